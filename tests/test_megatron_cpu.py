"""megatron-core's GPTModel (local spec) runs on CPU through the platform shim, and
tensor parallelism does not change the function: TP=1 and TP=2 give the same loss
and the same (gathered) gradients."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg import platform
from megatron_lpreg.model.builder import global_layer_name
from megatron_lpreg.tp_layout import gather_full, shard_of, tp_partition, unshard
from tests.distributed import Layout, RankFailed, run_ranks

VOCAB, SEQ, BATCH = 128, 16, 2


def _build_gpt():
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )



def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens, labels


def _loss_and_grads(full_weights: dict | None):
    """Build the model, load ``full_weights`` (sharded for this rank) if given,
    run forward+backward, return the loss and full (gathered) weights and grads."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = _build_gpt()
    group = ps.get_tensor_model_parallel_group()
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if full_weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                part = tp_partition(p)
                w = full_weights[global_layer_name(model, name)]
                p.copy_(w if part is None else shard_of(w, rank, tp, *part))

    tokens, labels = _batch()
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    per_token = model(tokens, pos, None, labels=labels)  # [b, s] fp32
    loss = per_token.mean()
    loss.backward()

    weights, grads = {}, {}
    for name, p in model.named_parameters():
        part = tp_partition(p)
        if part is None:
            weights[name], grads[name] = p.detach().clone(), p.grad.detach().clone()
        else:
            weights[name] = gather_full(p, *part, group)
            grads[name] = gather_full(p.grad, *part, group)
    return loss.item(), weights, grads


@pytest.fixture(scope="module")
def tp1():
    return run_ranks(_loss_and_grads, Layout(tp=1), None)[0]


def test_tp2_matches_tp1_loss_and_gradients(tp1):
    loss1, weights1, grads1 = tp1
    results = run_ranks(_loss_and_grads, Layout(tp=2), weights1)
    for loss2, weights2, grads2 in results:
        assert loss2 == pytest.approx(loss1, abs=1e-5)
        assert weights2.keys() == grads1.keys()
        for name in grads1:
            torch.testing.assert_close(weights2[name], weights1[name], rtol=0, atol=0)
            torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-5, atol=1e-5, msg=name)


def test_gradients_are_not_trivial(tp1):
    """Guards the equality test above against comparing zeros with zeros."""
    _, _, grads = tp1
    assert all(float(g.abs().max()) > 0 for g in grads.values())
    assert any(".mlp.linear_fc1." in n for n in grads)  # the stride-2 (SwiGLU) layout is covered


def test_tp_layout_round_trip():
    full = torch.arange(4 * 6).reshape(4, 6).float()
    for dim, stride in [(0, 1), (1, 1), (0, 2)]:
        shards = [shard_of(full, r, 2, dim, stride) for r in range(2)]
        assert torch.equal(unshard(shards, dim, stride), full)
    # stride 2 interleaves: rank 0 holds rows 0 and 2 of 4
    assert torch.equal(shard_of(full, 0, 2, 0, 2), full[[0, 2]])


def test_rank_failure_reports_the_rank_traceback():
    with pytest.raises(RankFailed, match="ZeroDivisionError"):
        run_ranks(_fail_on_rank_one, Layout(tp=2))


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ZeroDivisionError("boom")
    dist.barrier()  # rank 0 waits in a collective: the parent must not hang


def test_shim_is_a_no_op_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    before = torch.cuda.current_device
    assert platform.install_cpu_shims() is False
    assert torch.cuda.current_device is before
    assert platform.default_backend() == "nccl"


def _pipeline_loss_and_grads(full_weights: dict):
    """PP=2 through megatron's own pipeline schedule (p2p send/recv on gloo)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = _build_gpt()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full_weights[global_layer_name(model, name)])
    tokens, labels = _batch()
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)

    def forward_step(data_iterator, model):
        out = model(tokens, pos, None, labels=labels)

        def loss_func(per_token):
            loss = per_token.mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    grads = {global_layer_name(model, n): p.grad.detach().clone() for n, p in model.named_parameters()}
    loss = losses[0]["loss"].item() if ps.is_pipeline_last_stage() else None
    return loss, grads


def test_pp2_schedule_matches_single_stage(tp1):
    loss1, weights1, grads1 = tp1
    first, last = run_ranks(_pipeline_loss_and_grads, Layout(pp=2), weights1)
    assert first[0] is None and last[0] == pytest.approx(loss1, abs=1e-5)
    stage_grads = {**first[1], **last[1]}
    assert stage_grads.keys() == grads1.keys()
    assert first[1].keys().isdisjoint(last[1].keys())  # each stage owns its own layers
    for name, g in stage_grads.items():
        torch.testing.assert_close(g, grads1[name], rtol=1e-5, atol=1e-5, msg=name)

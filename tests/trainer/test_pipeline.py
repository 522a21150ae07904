"""The trainer's passes under pipeline parallelism: micro-batches of different shapes
through megatron's schedule at PP=2 (and TP=2 x PP=2) give the old-policy statistics
and the update's gradient of the single-stage model: every parameter's gradient,
reassembled from its stage and TP shards, with Lp-Reg selecting and regularising."""

from __future__ import annotations

import re

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.model.test_parity import _hf_configs, _hf_model, _megatron_from_hf
from tests.trainer.test_update import LP_REG, _batch, lp_reg_counts


def full_grads(gpt, vocab_size: int) -> dict[str, torch.Tensor]:
    """Every rank: its stage's gradients as full tensors (TP shards gathered), named with
    the global layer number; only TP rank 0 returns them. Padded vocabulary rows dropped."""
    from megatron.core import parallel_state as ps

    from megatron_lpreg.tp_layout import gather_full, tp_partition

    group = ps.get_tensor_model_parallel_group()
    offset = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(gpt.decoder.layers)}
    out = {}
    for name, p in gpt.named_parameters():
        part = tp_partition(p)
        g = gather_full(p.main_grad, *part, group) if part else p.main_grad.detach().clone()
        if "word_embeddings" in name or "output_layer" in name:
            g = g[:vocab_size]
        out[re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{offset[m.group(1)]}.", name)] = g
    return out if ps.get_tensor_model_parallel_rank() == 0 else {}


def _rank(cfg_dict, state):
    from megatron.core import parallel_state as ps

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.job import Groups
    from megatron_lpreg.trainer.batching import token_budget_micro_batches
    from megatron_lpreg.trainer.head import OutputHead
    from megatron_lpreg.trainer.logprobs import StatsConfig, sequence_stats
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp
    from megatron_lpreg.trainer.update import policy_update

    spec, gpt = _megatron_from_hf(cfg_dict, state)
    head = OutputHead(gpt, fused=False, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group())
    cfg = RunConfig()
    cfg.algo.micro_token_budget = 24  # several micro-batches of different shapes
    for k, v in LP_REG.items():
        setattr(cfg.algo, k, v)
    model = wrap_ddp(gpt, cfg)
    opt = make_optimizer(model, cfg.optim)
    batch = _batch(n=10)
    micro = token_budget_micro_batches(batch.seqs.lengths, cfg.algo.micro_token_budget)
    assert len({(len(m), int(batch.seqs.lengths[m].max())) for m in micro}) > 1
    st = sequence_stats(model, batch.seqs, micro, head, StatsConfig(proxy_threshold=0.1))
    rec = policy_update(model, opt, batch, list(range(10)), cfg.algo, head=head, groups=Groups.from_parallel_state(),
                        temperature=1.0)
    out = {"grads": full_grads(gpt, spec.vocab_size), "last": st is not None}
    if st is not None:
        mask = batch.seqs.mask > 0
        out.update(logprob=st["logprob"][mask], proxy=st["proxy_logprob"][mask], grad_norm=rec["grad_norm"],
                   lp_reg=lp_reg_counts(rec))
    return out


@pytest.fixture(scope="module")
def case():
    cfg = dict(_hf_configs()["qwen3"], vocab_size=500)
    model = _hf_model(cfg)
    return model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def single_stage(case):
    return run_ranks(_rank, 1, *case)[0]


def _merged_grads(results):
    out = {}
    for r in results:
        assert not set(out) & set(r["grads"]), "a parameter on two stages"
        out.update(r["grads"])
    return out


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(tp=2, pp=2)], ids=["pp2", "tp2pp2"])
def test_pipeline_matches_single_stage(case, single_stage, layout):
    ref = single_stage
    results = run_ranks(_rank, layout, *case)
    got = next(r for r in reversed(results) if r["last"])
    torch.testing.assert_close(got["logprob"], ref["logprob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["proxy"], ref["proxy"], rtol=1e-5, atol=1e-5)
    # Lp-Reg is exercised (tokens selected, some regularised) and selects the same tokens
    selected, regularised = ref["lp_reg"]
    assert 0 < regularised < selected and got["lp_reg"] == ref["lp_reg"], (got["lp_reg"], ref["lp_reg"])
    grads = _merged_grads(results)
    assert grads.keys() == ref["grads"].keys()
    scale = max(float(g.abs().max()) for g in ref["grads"].values())
    for name, want in ref["grads"].items():  # each tensor to 1e-4 of the largest gradient entry
        err = float((grads[name] - want).abs().max())
        assert err <= 1e-4 * scale, f"{name}: max |diff| {err:.3e} (scale {scale:.3e})"

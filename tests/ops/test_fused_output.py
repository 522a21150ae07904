"""The fused output layer equals output layer + foundation op: values and gradients for
hidden states and weight at TP=1/2/4 on gloo (fp32 to 1e-5; bf16 within 2e-2), with
sequence parallelism, and the no-grad statistics (proxy included)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks

T, H, V, VOCAB = 36, 24, 64, 61  # 36 = 4 chunks of 8 + a ragged one; splits over TP=2 for SP; padded vocab


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g) * 2
    weight = torch.randn(V, H, generator=g) / H**0.5
    target = torch.randint(0, VOCAB, (T,), generator=g)
    c_lp, c_h = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return hidden.to(dtype), weight.to(dtype), target, c_lp, c_h


def _rank(dtype, sequence_parallel):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lpreg.ops.fused_output import fused_logprob, fused_token_stats
    from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob

    group = ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    hidden, weight, target, c_lp, c_h = _inputs(dtype)
    w_shard = weight.chunk(tp)[rank].clone()

    # reference: the whole logits shard, then the foundation op
    h_ref = hidden.clone().requires_grad_()
    w_ref = w_shard.clone().requires_grad_()
    lp, ent = vocab_parallel_logprob(h_ref @ w_ref.t(), target, tp_group=group, vocab_size=VOCAB,
                                     temperature=0.7, with_entropy=True)
    ((lp * c_lp).sum() + (ent * c_h).sum()).backward()
    h_grad_ref = h_ref.grad.clone()
    dist.all_reduce(h_grad_ref, group=group)  # hidden is replicated: its gradient sums over ranks

    if sequence_parallel:
        h_in = hidden.chunk(tp)[rank].clone().requires_grad_()  # sequence-split
    else:
        h_in = hidden.clone().requires_grad_()
    w_in = w_shard.clone().requires_grad_()
    lp2, ent2 = fused_logprob(h_in, w_in, target, tp_group=group, vocab_size=VOCAB, temperature=0.7,
                              with_entropy=True, sequence_parallel=sequence_parallel, chunk_tokens=8)
    ((lp2 * c_lp).sum() + (ent2 * c_h).sum()).backward()
    h_grad_ref = h_grad_ref.chunk(tp)[rank] if sequence_parallel else h_grad_ref

    st_ref = token_stats(hidden @ w_shard.t(), target, tp_group=group, vocab_size=VOCAB, proxy="minp",
                         proxy_threshold=0.1)
    st = fused_token_stats(h_in.detach(), w_shard, target, tp_group=group, vocab_size=VOCAB, proxy="minp",
                           proxy_threshold=0.1, sequence_parallel=sequence_parallel, chunk_tokens=8)
    return {
        "lp": (lp2.detach(), lp.detach()), "ent": (ent2.detach(), ent.detach()),
        "h_grad": (h_in.grad, h_grad_ref), "w_grad": (w_in.grad, w_ref.grad),
        **{f"st_{f}": (getattr(st, f), getattr(st_ref, f)) for f in ("logprob", "entropy", "proxy_logprob",
                                                                     "in_proxy")},
    }


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (4, False), (2, True)], ids=["tp1", "tp2", "tp4", "tp2-sp"])
def test_fused_equals_unfused_fp32(tp, sp):
    for r in run_ranks(_rank, tp, torch.float32, sp):
        for key, (got, ref) in r.items():
            if ref.dtype == torch.bool:
                assert torch.equal(got, ref), key
            else:
                torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5, msg=key)


def test_fused_bf16_within_tolerance():
    for r in run_ranks(_rank, 2, torch.bfloat16, False):
        for key in ("lp", "ent", "h_grad", "w_grad"):
            got, ref = r[key]
            torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=key)


def test_shape_errors():
    from megatron_lpreg.ops.fused_output import fused_logprob

    with pytest.raises(ValueError, match="must be"):
        fused_logprob(torch.randn(4, 8), torch.randn(16, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        fused_logprob(torch.randn(4, 8), torch.randn(16, 8), torch.zeros(5, dtype=torch.long))

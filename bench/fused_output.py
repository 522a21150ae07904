"""Benchmark: fused output layer + log-prob vs output layer then the foundation op.

Side by side in one run, per (tokens, TP) point, in fresh gloo ranks, forward +
backward of ``sum(c1 * log p + c2 * H)`` with gradients for the hidden states and
the weight shard:

  unfused       logits = hidden @ W_shard^T, then vocab_parallel_logprob
  fused         fused_logprob (chunks of --chunk tokens, logits recomputed in backward)
  fused_loss    fused_logprob_loss (the loss is token-separable: gradients formed in the
                forward, no recompute; what the trainer uses for PPO/GRPO/Lp-Reg)

Reports seconds and peak RSS growth beyond the gradients both methods must
return (VmHWM after a reset minus the weight-shard and hidden-state gradients, per
rank, max over ranks) and the ratios of each fused method to unfused. Targets (issue 10):
memory <= 1/8, time <= 1.2x on CPU. Prints one JSON document.

    python bench/fused_output.py                           # hidden 5120, vocab 152,064, 4096 tokens, TP 2
    python bench/fused_output.py --tokens 4096 8192 --tp 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from proc_status import reset_peak, status_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg.local_ranks import run_ranks  # noqa: E402

METHODS = ("unfused", "fused", "fused_loss")


def _rank(tokens: int, hidden: int, vocab: int, chunk: int, method: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lpreg.ops.fused_output import fused_logprob, fused_logprob_loss
    from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob

    group = ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(0)
    padded = -(-vocab // (128 * tp)) * 128 * tp
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(padded // tp, hidden, generator=g) / hidden**0.5
    target = torch.randint(0, vocab, (tokens,), generator=g)
    c1, c2 = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)
    h.requires_grad_()
    w.requires_grad_()
    dist.barrier()
    base = status_bytes("VmRSS")
    reset_peak()
    t = time.perf_counter()
    def loss_of(lp, ent):
        return (lp * c1).sum() + (ent * c2).sum(), None

    if method == "fused_loss":
        zeros = torch.zeros(tokens)
        loss, lp, _, _ = fused_logprob_loss(h, w, target, loss_of, placeholder_logprob=zeros, placeholder_entropy=zeros,
                                            tp_group=group, vocab_size=vocab, with_entropy=True, chunk_tokens=chunk)
    else:
        if method == "fused":
            lp, ent = fused_logprob(h, w, target, tp_group=group, vocab_size=vocab, with_entropy=True,
                                    chunk_tokens=chunk)
        else:
            lp, ent = vocab_parallel_logprob(h @ w.t(), target, tp_group=group, vocab_size=vocab, with_entropy=True)
        loss, _ = loss_of(lp, ent)
    loss.backward()
    if method == "unfused":
        dist.all_reduce(h.grad, group=group)  # what the column-parallel layer's backward does
    seconds = time.perf_counter() - t
    # the gradients of the weight shard and the hidden states are results every method
    # must hold; what differs is everything else (logits, their gradient, temporaries)
    grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
    peak = status_bytes("VmHWM") - base - grads
    return {"seconds": seconds, "peak_extra_bytes": peak, "lp_sum": float(lp.sum()), "rank": rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--chunk", type=int, default=None, help="fused chunk tokens (default: tokens / 16)")
    ap.add_argument("--methods", nargs="+", choices=METHODS[1:], default=list(METHODS[1:]),
                    help="fused methods to run beside the unfused one")
    args = ap.parse_args()
    results = []
    for tokens in args.tokens:
        for tp in args.tp:
            chunk = args.chunk or max(1, tokens // 16)
            point = {"tokens": tokens, "tp": tp, "hidden": args.hidden, "vocab": args.vocab, "chunk": chunk}
            methods = ["unfused", *args.methods]
            for method in methods:
                per_rank = run_ranks(_rank, tp, tokens, args.hidden, args.vocab, chunk, method, timeout=3600)
                point[f"{method}_s"] = round(max(r["seconds"] for r in per_rank), 3)
                point[f"{method}_peak_mb"] = round(max(r["peak_extra_bytes"] for r in per_rank) / 2**20, 1)
                point[f"{method}_lp_sum"] = per_rank[0]["lp_sum"]
            for method in methods[1:]:
                point[f"{method}_time_ratio"] = round(point[f"{method}_s"] / point["unfused_s"], 3)
                point[f"{method}_memory_ratio"] = round(
                    point[f"{method}_peak_mb"] / max(point["unfused_peak_mb"], 1e-9), 3)
                point[f"{method}_same_result"] = abs(point[f"{method}_lp_sum"] - point["unfused_lp_sum"]) <= 1e-4 * abs(
                    point["unfused_lp_sum"])
            results.append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "fused_output", "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "targets": {"memory_ratio": 0.125, "time_ratio": 1.2}, "results": results}, indent=2))


if __name__ == "__main__":
    main()

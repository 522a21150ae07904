"""Benchmark: the vocab-parallel Lp-Reg op vs the naive reference path vs megatron's CE.

Side by side in one run, at a Qwen-size vocabulary, TP=1 and TP=2 (gloo ranks on
CPU, NCCL on GPU), for each token count:

  (a) ours:     token_stats (log-prob + entropy + min-p proxy), forward only
  (b) naive:    what the reference does: full softmax, mask p < kappa*p_max,
                renormalise, log_softmax over the whole row (TP=1 only: it needs
                the whole row, i.e. an all-gather at TP>1)
  (c) megatron: megatron-core's vocab_parallel_cross_entropy alone
  (ours_bwd / megatron_bwd) the update pass: our autograd log-prob vs megatron's
                CE, forward and backward (both end holding a logits-sized gradient)

Each (tokens, TP) point runs in fresh processes (one per rank) that call every
method in turn, repeatedly, so machine noise hits all methods alike; times are
medians. "peak extra" is the rise of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs, after malloc_trim hands freed heap pages back, so that a
call's own temporaries are counted) over its RSS with the inputs allocated; on GPU,
torch.cuda.max_memory_allocated above the inputs. Prints one JSON document.

    python bench/vocab_parallel.py                       # defaults below
    python bench/vocab_parallel.py --tokens 4096 --tp 1  # one point
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import statistics
import sys
import time

import torch
from proc_status import status_bytes

from megatron_lpreg.local_ranks import Layout, run_ranks

KAPPA = 0.02


# --------------------------------------------------------------------------- memory


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


class _Peak:
    """Peak memory above the current level, on GPU or (via RSS) on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            # Hand freed heap pages back first: otherwise a call that reuses them
            # does not raise the RSS and its temporaries go uncounted.
            _libc().malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = status_bytes("VmRSS")

    def extra(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return status_bytes("VmHWM") - self.base


# --------------------------------------------------------------------------- methods


def naive_stats(logits, target):
    """The reference's dense path on the full row (TP=1)."""
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)
    lp = logp.gather(1, target[:, None]).squeeze(1)
    p = torch.softmax(x, dim=-1)
    entropy = torch.logsumexp(x, dim=-1) - (p * x).sum(-1)
    keep = p >= KAPPA * p.max(dim=-1, keepdim=True).values
    masked = torch.where(keep, x, torch.full_like(x, -1e4))
    proxy = torch.log_softmax(masked, dim=-1).gather(1, target[:, None]).squeeze(1)
    return lp, entropy, proxy


def _run_once(kind, logits, target, victim, leaf, group):
    """One call of one method. A function of its own so that every output and
    autograd graph it makes is freed on return, before the next baseline."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob

    if kind == "ours":
        token_stats(logits, target, proxy="minp", proxy_threshold=KAPPA, tp_group=group)
    elif kind == "naive":
        naive_stats(logits, target)
    elif kind == "megatron":
        with torch.no_grad():
            vocab_parallel_cross_entropy(victim, target)
    elif kind == "ours_bwd":  # log-prob only: the same job as megatron's CE
        vocab_parallel_logprob(leaf, target, tp_group=group).sum().backward()
    elif kind == "megatron_bwd":
        victim.requires_grad_(True)
        vocab_parallel_cross_entropy(victim, target).sum().backward()
    else:
        raise ValueError(kind)


def _measure(kinds: list[str], n_tokens: int, vocab: int, dtype_name: str, repeats: int):
    """Runs on every rank of the TP group: for each repetition, every method once,
    interleaved, so that machine noise hits all methods alike. Returns per method
    the median time and the max peak extra memory (the slowest / largest rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    group = ps.get_tensor_model_parallel_group()
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    local_v = vocab // tp
    g = torch.Generator(device=dev).manual_seed(100 + rank)
    logits = (torch.randn(n_tokens, local_v, generator=g, device=dev) * 3).to(dtype)
    target = torch.randint(0, vocab, (n_tokens,), generator=torch.Generator(device=dev).manual_seed(5), device=dev)
    peak = _Peak(dev)
    times = {k: [] for k in kinds}
    extras = {k: [] for k in kinds}

    for it in range(repeats + 1):  # the first round warms up and is not recorded
        for kind in kinds:
            # megatron's CE writes into its input; give it a fresh copy each time,
            # made before the memory baseline (in training the logits are its own).
            victim = logits.clone() if kind.startswith("megatron") else None
            leaf = logits.detach().clone().requires_grad_(True) if kind.endswith("bwd") else None
            if dist.is_initialized():
                dist.barrier(group=group)
            peak.reset()
            t0 = time.perf_counter()
            _run_once(kind, logits, target, victim, leaf, group)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            extra = peak.extra()
            del victim, leaf
            if it:
                times[kind].append(dt)
                extras[kind].append(extra)
    out = {}
    for kind in kinds:
        stats = torch.tensor([statistics.median(times[kind]), float(max(extras[kind]))], dtype=torch.float64, device=dev)
        if dist.is_initialized() and tp > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        out[kind] = dict(seconds=stats[0].item(), peak_extra_bytes=int(stats[1].item()),
                         logits_bytes_per_rank=logits.numel() * logits.element_size())
    return out


def _point(kinds, n_tokens, tp, args):
    res = run_ranks(_measure, Layout(tp=tp), kinds, n_tokens, args.vocab, args.dtype, args.repeats,
                    timeout=3600)[0]
    for kind, r in res.items():
        r.update(kind=kind, tokens=n_tokens, tp=tp)
        print(f"  {kind:13s} tokens={n_tokens:6d} tp={tp}  {r['seconds']:.3f}s  "
              f"peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936, help="padded vocabulary (Qwen: 151936)")
    ap.add_argument("--tokens", default="4096,8192", help="comma-separated token counts")
    ap.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-max-gib", type=float, default=12.0,
                    help="skip the naive path where its estimated peak exceeds this (it needs ~5 row copies)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not os.path.exists("/proc/self/clear_refs"):
        sys.exit("this benchmark measures CPU memory through /proc (Linux only)")

    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        for n in [int(t) for t in args.tokens.split(",")]:
            kinds = ["ours", "megatron", "ours_bwd", "megatron_bwd"]
            naive_gib = 5 * n * args.vocab * 4 / 2**30
            if tp == 1 and naive_gib <= args.naive_max_gib:
                kinds.append("naive")
            point = _point(kinds, n, tp, args)
            a, c = point["ours"], point["megatron"]
            row = dict(
                tokens=n,
                tp=tp,
                results=point,
                ratio_time_a_over_c=a["seconds"] / c["seconds"],
                ratio_time_update_a_over_c=point["ours_bwd"]["seconds"] / point["megatron_bwd"]["seconds"],
            )
            if "naive" in point:
                b = point["naive"]
                row["ratio_time_a_over_b"] = a["seconds"] / b["seconds"]
                row["ratio_peak_extra_a_over_b"] = a["peak_extra_bytes"] / max(b["peak_extra_bytes"], 1)
            else:
                row["naive_skipped"] = (
                    "needs the whole row (all-gather) at TP>1" if tp > 1
                    else f"estimated {naive_gib:.1f} GiB > --naive-max-gib"
                )
            rows.append(row)

    def worst(key):
        vals = [r[key] for r in rows if key in r]
        return max(vals) if vals else math.nan

    report = dict(
        benchmark="vocab_parallel",
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        torch=torch.__version__,
        vocab=args.vocab,
        dtype=args.dtype,
        rows=rows,
        targets=dict(
            time_a_over_c=dict(target=1.5, worst=worst("ratio_time_a_over_c")),
            peak_extra_a_over_b=dict(target=0.25, worst=worst("ratio_peak_extra_a_over_b")),
        ),
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

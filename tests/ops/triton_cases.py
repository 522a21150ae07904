"""Triton kernels vs the torch path, case by case: each function returns
``{name: max |triton - torch|}`` (or a 0/1 flag), asserted in ``test_triton.py``.

Run in a fresh process with ``TRITON_INTERPRET=1`` on CPU (the interpreter must be
on before ``triton`` is first imported, which other tests' imports would preempt),
in-process on CUDA::

    TRITON_INTERPRET=1 python -m tests.ops.triton_cases   # JSON on stdout
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from megatron_lpreg.ops import vocab_parallel as vp

PROXIES = [("minp", 0.02), ("minp_soft", 0.02), ("fixed", 1e-3)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _logits(rows: int, cols: int, seed: int, dtype, device):
    """``[rows, cols]`` with a spread that puts tokens on both sides of the proxy's
    edge, one -inf logit and one row dominated by a single token."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g) * 3
    z[0, 1] = -math.inf
    z[1, :] = -4.0
    z[1, 2] = 10.0
    return z.to(dtype).to(device)


def _targets(rows: int, vocab: int, seed: int, device):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[1] = 2  # the dominant token
    return t.to(device)


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|; equal infinities (a -inf logit's log-prob) count as equal."""
    a, b = a.float(), b.float()
    return float(torch.where(a == b, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


def _beyond_bf16_ulp(a: torch.Tensor, b: torch.Tensor) -> float:
    """max of |a - b| minus b's bf16 spacing (8 significand bits), at least 0: bf16
    gradients are fp32 values rounded on both sides, so they may differ by one unit."""
    b32 = b.float()
    ulp = torch.exp2(torch.floor(torch.log2(b32.abs().clamp(min=1e-30))) - 7)
    return float(((a.float() - b32).abs() - ulp).clamp(min=0).max())


def _stats_diffs(a, b, proxy: str) -> dict[str, float]:
    # minp_soft gives every token a proxy log-prob; the others a sentinel outside the proxy
    inside = torch.ones_like(a.in_proxy) if proxy == "minp_soft" else a.in_proxy
    return {
        "logprob": _max(a.logprob, b.logprob),
        "entropy": _max(a.entropy, b.entropy),
        "proxy_logprob": _max(a.proxy_logprob[inside], b.proxy_logprob[inside]),
        "membership_differs": float((a.in_proxy != b.in_proxy).sum()),
        "outside_not_sentinel": float((b.proxy_logprob[~inside] > vp.PROXY_SENTINEL).sum()),
        "one_side_only": float(bool(a.in_proxy.all()) or not bool(a.in_proxy.any())),
    }


def token_stats_cases(device) -> dict[str, float]:
    out = {}
    # ties exactly at the min-p edge are kept (d >= log kappa), one fp32 step below is not
    at = torch.tensor(math.log(0.25), dtype=torch.float32)
    below = torch.nextafter(at, torch.tensor(-math.inf))
    z = torch.full((4, 40), -3.0)
    z[:, :4] = torch.stack([torch.tensor(0.0), at, at, below])
    z, t = z.to(device), torch.tensor([1, 2, 3, 0], device=device)
    for proxy in ("minp", "minp_soft"):
        a, b = (vp.token_stats(z, t, proxy=proxy, proxy_threshold=0.25, backend=bk) for bk in ("torch", "triton"))
        for k, v in _stats_diffs(a, b, proxy).items():
            out[f"stats/fp32/tie-{proxy}/{k}"] = v
    for dname, dtype in DTYPES.items():
        for proxy, thr in PROXIES:
            for temperature in (1.0, 0.7):
                z, t = _logits(6, 53, 0, dtype, device), _targets(6, 47, 0, device)  # 47 true of 53 columns
                z[:, 47:] = 60.0  # padding that would dominate every statistic if it leaked in
                a, b = (vp.token_stats(z, t, proxy=proxy, proxy_threshold=thr, temperature=temperature, vocab_size=47,
                                       backend=bk, chunk_tokens=4) for bk in ("torch", "triton"))
                for k, v in _stats_diffs(a, b, proxy).items():
                    out[f"stats/{dname}/{proxy}/T{temperature}/{k}"] = v
    return out


def gradient_cases(device) -> dict[str, float]:
    out = {}
    g = torch.Generator().manual_seed(7)
    w_lp, w_h = torch.randn(5, generator=g).to(device), torch.randn(5, generator=g).to(device)
    for dname, dtype in DTYPES.items():
        for with_entropy in (True, False):
            z, t = _logits(5, 41, 1, dtype, device), _targets(5, 37, 1, device)
            res = {}
            for backend in ("torch", "triton"):
                leaf = z.clone().requires_grad_(True)
                r = vp.vocab_parallel_logprob(leaf, t, temperature=0.8, vocab_size=37, with_entropy=with_entropy,
                                              backend=backend, chunk_tokens=3)
                lp, h = r if with_entropy else (r, torch.zeros(5, device=device))
                ((lp * w_lp).sum() + (h * w_h).sum()).backward()
                res[backend] = (lp.detach(), h.detach(), leaf.grad)
            (lp_a, h_a, g_a), (lp_b, h_b, g_b) = res["torch"], res["triton"]
            key = f"grad/{dname}/{'entropy' if with_entropy else 'logprob'}"
            out[f"{key}/logprob"] = _max(lp_a, lp_b)
            out[f"{key}/entropy"] = _max(h_a, h_b)
            if dtype == torch.bfloat16:
                out[f"{key}/grad_beyond_one_ulp"] = _beyond_bf16_ulp(g_b, g_a)
            else:
                out[f"{key}/grad"] = _max(g_a, g_b)
            out[f"{key}/grad_dtype_differs"] = float(g_b.dtype != dtype)
            out[f"{key}/padded_grad_nonzero"] = float((g_b[:, 37:] != 0).sum())
    return out


def fused_cases(device) -> dict[str, float]:
    from megatron_lpreg.ops.fused_output import fused_logprob, fused_logprob_loss, fused_token_stats

    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(7, 12, generator=g) * 2).to(device)
    weight = (torch.randn(29, 12, generator=g) / 12**0.5).to(device)
    target = torch.randint(0, 27, (7,), generator=g).to(device)
    names = ["lp", "entropy", "grad_hidden", "grad_weight", "loss", "loss_grad_hidden", "loss_grad_weight",
             "stats_logprob", "stats_proxy_logprob"]
    res = {}
    for backend in ("torch", "triton"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = fused_logprob(h, w, target, vocab_size=27, with_entropy=True, chunk_tokens=3, temperature=0.9,
                                backend=backend)
        (lp.sum() + 0.3 * ent.sum()).backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, *_ = fused_logprob_loss(h2, w2, target, lambda lp, e: ((lp * 1.5).sum() - e.sum(), None),
                                      placeholder_logprob=torch.zeros(7, device=device),
                                      placeholder_entropy=torch.zeros(7, device=device), vocab_size=27,
                                      with_entropy=True, chunk_tokens=3, backend=backend)
        loss.backward()
        st = fused_token_stats(hidden, weight, target, vocab_size=27, chunk_tokens=3, backend=backend)
        res[backend] = [lp, ent, h.grad, w.grad, loss, h2.grad, w2.grad, st.logprob, st.proxy_logprob]
    return {f"fused/{n}": _max(a.detach(), b.detach()) for n, a, b in zip(names, res["torch"], res["triton"],
                                                                            strict=True)}


def _tp_rank() -> dict[str, float]:
    """On each of 2 gloo ranks: both backends on this rank's shard."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lpreg.ops import triton_rows

    triton_rows.MAX_TILE = 16

    group = ps.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    out = {}
    # 61 of 64 columns (padding on rank 1); 30 of 64 (rank 1 holds only padding)
    for vocab in (61, 30):
        z, t = _logits(6, 64, 5, torch.float32, "cpu"), _targets(6, vocab, 5, "cpu")
        shard = z[:, rank * 32:(rank + 1) * 32].contiguous()
        for proxy, thr in PROXIES:
            a, b = (vp.token_stats(shard, t, proxy=proxy, proxy_threshold=thr, temperature=0.7, tp_group=group,
                                   vocab_size=vocab, backend=bk) for bk in ("torch", "triton"))
            for k, v in _stats_diffs(a, b, proxy).items():
                if k != "one_side_only":
                    out[f"tp2/V{vocab}/{proxy}/{k}"] = v
        grads = []
        for backend in ("torch", "triton"):
            leaf = shard.clone().requires_grad_(True)
            lp, h = vp.vocab_parallel_logprob(leaf, t, tp_group=group, vocab_size=vocab, with_entropy=True,
                                              backend=backend)
            (lp.sum() - 0.5 * h.sum()).backward()
            grads.append(leaf.grad)
        out[f"tp2/V{vocab}/grad"] = _max(grads[0], grads[1])
    return out


def tp2_cases() -> dict[str, float]:
    from megatron_lpreg.local_ranks import Layout, run_ranks

    per_rank = run_ranks(_tp_rank, Layout(tp=2, pp=1, dp=1))
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


def error_cases(device) -> dict[str, float]:
    z = _logits(3, 9, 2, torch.float32, device)
    z[2, 4] = math.nan
    try:
        vp.token_stats(z, _targets(3, 9, 2, device), backend="triton")
        raised = False
    except ValueError as e:
        raised = "token 2 contain NaN" in str(e)
    return {"errors/nan_not_reported": float(not raised)}


def run_all(device: str, *, with_tp2: bool = True) -> dict[str, float]:
    from megatron_lpreg.ops import triton_rows

    triton_rows.MAX_TILE = 16  # rows of 30-64 columns then span 2-4 tiles: the online rescaling runs
    out = {}
    for fn in (token_stats_cases, gradient_cases, fused_cases, error_cases):
        out.update(fn(device))
    if with_tp2:
        out.update(tp2_cases())
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        sys.exit("triton_cases: set TRITON_INTERPRET=1 on a machine without CUDA")
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    print(json.dumps(run_all(dev, with_tp2=dev == "cpu")))

"""Per-token log-prob, entropy and Lp-Reg proxy log-prob over a vocab-parallel logits shard.

The math is below; the proxy's role in Lp-Reg: ``docs/reference_semantics.md``. Rank ``r`` of a tensor-parallel
group of size ``tp`` holds the logits columns ``[r * V/tp, (r + 1) * V/tp)`` of the
(padded) vocabulary, megatron-core's convention. Every quantity is assembled from
per-shard partial sums joined by all-reduces; no rank ever holds a full vocabulary
row.

For each token with tempered logits ``x = z / T``, ``m = max_v x_v`` and
``d = x - m``:

* ``S  = sum_v exp(d_v)``                -> ``log pi(y) = d_y - log S``
* ``Sd = sum_v exp(d_v) * d_v``          -> ``H = log S - Sd / S``
* ``S_K = sum_{v in K} exp(d_v)``        -> ``log pi_proxy(y) = d_y - log S_K`` (y in K)

where the kept set ``K`` of the proxy is chosen on the *untempered* logits (the
reference filters before applying the temperature):

* ``minp``: ``z_v >= max z + log(kappa)``  <=>  ``d_v >= log(kappa) / T``
* ``fixed``: ``softmax(z)_v >= tau``  <=>  ``d_v >= (log S_raw + log(tau)) / T``
  where ``S_raw = sum exp(T * d_v)`` (``= S`` at T = 1); needs one more all-reduce.
* ``minp_soft``: filtered logits are set to the row minimum instead of removed:
  ``S' = S_K + (V - |K|) * exp(d_min)`` and a filtered target gets ``d_min - log S'``.

Structure. Tokens go in *chunks* (one collective round each: ``chunk_tokens``,
default all tokens) and, inside a chunk, in cache-sized *blocks* of rows
(``block_elements`` fp32 temporaries, reused): one pass reads the shard for the
row max, one all-reduce-MAX; a second blocked pass accumulates the partial sums,
one all-reduce-SUM of a few numbers per token. ``fixed`` adds one blocked pass and
one SUM. Backward passes need no collective: ``d log pi(y) / d x_v = 1[v = y] - p_v``
and ``d H / d x_v = -p_v (log p_v + H)`` are local to each shard given ``m``,
``log S`` and ``H``.

The caller's logits are never modified: in-place operations act only on the
temporaries this module allocated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lpreg import collectives

PROXY_KINDS = ("minp", "minp_soft", "fixed")
BACKENDS = ("auto", "torch", "triton")

# The reference sets filtered logits to -1e4, so a filtered target's proxy
# log-prob is about -1e4. We return min(-1e4, log pi(y)): close to the reference
# and, whatever the logit range, never above log pi(y), so the Lp-Reg gate
# ``log pi < log pi_proxy`` can never select a token outside the proxy's support.
PROXY_SENTINEL = -1e4

# fp32 elements of one block temporary. CPU (4 MiB): small enough that a block's
# several passes run from cache, large enough that per-block Python overhead is
# noise at a 150k vocabulary (measured in bench/vocab_parallel.py). CUDA (128 MiB):
# a pass is a kernel launch that streams from HBM, there is no cache to fit, and a
# block of 6 rows at a 151,936 vocabulary would be launch overhead; two temporaries
# of this size are small next to a chunk of logits.
DEFAULT_BLOCK_ELEMENTS = 1 << 20
CUDA_BLOCK_ELEMENTS = 1 << 25


def block_elements_for(device) -> int:
    """The default block temporary size (elements) on ``device``."""
    return CUDA_BLOCK_ELEMENTS if torch.device(device).type == "cuda" else DEFAULT_BLOCK_ELEMENTS


@dataclass
class TokenStats:
    """Per-token results, all ``[*]`` (the leading shape of the logits).

    logprob, entropy, proxy_logprob: fp32 (fp64 for fp64 logits). in_proxy: bool,
    True where the target is inside the proxy's kept set (its proxy log-prob is
    then exact; elsewhere it is a sentinel <= min(-1e4, logprob)).
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    proxy_logprob: torch.Tensor
    in_proxy: torch.Tensor


@dataclass(frozen=True)
class _Shard:
    """Where this rank's columns sit in the global vocabulary, and how to walk them."""

    start: int  # global id of local column 0
    n_local: int  # columns held (padded vocabulary / tp)
    n_valid: int  # leading local columns that are real tokens (< vocab_size)
    vocab_size: int  # true vocabulary size (without padding)
    chunk: int  # tokens per collective round
    block: int  # rows per cache block (<= chunk)
    dtype: torch.dtype  # compute dtype
    backend: str = "torch"  # "torch" (blocked passes) or "triton" (ops/triton_rows.py)


# ---------------------------------------------------------------------------
# input checks and geometry


def _effective_group(group):
    """None for a missing or one-rank group: its collectives would be no-ops that cost."""
    if group is not None and dist.get_world_size(group) == 1:
        return None
    return group


def _check_logits(logits, temperature, chunk_tokens, block_elements):
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor [..., vocab/tp]")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    if block_elements is not None and block_elements < 1:
        raise ValueError(f"block_elements must be >= 1 or None (by device), got {block_elements}")


def _check_target(logits, target):
    if not isinstance(target, torch.Tensor) or target.shape != logits.shape[:-1]:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(
            f"target shape {shape} must equal the logits' leading shape "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of token ids, got {target.dtype}")


def _check_target_range(target: torch.Tensor, shard: _Shard) -> None:
    if target.numel() == 0:
        return
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= shard.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"target id {bad} is outside the true vocabulary [0, {shard.vocab_size}); "
            "ids in the padded tail are not tokens"
        )


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """``auto``: Triton for CUDA logits when it can run, else torch; ``triton``: Triton
    or a one-line error saying why not; ``torch``: the blocked torch path."""
    if backend not in BACKENDS:
        raise ValueError(f"ops backend {backend!r} is not one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and not logits.is_cuda):
        return "torch"
    why = _triton_unusable(logits)
    if why is None:
        return "triton"
    if backend == "auto":
        return "torch"
    raise RuntimeError(f"ops backend 'triton' cannot run here: {why}")


def _triton_unusable(logits: torch.Tensor) -> str | None:
    if logits.dtype == torch.float64:
        return "fp64 logits (the kernels compute in fp32); use the torch backend"
    try:
        from megatron_lpreg.ops import triton_rows
    except ImportError:
        return "triton is not installed"
    if not logits.is_cuda and not triton_rows.interpreted():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before the kernels are imported)"
    return None


def _make_shard(logits, group, vocab_size, chunk_tokens, block_elements, backend: str = "torch") -> _Shard:
    rank, tp = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    n_local = logits.shape[-1]
    padded = n_local * tp
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {padded}] "
            f"(= {n_local} local columns x tensor-parallel size {tp})"
        )
    start = rank * n_local
    n_tokens = max(1, math.prod(logits.shape[:-1]))
    if block_elements is None:
        block_elements = block_elements_for(logits.device)
    return _Shard(
        start=start,
        n_local=n_local,
        n_valid=min(max(vocab_size - start, 0), n_local),
        vocab_size=vocab_size,
        chunk=min(chunk_tokens or n_tokens, n_tokens),
        block=min(max(1, block_elements // max(n_local, 1)), chunk_tokens or n_tokens, n_tokens),
        # fp32 accumulation for half precision; fp64 stays fp64 (gradcheck)
        dtype=torch.promote_types(logits.dtype, torch.float32),
        backend=resolve_backend(backend, logits),
    )


def _spans(lo: int, hi: int, step: int):
    for a in range(lo, hi, step):
        yield a, min(a + step, hi)


# ---------------------------------------------------------------------------
# collectives: the only places this module talks to other ranks


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        collectives.all_reduce(t, op, group)
    return t


def all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX, group)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM, group)


# ---------------------------------------------------------------------------
# small steps shared by the forward-only and autograd paths


def _global_max(logits2d, lo, hi, shard, temperature, group, *, with_min=False):
    """Tempered row max over the true vocabulary, ``[hi - lo]`` (and row min), one
    all-reduce-MAX (the min rides along negated). NaN and +inf rows come out as
    +inf on every rank, so all ranks raise together instead of one rank leaving
    the others waiting in a collective."""
    n = hi - lo
    if shard.n_valid == 0:  # this rank holds only padding columns
        local = torch.full((n, 2 if with_min else 1), -math.inf, dtype=shard.dtype, device=logits2d.device)
    else:
        x = logits2d[lo:hi, : shard.n_valid]
        cols = [x.amax(dim=1)]  # exact in the input dtype; no fp32 copy of the rows
        if with_min:
            cols.append(-x.amin(dim=1))
        local = torch.stack(cols, dim=1).to(shard.dtype)
        local = torch.where(torch.isnan(local), math.inf, local)
    red = all_reduce_max(local, group)
    m = red[:, 0]
    _check_max(m, lo)
    m = m / temperature if temperature != 1.0 else m
    mn = None
    if with_min:
        mn = -red[:, 1]
        mn = mn / temperature if temperature != 1.0 else mn
    return m, mn


def _check_max(m: torch.Tensor, lo: int) -> None:
    """Raise, on every rank alike, when a row's all-reduced max is not finite."""
    bad = ~torch.isfinite(m)
    if bool(bad.any()):
        i = lo + int(bad.nonzero()[0])
        raise ValueError(
            f"logits of token {i} contain NaN or +inf, or are all -inf; cannot form a distribution"
        )


class _Blocks:
    """Reusable block temporaries ``[block, n_valid]`` in the compute dtype."""

    def __init__(self, shard: _Shard, device, n: int = 2):
        self.bufs = [torch.empty(shard.block, shard.n_valid, dtype=shard.dtype, device=device) for _ in range(n)]

    def get(self, rows: int):
        return [b[:rows] for b in self.bufs]


def _shift_into(x: torch.Tensor, m: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """out <- x / T - m (``d``) in out's dtype; x ``[rows, n_valid]`` is only read.
    The single place d is computed, so a recomputation reproduces it bit for bit."""
    if x.dtype == out.dtype:
        if temperature != 1.0:
            torch.div(x, temperature, out=out).sub_(m.unsqueeze(1))
        else:
            torch.sub(x, m.unsqueeze(1), out=out)
    else:  # half precision: convert first so that the arithmetic is fp32
        out.copy_(x)
        if temperature != 1.0:
            out.div_(temperature)
        out.sub_(m.unsqueeze(1))
    return out


def _shifted(logits2d, a, b, shard, temperature, m_block, out):
    """d for rows [a, b) into the block temporary ``out``."""
    return _shift_into(logits2d[a:b, : shard.n_valid], m_block, temperature, out)


def _target_columns(target: torch.Tensor, shard: _Shard):
    """Local column of each target and whether this rank owns it."""
    local = target - shard.start
    owned = (local >= 0) & (local < shard.n_valid)
    return local.clamp(0, max(shard.n_valid - 1, 0)), owned


def _pick(d: torch.Tensor, col: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """d[i, col_i] where this rank owns the target, else 0 (so a SUM assembles it)."""
    if d.shape[1] == 0:
        return torch.zeros(d.shape[0], dtype=d.dtype, device=d.device)
    return torch.where(owned, d.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)


def _redo_rows(logits2d, rows: torch.Tensor, shard, temperature, m_rows) -> torch.Tensor:
    """d afresh for the global rows ``rows`` (int64 ``[k]``; ``m_rows [k]``): the rare
    rows the one-pass sums could not settle, after the block temporaries were reused."""
    x = logits2d[rows, : shard.n_valid]
    return _shift_into(x, m_rows, temperature, torch.empty(x.shape, dtype=shard.dtype, device=x.device))


def _exp_sums(d: torch.Tensor, e: torch.Tensor):
    """e <- exp(d); returns S = sum e and Sd = sum e * d per row, and the rows whose Sd is
    NaN: a -inf logit makes 0 * -inf (its true term is 0), settled by :func:`_settle`.
    Overwrites d (with e * d: no temporary). No host sync."""
    torch.exp(d, out=e)
    s = e.sum(dim=1)
    sd = d.mul_(e).sum(dim=1)
    return s, sd, torch.isnan(sd)


def _kept_sum_exact(d: torch.Tensor, e: torch.Tensor, thr) -> torch.Tensor:
    """sum of e over the kept set ``d >= thr`` (thr scalar or ``[rows, 1]``); overwrites e."""
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    return torch.where(d >= thr, e, zero, out=e).sum(dim=1)


# Relative half-width of the band around exp(thr) where e alone cannot decide
# membership; far above the error of exp (~1 ulp).
_BAND = 1e-5


def _kept_sum(e: torch.Tensor, thr: float):
    """sum of e = exp(d) over the kept set ``d >= thr`` (scalar thr), per row, and the rows
    it could not settle; overwrites e. No host sync.

    The boolean ``d >= thr`` / ``where`` path costs about four passes on CPU;
    an in-place ``threshold`` on e costs one. Summing ``e > c (1 - band)`` and then
    ``e > c (1 + band)`` (c = exp(thr)) gives bitwise-equal rows unless some
    element's e lies in the band; only those rows (returned) need the exact d-space
    test (:func:`_settle`), so the result equals the exact sum up to float rounding
    (a band element small enough to vanish in both sums changes the exact sum by
    less than its rounding).
    """
    c = math.exp(thr)
    lo = F.threshold_(e, c * (1 - _BAND), 0.0).sum(dim=1)
    hi = F.threshold_(e, c * (1 + _BAND), 0.0).sum(dim=1)
    return hi, hi != lo


def _settle(logits2d, lo: int, shard, temperature, m, *, sd=None, nan_sd=None, s_k=None, band=None, thr=None):
    """Redo exactly, in place, what the one-pass sums left open in a chunk starting at row
    ``lo`` (``[c]`` each): ``sd`` where ``nan_sd``, ``s_k`` (kept set ``d >= thr``) where
    ``band``. One host sync per chunk, not one per block."""
    masks = [x for x in (nan_sd, band) if x is not None]
    if not masks:
        return
    todo = masks[0] if len(masks) == 1 else masks[0] | masks[1]
    if not bool(todo.any()):
        return
    idx = todo.nonzero().squeeze(1)
    d = _redo_rows(logits2d, idx + lo, shard, temperature, m[idx])
    e = torch.exp(d)
    if nan_sd is not None:
        pick = nan_sd[idx]
        sd[idx[pick]] = torch.nansum(e[pick] * d[pick], dim=1)
    if band is not None:
        pick = band[idx]
        s_k[idx[pick]] = _kept_sum_exact(d[pick], e[pick], thr)


def _entropy(log_s: torch.Tensor, s: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    return log_s - sd / s


# ---------------------------------------------------------------------------
# forward-only pass (old-policy log-probs + proxy)


@dataclass
class _ChunkSums:
    """A chunk's all-reduced per-token sums, ``[c]`` each: S, Sd, d_y, the proxy's kept
    sum S_K and its threshold in d-space; for ``minp_soft`` also |K| and d_min."""

    s: torch.Tensor
    sd: torch.Tensor
    d_y: torch.Tensor
    s_k: torch.Tensor
    thr: torch.Tensor
    n_kept: torch.Tensor | None = None
    d_min: torch.Tensor | None = None


def _chunk_sums_torch(logits2d, target1d, lo, hi, shard, temperature, group, proxy, log_thr, blocks) -> _ChunkSums:
    """Blocked torch passes: max, then the sums (and for ``fixed`` one more pass)."""
    dev = logits2d.device
    minp_thr = log_thr / temperature  # in d-space; a Python float compares in fp32
    m, x_min = _global_max(logits2d, lo, hi, shard, temperature, group, with_min=proxy == "minp_soft")
    col, owned = _target_columns(target1d[lo:hi], shard)
    # per token: S, Sd, d_y, then S_K (minp*), |K| (minp_soft) or S_raw (fixed, T != 1)
    n_cols = 3 + (proxy != "fixed") + (proxy == "minp_soft") + (proxy == "fixed" and temperature != 1.0)
    part = torch.zeros(hi - lo, n_cols, dtype=shard.dtype, device=dev)
    nan_sd = torch.zeros(hi - lo, dtype=torch.bool, device=dev)
    band = torch.zeros_like(nan_sd) if proxy != "fixed" else None
    for a, b in _spans(lo, hi, shard.block):
        r = slice(a - lo, b - lo)
        d, e = blocks.get(b - a)
        _shifted(logits2d, a, b, shard, temperature, m[r], d)
        part[r, 2] = _pick(d, col[r], owned[r])
        if proxy == "fixed" and temperature != 1.0:  # untempered normaliser, absolute threshold
            part[r, 3] = torch.exp(d * temperature).sum(dim=1)
        if proxy == "minp_soft":
            part[r, 4] = (d >= minp_thr).sum(dim=1)
        part[r, 0], part[r, 1], nan_sd[r] = _exp_sums(d, e)  # d is spent from here
        if proxy != "fixed":
            part[r, 3], band[r] = _kept_sum(e, minp_thr)
    _settle(logits2d, lo, shard, temperature, m, sd=part[:, 1], nan_sd=nan_sd,
            s_k=part[:, 3] if band is not None else None, band=band, thr=minp_thr)
    s, sd, d_y, *rest = all_reduce_sum(part, group).unbind(1)

    if proxy == "fixed":
        s_raw = rest[0] if temperature != 1.0 else s
        thr = (torch.log(s_raw) + log_thr) / temperature  # [c]
        s_k = torch.zeros(hi - lo, dtype=shard.dtype, device=dev)
        for a, b in _spans(lo, hi, shard.block):
            r = slice(a - lo, b - lo)
            d, e = blocks.get(b - a)
            _shifted(logits2d, a, b, shard, temperature, m[r], d)
            torch.exp(d, out=e)
            s_k[r] = _kept_sum_exact(d, e, thr[r].unsqueeze(1))
        return _ChunkSums(s, sd, d_y, all_reduce_sum(s_k, group), thr)
    soft = proxy == "minp_soft"
    return _ChunkSums(s, sd, d_y, rest[0], torch.full_like(s, minp_thr),
                      n_kept=rest[1] if soft else None, d_min=x_min - m if soft else None)


def _join_max(p: dict, lo: int, group, *, with_min: bool = False):
    """Global tempered row max (and min) from Triton partials: one all-reduce-MAX.
    A local NaN or +inf becomes +inf, so every rank raises together."""
    bad = torch.isnan(p["m"]) | torch.isnan(p["s"]) | (p["m"] == math.inf)
    cols = [torch.where(bad, math.inf, p["m"])]
    if with_min:
        cols.append(-p["xmin"])
    red = all_reduce_max(torch.stack(cols, dim=1), group)
    _check_max(red[:, 0], lo)
    return red[:, 0], (-red[:, 1] if with_min else None)


def _rescaled(p: dict, m: torch.Tensor):
    """S and Sd of the partials, taken from the local max to the global ``m``."""
    scale = torch.exp(p["m"] - m)  # 0 for a rank whose columns are all -inf or padding
    shift = torch.where(p["s"] > 0, p["m"] - m, 0.0) * p["s"]
    return p["s"] * scale, scale * (p["sd"] + shift)


def _chunk_sums_triton(logits2d, target1d, lo, hi, shard, temperature, group, proxy, log_thr,
                       _blocks=None) -> _ChunkSums:
    """Triton: one read for the partials, one for the kept sum (needs the global max)."""
    from megatron_lpreg.ops import triton_rows

    x = logits2d[lo:hi, : shard.n_valid]
    col, owned = _target_columns(target1d[lo:hi], shard)
    soft, raw = proxy == "minp_soft", proxy == "fixed" and temperature != 1.0
    p = triton_rows.row_partials(x, torch.where(owned, col, -1), temperature, with_min=soft, with_raw=raw)
    m, x_min = _join_max(p, lo, group, with_min=soft)
    s, sd = _rescaled(p, m)
    cols = [s, sd, torch.where(owned, p["xy"] - m, 0.0)]
    if raw:
        cols.append(p["sraw"] * torch.exp((p["m"] - m) * temperature))
    if proxy != "fixed":
        thr = torch.full_like(s, log_thr / temperature)
        s_k, count = triton_rows.kept_sums(x, temperature, m, thr, with_count=soft)
        cols += [s_k] + ([count] if soft else [])
    red = all_reduce_sum(torch.stack(cols, dim=1), group).unbind(1)
    s, sd, d_y = red[:3]
    if proxy == "fixed":
        thr = (torch.log(red[3] if raw else s) + log_thr) / temperature
        s_k, _ = triton_rows.kept_sums(x, temperature, m, thr)
        return _ChunkSums(s, sd, d_y, all_reduce_sum(s_k, group), thr)
    return _ChunkSums(s, sd, d_y, red[3], thr, n_kept=red[4] if soft else None, d_min=x_min - m if soft else None)


def _validate_proxy(proxy: str, proxy_threshold: float) -> None:
    if proxy not in PROXY_KINDS:
        raise ValueError(f"proxy={proxy!r} is not one of {PROXY_KINDS}")
    if not (isinstance(proxy_threshold, (int, float)) and 0.0 < proxy_threshold <= 1.0):
        raise ValueError(f"proxy_threshold must be in (0, 1], got {proxy_threshold!r}")


@torch.no_grad()
def token_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    proxy: str = "minp",
    proxy_threshold: float = 0.02,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
    block_elements: int | None = None,
    backend: str = "auto",
) -> TokenStats:
    """Log-prob, entropy and Lp-Reg proxy log-prob of ``target`` in one pass, no grad.

    Args:
        logits: ``[..., vocab/tp]`` fp32|bf16|fp16, this rank's vocabulary shard
            (the full vocabulary when ``tp_group`` is None). Never modified.
        target: ``[...]`` int64, global token ids in ``[0, vocab_size)``.
        proxy: ``"minp"`` (kappa relative to the max prob), ``"minp_soft"`` or
            ``"fixed"`` (absolute tau). See the module docstring.
        proxy_threshold: kappa or tau, in (0, 1].
        temperature: logits are divided by it; the proxy's kept set is chosen
            before, on the raw logits, as the reference does.
        tp_group: the tensor-parallel process group the vocabulary is split over.
        vocab_size: true vocabulary size; columns at or beyond it are padding and
            ignored. Defaults to ``vocab/tp * tp``.
        chunk_tokens: tokens per collective round (None: all in one round).
        block_elements: size of the reusable temporaries (rows x vocab/tp); None: by
            device (:func:`block_elements_for`).
        backend: ``auto`` (Triton kernels for CUDA logits when Triton runs, else the
            torch passes), ``torch`` or ``triton`` (:mod:`megatron_lpreg.ops.triton_rows`).

    Returns:
        :class:`TokenStats` of ``[...]`` tensors.
    """
    _check_logits(logits, temperature, chunk_tokens, block_elements)
    _check_target(logits, target)
    _validate_proxy(proxy, proxy_threshold)
    group = _effective_group(tp_group)
    shard = _make_shard(logits, group, vocab_size, chunk_tokens, block_elements, backend)
    _check_target_range(target, shard)

    lead = logits.shape[:-1]
    logits2d = logits.detach().reshape(-1, shard.n_local)
    target1d = target.reshape(-1)
    n, dev = target1d.numel(), logits.device
    out = {k: torch.empty(n, dtype=shard.dtype, device=dev) for k in ("lp", "h", "px")}
    in_proxy = torch.empty(n, dtype=torch.bool, device=dev)
    blocks = _Blocks(shard, dev) if shard.backend == "torch" else None
    log_thr = math.log(proxy_threshold)
    chunk_sums = _chunk_sums_triton if shard.backend == "triton" else _chunk_sums_torch

    for lo, hi in _spans(0, n, shard.chunk):
        c = chunk_sums(logits2d, target1d, lo, hi, shard, temperature, group, proxy, log_thr, blocks)
        s, sd, d_y, s_k, thr = c.s, c.sd, c.d_y, c.s_k, c.thr
        # d_y is global after the SUM, so membership needs no extra collective.
        kept_y = d_y >= thr

        log_s = torch.log(s)
        logprob = d_y - log_s
        out["lp"][lo:hi] = logprob
        out["h"][lo:hi] = _entropy(log_s, s, sd)
        if proxy == "minp_soft":
            d_min = c.d_min
            n_out = shard.vocab_size - c.n_kept
            log_s_soft = torch.log(s_k + n_out * torch.exp(d_min))
            out["px"][lo:hi] = torch.where(kept_y, d_y, d_min) - log_s_soft
        else:
            sentinel = torch.clamp(logprob, max=PROXY_SENTINEL)
            out["px"][lo:hi] = torch.where(kept_y, d_y - torch.log(s_k), sentinel)
        in_proxy[lo:hi] = kept_y

    return TokenStats(
        logprob=out["lp"].reshape(lead),
        entropy=out["h"].reshape(lead),
        proxy_logprob=out["px"].reshape(lead),
        in_proxy=in_proxy.reshape(lead),
    )


# ---------------------------------------------------------------------------
# autograd pass (the update): log-prob and entropy with gradients


def _grad_buffer(logits2d: torch.Tensor, shard: _Shard, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient w.r.t. the shard: the blocked backward writes every valid column, so
    only the padded columns are zeroed here (not a full extra pass over the logits)."""
    grad = torch.empty_like(logits2d) if out is None else out
    grad[:, shard.n_valid :] = 0
    return grad


class _VocabParallelLogProb(torch.autograd.Function):
    """Blocked log pi(y) (and H) with grad w.r.t. the logits shard.

    Saves the logits reference and per-token m, log S, H only: extra memory is a
    few block temporaries in both directions.
    """

    @staticmethod
    def forward(ctx, logits2d, target1d, temperature, group, shard, with_entropy):
        logprob, entropy, m_all, log_s_all = logprob_forward(logits2d, target1d, temperature, group, shard,
                                                             with_entropy)
        ctx.save_for_backward(logits2d, target1d, m_all, log_s_all, entropy)
        ctx.cfg = (temperature, shard, with_entropy)
        # autograd.Function outputs must be tensors: an empty one stands for "no entropy".
        return logprob, entropy if with_entropy else torch.zeros(0, device=logits2d.device)

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits2d, target1d, m_all, log_s_all, entropy = ctx.saved_tensors
        temperature, shard, with_entropy = ctx.cfg
        grad = logprob_backward(logits2d, target1d, m_all, log_s_all, entropy, g_lp, g_h, temperature, shard,
                                with_entropy)
        return grad, None, None, None, None, None


def logprob_forward(logits2d, target1d, temperature, group, shard, with_entropy):
    """Blocked forward of :class:`_VocabParallelLogProb`: ``(logprob, entropy or None,
    m, log S)``, each ``[n]`` in the shard's compute dtype. Also used by the fused
    output layer (:mod:`megatron_lpreg.ops.fused_output`) on chunks of logits."""
    n, dev = target1d.numel(), logits2d.device
    m_all = torch.empty(n, dtype=shard.dtype, device=dev)
    log_s_all = torch.empty_like(m_all)
    logprob = torch.empty_like(m_all)
    entropy = torch.empty_like(m_all) if with_entropy else None
    blocks = _Blocks(shard, dev) if shard.backend == "torch" else None
    for lo, hi in _spans(0, n, shard.chunk):
        if shard.backend == "triton":
            m, d_y, s, sd = _logprob_sums_triton(logits2d, target1d, lo, hi, shard, temperature, group)
        else:
            m, d_y, s, sd = _logprob_sums_torch(logits2d, target1d, lo, hi, shard, temperature, group, blocks,
                                                with_entropy)
        log_s = torch.log(s)
        m_all[lo:hi], log_s_all[lo:hi] = m, log_s
        logprob[lo:hi] = d_y - log_s
        if with_entropy:
            entropy[lo:hi] = _entropy(log_s, s, sd)
    return logprob, entropy, m_all, log_s_all


def _logprob_sums_triton(logits2d, target1d, lo, hi, shard, temperature, group):
    """``(m, d_y, S, Sd)`` of a chunk from one Triton read, one MAX and one SUM."""
    from megatron_lpreg.ops import triton_rows

    col, owned = _target_columns(target1d[lo:hi], shard)
    p = triton_rows.row_partials(logits2d[lo:hi, : shard.n_valid], torch.where(owned, col, -1), temperature)
    m, _ = _join_max(p, lo, group)
    s, sd = _rescaled(p, m)
    d_y, s, sd = all_reduce_sum(torch.stack([torch.where(owned, p["xy"] - m, 0.0), s, sd], dim=1), group).unbind(1)
    return m, d_y, s, sd


def _logprob_sums_torch(logits2d, target1d, lo, hi, shard, temperature, group, blocks, with_entropy):
    """``(m, d_y, S, Sd)`` of a chunk from the blocked passes (Sd only ``with_entropy``)."""
    dev = logits2d.device
    m, _ = _global_max(logits2d, lo, hi, shard, temperature, group)
    col, owned = _target_columns(target1d[lo:hi], shard)
    part = torch.zeros(hi - lo, 3, dtype=shard.dtype, device=dev)  # d_y, S, Sd
    nan_sd = torch.zeros(hi - lo, dtype=torch.bool, device=dev)
    for a, b in _spans(lo, hi, shard.block):
        r = slice(a - lo, b - lo)
        d, e = blocks.get(b - a)
        _shifted(logits2d, a, b, shard, temperature, m[r], d)
        part[r, 0] = _pick(d, col[r], owned[r])
        if with_entropy:
            part[r, 1], part[r, 2], nan_sd[r] = _exp_sums(d, e)
        else:
            part[r, 1] = torch.exp(d, out=e).sum(dim=1)
    if with_entropy:
        _settle(logits2d, lo, shard, temperature, m, sd=part[:, 2], nan_sd=nan_sd)
    d_y, s, sd = all_reduce_sum(part, group).unbind(1)
    return m, d_y, s, sd


def logprob_backward(logits2d, target1d, m_all, log_s_all, entropy, g_lp, g_h, temperature, shard, with_entropy,
                     out=None):
    """Gradient w.r.t. the logits shard ``[n, V/tp]`` from the saved per-token ``m``,
    ``log S`` and ``H``; no collective. ``out``: where to write it; may be ``logits2d``
    itself (each block of rows is read before it is written), which the fused output
    layer does with a chunk's logits it no longer needs."""
    n = target1d.numel()
    use_h = with_entropy and g_h is not None and g_h.numel() == n
    if g_lp is None:
        g_lp = torch.zeros(n, dtype=shard.dtype, device=logits2d.device)
    grad = _grad_buffer(logits2d, shard, out)
    col, owned = _target_columns(target1d, shard)
    if shard.backend == "triton":
        from megatron_lpreg.ops import triton_rows

        f32 = functools.partial(torch.Tensor.to, dtype=torch.float32)
        triton_rows.row_grads(logits2d[:, : shard.n_valid], grad[:, : shard.n_valid], torch.where(owned, col, -1),
                              temperature, f32(m_all), f32(log_s_all), f32(entropy) if use_h else None, f32(g_lp),
                              f32(g_h) if use_h else None)
        return grad
    blocks = _Blocks(shard, logits2d.device)
    for a, b in _spans(0, n, shard.block):
        logp, p = blocks.get(b - a)
        # (x - m) - log S, not x - (m + log S): x - m is exact, so p carries
        # only the rounding of log S.
        _shifted(logits2d, a, b, shard, temperature, m_all[a:b], logp).sub_(log_s_all[a:b].unsqueeze(1))
        if use_h:
            # A -inf logit would give 0 * -inf in dH/dx; its true term is 0. Below
            # -1e4, exp is exactly 0 in fp32 and fp64 alike, so clamping there
            # changes nothing else and keeps g_h * log p finite.
            logp.clamp_(min=-1e4)
        torch.exp(logp, out=p)
        g = g_lp[a:b].to(shard.dtype).unsqueeze(1)
        if use_h:
            # d/dx_v of g*log p_y + g_h*H = g (1[v=y] - p_v) - g_h p_v (log p_v + H)
            #   = g 1[v=y] + p_v * (-(g + g_h H) - g_h log p_v): three passes, not five
            gh = g_h[a:b].to(shard.dtype).unsqueeze(1)
            gx = logp.mul_(-gh).sub_(g + gh * entropy[a:b].unsqueeze(1)).mul_(p)
        else:
            gx = p.mul_(-g)
        if gx.shape[1] > 0:
            hit = torch.where(owned[a:b], g.squeeze(1), 0.0).unsqueeze(1)
            gx.scatter_add_(1, col[a:b].unsqueeze(1), hit)
        if temperature != 1.0:
            gx.div_(temperature)
        grad[a:b, : shard.n_valid] = gx
    return grad


def vocab_parallel_logprob(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
    block_elements: int | None = None,
    backend: str = "auto",
):
    """Differentiable ``log pi(target)`` (and entropy) from a vocab-parallel logits shard.

    Args:
        logits: ``[..., vocab/tp]`` fp32|bf16|fp16 with grad; never modified.
            Arithmetic is fp32 per block; the gradient has the logits' dtype.
        target: ``[...]`` int64 global token ids in ``[0, vocab_size)``.
        with_entropy: also return the (differentiable) entropy.
        temperature, tp_group, vocab_size, chunk_tokens, block_elements, backend: as
            :func:`token_stats`.

    Returns:
        ``logprob [...]`` fp32, or ``(logprob, entropy)`` when ``with_entropy``.
        Padded columns receive zero gradient.
    """
    _check_logits(logits, temperature, chunk_tokens, block_elements)
    _check_target(logits, target)
    group = _effective_group(tp_group)
    shard = _make_shard(logits, group, vocab_size, chunk_tokens, block_elements, backend)
    _check_target_range(target, shard)
    lead = logits.shape[:-1]
    logprob, entropy = _VocabParallelLogProb.apply(
        logits.reshape(-1, shard.n_local), target.reshape(-1), float(temperature), group, shard, with_entropy
    )
    if with_entropy:
        return logprob.reshape(lead), entropy.reshape(lead)
    return logprob.reshape(lead)


# ---------------------------------------------------------------------------
# beyond the reference: exact full-vocabulary KL to the min-p proxy


class _MinpProxyKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, temperature, log_kappa, group, shard):
        n, dev = logits2d.shape[0], logits2d.device
        thr = log_kappa / temperature
        saved = torch.empty(n, 3, dtype=shard.dtype, device=dev)  # m, log S, log S_K
        blocks = _Blocks(shard, dev)
        for lo, hi in _spans(0, n, shard.chunk):
            m, _ = _global_max(logits2d, lo, hi, shard, temperature, group)
            sums = torch.zeros(hi - lo, 2, dtype=shard.dtype, device=dev)
            band = torch.zeros(hi - lo, dtype=torch.bool, device=dev)
            for a, b in _spans(lo, hi, shard.block):
                r = slice(a - lo, b - lo)
                d, e = blocks.get(b - a)
                _shifted(logits2d, a, b, shard, temperature, m[r], d)
                sums[r, 0] = torch.exp(d, out=e).sum(dim=1)
                sums[r, 1], band[r] = _kept_sum(e, thr)
            _settle(logits2d, lo, shard, temperature, m, s_k=sums[:, 1], band=band, thr=thr)
            saved[lo:hi, 0] = m
            saved[lo:hi, 1:] = torch.log(all_reduce_sum(sums, group))
        ctx.save_for_backward(logits2d, saved)
        ctx.cfg = (temperature, thr, shard)
        return saved[:, 1] - saved[:, 2]

    @staticmethod
    def backward(ctx, g):
        logits2d, saved = ctx.saved_tensors
        temperature, thr, shard = ctx.cfg
        grad = _grad_buffer(logits2d, shard)
        blocks = _Blocks(shard, logits2d.device)
        for a, b in _spans(0, logits2d.shape[0], shard.block):
            d, p = blocks.get(b - a)
            m, log_s, log_sk = saved[a:b].unbind(1)
            _shifted(logits2d, a, b, shard, temperature, m, d)
            torch.exp(d - log_s.unsqueeze(1), out=p)
            q = torch.where(d >= thr, torch.exp(d - log_sk.unsqueeze(1)), 0.0)
            grad[a:b, : shard.n_valid] = p.sub_(q).mul_(g[a:b].to(shard.dtype).unsqueeze(1) / temperature)
        return grad, None, None, None, None


def minp_proxy_kl(
    logits: torch.Tensor,
    *,
    kappa: float = 0.02,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    """Exact ``KL(pi_proxy || pi)`` over the whole vocabulary, per token, with grad.

    With ``q`` the min-p proxy of the same logits (``q_v = p_v / P_K`` on the kept
    set ``K``, 0 elsewhere, ``P_K = S_K / S``)::

        KL(q || p) = sum_{v in K} q_v log(q_v / p_v) = -log P_K = log S - log S_K

    ``KL(p || q)`` (what the per-token k3 estimator targets) is infinite whenever
    ``p`` has mass outside ``K``, so this is the direction that is finite.
    Gradient w.r.t. the tempered logits: ``p - q`` (K fixed, which it is almost
    everywhere). The same ``p - q`` is the gradient when ``q`` is treated as a
    detached target, so it serves both readings. Costs one MAX and one SUM.

    Args:
        logits: ``[..., vocab/tp]`` fp32|bf16|fp16. kappa in (0, 1].
    Returns:
        ``[...]`` fp32, >= 0.
    """
    _check_logits(logits, temperature, chunk_tokens, block_elements)
    _validate_proxy("minp", kappa)
    group = _effective_group(tp_group)
    shard = _make_shard(logits, group, vocab_size, chunk_tokens, block_elements)
    kl = _MinpProxyKL.apply(logits.reshape(-1, shard.n_local), float(temperature), math.log(kappa), group, shard)
    return kl.reshape(logits.shape[:-1])

"""Per-token log-prob, entropy and Lp-Reg proxy log-prob over a vocab-parallel logits shard.

Math: ``shared/design/LPREG.md`` sections 1 and 4. Rank ``r`` of a tensor-parallel
group of size ``tp`` holds the logits columns ``[r * V/tp, (r + 1) * V/tp)`` of the
(padded) vocabulary, megatron-core's convention. Every quantity is assembled from
per-shard partial sums joined by all-reduces; no rank ever holds a full vocabulary
row, and no fp32 copy of more than one chunk of tokens is ever made.

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

Collectives per chunk of tokens: ``minp`` and ``minp_soft`` one all-reduce-MAX and
one all-reduce-SUM (of a few numbers per token); ``fixed`` one MAX and two SUMs.
Backward passes need no collective: ``d log pi(y) / d x_v = 1[v = y] - p_v`` and
``d H / d x_v = -p_v (log p_v + H)`` are local to each shard given ``m`` and ``log S``.

The caller's logits are never modified: every in-place operation acts on a
per-chunk temporary this module allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

PROXY_KINDS = ("minp", "minp_soft", "fixed")

# The reference sets filtered logits to -1e4, so a filtered target's proxy
# log-prob is about -1e4. We return min(-1e4, log pi(y)): close to the reference
# and, whatever the logit range, never above log pi(y), so the Lp-Reg gate
# ``log pi < log pi_proxy`` can never select a token outside the proxy's support.
PROXY_SENTINEL = -1e4

# Elements of one fp32 chunk temporary: bounds the extra memory to a few times
# 64 MiB whatever the vocabulary and token count.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TokenStats:
    """Per-token results, all ``[*]`` (the leading shape of the logits).

    logprob, entropy, proxy_logprob: fp32. in_proxy: bool, True where the target
    token is inside the proxy's kept set (its proxy log-prob is then exact).
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    proxy_logprob: torch.Tensor
    in_proxy: torch.Tensor


@dataclass(frozen=True)
class _Shard:
    """Where this rank's columns sit in the global vocabulary."""

    rank: int
    tp: int
    start: int  # global id of local column 0
    n_local: int  # columns held (padded vocabulary / tp)
    n_valid: int  # leading local columns that are real tokens (< vocab_size)
    vocab_size: int  # true vocabulary size (without padding)


# ---------------------------------------------------------------------------
# input checks and geometry


def _tp_rank_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _effective_group(group):
    """None for a group of one rank: its collectives would be no-ops that still cost."""
    if group is not None and dist.get_world_size(group) == 1:
        return None
    return group


def _make_shard(logits: torch.Tensor, group, vocab_size: int | None) -> _Shard:
    rank, tp = _tp_rank_size(group)
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
    n_valid = min(max(vocab_size - start, 0), n_local)
    return _Shard(rank, tp, start, n_local, n_valid, vocab_size)


def _check_logits(logits, temperature, chunk_elements):
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor [..., vocab/tp]")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")


def _check_target(logits, target):
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits' leading shape "
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


def _chunk_rows(n_tokens: int, n_local: int, chunk_elements: int) -> int:
    return max(1, min(n_tokens, chunk_elements // max(n_local, 1)))


# ---------------------------------------------------------------------------
# collectives: the only places this module talks to other ranks


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX, group)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM, group)


# ---------------------------------------------------------------------------
# small steps shared by the forward-only and autograd paths


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for half-precision input; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _tempered_chunk(logits2d: torch.Tensor, rows: slice, shard: _Shard, temperature: float):
    """``[c, n_valid]`` tempered logits of one chunk in the compute dtype (fp32, or
    fp64 for fp64 input). May alias the caller's logits (fp32/fp64 input at T = 1):
    callers must not write into it."""
    x = logits2d[rows, : shard.n_valid].to(_compute_dtype(logits2d))
    return x / temperature if temperature != 1.0 else x


def _global_max(x: torch.Tensor, group, *, with_min: bool):
    """All-reduce-MAX of the row max (and of minus the row min, packed in the
    same call). NaN and +inf rows come out as +inf on every rank so that all
    ranks raise together instead of one rank leaving the others in a collective."""
    c = x.shape[0]
    if x.shape[1] == 0:  # this rank holds only padding columns
        local = torch.full((c, 2 if with_min else 1), -math.inf, dtype=x.dtype, device=x.device)
    else:
        cols = [x.amax(dim=1)]
        if with_min:
            cols.append(-x.amin(dim=1))
        local = torch.stack(cols, dim=1)
        local = torch.where(torch.isnan(local), math.inf, local)
    red = all_reduce_max(local, group)
    m = red[:, 0]
    bad = ~torch.isfinite(m)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"logits of token {i} (of the chunk) contain NaN or +inf, or are all -inf; "
            "cannot form a distribution"
        )
    return m, (-red[:, 1] if with_min else None)


def _target_columns(target: torch.Tensor, shard: _Shard):
    """Local column of each target and whether this rank owns it."""
    local = target - shard.start
    owned = (local >= 0) & (local < shard.n_valid)
    return local.clamp(0, max(shard.n_valid - 1, 0)), owned


def _pick(d: torch.Tensor, col: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """d[i, col_i] where this rank owns the target, else 0 (summed over ranks)."""
    if d.shape[1] == 0:
        return torch.zeros(d.shape[0], dtype=d.dtype, device=d.device)
    return torch.where(owned, d.gather(1, col.unsqueeze(1)).squeeze(1), 0.0)


def _exp_and_dot(d: torch.Tensor):
    """e = exp(d), S = sum e, Sd = sum e * d, per row. 0 * -inf (a -inf logit)
    counts as 0; only rows that have one pay for the slower nansum."""
    e = torch.exp(d)
    s = e.sum(dim=1)
    sd = torch.linalg.vecdot(e, d)
    nan_rows = torch.isnan(sd)
    if bool(nan_rows.any()):
        sd[nan_rows] = torch.nansum(e[nan_rows] * d[nan_rows], dim=1)
    return e, s, sd


def _entropy(log_s: torch.Tensor, s: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    return log_s - sd / s


# ---------------------------------------------------------------------------
# forward-only pass (old-policy log-probs + proxy)


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
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
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
        chunk_elements: fp32 elements per chunk temporary (tokens x vocab/tp).

    Returns:
        :class:`TokenStats` of ``[...]`` tensors (fp32; ``in_proxy`` bool).
    """
    _check_logits(logits, temperature, chunk_elements)
    _check_target(logits, target)
    _validate_proxy(proxy, proxy_threshold)
    tp_group = _effective_group(tp_group)
    shard = _make_shard(logits, tp_group, vocab_size)
    _check_target_range(target, shard)

    lead = logits.shape[:-1]
    logits2d = logits.detach().reshape(-1, shard.n_local)
    target1d = target.reshape(-1)
    n = target1d.numel()
    cdt = _compute_dtype(logits)
    out = {k: torch.empty(n, dtype=cdt, device=logits.device) for k in ("lp", "h", "px")}
    in_proxy = torch.empty(n, dtype=torch.bool, device=logits.device)
    step = _chunk_rows(n, shard.n_local, chunk_elements)
    log_thr = math.log(proxy_threshold)

    for lo in range(0, n, step):
        rows = slice(lo, min(lo + step, n))
        x = _tempered_chunk(logits2d, rows, shard, temperature)
        m, x_min = _global_max(x, tp_group, with_min=proxy == "minp_soft")
        d = x - m.unsqueeze(1)
        col, owned = _target_columns(target1d[rows], shard)
        d_y = _pick(d, col, owned)
        e, s, sd = _exp_and_dot(d)

        s_k = None
        if proxy != "fixed":  # the kept set is known from the max alone
            keep = d >= log_thr / temperature
            s_k = torch.where(keep, e, 0.0).sum(dim=1)
        cols = [s, sd, d_y]
        if proxy == "fixed" and temperature != 1.0:
            cols.append(torch.exp(d * temperature).sum(dim=1))  # untempered normaliser
        if s_k is not None:
            cols.append(s_k)
        if proxy == "minp_soft":
            cols.append(keep.sum(dim=1, dtype=d.dtype))
        red = all_reduce_sum(torch.stack(cols, dim=1), tp_group).unbind(1)
        s, sd, d_y = red[:3]
        if proxy == "fixed":
            # tau is absolute: the threshold needs the untempered normaliser first.
            s_raw = red[3] if temperature != 1.0 else s
            thr = (torch.log(s_raw) + log_thr) / temperature
            s_k = torch.where(d >= thr.unsqueeze(1), e, 0.0).sum(dim=1)
            s_k = all_reduce_sum(s_k, tp_group)
        else:
            thr = torch.full_like(s, log_thr / temperature)
            s_k = red[3]
        # d_y is global after the SUM, so membership needs no extra collective.
        kept_y = d_y >= thr

        log_s = torch.log(s)
        logprob = d_y - log_s
        out["lp"][rows] = logprob
        out["h"][rows] = _entropy(log_s, s, sd)
        if proxy == "minp_soft":
            d_min = x_min - m
            n_out = shard.vocab_size - red[4]
            log_s_soft = torch.log(s_k + n_out * torch.exp(d_min))
            out["px"][rows] = torch.where(kept_y, d_y, d_min) - log_s_soft
        else:
            sentinel = torch.clamp(logprob, max=PROXY_SENTINEL)
            out["px"][rows] = torch.where(kept_y, d_y - torch.log(s_k), sentinel)
        in_proxy[rows] = kept_y

    return TokenStats(
        logprob=out["lp"].reshape(lead),
        entropy=out["h"].reshape(lead),
        proxy_logprob=out["px"].reshape(lead),
        in_proxy=in_proxy.reshape(lead),
    )


# ---------------------------------------------------------------------------
# autograd pass (the update): log-prob and entropy with gradients


class _VocabParallelLogProb(torch.autograd.Function):
    """Chunked log pi(y) (and H) with grad w.r.t. the logits shard.

    Saves only the logits reference and per-token m, log S, H: extra memory is one
    chunk of fp32 temporaries in both directions.
    """

    @staticmethod
    def forward(ctx, logits2d, target1d, temperature, group, shard, step, with_entropy):
        n = target1d.numel()
        dev = logits2d.device
        m_all = torch.empty(n, dtype=_compute_dtype(logits2d), device=dev)
        log_s_all = torch.empty_like(m_all)
        logprob = torch.empty_like(m_all)
        entropy = torch.empty_like(m_all) if with_entropy else None
        for lo in range(0, n, step):
            rows = slice(lo, min(lo + step, n))
            x = _tempered_chunk(logits2d, rows, shard, temperature)
            m, _ = _global_max(x, group, with_min=False)
            d = x - m.unsqueeze(1)
            col, owned = _target_columns(target1d[rows], shard)
            cols = [_pick(d, col, owned)]
            if with_entropy:
                _, s, sd = _exp_and_dot(d)
                cols += [s, sd]
            else:
                cols.append(torch.exp(d).sum(dim=1))
            red = all_reduce_sum(torch.stack(cols, dim=1), group)
            log_s = torch.log(red[:, 1])
            m_all[rows], log_s_all[rows] = m, log_s
            logprob[rows] = red[:, 0] - log_s
            if with_entropy:
                entropy[rows] = _entropy(log_s, red[:, 1], red[:, 2])
        ctx.save_for_backward(logits2d, target1d, m_all, log_s_all, entropy)
        ctx.cfg = (temperature, shard, step, with_entropy)
        # autograd.Function outputs must be tensors: an empty one stands for "no entropy".
        return logprob, entropy if with_entropy else torch.zeros(0, device=dev)

    @staticmethod
    def backward(ctx, g_lp, g_h):
        logits2d, target1d, m_all, log_s_all, entropy = ctx.saved_tensors
        temperature, shard, step, with_entropy = ctx.cfg
        n = target1d.numel()
        grad = torch.zeros_like(logits2d)
        use_h = with_entropy and g_h is not None and g_h.numel() == n
        if g_lp is None:
            g_lp = torch.zeros(n, dtype=m_all.dtype, device=logits2d.device)
        for lo in range(0, n, step):
            rows = slice(lo, min(lo + step, n))
            x = _tempered_chunk(logits2d, rows, shard, temperature)
            # (x - m) - log S, not x - (m + log S): x - m is exact and keeps
            # p accurate to fp32 rounding of log S alone.
            logp = (x - m_all[rows].unsqueeze(1)).sub_(log_s_all[rows].unsqueeze(1))
            if use_h:  # a -inf logit would give 0 * -inf in dH/dx; its true term is 0
                logp.clamp_(min=torch.finfo(logp.dtype).min)
            p = torch.exp(logp)
            g = g_lp[rows].to(x.dtype).unsqueeze(1)
            gx = p.mul_(-g) if not use_h else p * (-g)
            if use_h:
                # dH/dx_v = -p_v (log p_v + H)
                logp.add_(entropy[rows].unsqueeze(1)).mul_(p).mul_(g_h[rows].to(x.dtype).unsqueeze(1))
                gx.sub_(logp)
            col, owned = _target_columns(target1d[rows], shard)
            if gx.shape[1] > 0:
                gx.scatter_add_(1, col.unsqueeze(1), torch.where(owned, g.squeeze(1), 0.0).unsqueeze(1))
            if temperature != 1.0:
                gx.div_(temperature)
            grad[rows, : shard.n_valid] = gx
        return grad, None, None, None, None, None, None


def vocab_parallel_logprob(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
):
    """Differentiable ``log pi(target)`` (and entropy) from a vocab-parallel logits shard.

    Args:
        logits: ``[..., vocab/tp]`` fp32|bf16|fp16 with grad; never modified.
            Arithmetic is fp32 per chunk; the gradient has the logits' dtype.
        target: ``[...]`` int64 global token ids in ``[0, vocab_size)``.
        temperature, tp_group, vocab_size, chunk_elements: as :func:`token_stats`.
        with_entropy: also return the (differentiable) entropy.

    Returns:
        ``logprob [...]`` fp32, or ``(logprob, entropy)`` when ``with_entropy``.
        Padded columns receive zero gradient.
    """
    _check_logits(logits, temperature, chunk_elements)
    _check_target(logits, target)
    tp_group = _effective_group(tp_group)
    shard = _make_shard(logits, tp_group, vocab_size)
    _check_target_range(target, shard)
    lead = logits.shape[:-1]
    logits2d = logits.reshape(-1, shard.n_local)
    target1d = target.reshape(-1)
    step = _chunk_rows(target1d.numel(), shard.n_local, chunk_elements)
    logprob, entropy = _VocabParallelLogProb.apply(
        logits2d, target1d, float(temperature), tp_group, shard, step, with_entropy
    )
    if with_entropy:
        return logprob.reshape(lead), entropy.reshape(lead)
    return logprob.reshape(lead)


# ---------------------------------------------------------------------------
# beyond the reference: exact full-vocabulary KL to the min-p proxy


class _MinpProxyKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, temperature, log_kappa, group, shard, step):
        n = logits2d.shape[0]
        cdt = _compute_dtype(logits2d)
        kl = torch.empty(n, dtype=cdt, device=logits2d.device)
        saved = torch.empty(n, 3, dtype=cdt, device=logits2d.device)  # m, log S, log S_K
        thr = log_kappa / temperature
        for lo in range(0, n, step):
            rows = slice(lo, min(lo + step, n))
            x = _tempered_chunk(logits2d, rows, shard, temperature)
            m, _ = _global_max(x, group, with_min=False)
            d = x - m.unsqueeze(1)
            e = torch.exp(d)
            sums = torch.stack([e.sum(dim=1), torch.where(d >= thr, e, 0.0).sum(dim=1)], dim=1)
            logs = torch.log(all_reduce_sum(sums, group))
            kl[rows] = logs[:, 0] - logs[:, 1]
            saved[rows] = torch.cat([m.unsqueeze(1), logs], dim=1)
        ctx.save_for_backward(logits2d, saved)
        ctx.cfg = (temperature, thr, shard, step)
        return kl

    @staticmethod
    def backward(ctx, g):
        logits2d, saved = ctx.saved_tensors
        temperature, thr, shard, step = ctx.cfg
        grad = torch.zeros_like(logits2d)
        for lo in range(0, logits2d.shape[0], step):
            rows = slice(lo, min(lo + step, logits2d.shape[0]))
            x = _tempered_chunk(logits2d, rows, shard, temperature)
            m, log_s, log_sk = saved[rows].unbind(1)
            d = x - m.unsqueeze(1)
            p = torch.exp(d - log_s.unsqueeze(1))
            q = torch.where(d >= thr, torch.exp(d - log_sk.unsqueeze(1)), 0.0)
            grad[rows, : shard.n_valid] = (p - q).mul_(g[rows].to(x.dtype).unsqueeze(1) / temperature)
        return grad, None, None, None, None, None


def minp_proxy_kl(
    logits: torch.Tensor,
    *,
    kappa: float = 0.02,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
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
    _check_logits(logits, temperature, chunk_elements)
    _validate_proxy("minp", kappa)
    tp_group = _effective_group(tp_group)
    shard = _make_shard(logits, tp_group, vocab_size)
    logits2d = logits.reshape(-1, shard.n_local)
    step = _chunk_rows(logits2d.shape[0], shard.n_local, chunk_elements)
    kl = _MinpProxyKL.apply(logits2d, float(temperature), math.log(kappa), tp_group, shard, step)
    return kl.reshape(logits.shape[:-1])

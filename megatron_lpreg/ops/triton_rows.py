"""Triton kernels for the vocab-parallel op's row passes (``ops.backend: triton``).

The torch path (:mod:`megatron_lpreg.ops.vocab_parallel`) walks a block of rows
several times (max, exp and sums, the proxy's kept sum), each pass a kernel that
reads the block from memory. Here one program owns one row of this rank's shard and
walks its columns in tiles:

* :func:`row_partials` reads the row **once**: an online max with rescaled sums,
  ``S = sum exp(x - m)`` and ``Sd = sum exp(x - m) (x - m)`` relative to the row's
  local max ``m`` (when the max rises from m to m', ``S <- S e^(m-m') + ...`` and
  ``Sd <- e^(m-m') (Sd + (m - m') S) + ...``), the target's tempered logit where
  this rank owns it, and optionally the row min and the untempered sum ``fixed``
  needs. Shards join with one MAX (of ``m``) and one SUM of the rescaled partials,
  the same two collectives as the torch path.
* :func:`kept_sums` reads it once more for the proxy's ``S_K = sum over x - M >=
  thr of exp(x - M)`` (and ``|K|``): the kept set is defined against the *global*
  max ``M``, known only after the MAX, so it cannot share the first read. The
  old-policy pass pays two reads; the update pass (no proxy) one.
* :func:`row_grads` writes ``d/dx (g log p_y + g_h H)`` (softmax minus one-hot, the
  entropy term), one read and one write per element, into a separate buffer or over
  the logits themselves (a tile is read before it is written).

Arithmetic is fp32 whatever the input (fp32, bf16, fp16). x is divided by the
temperature as the torch path does, so memberships ``d >= thr`` agree with it.
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run
on CPU tensors: that is how they are tested without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_NEG_INF = float("-inf")

# Columns per tile at most. 4096 keeps a program's registers busy without spilling on
# H100-class GPUs; the tests lower it so that small rows span several tiles and the
# online rescaling is exercised.
MAX_TILE = 4096


def _tile(n_valid: int, device: torch.device) -> int:
    return max(16, min(MAX_TILE, triton.next_power_of_2(max(n_valid, 1))))


@triton.jit
def _partials_kernel(x_ptr, stride, n_valid, tcol_ptr, temperature,
                     m_out, s_out, sd_out, xy_out, xmin_out, sraw_out,
                     BLOCK: tl.constexpr, WITH_MIN: tl.constexpr, WITH_RAW: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    tcol = tl.load(tcol_ptr + row)
    m = tl.full((), _NEG_INF, tl.float32)
    s = tl.zeros((), tl.float32)
    sd = tl.zeros((), tl.float32)
    sraw = tl.zeros((), tl.float32)
    xy = tl.zeros((), tl.float32)
    xmin = tl.full((), float("inf"), tl.float32)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_valid
        x = tl.load(base + cols, mask=valid, other=_NEG_INF).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        # until a finite value is seen the reference point is 0: exp(-inf - 0) = 0
        ref = tl.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = tl.exp(m - ref)
        e = tl.exp(x - ref)
        d = tl.where(e > 0, x - ref, 0.0)  # a -inf logit adds 0, not 0 * -inf
        shift = (tl.where(s > 0, m, ref) - ref) * s  # no -inf * 0 while nothing is summed yet
        sd = alpha * (sd + shift) + tl.sum(e * d, 0)
        s = alpha * s + tl.sum(e, 0)
        if WITH_RAW:
            sraw = tl.exp((m - ref) * temperature) * sraw + tl.sum(tl.exp((x - ref) * temperature), 0)
        if WITH_MIN:
            xmin = tl.minimum(xmin, tl.min(tl.where(valid, x, float("inf")), 0))
        xy += tl.sum(tl.where(cols == tcol, x, 0.0), 0)
        m = m_new
    tl.store(m_out + row, m)
    tl.store(s_out + row, s)
    tl.store(sd_out + row, sd)
    tl.store(xy_out + row, xy)
    if WITH_MIN:
        tl.store(xmin_out + row, xmin)
    if WITH_RAW:
        tl.store(sraw_out + row, sraw)


@triton.jit
def _kept_kernel(x_ptr, stride, n_valid, temperature, m_ptr, thr_ptr, sk_out, cnt_out,
                 BLOCK: tl.constexpr, WITH_COUNT: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    m = tl.load(m_ptr + row)
    thr = tl.load(thr_ptr + row)
    sk = tl.zeros((), tl.float32)
    cnt = tl.zeros((), tl.float32)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_valid
        d = tl.load(base + cols, mask=valid, other=_NEG_INF).to(tl.float32) / temperature - m
        keep = valid & (d >= thr)
        sk += tl.sum(tl.where(keep, tl.exp(d), 0.0), 0)
        if WITH_COUNT:
            cnt += tl.sum(keep.to(tl.float32), 0)
    tl.store(sk_out + row, sk)
    if WITH_COUNT:
        tl.store(cnt_out + row, cnt)


@triton.jit
def _grad_kernel(x_ptr, x_stride, g_ptr, g_stride, n_valid, tcol_ptr, temperature, m_ptr, logs_ptr, h_ptr,
                 glp_ptr, gh_ptr, BLOCK: tl.constexpr, USE_H: tl.constexpr):
    row = tl.program_id(0)
    xbase = x_ptr + row.to(tl.int64) * x_stride
    gbase = g_ptr + row.to(tl.int64) * g_stride
    tcol = tl.load(tcol_ptr + row)
    m = tl.load(m_ptr + row)
    log_s = tl.load(logs_ptr + row)
    g = tl.load(glp_ptr + row)
    if USE_H:
        gh = tl.load(gh_ptr + row)
        lead = g + gh * tl.load(h_ptr + row)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_valid
        x = tl.load(xbase + cols, mask=valid, other=0.0).to(tl.float32) / temperature
        logp = (x - m) - log_s  # x - m is exact, so p carries only log S's rounding
        if USE_H:
            logp = tl.maximum(logp, -1e4)  # a -inf logit: exp is 0 and gh * log p stays finite
            p = tl.exp(logp)
            gx = p * (-lead - gh * logp)
        else:
            gx = -g * tl.exp(logp)
        gx = (gx + tl.where(cols == tcol, g, 0.0)) / temperature
        tl.store(gbase + cols, gx.to(g_ptr.dtype.element_ty), mask=valid)


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (CPU tensors)."""
    return not isinstance(_partials_kernel, triton.runtime.JITFunction)


def _f32(n: int, device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=device)


def row_partials(x: torch.Tensor, tcol: torch.Tensor, temperature: float, *, with_min: bool = False,
                 with_raw: bool = False) -> dict[str, torch.Tensor]:
    """Per-row partials of ``x [rows, n_valid]`` (a strided view of the shard's valid
    columns, any float dtype; read once). ``tcol [rows]`` int: the target's local
    column, -1 where this rank does not own it.

    Returns fp32 ``[rows]`` tensors: ``m`` (max of x/T; -inf for an all -inf row),
    ``s`` and ``sd`` relative to ``m``, ``xy`` (x_y/T, 0 when not owned), and with
    the flags ``xmin`` (min of x/T) and ``sraw`` (``sum exp(x - T m)``, untempered).
    """
    rows, n_valid = x.shape
    dev = x.device
    out = {k: _f32(rows, dev) for k in ("m", "s", "sd", "xy", "xmin", "sraw")}
    if rows == 0:
        return out
    if n_valid == 0:  # a rank that holds only padding columns
        out["m"].fill_(_NEG_INF)
        for k in ("s", "sd", "xy", "sraw"):
            out[k].zero_()
        out["xmin"].fill_(math.inf)
        return out
    _partials_kernel[(rows,)](
        x, x.stride(0), n_valid, tcol, float(temperature),
        out["m"], out["s"], out["sd"], out["xy"], out["xmin"], out["sraw"],
        BLOCK=_tile(n_valid, dev), WITH_MIN=with_min, WITH_RAW=with_raw,
    )
    return out


def kept_sums(x: torch.Tensor, temperature: float, m: torch.Tensor, thr: torch.Tensor, *,
              with_count: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``S_K = sum exp(d)`` over ``d = x/T - m >= thr`` per row (``m``, ``thr``: fp32
    ``[rows]``), and ``|K|`` (fp32) when ``with_count``."""
    rows, n_valid = x.shape
    sk, cnt = _f32(rows, x.device), _f32(rows, x.device)
    if n_valid == 0 or rows == 0:
        sk.zero_()
        cnt.zero_()
    else:
        _kept_kernel[(rows,)](x, x.stride(0), n_valid, float(temperature), m.contiguous(), thr.contiguous(), sk,
                              cnt, BLOCK=_tile(n_valid, x.device), WITH_COUNT=with_count)
    return sk, (cnt if with_count else None)


def row_grads(x: torch.Tensor, out: torch.Tensor, tcol: torch.Tensor, temperature: float, m: torch.Tensor,
              log_s: torch.Tensor, entropy: torch.Tensor | None, g_lp: torch.Tensor,
              g_h: torch.Tensor | None) -> None:
    """Write ``g (1[v = y] - p_v) - g_h p_v (log p_v + H)``, divided by T, into ``out``
    ``[rows, n_valid]`` (``out`` may be ``x``). Per-row inputs fp32 ``[rows]``."""
    rows, n_valid = x.shape
    if n_valid == 0 or rows == 0:
        return
    use_h = g_h is not None
    dummy = g_lp
    _grad_kernel[(rows,)](
        x, x.stride(0), out, out.stride(0), n_valid, tcol, float(temperature), m.contiguous(), log_s.contiguous(),
        entropy.contiguous() if use_h else dummy, g_lp.contiguous(), g_h.contiguous() if use_h else dummy,
        BLOCK=_tile(n_valid, x.device), USE_H=use_h,
    )

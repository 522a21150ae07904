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
temperature exactly (round-to-nearest, as the torch path), so memberships ``d >= thr``
agree with it. The kernels themselves are in :mod:`megatron_lpreg.ops.triton_kernels`.
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run
on CPU tensors: that is how they are tested without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton

from megatron_lpreg.ops import triton_kernels as kernels

# Columns per tile at most (the tests lower it so that small rows span several tiles).
MAX_TILE = kernels.MAX_TILE


def _tile(n_valid: int) -> int:
    return max(kernels.MIN_TILE, min(MAX_TILE, triton.next_power_of_2(max(n_valid, 1))))


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (CPU tensors)."""
    return not isinstance(kernels.partials_kernel, triton.runtime.JITFunction)


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
        out["m"].fill_(-math.inf)
        for k in ("s", "sd", "xy", "sraw"):
            out[k].zero_()
        out["xmin"].fill_(math.inf)
        return out
    kernels.partials_kernel[(rows,)](
        x, x.stride(0), n_valid, tcol, float(temperature),
        out["m"], out["s"], out["sd"], out["xy"], out["xmin"], out["sraw"],
        BLOCK=_tile(n_valid), WITH_MIN=with_min, WITH_RAW=with_raw,
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
        kernels.kept_kernel[(rows,)](x, x.stride(0), n_valid, float(temperature), m.contiguous(), thr.contiguous(), sk,
                              cnt, BLOCK=_tile(n_valid), WITH_COUNT=with_count)
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
    kernels.grad_kernel[(rows,)](
        x, x.stride(0), out, out.stride(0), n_valid, tcol, float(temperature), m.contiguous(), log_s.contiguous(),
        entropy.contiguous() if use_h else dummy, g_lp.contiguous(), g_h.contiguous() if use_h else dummy,
        BLOCK=_tile(n_valid), USE_H=use_h,
    )

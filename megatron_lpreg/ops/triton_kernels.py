"""The Triton kernels of the vocab-parallel op's row passes, and every variant the
project launches.

Kernels only: this module imports ``triton`` and nothing else, so it can be compiled
ahead of time for a CUDA target on a machine without a GPU or torch
(``tests/ops/test_triton_compile.py`` does, for sm_80 and sm_90, with the installed
Triton and the oldest supported one). The launchers, which take torch tensors, are in
:mod:`megatron_lpreg.ops.triton_rows`; the math is described there.

Rules the compiler (not the interpreter) enforces, learnt the hard way:

* no plain Python globals inside ``@triton.jit`` functions (Triton 3.6 refuses them):
  constants are written out (``float("-inf")``);
* division by the temperature is ``tl.math.div_rn`` (IEEE round-to-nearest): ``/`` on
  fp32 compiles to ``div.full.f32``, an approximate division, and the proxy's kept set
  ``x / T - m >= thr`` must agree with the torch path's exact division at ties.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns per tile at most. 4096 keeps a program's registers busy without spilling on
# H100-class GPUs; the tests lower it so that small rows span several tiles and the
# online rescaling is exercised.
MAX_TILE = 4096
MIN_TILE = 16


@triton.jit
def partials_kernel(x_ptr, stride, n_valid, tcol_ptr, temperature,
                    m_out, s_out, sd_out, xy_out, xmin_out, sraw_out,
                    BLOCK: tl.constexpr, WITH_MIN: tl.constexpr, WITH_RAW: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    tcol = tl.load(tcol_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sd = tl.zeros((), tl.float32)
    sraw = tl.zeros((), tl.float32)
    xy = tl.zeros((), tl.float32)
    xmin = tl.full((), float("inf"), tl.float32)
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_valid
        x = tl.math.div_rn(tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32), temperature)
        m_new = tl.maximum(m, tl.max(x, 0))
        # until a finite value is seen the reference point is 0: exp(-inf - 0) = 0
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
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
def kept_kernel(x_ptr, stride, n_valid, temperature, m_ptr, thr_ptr, sk_out, cnt_out,
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
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        d = tl.math.div_rn(x, temperature) - m
        keep = valid & (d >= thr)
        sk += tl.sum(tl.where(keep, tl.exp(d), 0.0), 0)
        if WITH_COUNT:
            cnt += tl.sum(keep.to(tl.float32), 0)
    tl.store(sk_out + row, sk)
    if WITH_COUNT:
        tl.store(cnt_out + row, cnt)


@triton.jit
def grad_kernel(x_ptr, x_stride, g_ptr, g_stride, n_valid, tcol_ptr, temperature, m_ptr, logs_ptr, h_ptr,
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
        x = tl.math.div_rn(tl.load(xbase + cols, mask=valid, other=0.0).to(tl.float32), temperature)
        logp = (x - m) - log_s  # x - m is exact, so p carries only log S's rounding
        if USE_H:
            logp = tl.maximum(logp, -1e4)  # a -inf logit: exp is 0 and gh * log p stays finite
            p = tl.exp(logp)
            gx = p * (-lead - gh * logp)
        else:
            gx = -g * tl.exp(logp)
        gx = tl.math.div_rn(gx + tl.where(cols == tcol, g, 0.0), temperature)
        tl.store(gbase + cols, gx.to(g_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------- what is launched
#
# Every (kernel, argument types, constexprs) the launchers in triton_rows.py can produce,
# for the ahead-of-time compile test. A launcher that passes a new flag or dtype must add
# it here; tests/ops/test_triton_compile.py checks the launchers' calls against this table.

INPUT_DTYPES = ("fp32", "bf16")  # the logits: model.params_dtype (fp16 is not a training dtype here)
TILES = (MIN_TILE, MAX_TILE)  # the smallest and largest tile a launch can pick


def variants():
    """``(name, kernel, signature, constexprs)`` of every launch variant: signature maps
    argument names to Triton types (``*bf16``, ``i32``, ``fp32``, ``constexpr``)."""
    out = []
    for x in INPUT_DTYPES:
        for tile in TILES:
            for with_min in (False, True):
                for with_raw in (False, True):
                    sig = {"x_ptr": f"*{x}", "stride": "i32", "n_valid": "i32", "tcol_ptr": "*i64",
                           "temperature": "fp32", **dict.fromkeys(
                               ("m_out", "s_out", "sd_out", "xy_out", "xmin_out", "sraw_out"), "*fp32")}
                    cx = {"BLOCK": tile, "WITH_MIN": with_min, "WITH_RAW": with_raw}
                    out.append((f"partials/{x}/B{tile}/min{int(with_min)}/raw{int(with_raw)}", partials_kernel,
                                {**sig, **dict.fromkeys(cx, "constexpr")}, cx))
            for with_count in (False, True):
                sig = {"x_ptr": f"*{x}", "stride": "i32", "n_valid": "i32", "temperature": "fp32",
                       **dict.fromkeys(("m_ptr", "thr_ptr", "sk_out", "cnt_out"), "*fp32")}
                cx = {"BLOCK": tile, "WITH_COUNT": with_count}
                out.append((f"kept/{x}/B{tile}/count{int(with_count)}", kept_kernel,
                            {**sig, **dict.fromkeys(cx, "constexpr")}, cx))
            # the gradient is written in the logits' dtype (a buffer like them, or over them)
            for use_h in (False, True):
                sig = {"x_ptr": f"*{x}", "x_stride": "i32", "g_ptr": f"*{x}", "g_stride": "i32", "n_valid": "i32",
                       "tcol_ptr": "*i64", "temperature": "fp32",
                       **dict.fromkeys(("m_ptr", "logs_ptr", "h_ptr", "glp_ptr", "gh_ptr"), "*fp32")}
                cx = {"BLOCK": tile, "USE_H": use_h}
                out.append((f"grad/{x}/B{tile}/h{int(use_h)}", grad_kernel, {**sig, **dict.fromkeys(cx, "constexpr")},
                            cx))
    return out

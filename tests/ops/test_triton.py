"""The Triton row kernels (``ops.backend: triton``) against the torch path, the
reference (``tests/ops/triton_cases.py`` runs the cases): token statistics for every
proxy kind, log-prob and entropy gradients, the fused output layer, at TP=1 and TP=2
(gloo), fp32 and bf16, an odd vocabulary with padded columns, a rank holding only
padding, -inf logits, a temperature, a NaN.

Without CUDA the cases run in a fresh process under Triton's interpreter
(``TRITON_INTERPRET=1`` must be set before triton is first imported, which other
tests in this process may already have done); with CUDA, in-process on the GPU.
Select with ``pytest -k triton``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lpreg.ops import vocab_parallel as vp

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


@pytest.fixture(scope="module")
def diffs() -> dict[str, float]:
    if torch.cuda.is_available():
        from tests.ops import triton_cases

        return triton_cases.run_all("cuda", with_tp2=False)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "tests.ops.triton_cases"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(diffs: dict[str, float], prefix: str) -> None:
    picked = {k: v for k, v in diffs.items() if k.startswith(prefix)}
    assert picked, f"no cases under {prefix}"
    for name, v in picked.items():
        flag = name.rsplit("/", 1)[-1] in ("membership_differs", "outside_not_sentinel", "one_side_only",
                                           "grad_dtype_differs", "padded_grad_nonzero", "nan_not_reported")
        assert (v == 0.0 if flag else v <= TOL), (name, v)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_token_stats_match_torch(diffs, dtype):
    _check(diffs, f"stats/{dtype}/")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_logprob_gradients_match_torch(diffs, dtype):
    _check(diffs, f"grad/{dtype}/")


def test_triton_fused_output_matches_torch(diffs):
    _check(diffs, "fused/")


def test_triton_tp2_matches_torch(diffs):
    if torch.cuda.is_available():
        pytest.skip("TP=2 runs on gloo CPU ranks under the interpreter (the CPU run covers it)")
    _check(diffs, "tp2/")


def test_triton_reports_nan_like_torch(diffs):
    _check(diffs, "errors/")


def test_triton_backend_choice_and_errors():
    cpu = torch.zeros(2, 5)
    assert vp.resolve_backend("auto", cpu) == "torch"  # the interpreter is for tests, never chosen
    assert vp.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="not one of"):
        vp.resolve_backend("cuda", cpu)
    with pytest.raises(RuntimeError, match="fp64"):
        vp.resolve_backend("triton", cpu.double())

"""Every Triton kernel variant the project launches compiles ahead of time for sm_80
and sm_90, with the installed Triton and with the oldest supported one
(``OLDEST_TRITON``, the version CUDA torch 2.11 pins), and divides exactly.

No GPU is needed: Triton compiles for a CUDA target on a CPU-only machine. The oldest
Triton lives in a side environment, ``.venv-triton<version>`` at the repository root,
created on first use and reused (``triton_env``). Select with ``pytest -k
triton_compile``. The interpreter tests (``test_triton.py``) check what the kernels
compute; these check that the compiler accepts them, which the interpreter does not
(it accepted a plain Python global that Triton 3.6 refuses).
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
OLDEST_TRITON = "3.6.0"
ARCHS = (80, 90)


def triton_env(version: str) -> Path:
    """The python of a cached venv holding only ``triton==version`` (created under a lock,
    so parallel test workers share one)."""
    venv = ROOT / f".venv-triton{version}"
    py = venv / "bin" / "python"
    stamp = venv / ".stamp"
    with open(ROOT / f".venv-triton{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
            res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "--only-binary=:all:", f"triton=={version}"], capture_output=True, text=True,
                                 timeout=900)
            assert res.returncode == 0, f"installing triton=={version} failed:\n{res.stderr[-2000:]}"
            stamp.write_text(version + "\n")
    return py


def _compile_all(python: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [str(python), "-m", "tests.ops.triton_compile", *[f"--arch={a}" for a in ARCHS]]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_all_compile(out: dict) -> None:
    from megatron_lpreg.ops import triton_kernels

    expected = {f"{name}/sm{a}" for name, *_ in triton_kernels.variants() for a in ARCHS}
    assert set(out["results"]) == expected
    failed = {k: v for k, v in out["results"].items() if v != "ok"}
    assert not failed, f"Triton {out['triton']} refuses {len(failed)} variant(s): {dict(list(failed.items())[:4])}"


def test_triton_compile_installed_version():
    import triton

    out = _compile_all(Path(sys.executable))
    assert out["triton"] == triton.__version__
    _assert_all_compile(out)


def test_triton_compile_oldest_supported_version():
    out = _compile_all(triton_env(OLDEST_TRITON))
    assert out["triton"] == OLDEST_TRITON
    _assert_all_compile(out)


def _launches() -> list[tuple[str, set[str]]]:
    """``(kernel name, constexpr keywords)`` of every launch in triton_rows.py, read from its source."""
    tree = ast.parse((ROOT / "megatron_lpreg" / "ops" / "triton_rows.py").read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
            if isinstance(target, ast.Attribute) and target.attr.endswith("_kernel"):
                out.append((target.attr, {k.arg for k in node.keywords}))
    return out


def test_triton_compile_table_covers_every_launch():
    """The variant table the compile tests read names every kernel the launchers call, with
    the same constexprs: a new launch or flag cannot escape the compile tests."""
    from megatron_lpreg.ops import triton_kernels

    table = {}
    for _, kernel, _, cx in triton_kernels.variants():
        table.setdefault(kernel.__name__, set()).add(frozenset(cx))
    launches = _launches()
    assert {k for k, _ in launches} == set(table)
    for kernel, keywords in launches:
        assert table[kernel] == {frozenset(keywords)}, (kernel, keywords, table[kernel])

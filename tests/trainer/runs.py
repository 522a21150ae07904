"""Helpers for tests that run the real trainer (``python -m megatron_lpreg.train``) on the tiny task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_lpreg.trainer.metrics import deterministic, read_metrics  # noqa: F401 - tests import it from here

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "tiny_cpu.yaml"

# small and fast: a few steps of everything, the structure of the demo
FAST = [
    "warm_start.steps=40", "warm_start.batch_size=32", "warm_start.lr=2.0e-3",  # the demo's is slower
    "rollout.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=6",
    "algo.mini_batches=2", "algo.neg_percent=0.5", "train.save_every=1", "train.keep_last=10",
    "reward.workers=1",
]


def task_overrides(task: Path) -> list[str]:
    return [f"model.hf_dir={task / 'model'}", f"data.train_path={task / 'train.jsonl'}"]


def train_cmd(out: Path, task: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_lpreg.train", "--config", str(CONFIG),
            *task_overrides(task), *FAST, f"train.out_dir={out}", *extra]


def run_training(out: Path, task: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(out, task, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def fresh_run(tmp_path_factory, *extra: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """``(out_dir, task_dir, process)`` of a run on a newly written tiny task (300 rows)."""
    from megatron_lpreg.data.tiny_task import write_task

    task = write_task(tmp_path_factory.mktemp("task"), train_rows=300)
    out = tmp_path_factory.mktemp("run")
    return out, task, run_training(out, task, *extra)


def metrics(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def checkpoint_tensors(ckpt: Path, hf_dir: Path) -> dict[str, torch.Tensor]:
    from megatron_lpreg.model.checkpoint import read_tensors
    from megatron_lpreg.model.hf_config import load_spec

    return dict(read_tensors(ckpt / "dist", load_spec(hf_dir)))

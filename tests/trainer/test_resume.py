"""SIGKILL mid-run, resume: the run ends bit-identical (weights and logged metrics)
to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from megatron_lpreg.data.tiny_task import write_task
from tests.trainer.runs import (
    ROOT,
    checkpoint_tensors,
    deterministic,
    metrics,
    run_training,
    train_cmd,
)

pytest.importorskip("vllm")

STEPS, KILL_AFTER = 4, 2


def test_kill_and_resume_is_exact(tmp_path):
    task = write_task(tmp_path / "task", train_rows=300)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_training(straight, task, f"train.steps={STEPS}")

    proc = subprocess.Popen(train_cmd(killed, task, f"train.steps={STEPS}"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / f"step_{KILL_AFTER:06d}"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the kill point"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / f"step_{STEPS:06d}").exists()

    run_training(killed, task, f"train.steps={STEPS}")

    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # no duplicate or missing records
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]
    wa = checkpoint_tensors(straight / "checkpoints" / f"step_{STEPS:06d}", task / "model")
    wb = checkpoint_tensors(killed / "checkpoints" / f"step_{STEPS:06d}", task / "model")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[n], wb[n]) for n in wa), [n for n in wa if not torch.equal(wa[n], wb[n])]

"""SIGKILL mid-run, resume: the run ends bit-identical (weights and logged metrics)
to an uninterrupted one, for an Lp-Reg run with AER, DAPO's dynamic sampling and
overlong penalty, and TIS (every piece of state beyond the weights); and for the
default Lp-Reg run killed before its first update, which resumes from the step-0
checkpoint (one without optimiser moments)."""

from __future__ import annotations

import json
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

STEPS = 4


# the default Lp-Reg run, and Lp-Reg with every piece of state beyond the weights: AER's
# controller, DAPO's refill (the data order moves by every prompt drawn), the overlong
# penalty and truncated importance sampling
METHODS = {
    "lp_reg": [],
    "lp_reg_aer_dapo_tis": ["algo.loss=lp_reg", "algo.entropy_control=aer", "algo.aer_alpha_init=0.01",
                            "algo.tis_cap=2.0", "rollout.dynamic_sampling=true", "reward.overlong_buffer_tokens=2"],
}


@pytest.mark.parametrize(("method", "kill_after"), [("lp_reg_aer_dapo_tis", 2), ("lp_reg", 0)])
def test_kill_and_resume_is_exact(tmp_path, method, kill_after):
    task = write_task(tmp_path / "task", train_rows=300)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = [f"train.steps={STEPS}", *METHODS[method]]
    run_training(straight, task, *extra)

    proc = subprocess.Popen(train_cmd(killed, task, *extra), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / f"step_{kill_after:06d}"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the kill point"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / f"step_{STEPS:06d}").exists()

    run_training(killed, task, *extra)
    resumes = [json.loads(line) for line in (killed / "resume_log.jsonl").read_text().splitlines()]
    assert [r["from_step"] for r in resumes] == [kill_after]

    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # no duplicate or missing records
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]
    wa = checkpoint_tensors(straight / "checkpoints" / f"step_{STEPS:06d}", task / "model")
    wb = checkpoint_tensors(killed / "checkpoints" / f"step_{STEPS:06d}", task / "model")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[n], wb[n]) for n in wa), [n for n in wa if not torch.equal(wa[n], wb[n])]
    if method == "lp_reg_aer_dapo_tis":  # the pieces ran, and their state moved
        # the coefficient is non-zero at the kill point and moves every step (entropy above the target)
        assert all(r["aer/target_entropy"] > 0 and r["aer/alpha"] > 0 for r in a)
        assert len({r["aer/next_alpha"] for r in a}) == STEPS
        assert all(r["rollout/prompts_drawn"] >= 8 for r in a) and "reward/overlong_penalty_mean" in a[0]

"""A real one-node Slurm: submit the tiny CPU training through `python -m launch`
(nemo-run's SlurmExecutor when the launcher environment `.venv-launch` exists, the
plain sbatch path otherwise), `scontrol requeue` it mid-run, and check that the
requeued job resumes from the checkpoint and finishes. Everything started is stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from launch.__main__ import REPO
from megatron_lpreg.data.tiny_task import write_task
from tests.launch.slurm_cluster import SlurmCluster, ensure_slurm
from tests.trainer.runs import FAST, task_overrides

pytest.importorskip("vllm")
STEPS = 10
LAUNCH_PYTHON = REPO / ".venv-launch" / "bin" / "python"


@pytest.fixture
def cluster(tmp_path):
    reason = ensure_slurm()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    c = SlurmCluster(tmp_path / "slurm").start()
    yield c
    c.stop()


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_submit_requeue_resume(cluster, tmp_path):
    task = write_task(tmp_path / "task", train_rows=300)
    out = tmp_path / "run"
    nemo = LAUNCH_PYTHON.exists()
    launcher = [str(LAUNCH_PYTHON)] if nemo else [sys.executable]
    print(f"launching through {'nemo-run' if nemo else 'plain sbatch (no .venv-launch: run make launch-venv)'}")
    cmd = [*launcher, "-m", "launch", "tiny_cpu", "--executor", "slurm", "--out-dir", str(out),
           "--python", str(REPO / ".venv" / "bin" / "python"), "--time", "00:20:00",
           *([] if nemo else ["--plain"]),
           *task_overrides(task), *FAST, f"train.steps={STEPS}", "train.save_every=1", "warm_start.steps=30"]
    sub = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=cluster.env, timeout=300)
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-3000:]
    jobs = cluster.run("squeue", "-h", "-o", "%i %j").stdout.split()
    assert len(jobs) == 2 and jobs[1].endswith("lpreg-tiny_cpu"), jobs
    job = jobs[0]

    ckpts = out / "checkpoints"
    _wait(lambda: (ckpts / "step_000003").exists(), 600, "step 3's checkpoint")
    cluster.run("scontrol", "requeue", job)
    _wait(lambda: cluster.job_state(job) == "PENDING", 120, "the requeued job to be pending")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip Slurm's requeue delay
    _wait(lambda: (out / "FINISHED").exists(), 900, "the requeued job to finish")
    _wait(lambda: cluster.job_state(job) == "", 120, "the job to leave the queue")

    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == list(range(1, STEPS + 1)), steps  # resumed: no step lost or logged twice
    assert (ckpts / f"step_{STEPS:06d}" / "trainer_state.json").exists()
    with open(out / "resume_log.jsonl") as f:
        resumes = [json.loads(line) for line in f if line.strip()]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 3, resumes  # continued, not restarted

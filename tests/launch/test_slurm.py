"""A real one-node Slurm: submit the tiny CPU training through `python -m launch`
(nemo-run's SlurmExecutor when the launcher environment `.venv-launch` exists, the
plain sbatch path otherwise), `scontrol requeue` it mid-run, and check that the
requeued job resumes from the checkpoint and finishes. A run that fails at every
start (an injected crash) is restarted in place `launch.max_restarts` times, then the
job fails with one line and is not requeued. Everything started is stopped."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from launch.__main__ import REPO
from megatron_lpreg.data.tiny_task import write_task
from tests.launch.slurm_cluster import SlurmCluster, ensure_slurm, start_or_skip
from tests.trainer.runs import FAST, task_overrides

pytest.importorskip("vllm")
STEPS = 10
LAUNCH_PYTHON = REPO / ".venv-launch" / "bin" / "python"


@pytest.fixture
def cluster(tmp_path):
    c = start_or_skip(SlurmCluster(tmp_path / "slurm"), ensure_slurm())
    yield c
    c.stop()


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
    cluster.wait(lambda: (ckpts / "step_000003").exists() or cluster.job_state(job) == "", 600, "step 3's checkpoint")
    assert (ckpts / "step_000003").exists(), "the job ended before step 3"
    cluster.run("scontrol", "requeue", job)
    cluster.wait(lambda: cluster.job_state(job) == "PENDING", 120, "the requeued job to be pending")
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # skip Slurm's requeue delay
    cluster.wait(lambda: (out / "FINISHED").exists() or cluster.job_state(job) == "", 900, "the requeued job to finish")
    cluster.wait(lambda: cluster.job_state(job) == "", 120, "the job to leave the queue")
    assert (out / "FINISHED").exists(), "the requeued job ended unfinished"

    with open(out / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == list(range(1, STEPS + 1)), steps  # resumed: no step lost or logged twice
    assert (ckpts / f"step_{STEPS:06d}" / "trainer_state.json").exists()
    with open(out / "resume_log.jsonl") as f:
        resumes = [json.loads(line) for line in f if line.strip()]
    # continued, not restarted in place: one resume, no restart record
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 3, resumes


@pytest.mark.multinode
def test_restart_limit_stops_a_run_that_fails_at_every_start(cluster, tmp_path):
    task = write_task(tmp_path / "task", train_rows=300)
    out = tmp_path / "run"
    fault = "LPREG_TEST_FAULT=0:0:update:crash"  # step 0's update, at every start (each resumes at step 0)
    cmd = [sys.executable, "-m", "launch", "tiny_cpu", "--executor", "slurm", "--plain", "--out-dir", str(out),
           "--python", str(REPO / ".venv" / "bin" / "python"), "--time", "00:20:00", "--max-restarts", "1",
           "--env", fault, *task_overrides(task), *FAST, "train.steps=3", "warm_start.steps=0"]
    sub = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=cluster.env, timeout=300)
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-3000:]
    job = cluster.run("squeue", "-h", "-o", "%i").stdout.split()[0]
    cluster.wait(lambda: cluster.job_state(job) == "", 900, "the job to end")

    log = "".join(p.read_text(errors="replace") for p in (out / "slurm").glob("slurm-*.out"))
    last = [line for line in log.splitlines() if "giving up" in line]
    assert len(last) == 1, log[-4000:]
    assert re.fullmatch(r"\[launch\] node 0: giving up: the trainer failed 2 time\(s\), 1 restart\(s\) of "
                        r"launch.max_restarts=1 \(exit code \d+\); last error: rank 0: InjectedFault: injected crash "
                        r"in phase 'update' of step 0 \(LPREG_TEST_FAULT\)", last[0]), last[0]
    records = [json.loads(line) for line in (out / "resume_log.jsonl").read_text().splitlines()]
    restarts = [r for r in records if "restart" in r]
    assert [(r["restart"], r["max_restarts"], r["job"]) for r in restarts] == [(1, 1, job)], records
    assert restarts[0]["cause"].startswith("rank 0: InjectedFault: injected crash"), records
    assert not (out / "FINISHED").exists() and "requeueing" not in log
    info = cluster.run("scontrol", "show", "job", job, check=False).stdout
    assert "JobState=FAILED" in info and "Restarts=0" in info, info  # failed for good, not requeued

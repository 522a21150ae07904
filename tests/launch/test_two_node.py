"""Two Slurm nodes for real (``pytest -k two_node``): two slurmd daemons in their own
network and UTS namespaces (:class:`tests.launch.slurm_cluster.TwoNodeSlurmCluster`:
hosts lpr-n0 / lpr-n1 at 10.251.0.1 / .2, no other interface), the tiny task through
``python -m launch`` with one process per node, so torchrun's c10d rendezvous on the
first node (MASTER_ADDR), node ranks and every process group (megatron's, vLLM's,
the world's) cross the two hosts over the namespaces' own addresses.

* CI: DP=2 across the nodes; the rank on the second node is SIGKILLed mid-run,
  torchrun restarts both nodes' ranks in place, and the run resumes and finishes.
* ``make test-multinode`` (``LPREG_MULTINODE=1``): TP=2 across the nodes, Slurm's
  pre-termination signal mid-run, the job requeued, resumed on both nodes and
  bit-identical (metrics and weights) to an uninterrupted two-node run; the
  interrupted job goes through nemo-run's SlurmExecutor when ``.venv-launch`` exists
  (``make launch-venv``), the uninterrupted one through the plain sbatch script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.__main__ import REPO
from megatron_lpreg.data.tiny_task import write_task
from tests.launch.slurm_cluster import (
    TwoNodeSlurmCluster,
    ensure_slurm,
    netns_unavailable,
    start_or_skip,
)
from tests.trainer.runs import FAST, checkpoint_tensors, deterministic, metrics, task_overrides

pytest.importorskip("vllm")
STEPS = 6
LAUNCH_PYTHON = REPO / ".venv-launch" / "bin" / "python"


@pytest.fixture
def two_nodes(tmp_path):
    c = start_or_skip(TwoNodeSlurmCluster(tmp_path / "slurm"), ensure_slurm() or netns_unavailable())
    yield c
    c.stop()


def submit(cluster, out: Path, task: Path, *extra: str, nemo: bool = False) -> str:
    """Submit the tiny task on both nodes, one process each, from the head node."""
    launcher = [str(LAUNCH_PYTHON)] if nemo else [sys.executable]
    cmd = [*cluster.prefix, *launcher, "-m", "launch", "tiny_cpu", "--executor", "slurm", "--nodes", "2",
           "--procs-per-node", "1", "--out-dir", str(out), "--python", str(REPO / ".venv" / "bin" / "python"),
           "--time", "00:30:00", *([] if nemo else ["--plain"]), *task_overrides(task), *FAST,
           f"train.steps={STEPS}", "warm_start.steps=30", *extra]
    sub = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=cluster.env, timeout=300)
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-3000:]
    jobs = dict(line.split(maxsplit=1) for line in cluster.run("squeue", "-h", "-o", "%i %j").stdout.splitlines())
    mine = [j for j, name in jobs.items() if name.endswith("lpreg-tiny_cpu")]
    return max(mine, key=int)


def rank_pid(ns: str, rank: int) -> int:
    """The trainer process of global ``rank`` among the processes of network namespace ``ns``."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"megatron_lpreg.train" in cmd and b"torch.distributed.run" not in cmd and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} in namespace {ns}")


def slurm_log(out: Path) -> str:
    """The job's output: the plain script's ``slurm-<id>.out``, or the logs of the
    nemo-run experiment (in ``$NEMORUN_HOME``, default ``~/.nemo_run``) whose job script
    exports ``OUT_DIR=<out>``."""
    logs = sorted((out / "slurm").glob("slurm-*.out"))
    home = Path(os.environ.get("NEMORUN_HOME", Path.home() / ".nemo_run")) / "experiments" / "lpreg-tiny_cpu"
    for script in home.glob("*/*_sbatch.sh"):
        if f"export OUT_DIR={out}\n" in script.read_text(errors="replace"):
            logs += sorted(script.parent.rglob("*.out"))
    return "".join(p.read_text(errors="replace") for p in logs)


def finished(cluster, out: Path, job: str, timeout: float = 900) -> None:
    cluster.wait(lambda: (out / "FINISHED").exists() or cluster.job_state(job) == "", timeout, "the run to finish")
    cluster.wait(lambda: cluster.job_state(job) == "", 120, "the job to leave the queue")
    assert (out / "FINISHED").exists(), slurm_log(out)[-4000:]


def test_two_node_dp2_run_survives_a_killed_rank(two_nodes, tmp_path):
    task = write_task(tmp_path / "task", train_rows=300)
    out = tmp_path / "run"
    job = submit(two_nodes, out, task, "parallel.tp=1")
    two_nodes.wait(lambda: (out / "checkpoints" / "step_000002").exists(), 900, "step 2's checkpoint")
    assert two_nodes.job_state(job) == "RUNNING"
    os.kill(rank_pid(two_nodes.ns[1], rank=1), signal.SIGKILL)  # rank 1 runs on the second node
    finished(two_nodes, out, job)

    log = slurm_log(out)
    assert "[launch] node 0: run finished" in log and "[launch] node 1: run finished" in log, log[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))  # no step lost or logged twice
    records = [json.loads(line) for line in (out / "resume_log.jsonl").read_text().splitlines()]
    restarts = [r for r in records if "restart" in r]
    resumes = [r for r in records if "from_step" in r]
    assert [r["restart"] for r in restarts] == [1] and restarts[0]["job"] == job, records
    assert restarts[0]["max_restarts"] == 3 and restarts[0]["cause"], records
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 2, records  # restarted in place, resumed
    print("restart cause:", restarts[0]["cause"])
    for r in metrics(out):  # the stragglers' view: both ranks' phase times in every step
        assert r["perf/slowest_rank"] in (0, 1) and r["perf/update_max_s"] >= r["perf/update_min_s"] > 0


@pytest.mark.multinode
def test_two_node_tp2_requeue_is_bit_identical(two_nodes, tmp_path):
    task = write_task(tmp_path / "task", train_rows=300)
    straight, requeued = tmp_path / "straight", tmp_path / "requeued"
    # both at once: each node has a core for each job
    a = submit(two_nodes, straight, task)
    b = submit(two_nodes, requeued, task, nemo=LAUNCH_PYTHON.exists())
    two_nodes.wait(lambda: (requeued / "checkpoints" / "step_000002").exists(), 900, "step 2's checkpoint")
    # Slurm's pre-termination signal (the job's --signal=USR1@<grace>), sent now
    two_nodes.run("scancel", "--signal=USR1", b)
    two_nodes.wait(lambda: two_nodes.job_state(b) == "PENDING", 300, "the job to requeue itself")
    assert not (requeued / "FINISHED").exists()
    two_nodes.run("scontrol", "update", f"JobId={b}", "StartTime=now")  # skip Slurm's requeue delay
    finished(two_nodes, straight, a)
    finished(two_nodes, requeued, b)

    log = slurm_log(requeued)
    assert "node 0: USR1" in log and "stopped before the end: requeueing job" in log, log[-3000:]
    assert log.count("[launch] node 1: run finished") == 1
    resumes = [json.loads(line) for line in (requeued / "resume_log.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 2 and "restart" not in resumes[0], resumes
    ma, mb = metrics(straight), metrics(requeued)
    assert [r["step"] for r in mb] == list(range(1, STEPS + 1))
    assert [deterministic(r) for r in ma] == [deterministic(r) for r in mb]
    last = f"step_{STEPS:06d}"
    wa = checkpoint_tensors(straight / "checkpoints" / last, task / "model")
    wb = checkpoint_tensors(requeued / "checkpoints" / last, task / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)

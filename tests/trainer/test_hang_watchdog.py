"""A rank that hangs mid-run (``pytest -k hang_watchdog``): rank 1 of the tiny TP=2 run
stops making progress in the update of step 2 (the test-only ``LPREG_TEST_FAULT``);
every rank ends within ``train.hang_timeout_s`` plus :data:`SLACK`, the stack file
names the phase and the function that hung, the launcher prints the one line, and
the run, started again, resumes from its last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from megatron_lpreg.data.tiny_task import write_task
from megatron_lpreg.trainer.watchdog import FAULT_ENV
from tests.trainer.runs import ROOT, metrics, run_training, train_cmd

pytest.importorskip("vllm")

STEPS = 4
HANG_STEP = 2           # the loop's step 2 (its record is step 3); checkpoint step_000002 precedes it
# above every phase's normal length here: the first rollout (vLLM's warm-up) takes up to
# ~25 s on a loaded 2-core machine
HANG_TIMEOUT_S = 40
# after the timeout: the step's phases before its update (the clock starts at the
# checkpoint before), the watchdog's check interval (2 s) and grace (4 s), torchrun
# stopping the other rank, the processes' exit
SLACK_S = 30


@pytest.mark.multinode
def test_hang_watchdog_ends_every_rank_and_the_run_resumes(tmp_path):
    task = write_task(tmp_path / "task", train_rows=300)
    out = tmp_path / "run"
    extra = [f"train.steps={STEPS}"]
    log = tmp_path / "hung.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{FAULT_ENV: f"1:{HANG_STEP}:update:hang"})
    with open(log, "w") as f:
        proc = subprocess.Popen(train_cmd(out, task, *extra, f"train.hang_timeout_s={HANG_TIMEOUT_S}"), cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        marker = out / "checkpoints" / f"step_{HANG_STEP:06d}"
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached step {HANG_STEP}:\n{log.read_text()[-3000:]}"
        t0 = time.monotonic()
        rc = proc.wait(timeout=HANG_TIMEOUT_S + SLACK_S + 120)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    text = log.read_text()
    print(f"hang detected and every rank ended {ended:.1f} s after step {HANG_STEP}'s checkpoint "
          f"(timeout {HANG_TIMEOUT_S} s)")
    assert rc != 0
    assert HANG_TIMEOUT_S <= ended <= HANG_TIMEOUT_S + SLACK_S, (ended, text[-3000:])

    report = (out / "errors" / "rank1-hang.txt").read_text()
    first = report.splitlines()[0]
    assert re.fullmatch(rf"rank 1 hung: no progress for \d+ s in phase 'update' of step {HANG_STEP} \(limit "
                        rf"train.hang_timeout_s={HANG_TIMEOUT_S}\); exit 75, stacks in .*rank1-hang.txt", first), first
    # the stack of the thread that hung: the loop's update, then the injected hang
    assert "Thread MainThread" in report, report[:3000]
    main = report.split("Thread MainThread")[1].split("\nThread ")[0]
    assert re.search(r"loop\.py\", line \d+, in update\n", main) and "in injected_hang" in main, main
    assert f"train: error: {first}" in text  # the launcher's one line per report
    # rank 0 ended too: it waited in the update's collective and reported that, or failed in it
    rank0 = list((out / "errors").glob("rank0*.txt"))
    assert rank0, text[-3000:]
    print("rank 0:", rank0[0].read_text().splitlines()[0])
    assert [r["step"] for r in metrics(out)] == list(range(1, HANG_STEP + 1))
    assert not (out / "checkpoints" / f"step_{HANG_STEP + 1:06d}").exists()

    run_training(out, task, *extra)  # started again without the fault
    resumes = [json.loads(line) for line in (out / "resume_log.jsonl").read_text().splitlines()]
    assert [r["from_step"] for r in resumes] == [HANG_STEP]
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    assert (out / "FINISHED").exists()

"""The record of in-place restarts: the cause read from the previous start's error
reports (a hang first), one record per restart, and the launcher's last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from megatron_lpreg.trainer.restarts import (
    allocation,
    cause,
    give_up_line,
    last_start,
    record_start,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_cause_prefers_a_hang_then_the_lowest_rank(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    assert cause(errors, 0).startswith("no error report")
    (errors / "rank1.txt").write_text("RuntimeError: boom\n\ntraceback\n")
    (errors / "rank0.txt").write_text("RuntimeError: Connection closed by peer\n")
    assert cause(errors, 0) == "rank 0: RuntimeError: Connection closed by peer"
    (errors / "rank1-hang.txt").write_text("rank 1 hung: no progress for 31 s in phase 'update'\n")
    assert cause(errors, 0) == "rank 1 hung: no progress for 31 s in phase 'update'"
    for f in errors.iterdir():
        _age(f, 100)
    assert cause(errors, time.time() - 10).startswith("no error report")  # older than the start: not its cause


def test_record_start_logs_restarts_with_their_cause(tmp_path):
    env = {"TORCHELASTIC_MAX_RESTARTS": "3", "SLURM_JOB_ID": "42"}
    assert record_start(tmp_path, restarted=False, environ=env) is None  # a first start: only marked
    assert not (tmp_path / "resume_log.jsonl").exists() and last_start(tmp_path) > 0
    _age(tmp_path / "errors" / ".last_start", 50)
    (tmp_path / "errors" / "rank2.txt").write_text("InjectedFault: injected crash\n")
    rec = record_start(tmp_path, restarted=True, environ=env)
    assert (rec["restart"], rec["max_restarts"], rec["job"], rec["allocation"]) == (1, 3, "42", "42.0")
    assert rec["cause"] == "rank 2: InjectedFault: injected crash"
    # the next restart finds no newer report: the previous start was killed
    rec2 = record_start(tmp_path, restarted=True, environ=env)
    assert rec2["restart"] == 2 and rec2["cause"].startswith("no error report")
    # Slurm requeued the job: a new allocation counts from 1 again
    rec3 = record_start(tmp_path, restarted=True, environ=dict(env, SLURM_RESTART_COUNT="1"))
    assert (rec3["restart"], rec3["allocation"]) == (1, "42.1")
    log = [json.loads(line) for line in (tmp_path / "resume_log.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in log] == [1, 2, 1]
    assert allocation({}) == ""


def test_give_up_line_counts_this_jobs_restarts(tmp_path):
    (tmp_path / "resume_log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"from_step": 2, "checkpoint": "step_000002"},
        {"restart": 5, "allocation": "7.0", "cause": "old job"},
        {"restart": 1, "allocation": "9.0", "cause": "x"}, {"restart": 2, "allocation": "9.0", "cause": "y"}]) + "\n")
    record_start(tmp_path, restarted=False)
    (tmp_path / "errors" / "rank0.txt").write_text("InjectedFault: injected crash in phase 'update' of step 1\n")
    line = give_up_line(tmp_path, max_restarts=2, exit_code=1, alloc="9.0")
    assert line == ("giving up: the trainer failed 3 time(s), 2 restart(s) of launch.max_restarts=2 (exit code 1); "
                    "last error: rank 0: InjectedFault: injected crash in phase 'update' of step 1")
    out = subprocess.run([sys.executable, "-m", "megatron_lpreg.trainer.restarts", str(tmp_path), "--max-restarts",
                          "2", "--exit-code", "1", "--allocation", "9.0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == line

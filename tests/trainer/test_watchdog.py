"""The hang watchdog on its own (no trainer): it fires only after the timeout without
a beat, its report names the phase, the step and the function that hung, every beat
resets it, and the test-only fault switch parses and fires once. The trainer run
that hangs is in test_hang_watchdog.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed  # noqa: F401 - imported, as in a rank: a report does not wait for torch's import

from megatron_lpreg.trainer.watchdog import (
    HANG_EXIT_CODE,
    Fault,
    Heartbeat,
    InjectedFault,
    collective_timeout_s,
)


def stuck_in_a_named_function(event: threading.Event) -> None:
    event.wait(30)


def test_fires_after_the_timeout_and_names_the_phase_step_and_function(tmp_path, capsys):
    exits = []
    done = threading.Event()
    hb = Heartbeat(1.0, tmp_path, rank=3, exit=lambda code: (exits.append(code), done.set()))
    hb.new_step(7)
    hb.beat("update")
    release = threading.Event()
    worker = threading.Thread(target=stuck_in_a_named_function, args=(release,), name="stuck")
    worker.start()
    t0 = time.monotonic()
    hb.start()
    try:
        assert done.wait(10), "the watchdog never fired"
        elapsed = time.monotonic() - t0
    finally:
        release.set()
        worker.join()
        hb.close()
    assert exits == [HANG_EXIT_CODE]
    assert 1.0 <= elapsed <= 1.0 + hb.interval_s + hb.grace_s + 1.0, elapsed
    report = (tmp_path / "rank3-hang.txt").read_text()
    first = report.splitlines()[0]
    assert first.startswith("rank 3 hung: no progress for ") and "in phase 'update' of step 7" in first, first
    assert "train.hang_timeout_s=1" in first and f"exit {HANG_EXIT_CODE}" in first
    assert "Thread stuck" in report and "in stuck_in_a_named_function" in report  # every thread's stack
    assert "torch" in report.splitlines()[-1]  # the collective state line (no process group here)
    assert first in capsys.readouterr().err  # the one line on stderr


def test_beats_keep_it_quiet_and_zero_turns_it_off(tmp_path):
    exits = []
    hb = Heartbeat(0.6, tmp_path, rank=0, exit=exits.append).start()
    try:
        for _ in range(20):  # 2 s of progress, a beat every 0.1 s
            hb.beat("rollout")
            time.sleep(0.1)
            assert hb.stalled()[:2] == ("rollout", None) and hb.stalled()[2] < 0.5
    finally:
        hb.close()
    assert exits == [] and not (tmp_path / "rank0-hang.txt").exists()
    off = Heartbeat(0, tmp_path, rank=0, exit=exits.append).start()
    time.sleep(0.3)
    off.close()
    assert exits == [] and off._thread is None


def test_collective_timeout_outlasts_the_watchdog():
    assert collective_timeout_s(0) is None
    hb = Heartbeat(1800, "/nonexistent", rank=0)
    assert collective_timeout_s(1800) > 1800 + hb.interval_s + hb.grace_s


@pytest.mark.parametrize("spec,fault", [
    ("1:2:update:hang", Fault(1, 2, "update", "hang")),
    ("0:0:rollout:crash", Fault(0, 0, "rollout", "crash")),
    ("1:3:old_logprob:sleep=2.5", Fault(1, 3, "old_logprob", "sleep", 2.5)),
])
def test_fault_switch_parses(spec, fault):
    assert Fault.from_env({"LPREG_TEST_FAULT": spec}) == fault
    assert Fault.from_env({}) is None


@pytest.mark.parametrize("spec", ["1:2:update", "x:2:update:hang", "1:2:update:explode", "1:2:update:sleep=soon"])
def test_a_bad_fault_switch_is_one_line(spec):
    with pytest.raises(ValueError, match="LPREG_TEST_FAULT=") as e:
        Fault.from_env({"LPREG_TEST_FAULT": spec})
    assert "\n" not in str(e.value)


def test_fault_fires_once_on_its_rank_step_and_phase(tmp_path):
    fault = Fault(1, 2, "update", "crash")
    other_rank = Heartbeat(0, tmp_path, rank=0, fault=fault)
    other_rank.new_step(2)
    other_rank.beat("update")  # not this rank's fault
    hb = Heartbeat(0, tmp_path, rank=1, fault=fault)
    hb.new_step(1)
    hb.beat("update")  # not yet: step 1
    hb.new_step(2)
    hb.beat("rollout")
    with pytest.raises(InjectedFault, match="injected crash in phase 'update' of step 2"):
        hb.beat("update")
    hb.beat("update")  # once: the phase's next beat passes

"""Hang detection: a heartbeat that every phase of the loop advances, and a thread
that ends the rank when it stops.

Each rank's :class:`Heartbeat` records the phase it last entered (rollout, grading,
old-policy pass, each optimiser step, eval, checkpoint, ...) and when. A daemon
thread looks at it every few seconds; when no phase has begun for
``train.hang_timeout_s`` seconds the rank

* writes every thread's Python stack (and, on NCCL, torch's flight recorder of
  collectives) to ``<out_dir>/errors/rank<r>-hang.txt``, whose first line is the
  message below;
* prints one line: ``rank <r> hung: no progress for <s> s in phase '<phase>' of step
  <n> ...``;
* waits :attr:`Heartbeat.grace_s` (so ranks that stalled at the same moment write
  their stacks too) and exits with :data:`HANG_EXIT_CODE`.

A rank blocked in a collective on a stuck peer stalls as well and reports the same
way; its stack ends in the collective, while the stuck rank's names what it was
doing. If a rank cannot run Python at all (a C call holding the GIL), the
collectives' own timeout (:func:`collective_timeout_s`, given to
``init_process_group``) ends the ranks waiting on it, and the launcher's
``srun --kill-on-bad-exit`` the rest.

Test-only fault injection, read here and nowhere else: ``LPREG_TEST_FAULT=<rank>:
<step>:<phase>:<kind>`` makes global rank ``rank`` misbehave when it enters ``phase``
during loop step ``step`` (0-based, the step that produces record ``step + 1``):
``hang`` (sleeps forever), ``sleep=<s>`` (a straggler: ``s`` seconds late) or
``crash`` (raises :class:`InjectedFault`).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

HANG_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: a restart may succeed
FAULT_ENV = "LPREG_TEST_FAULT"
FAULT_KINDS = ("hang", "crash", "sleep=<seconds>")


def collective_timeout_s(hang_timeout_s: float) -> float | None:
    """The process groups' timeout for a run with ``hang_timeout_s`` (None: the
    backend's default, when the watchdog is off). Longer than the watchdog's limit
    plus its check and grace, so a stuck rank reports its own stack before the
    ranks waiting on it give up."""
    return hang_timeout_s + 60.0 if hang_timeout_s > 0 else None


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    """A test's injected fault (see the module docstring)."""

    rank: int
    step: int
    phase: str
    kind: str            # hang | crash | sleep
    seconds: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Fault | None:
        spec = environ.get(FAULT_ENV, "")
        if not spec:
            return None
        parts = spec.split(":")
        try:
            rank, step, phase, kind = int(parts[0]), int(parts[1]), parts[2], parts[3]
            seconds = float(kind.removeprefix("sleep=")) if kind.startswith("sleep=") else 0.0
        except (IndexError, ValueError):
            raise ValueError(f"{FAULT_ENV}={spec!r} is not <rank>:<step>:<phase>:<kind> with kind one of "
                             f"{FAULT_KINDS}") from None
        kind = "sleep" if kind.startswith("sleep=") else kind
        if kind not in ("hang", "crash", "sleep") or len(parts) != 4:
            raise ValueError(f"{FAULT_ENV}={spec!r}: kind {parts[3]!r} is not one of {FAULT_KINDS}")
        return cls(rank, step, phase, kind, seconds)

    def trigger(self) -> None:
        if self.kind == "crash":
            raise InjectedFault(f"injected crash in phase {self.phase!r} of step {self.step} ({FAULT_ENV})")
        if self.kind == "sleep":
            time.sleep(self.seconds)
            return
        injected_hang()


def injected_hang() -> None:
    """A rank stuck for good (the test's stand-in for a wedged kernel or a lost peer)."""
    while True:
        time.sleep(3600)


class Heartbeat:
    """This rank's progress marker and the thread that watches it (module docstring).

    ``timeout_s`` 0 turns the watching off (the beats still record the phase).
    ``exit`` and ``clock`` are for tests of this class alone."""

    def __init__(self, timeout_s: float, report_dir: Path, *, rank: int, fault: Fault | None = None,
                 exit: Callable[[int], None] = os._exit, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = float(timeout_s)
        self.report_path = Path(report_dir) / f"rank{rank}-hang.txt"
        self.rank = rank
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.interval_s = min(5.0, max(0.1, self.timeout_s / 20))
        self.grace_s = 2 * self.interval_s
        self._exit = exit
        self._clock = clock
        self._lock = threading.Lock()
        self._phase, self._step, self._since = "start", None, clock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._fault_fired = False

    @classmethod
    def for_run(cls, timeout_s: float, out_dir: str | Path, rank: int) -> Heartbeat:
        """The run's heartbeat, with the test's fault when ``LPREG_TEST_FAULT`` names one."""
        return cls(timeout_s, Path(out_dir) / "errors", rank=rank, fault=Fault.from_env(os.environ))

    def start(self) -> Heartbeat:
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="lpreg-hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def new_step(self, step: int) -> None:
        with self._lock:
            self._step = step
        self.beat("step")

    def beat(self, phase: str) -> None:
        """Progress: ``phase`` begins now."""
        with self._lock:
            self._phase, self._since = phase, self._clock()
        f = self.fault
        if f is not None and f.phase == phase and f.step == self._step and not self._fault_fired:
            self._fault_fired = True  # once: a phase may begin several times in a step
            f.trigger()

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
            self._thread = None

    def stalled(self) -> tuple[str, int | None, float]:
        """``(phase, step, seconds since it began)``."""
        with self._lock:
            return self._phase, self._step, self._clock() - self._since

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval_s):
            phase, step, seconds = self.stalled()
            if seconds >= self.timeout_s:
                message = self.report(phase, step, seconds)
                print(f"[watchdog] {message}", file=sys.stderr, flush=True)
                # ranks that stalled with this one (waiting on it) write their stacks before
                # this exit makes the launcher stop them
                if self._stopped.wait(self.grace_s):
                    return
                self._exit(HANG_EXIT_CODE)
                return

    def report(self, phase: str, step: int | None, seconds: float) -> str:
        """Write the stacks; returns the one-line message (also the file's first line)."""
        where = f"phase {phase!r}" + (f" of step {step}" if step is not None else "")
        message = (f"rank {self.rank} hung: no progress for {seconds:.0f} s in {where} (limit "
                   f"train.hang_timeout_s={self.timeout_s:g}); exit {HANG_EXIT_CODE}, stacks in {self.report_path}")
        text = [message, "", f"host {socket.gethostname()}, pid {os.getpid()}, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}", "", thread_stacks(), collective_state()]
        try:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            self.report_path.write_text("\n".join(text) + "\n")
        except OSError as e:
            message += f" (could not write the stacks: {e})"
        return message


def thread_stacks() -> str:
    """Every thread's Python stack, innermost call last (as a traceback reads)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:")
        out.append("".join(traceback.format_stack(frame)).rstrip())
        out.append("")
    return "\n".join(out)


def collective_state() -> str:
    """What torch knows of this rank's collectives: NCCL's flight recorder (kept when
    ``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0, which ``launch/`` sets on GPU jobs)."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return "torch.distributed: not initialised"
        backend = dist.get_backend()
        if backend != "nccl":
            return f"torch.distributed backend {backend}: keeps no record of collectives in flight"
        import pickle

        from torch._C._distributed_c10d import _dump_nccl_trace

        entries = pickle.loads(_dump_nccl_trace()).get("entries", [])
        lines = [f"NCCL flight recorder, last {min(len(entries), 32)} of {len(entries)} collectives (newest last):"]
        for e in entries[-32:]:
            lines.append(f"  seq {e.get('collective_seq_id')} {e.get('profiling_name')} group "
                         f"{e.get('process_group')} state {e.get('state')}")
        return "\n".join(lines)
    except Exception as e:  # noqa: BLE001 - a report must not fail on what torch lacks
        return f"torch collective state unavailable: {type(e).__name__}: {e}"

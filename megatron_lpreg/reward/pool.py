"""Run the grader on many responses in worker processes, each under a time and memory limit.

A grader that hangs (sympy simplifying ``10^{10^{10}}``), crashes or exhausts
memory costs that one sample a score of 0 with a reason; the worker is replaced
and training goes on. Workers are long-lived (importing sympy costs a second)
and started with ``spawn``, so they never inherit the trainer's threads or
process groups.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait


@dataclass(frozen=True)
class Graded:
    score: float
    reason: str  # correct | wrong | no_answer | unparsable | timeout | crashed | error:<type> ...


def _worker(conn, memory_mb: int, grade_fn: Callable) -> None:
    import resource

    if memory_mb > 0:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        response, truth = task
        try:
            score, reason = grade_fn(response, truth)
        except MemoryError:
            score, reason = 0.0, "out_of_memory"
        except RecursionError:
            score, reason = 0.0, "too_deep"
        except Exception as e:  # noqa: BLE001 - any grader failure scores 0, with its type
            score, reason = 0.0, f"error:{type(e).__name__}"
        conn.send((float(score), reason))


def _default_grade(response: str, truth: str, answer_format: str = "any"):
    from megatron_lpreg.reward.math_grader import grade

    return grade(response, truth, answer_format)


def _coin_grade(response: str, truth: str):
    from megatron_lpreg.data.coin_task import grade

    return grade(response, truth)


GRADERS = ("math", "coins")  # reward.grader: math answers (math-verify), or the coin task's verifier


def grader_function(grader: str, answer_format: str = "any") -> Callable:
    """The ``grade_fn`` for ``reward.grader`` (``answer_format`` is the math grader's)."""
    if grader == "math":
        return functools.partial(_default_grade, answer_format=answer_format)
    if grader == "coins":
        return _coin_grade
    raise ValueError(f"reward.grader={grader!r} is not one of {GRADERS}")


class VerifierPool:
    def __init__(self, workers: int = 2, *, timeout_s: float = 5.0, memory_mb: int = 1024,
                 answer_format: str = "any", grade_fn: Callable | None = None):
        """``grade_fn(response, truth) -> (score, reason)`` must be importable (pickled by
        reference); by default the math grader reading answers in ``answer_format``."""
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"workers={workers} must be >= 1 and timeout_s={timeout_s} > 0")
        if grade_fn is None:
            grade_fn = grader_function("math", answer_format)
        self.timeout_s, self.memory_mb, self.grade_fn = timeout_s, memory_mb, grade_fn
        self._ctx = mp.get_context("spawn")
        self._workers = [self._start() for _ in range(workers)]
        self.replaced = 0

    def _start(self):
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_worker, args=(child, self.memory_mb, self.grade_fn), daemon=True)
        p.start()
        child.close()
        return p, parent

    def _replace(self, i: int) -> None:
        p, conn = self._workers[i]
        if p.is_alive():
            p.kill()
        p.join()
        conn.close()
        self._workers[i] = self._start()
        self.replaced += 1

    def score(self, responses: Sequence[str], truths: Sequence[str]) -> list[Graded]:
        if len(responses) != len(truths):
            raise ValueError(f"{len(responses)} responses but {len(truths)} ground truths")
        results: list[Graded | None] = [None] * len(responses)
        todo = list(range(len(responses)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker -> (task, deadline)
        while todo or busy:
            for w in range(len(self._workers)):
                if w not in busy and todo:
                    t = todo.pop()
                    try:
                        self._workers[w][1].send((responses[t], truths[t]))
                    except (BrokenPipeError, OSError):
                        self._replace(w)
                        self._workers[w][1].send((responses[t], truths[t]))
                    busy[w] = (t, time.monotonic() + self.timeout_s)
            now = time.monotonic()
            wait_s = max(0.0, min(d for _, d in busy.values()) - now) if busy else 0.0
            conns = {self._workers[w][1]: w for w in busy}
            sentinels = {self._workers[w][0].sentinel: w for w in busy}
            ready = wait(list(conns) + list(sentinels), timeout=wait_s)
            for r in ready:
                w = conns.get(r, sentinels.get(r))
                if w not in busy:
                    continue
                t, _ = busy.pop(w)
                try:
                    score, reason = self._workers[w][1].recv() if r in conns else (0.0, "crashed")
                except (EOFError, OSError):
                    score, reason = 0.0, "crashed"
                if reason == "crashed":
                    self._replace(w)
                results[t] = Graded(score, reason)
            now = time.monotonic()
            for w, (t, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(w)
                    self._replace(w)
                    results[t] = Graded(0.0, "timeout")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for p, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))

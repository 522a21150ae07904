"""Spawn N local ranks with megatron-core's parallel state initialised.

Used by the distributed tests and the benchmarks to run real collectives
(gloo on CPU, nccl on GPU) in one machine: every rank is a fresh ``spawn``
process, so each installs the CPU shims itself (:mod:`megatron_lpreg.platform`).

``fn`` must be importable by reference (a module-level function); its return
value must be picklable. A failure in any rank is re-raised in the parent with
that rank's traceback; a rank that hangs is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp


@dataclass(frozen=True)
class Layout:
    """How ``world_size`` ranks are split: tp * pp * dp == world_size."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


class RankFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, layout, port, fn, args, kwargs, threads, queue):
    try:
        import torch

        from megatron_lpreg.job import finish_job, init_job

        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(layout.world_size), LOCAL_RANK=str(rank))
        init_job(layout.tp, layout.pp)  # as the command lines do, from these variables
        try:
            result = fn(*args, **kwargs)
        finally:
            finish_job()
        # Plain pickle copies tensor storage into bytes; the queue's own pickler would
        # pass shared-memory handles that die with this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    layout: Layout | int,
    *args: Any,
    timeout: float = 600.0,
    threads_per_rank: int | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on every rank of ``layout``; return results by rank.

    ``layout`` may be an int (pure tensor parallelism of that size).
    """
    if isinstance(layout, int):
        layout = Layout(tp=layout)
    n = layout.world_size
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, layout, port, fn, args, kwargs, threads_per_rank, queue),
            daemon=False,
        )
        for r in range(n)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(n):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                raise RankFailed(
                    f"ranks {sorted(set(range(n)) - set(results) - set(errors))} did not finish "
                    f"within {timeout:.0f}s (layout {layout})"
                ) from None
            if not ok:
                errors[rank] = payload
                break  # the other ranks are probably blocked in a collective
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank, tb = sorted(errors.items())[0]
        raise RankFailed(f"rank {rank} of {n} failed (layout {layout}):\n{tb}")
    return [results[r] for r in range(n)]

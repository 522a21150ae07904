"""Stopping on request: Slurm's pre-termination signal, a requeue's SIGTERM, or a stop file."""

from __future__ import annotations

import torch.distributed as dist

from megatron_lpreg.collectives import all_reduce


class StopRequest:
    """A stop asked from outside: SIGTERM / SIGUSR1 to any rank, or ``stop_file``
    appearing. :meth:`requested` is collective (every rank calls it at the same point
    of the step) so all ranks stop after the same step."""

    def __init__(self, stop_file: str = ""):
        import signal

        self.stop_file = stop_file
        self.flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        import os

        import torch

        local = self.flag or bool(self.stop_file and os.path.exists(self.stop_file))
        t = all_reduce(torch.tensor([1.0 if local else 0.0]), dist.ReduceOp.MAX, dist.group.WORLD)
        return bool(t.item() > 0)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

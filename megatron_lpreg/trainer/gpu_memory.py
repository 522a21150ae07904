"""GPU memory the trainer measures per phase and gives back before rollout.

Colocated with vLLM, the trainer and the engine take turns on one GPU: what the
trainer's caching allocator keeps (freed activations, megatron's reusable attention
buffer) is invisible to vLLM's allocator, so it is released before the engine wakes
(:func:`release_trainer_cache`). :class:`PhaseMemory` records each phase's peak
(``memory/<phase>_peak_gib``, nested phases included) and what the allocator reserves
at its end (``memory/<phase>_reserved_gib``) into the step's metrics. On a machine
without CUDA both do nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

GIB = 2**30


def release_trainer_cache() -> None:
    """Give back what the trainer holds but does not need between steps: megatron's global
    memory buffer (the local attention's ``[b * heads, s, s]`` scores, kept for reuse)
    and torch's cached blocks."""
    from megatron.core import parallel_state

    parallel_state.get_global_memory_buffer().buffer.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PhaseMemory:
    """Peak GPU memory per phase from CUDA's one peak counter, which nested phases share:
    at every phase boundary the counter's peak so far is folded into each open phase,
    then reset."""

    def __init__(self, cuda=None):
        self.cuda = torch.cuda if cuda is None else cuda  # a stand-in in tests
        self._open: list[int] = []

    def _fold(self) -> None:
        now = self.cuda.max_memory_allocated()
        self._open = [max(p, now) for p in self._open]

    @contextmanager
    def phase(self, timing: dict, name: str):
        if not self.cuda.is_available():
            yield
            return
        self._fold()
        self._open.append(0)
        self.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            self._fold()
            timing[f"memory/{name}_peak_gib"] = self._open.pop() / GIB
            timing[f"memory/{name}_reserved_gib"] = self.cuda.memory_reserved() / GIB
            self.cuda.reset_peak_memory_stats()

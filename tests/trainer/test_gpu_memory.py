"""Per-phase GPU memory (``trainer/gpu_memory.py``) with a stand-in for ``torch.cuda``'s
counters: nested phases each get their own peak from the one shared counter, and the
trainer's cache is given back before rollout."""

from __future__ import annotations

import pytest

from megatron_lpreg.trainer.gpu_memory import GIB, PhaseMemory


class FakeCuda:
    """An allocator whose allocated bytes the test sets; tracks the peak like CUDA's."""

    def __init__(self):
        self.now = self.peak = 0

    def alloc(self, gib: float) -> None:
        self.now = int(gib * GIB)
        self.peak = max(self.peak, self.now)

    def is_available(self):
        return True

    def max_memory_allocated(self):
        return self.peak

    def reset_peak_memory_stats(self):
        self.peak = self.now

    def memory_reserved(self):
        return 2 * self.now


def test_nested_phases_each_report_their_own_peak():
    cuda, timing = FakeCuda(), {}
    mem = PhaseMemory(cuda)
    cuda.alloc(1)
    with mem.phase(timing, "step"):
        with mem.phase(timing, "rollout"):
            cuda.alloc(5)
            cuda.alloc(2)
        with mem.phase(timing, "update"):
            cuda.alloc(3)
            cuda.alloc(1)
        cuda.alloc(1.5)
    assert timing["memory/rollout_peak_gib"] == 5
    assert timing["memory/update_peak_gib"] == 3  # not the rollout's 5: the counter was reset
    assert timing["memory/step_peak_gib"] == 5  # ...but the outer phase keeps it
    assert timing["memory/update_reserved_gib"] == pytest.approx(2)


def test_nothing_recorded_without_cuda():
    cuda = FakeCuda()
    cuda.is_available = lambda: False
    timing = {}
    with PhaseMemory(cuda).phase(timing, "update"):
        pass
    assert timing == {}

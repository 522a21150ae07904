"""The one helper every distributed test uses to run code on N gloo ranks.

``run_ranks(fn, Layout(tp=2, pp=1, dp=1), *args)`` spawns the ranks, installs the
CPU shims, initialises torch.distributed and megatron-core's ``parallel_state``
with that layout, calls ``fn(*args)`` on every rank and returns the per-rank
results. ``fn`` must be a module-level function of an importable test module.
"""

from megatron_lpreg.local_ranks import Layout, RankFailed, run_ranks

__all__ = ["Layout", "RankFailed", "run_ranks"]

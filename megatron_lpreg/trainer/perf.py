"""Stragglers: each phase's seconds on the slowest and the fastest rank, and which rank
was slowest, from one all-gather per step of every rank's phase times.

Metrics (``perf/``): ``<phase>_max_s`` and ``<phase>_min_s`` for each phase the step
timed (``time/<phase>_s``: step, sync, rollout, reward, old_logprob, update, eval), and
``slowest_rank``. A rank waiting in a collective for a slower one counts the wait in
its own phase, so a delay appears as a spread (max - min) in the phase where it
happened and, as waiting on the other ranks, in a later one. ``slowest_rank`` is the
rank with the maximum in the phase of largest spread, the earliest such phase of
the step when several tie.
"""

from __future__ import annotations

import torch

from megatron_lpreg.collectives import all_gather_host

PHASES = ("step", "sync", "rollout", "reward", "old_logprob", "update", "eval")


def phase_seconds(timing: dict) -> torch.Tensor:
    """``[len(PHASES)]`` fp64: this rank's seconds per phase (NaN: not timed this step)."""
    return torch.tensor([timing.get(f"time/{p}_s", float("nan")) for p in PHASES], dtype=torch.float64)


def straggler_metrics(every: torch.Tensor) -> dict:
    """``every``: ``[ranks, len(PHASES)]`` fp64 seconds (NaN: not timed). The ``perf/`` metrics."""
    out: dict = {}
    best_spread, slowest = -1.0, 0
    for j, phase in enumerate(PHASES):
        col = every[:, j]
        if torch.isnan(col).any():
            continue
        hi, lo = float(col.max()), float(col.min())
        out[f"perf/{phase}_max_s"] = hi
        out[f"perf/{phase}_min_s"] = lo
        if phase != "step" and hi - lo > best_spread:  # the step spans the phases
            best_spread, slowest = hi - lo, int(col.argmax())
    out["perf/slowest_rank"] = slowest
    return out


def straggler_stats(timing: dict, group) -> dict:
    """The ``perf/`` metrics of this step over ``group`` (every rank calls it, once a step)."""
    return straggler_metrics(all_gather_host(phase_seconds(timing), group=group))

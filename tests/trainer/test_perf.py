"""Stragglers: each phase's slowest and fastest rank from one all-gather of every
rank's phase times (two gloo ranks), and the choice of the slowest rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lpreg.trainer.perf import PHASES, phase_seconds, straggler_metrics, straggler_stats
from tests.distributed import Layout, run_ranks


def _stats_on_rank():
    rank = dist.get_rank()
    # rank 1 is 3 s late in the rollout; rank 0 waits for it in the old-policy pass
    timing = {"time/step_s": 10.0, "time/sync_s": 0.5 + 0.1 * rank, "time/rollout_s": 4.0 + 3.0 * rank,
              "time/reward_s": 1.0, "time/old_logprob_s": 4.0 - 3.0 * rank, "time/update_s": 0.5}
    calls = []
    original = dist.all_gather

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    dist.all_gather = counting
    try:
        out = straggler_stats(timing, dist.group.WORLD)
    finally:
        dist.all_gather = original
    return out, len(calls)


def test_two_ranks_one_gather_per_step():
    results = run_ranks(_stats_on_rank, Layout(tp=1, dp=2), timeout=120)
    (a, calls_a), (b, calls_b) = results
    assert a == b and calls_a == calls_b == 1  # the same metrics on every rank, from one collective
    assert a["perf/rollout_max_s"] == 7.0 and a["perf/rollout_min_s"] == 4.0
    assert a["perf/old_logprob_max_s"] == 4.0 and a["perf/old_logprob_min_s"] == 1.0
    assert abs(a["perf/sync_max_s"] - 0.6) < 1e-12 and a["perf/sync_min_s"] == 0.5
    assert a["perf/step_max_s"] == a["perf/step_min_s"] == 10.0
    assert "perf/eval_max_s" not in a  # not timed this step
    # rollout and old-logprob spread equally (3 s): the earlier phase, where rank 1 was late, wins
    assert a["perf/slowest_rank"] == 1


def test_slowest_rank_is_the_maximum_of_the_widest_phase():
    every = torch.full((4, len(PHASES)), float("nan"), dtype=torch.float64)
    every[:, PHASES.index("step")] = torch.tensor([9.0, 9.0, 9.0, 30.0])  # the step itself is not a phase
    every[:, PHASES.index("update")] = torch.tensor([1.0, 1.0, 5.0, 1.0])
    every[:, PHASES.index("rollout")] = torch.tensor([2.0, 2.5, 2.0, 2.0])
    m = straggler_metrics(every)
    assert m["perf/slowest_rank"] == 2
    assert m["perf/update_max_s"] == 5.0 and m["perf/update_min_s"] == 1.0
    assert set(m) == {"perf/step_max_s", "perf/step_min_s", "perf/update_max_s", "perf/update_min_s",
                      "perf/rollout_max_s", "perf/rollout_min_s", "perf/slowest_rank"}


def test_phase_seconds_order_and_missing():
    t = phase_seconds({"time/update_s": 2.0})
    assert t.dtype == torch.float64 and t.shape == (len(PHASES),)
    assert t[PHASES.index("update")] == 2.0 and torch.isnan(t[PHASES.index("rollout")])

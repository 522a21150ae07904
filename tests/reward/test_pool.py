"""A hanging, crashing or memory-hungry grader costs one sample, not the run."""

from __future__ import annotations

import time

from megatron_lpreg.reward.pool import VerifierPool
from tests.reward import hostile


def test_hanging_verifier_times_out_and_is_replaced():
    with VerifierPool(2, timeout_s=1.0, grade_fn=hostile.hang) as pool:
        t = time.monotonic()
        res = pool.score(["ok", "hang", "ok", "hang", "ok"], ["1"] * 5)
        assert time.monotonic() - t < 20
        assert [r.reason for r in res] == ["correct", "timeout", "correct", "timeout", "correct"]
        assert pool.replaced == 2
        assert [r.score for r in pool.score(["ok"] * 3, ["1"] * 3)] == [1.0] * 3  # pool still works


def test_crashing_verifier_scores_zero():
    with VerifierPool(1, timeout_s=10.0, grade_fn=hostile.crash) as pool:
        res = pool.score(["crash", "ok", "crash", "ok"], ["1"] * 4)
    assert [(r.score, r.reason) for r in res] == [(0.0, "crashed"), (1.0, "correct")] * 2


def test_memory_limit_contains_a_hog():
    with VerifierPool(1, timeout_s=10.0, memory_mb=512, grade_fn=hostile.hog) as pool:
        res = pool.score(["hog", "ok"], ["1", "1"])
    assert res[0].score == 0.0 and res[0].reason in ("out_of_memory", "crashed")
    assert res[1].score == 1.0

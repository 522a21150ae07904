from __future__ import annotations

import itertools

import pytest

from megatron_lpreg.algo.dynamic_sampling import Group, collect_informative_groups


def _sampler(pattern):
    """Yields rounds of groups; True = informative (mixed scores), False = all equal."""
    counter = itertools.count()

    def sample():
        return [Group([1.0, 0.0] if flag else [1.0, 1.0], payload=next(counter)) for flag in pattern]

    return sample


def test_refills_until_enough_and_keeps_arrival_order():
    groups, stats = collect_informative_groups(_sampler([True, False, False]), 3)
    assert [g.payload for g in groups] == [0, 3, 6] and stats.rounds == 3
    assert stats.groups_seen == 9 and stats.groups_dropped == 6


def test_exhausted_rounds_warn_or_raise(caplog):
    groups, stats = collect_informative_groups(_sampler([False, True]), 5, max_rounds=2)
    assert len(groups) == 2 and stats.rounds == 2
    assert "informative groups of 5" in caplog.text
    with pytest.raises(RuntimeError, match="raise max_rounds"):
        collect_informative_groups(_sampler([False]), 1, max_rounds=3, strict=True)

"""DAPO dynamic sampling: keep drawing rollouts until the batch holds enough groups
whose rewards differ (a group with equal rewards has zero advantage everywhere)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Group:
    """The responses to one prompt: their scores and whatever the trainer carries along."""

    scores: Sequence[float]
    payload: Any = None

    @property
    def informative(self) -> bool:
        return len(set(self.scores)) > 1


@dataclass
class SamplingStats:
    rounds: int
    groups_seen: int
    groups_dropped: int


def collect_informative_groups(
    sample: Callable[[], list[Group]], target_groups: int, *, max_rounds: int = 8, strict: bool = False
) -> tuple[list[Group], SamplingStats]:
    """Call ``sample()`` (one rollout round) until ``target_groups`` informative groups
    were collected, or ``max_rounds`` rounds were spent (``max_rounds <= 0``: no limit).

    Returns the first ``target_groups`` informative groups in arrival order. When the
    rounds run out first: ``strict`` raises; otherwise a warning is logged and the
    shorter list returned (the step trains on fewer groups, never on dropped ones).
    """
    if target_groups < 1:
        raise ValueError(f"target_groups must be >= 1, got {target_groups}")
    kept: list[Group] = []
    seen = rounds = 0
    while len(kept) < target_groups and (max_rounds <= 0 or rounds < max_rounds):
        batch = sample()
        rounds += 1
        seen += len(batch)
        kept.extend(g for g in batch if g.informative)
    stats = SamplingStats(rounds=rounds, groups_seen=seen, groups_dropped=seen - len(kept))
    if len(kept) < target_groups:
        msg = (f"dynamic sampling found {len(kept)} informative groups of {target_groups} wanted "
               f"in {rounds} rounds ({seen} groups drawn): the task may be too easy or too hard "
               "for the policy; raise max_rounds or check the data")
        if strict:
            raise RuntimeError(msg)
        log.warning(msg)
    return kept[:target_groups], stats

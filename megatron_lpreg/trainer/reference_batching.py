"""The reference's (verl's) dynamic batching, for ``algo.selection_scope: reference``
and ``algo.loss_agg_mode: reference-token-mean`` (docs/reference_semantics.md).

The reference ranks Lp-Reg's lowest-probability tokens within each per-GPU
micro-batch and weights each micro-batch's token-mean loss by its share of the
GPU's mini-batch, so which tokens are regularised and how much each counts depend
on how its batches are cut. To reproduce it, rows are cut the same way:

1. rows -> data-parallel ranks: balanced partitions of the unpadded lengths
   (prompt + response) into ``dp`` parts of equal row count (its ``balance_batch``;
   the trainer deals rows this way whatever the scope:
   :func:`megatron_lpreg.trainer.batching.data_parallel_rows`);
2. a rank's rows -> mini-batches: contiguous slices, in increasing row order;
3. a mini-batch -> micro-batches: ``n = min(rows, ceil(tokens / budget))``, the
   largest ``n`` over the DP ranks, then balanced partitions of the unpadded
   lengths into ``n`` parts of any row count (its ``rearrange_micro_batches``).

Balanced partitions use the largest differencing method (Karmarkar-Karp) with the
reference's tie-breaking, so the parts are the same rows in the same order.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from megatron_lpreg.loss.aggregation import REFERENCE_TOKEN_MEAN


def uses_reference_batching(algo) -> bool:
    """Whether the update cuts its batches as the reference does (per-DP-rank dynamic
    batching of unpadded tokens): the reference scope or aggregation asks for it."""
    return algo.selection_scope == "reference" or algo.loss_agg_mode == REFERENCE_TOKEN_MEAN


class _Part:
    """One part of a partial partition: its total and its (row, length) items."""

    __slots__ = ("total", "items")

    def __init__(self):
        self.total, self.items = 0, []

    def key(self):
        # the reference orders parts by total, then item count, then the items themselves
        return (self.total, len(self.items), self.items)


class _Partial:
    """k parts kept in decreasing order; heap order: the largest spread first, then the
    largest first part."""

    def __init__(self, items: Sequence[tuple[int, int]], k: int):
        self.parts = [_Part() for _ in range(k)]
        for part, (row, length) in zip(self.parts, items, strict=False):
            part.items.append((row, length))
            part.total += length
        self._order()

    def _order(self):
        self.parts.sort(key=_Part.key, reverse=True)

    def spread(self) -> int:
        return self.parts[0].total - self.parts[-1].total

    def absorb(self, other: _Partial) -> None:
        # the largest part of one meets the smallest of the other: the difference shrinks
        for mine, theirs in zip(self.parts, reversed(other.parts), strict=True):
            mine.items += theirs.items
            mine.total += theirs.total
        self._order()

    def __lt__(self, other: _Partial) -> bool:
        if self.spread() != other.spread():
            return self.spread() > other.spread()
        return self.parts[0].key() > other.parts[0].key()


def balanced_partitions(lengths: Sequence[int], k: int, *, equal_rows: bool) -> list[list[int]]:
    """Rows ``0..len(lengths)-1`` in ``k`` parts of near-equal total length, each part's
    rows in increasing order; ``equal_rows``: every part has ``len / k`` rows."""
    n = len(lengths)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} rows into {k} non-empty parts")
    if equal_rows and n % k:
        raise ValueError(f"{n} rows do not split into {k} parts of equal row count")
    by_length = sorted((int(length), row) for row, length in enumerate(lengths))
    group = k if equal_rows else 1
    pq: list[_Partial] = []
    for i in range(0, n, group):  # pushed one by one, shortest first: the reference's heap order
        heapq.heappush(pq, _Partial([(row, length) for length, row in by_length[i : i + group]], k))
    while len(pq) > 1:
        first, second = heapq.heappop(pq), heapq.heappop(pq)
        first.absorb(second)
        heapq.heappush(pq, first)
    parts = [sorted(row for row, _ in part.items) for part in pq[0].parts]
    if any(not p for p in parts):
        raise ValueError(f"a part came out empty cutting {n} rows into {k}")
    return parts


def mini_batch_slices(n_rows: int, n_mini: int) -> list[list[int]]:
    """Positions ``0..n_rows-1`` in ``n_mini`` contiguous slices (step 2); the reference
    needs equal slices, uneven counts differ by at most one row."""
    n_mini = min(n_mini, n_rows)
    bounds = [round(i * n_rows / n_mini) for i in range(n_mini + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n_mini)]


def micro_batch_count(lengths: Sequence[int], token_budget: int) -> int:
    """This rank's micro-batch count for a mini-batch, before the max over DP ranks."""
    return min(len(lengths), math.ceil(sum(int(x) for x in lengths) / token_budget))


def micro_batches(lengths: Sequence[int], count: int) -> list[list[int]]:
    """A mini-batch's rows (positions into ``lengths``) in ``count`` micro-batches (step 3)."""
    return balanced_partitions(lengths, min(count, len(lengths)), equal_rows=False)

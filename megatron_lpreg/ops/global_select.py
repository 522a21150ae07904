"""The k-th smallest value over values spread across ranks, with all-reduces of counts only.

Lp-Reg's ``global`` selection scope regularises the lowest rho% of negative-advantage
tokens of a whole mini-batch, wherever they live (any data-parallel rank, any
micro-batch). Gathering every token's log-prob to one rank would cost O(tokens);
this costs at most 64 all-reduces of one integer: a bisection over the totally
ordered integer keys of the float values, counting on every rank how many of its
values lie at or below the midpoint.

Every rank gets the same threshold; ``values <= threshold`` then selects exactly
the k smallest (more only when values tie with the k-th).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lpreg.collectives import all_reduce

_MAG = 0x7FFF_FFFF_FFFF_FFFF


def _keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in the same order as the float64 values (-0.0 and 0.0 equal)."""
    bits = values.double().view(torch.int64)
    return torch.where(bits < 0, -(bits & _MAG), bits)


def _from_key(key: int) -> float:
    bits = key if key >= 0 else ((-key) | (1 << 63)) - (1 << 64)
    return torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    return all_reduce(x, dist.ReduceOp.SUM, group) if group is not None else x


def _extreme(x: torch.Tensor, op, group) -> torch.Tensor:
    return all_reduce(x, op, group) if group is not None else x


def global_count(n: int, group=None) -> int:
    """Sum of ``n`` over the ranks of ``group``."""
    return int(_sum(torch.tensor([n], dtype=torch.int64), group))


def kth_smallest(values: torch.Tensor, k: int, group=None) -> float | None:
    """The k-th smallest (1-based) of all ranks' ``values`` (any shape, finite floats).

    ``group``: the ranks whose values count together (e.g. the data-parallel group);
    None means this process alone. Returns None when there are fewer than ``k``
    values in total. Every rank must call it (it is a collective).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = values.detach().reshape(-1)
    if flat.numel() and not bool(torch.isfinite(flat).all()):
        raise ValueError("kth_smallest needs finite values")
    keys = _keys(flat.cpu())
    total = global_count(keys.numel(), group)
    if total < k:
        return None
    big = torch.iinfo(torch.int64).max
    lo = _extreme(torch.tensor([int(keys.min()) if keys.numel() else big]), dist.ReduceOp.MIN, group).item()
    hi = _extreme(torch.tensor([int(keys.max()) if keys.numel() else -big]), dist.ReduceOp.MAX, group).item()
    # invariant: count(<= hi) >= k and count(<= lo - 1) < k
    while lo < hi:
        mid = lo + (hi - lo) // 2
        below = int(_sum(torch.tensor([int((keys <= mid).sum())], dtype=torch.int64), group))
        if below >= k:
            hi = mid
        else:
            lo = mid + 1
    return _from_key(lo)

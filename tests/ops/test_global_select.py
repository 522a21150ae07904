"""Global k-th smallest over data-parallel ranks equals the single-process answer."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.ops.global_select import _from_key, _keys, kth_smallest
from tests.distributed import Layout, run_ranks


def _pieces():
    """Uneven pieces per rank, negative and positive values, -0.0, an empty rank."""
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(37, generator=g, dtype=torch.float64) * 5,
        torch.cat([torch.tensor([-0.0, 0.0, -1e-300]), torch.randn(20, generator=g, dtype=torch.float64)]),
        torch.empty(0, dtype=torch.float64),
        -torch.rand(11, generator=g, dtype=torch.float64) * 1e4,
    ]


KS = [1, 2, 7, 35, 71]


def _rank_kth():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    piece = _pieces()[dist.get_rank()]
    group = ps.get_data_parallel_group()
    return [kth_smallest(piece, k, group) for k in KS] + [kth_smallest(piece, 1000, group)]


def test_dp4_equals_single_process_over_the_concatenation():
    everything = torch.cat(_pieces())
    want = [everything.sort().values[k - 1].item() for k in KS]
    for got in run_ranks(_rank_kth, Layout(dp=4)):
        assert got[:-1] == want
        assert got[-1] is None  # fewer values than k


def test_single_process_and_selection_semantics():
    v = torch.tensor([3.0, -1.0, 2.5, -7.0, 0.0])
    assert kth_smallest(v, 1) == -7.0 and kth_smallest(v, 3) == 0.0 and kth_smallest(v, 5) == 3.0
    assert int((v <= kth_smallest(v, 2)).sum()) == 2
    with pytest.raises(ValueError, match="finite"):
        kth_smallest(torch.tensor([1.0, float("nan")]), 1)


def test_keys_preserve_order_and_round_trip():
    x = torch.tensor([-1e308, -2.0, -1e-300, -0.0, 0.0, 1e-300, 2.0, 1e308], dtype=torch.float64)
    k = _keys(x)
    assert (k[1:] >= k[:-1]).all() and k[3] == k[4]
    assert [_from_key(int(i)) for i in k] == [v if v != 0 else 0.0 for v in x.tolist()]

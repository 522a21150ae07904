"""Metrics at DP=2: the per-token statistics and the update's metrics are those of the
whole step, not of rank 0's rows."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import Layout, run_ranks


def _tensors():
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(6, 9, generator=g) * 6
    ent = torch.rand(6, 9, generator=g)
    roll = lp + torch.randn(6, 9, generator=g) * 0.2
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()
    mask[5] = 0.0
    mask[5, 0] = 1.0  # rank 1 holds a row with one token: unequal token counts per rank
    return lp, ent, roll, mask


def _reduced():
    from megatron_lpreg.job import Groups
    from megatron_lpreg.trainer.metrics import response_token_stats
    from megatron_lpreg.trainer.update import _reduce_over_dp

    groups = Groups.from_parallel_state()
    lp, ent, roll, mask = _tensors()
    mine = [i for i in range(6) if i % 2 == groups.dp_rank]
    st = response_token_stats(lp[mine], ent[mine], roll[mine], mask[mine], group=groups.dp)
    # per-rank update records: a mean weighted by units and a count
    rec = {"pg_clipfrac": 0.1 * (groups.dp_rank + 1), "lp_reg/selected_tokens": 3 + groups.dp_rank,
           "units": float(mask[mine].sum())}
    return st, _reduce_over_dp(dict(rec), groups), float(mask[mine].sum())


def test_token_statistics_and_update_metrics_are_reduced_over_dp():
    from megatron_lpreg.trainer.metrics import response_token_stats

    res = run_ranks(_reduced, Layout(tp=1, dp=2), timeout=120)
    lp, ent, roll, mask = _tensors()
    want = response_token_stats(lp, ent, roll, mask)  # the whole batch in one process
    u0, u1 = res[0][2], res[1][2]
    for st, rec, _ in res:
        assert st == pytest.approx(want)
        assert rec["lp_reg/selected_tokens"] == 7
        assert math.isclose(rec["pg_clipfrac"], (0.1 * u0 + 0.2 * u1) / (u0 + u1))
        assert "units" not in rec
    # the rank-0-only value the old trainer logged differs from the whole batch's
    only0 = response_token_stats(lp[::2], ent[::2], roll[::2], mask[::2])
    assert only0["entropy"] / only0["tokens"] != pytest.approx(want["entropy"] / want["tokens"])


def _precondition_tensors():
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(8, 30, generator=g) * 6  # p from 1 down to e^-6
    proxy = torch.where(lp > -5.7, lp + 0.1, torch.full_like(lp, -1e4))  # below p = e^-5.7: outside
    adv = torch.randn(8, 1, generator=g).expand(8, 30).clone()
    mask = torch.ones(8, 30)
    mask[3, 20:] = 0
    return lp, proxy, adv, mask


def _precondition_reduced():
    from megatron_lpreg.job import Groups
    from megatron_lpreg.trainer.metrics import precondition_stats

    groups = Groups.from_parallel_state()
    lp, proxy, adv, mask = _precondition_tensors()
    mine = [i for i in range(8) if i % 2 == groups.dp_rank]
    return precondition_stats(lp[mine], proxy[mine], adv[mine], mask[mine], neg_percent=0.1, group=groups.dp)


def test_precondition_statistics_count_what_they_say_and_reduce_over_dp():
    from megatron_lpreg.trainer.metrics import precondition_stats

    lp, proxy, adv, mask = _precondition_tensors()
    got = precondition_stats(lp, proxy, adv, mask, neg_percent=0.1)
    # by hand: in-proxy tokens with p < 0.1; the int(n_neg * 0.1) lowest negatives and their in-proxy share
    m = mask > 0
    assert got["in_proxy_lt_0.1"] == int((m & (lp > -5.7) & (lp < math.log(0.1))).sum())
    neg = lp[m & (adv < 0)]
    k = int(neg.numel() * 0.1)
    lowest = neg.sort().values[:k]
    assert got["lowest_neg"] == k and got["lowest_neg_in_proxy"] == int((lowest > -5.7).sum())
    assert 0 < got["lowest_neg_in_proxy"] < k  # the case has both kinds
    for per_rank in run_ranks(_precondition_reduced, Layout(tp=1, dp=2), timeout=120):
        assert per_rank == got

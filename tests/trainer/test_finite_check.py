"""The update's finite check (``trainer/update.py: _all_finite``): every rank skips the
step when any rank's loss or any gradient element is NaN or inf, with one host sync."""

from __future__ import annotations

import math

import torch

from tests.distributed import Layout, run_ranks


def _case(where: str) -> tuple[bool, int]:
    import torch.distributed as dist

    from megatron_lpreg.trainer.update import _all_finite
    from tests.host_syncs import HostSyncs

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for i, p in enumerate(model.parameters()):
        g = torch.full_like(p, 0.5)
        if i == 0:
            p.main_grad = g  # megatron DDP's buffer
        else:
            p.grad = g
    mine = dist.get_rank() == 1
    if mine and where == "main_grad":
        model[0].weight.main_grad[1, 2] = math.inf
    if mine and where == "grad":
        model[1].bias.grad[0] = math.nan
    with HostSyncs() as syncs:
        ok = _all_finite(model, mine and where == "loss", dist.group.WORLD)
    return ok, syncs.count


def test_finite_check_agrees_over_ranks_with_one_sync():
    for where, expected in (("nowhere", True), ("main_grad", False), ("grad", False), ("loss", False)):
        res = run_ranks(_case, Layout(tp=1, pp=1, dp=2), where)
        assert [ok for ok, _ in res] == [expected, expected], where
        assert all(n == 1 for _, n in res), (where, res)

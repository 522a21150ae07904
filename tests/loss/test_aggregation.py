"""The four loss aggregation modes against their definitions, computed by hand, on the
edge cases the trainer meets: a one-token micro-batch, a row without valid tokens,
non-finite values on padded positions, an empty mask."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.loss.aggregation import AGG_MODES, aggregate, entropy_metric

LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # 3 tokens, 1 token, none


def test_each_mode_by_hand():
    want = {
        "token-mean": (1 + 2 + 3 + 5) / 4,
        "seq-mean-token-sum": (6 + 5 + 0) / 3,          # over all rows, as the reference
        "seq-mean-token-mean": (6 / 3 + 5 / 1) / 2,      # over the rows that have tokens
        "seq-mean-token-sum-norm": (6 + 5) / 4,          # the padded width as the constant
    }
    assert set(want) == set(AGG_MODES)
    for mode, value in want.items():
        assert float(aggregate(LOSS, MASK, mode)) == pytest.approx(value), mode


@pytest.mark.parametrize("mode", AGG_MODES)
def test_one_valid_token_gives_its_value(mode):
    mask = torch.zeros(1, 4)
    mask[0, 2] = 1
    want = {"seq-mean-token-sum-norm": 3.0 / 4}.get(mode, 3.0)
    assert float(aggregate(LOSS[:1], mask, mode)) == pytest.approx(want), mode


@pytest.mark.parametrize("mode", AGG_MODES)
def test_padded_non_finite_values_do_not_leak_and_an_empty_mask_gives_zero(mode):
    loss = LOSS.clone().requires_grad_()
    poisoned = torch.where(MASK > 0, loss, torch.full_like(loss, math.nan))
    out = aggregate(poisoned, MASK, mode)
    assert float(out.detach()) == pytest.approx(float(aggregate(LOSS, MASK, mode)))
    out.backward()
    assert bool(torch.isfinite(loss.grad).all()) and float(loss.grad[MASK == 0].abs().sum()) == 0.0
    assert float(aggregate(LOSS, torch.zeros_like(MASK), mode)) == 0.0


def test_shape_mismatch_and_unknown_mode_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        aggregate(LOSS, MASK[:, :3])
    with pytest.raises(ValueError, match="loss_agg_mode='token-sum'"):
        aggregate(LOSS, MASK, "token-sum")


def test_entropy_metric_is_the_token_mean_over_the_mask():
    assert entropy_metric({}, LOSS, MASK)["entropy"] == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert entropy_metric({"x": 1}, None, MASK) == {"x": 1}

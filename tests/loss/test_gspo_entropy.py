"""GSPO, entropy bonus and 80/20 against direct transcriptions."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.loss.entropy_control import entropy_bonus, high_entropy_mask
from megatron_lpreg.loss.gspo import gspo_loss


def _data(seed=0, B=4, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    mask = (torch.rand(B, T, generator=g) < 0.8).double()
    mask[:, 0] = 1
    return lp, old, adv, mask


def test_gspo_value_and_gradient_by_sequence():
    lp, old, adv, mask = _data()
    leaf = lp.clone().requires_grad_(True)
    loss, _ = gspo_loss(leaf, old, adv, mask, clip_low=0.01, clip_high=0.02)
    loss.backward()
    B, T = lp.shape
    total, grad = 0.0, torch.zeros_like(lp)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        s = math.exp(sum((lp[b, t] - old[b, t]).item() for t in idx) / len(idx))
        a = adv[b, 0].item()
        clipped = min(max(s, 0.99), 1.02)
        total += max(-a * s, -a * clipped)  # every token of the sequence has the same value
        # d/d logp_t of the token loss: -A s when the unclipped branch is active, else 0
        active = (-a * s) >= (-a * clipped)
        for t in idx:
            grad[b, t] = (-a * s if active else 0.0) / len(idx) / B
    assert loss.item() == pytest.approx(total / B, rel=1e-12)
    torch.testing.assert_close(leaf.grad, grad, rtol=1e-10, atol=1e-12)


def test_entropy_bonus_subtracts_the_mean_entropy():
    lp, old, adv, mask = _data(1)
    ent = torch.rand_like(lp).requires_grad_(True)
    base = torch.tensor(0.5, dtype=torch.float64)
    out = entropy_bonus(base, ent, mask, coef=0.01)
    assert out.item() == pytest.approx(0.5 - 0.01 * (ent * mask).sum().item() / mask.sum().item())
    out.backward()
    torch.testing.assert_close(ent.grad, -0.01 * mask / mask.sum())


def test_high_entropy_mask_keeps_the_top_fifth():
    ent = torch.arange(50, dtype=torch.float64).reshape(5, 10)
    mask = torch.ones(5, 10)
    mask[0, :] = 0  # entropies 0..9 are padding
    keep = high_entropy_mask(ent, mask, top_fraction=0.2)
    assert keep.sum() == 8 and bool((ent[keep > 0] >= 42).all())  # 40 valid -> top 8: 42..49
    assert high_entropy_mask(ent, torch.zeros(5, 10)).sum() == 0
    with pytest.raises(ValueError, match="top_fraction"):
        high_entropy_mask(ent, mask, top_fraction=0.0)

"""KL-Cov and Clip-Cov against direct transcriptions of their rules."""

from __future__ import annotations

import torch

from megatron_lpreg.loss.cov_control import clip_cov_loss, clip_cov_selection, kl_cov_loss


def _data(seed=0, B=6, T=50):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 6
    old = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = 2 * torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    mask = (torch.rand(B, T, generator=g) < 0.9).double()
    return lp, old, adv, mask


def _cov_list(lp, adv, mask):
    valid = [(b, t) for b in range(lp.shape[0]) for t in range(lp.shape[1]) if mask[b, t] > 0]
    ma = sum(adv[v].item() for v in valid) / len(valid)
    ml = sum(lp[v].item() for v in valid) / len(valid)
    return valid, {v: (adv[v].item() - ma) * (lp[v].item() - ml) for v in valid}


def test_kl_cov_matches_transcription():
    lp, old, adv, mask = _data()
    leaf = lp.clone().requires_grad_(True)
    loss, m = kl_cov_loss(leaf, old, adv, mask, k_percent=2.0, kl_coef=0.5)
    valid, cov = _cov_list(lp, adv, mask)
    k = max(1, int(len(valid) * 2.0 / 100))
    chosen = set(sorted(valid, key=lambda v: -cov[v])[:k])
    total = 0.0
    for v in valid:
        r = torch.exp(lp[v] - old[v]).item()
        total += -adv[v].item() * r + (0.5 * abs(lp[v].item() - old[v].item()) if v in chosen else 0.0)
    assert m["cov/regularised_tokens"] == k
    torch.testing.assert_close(loss, torch.tensor(total / len(valid), dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(leaf.grad).all()


def test_clip_cov_drops_a_random_share_of_in_band_unclipped_tokens():
    lp, old, adv, mask = _data(1)
    kw = dict(clip_low=0.2, clip_high=0.2, clip_ratio=0.02, lb=0.5, ub=5.0)
    sel = clip_cov_selection(lp, old, adv, mask, generator=torch.Generator().manual_seed(3), **kw)
    valid, cov = _cov_list(lp, adv, mask)
    r = torch.exp(lp - old)
    clipped = (-adv * r.clamp(0.8, 1.2)) > (-adv * r)
    band = [v for v in valid if 0.5 < cov[v] < 5.0 and not clipped[v]]
    assert int(sel.sum()) == min(max(int(0.02 * len(valid)), 1), len(band)) > 0
    assert all(v in band for v in map(tuple, sel.nonzero().tolist()))
    # the same generator seed, the same draw; the loss is PPO with those tokens zeroed
    loss, m = clip_cov_loss(lp, old, adv, mask, generator=torch.Generator().manual_seed(3), **kw)
    pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    want = (pg * mask * (~sel)).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    assert m["cov/dropped_tokens"] == int(sel.sum())

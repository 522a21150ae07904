"""PPO/GRPO clip loss against a token-by-token transcription."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.loss.aggregation import AGG_MODES
from megatron_lpreg.loss.ppo import ppo_clip_loss
from tests.loss.transcribe import aggregate_tokens


def _transcription(lp, old, adv, mask, roll, *, lo, hi, c, cap, mode):
    B, T = lp.shape
    per = {}
    for b in range(B):
        for t in range(T):
            if mask[b, t] <= 0:
                continue
            r = torch.exp(torch.clamp(lp[b, t] - old[b, t], -20, 20))
            a = adv[b, t]
            x = torch.maximum(-a * r, -a * torch.clamp(r, 1 - lo, 1 + hi))
            if c is not None and a < 0:
                x = torch.minimum(x, -a * c)
            if cap is not None:
                x = x * torch.clamp(torch.exp(old[b, t] - roll[b, t]), max=cap)
            per[b, t] = x
    return aggregate_tokens(per, B, T, mode, lp.sum() * 0)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("c, cap", [(None, None), (3.0, None), (3.0, 2.0), (None, 1.5)])
def test_matches_transcription(mode, c, cap):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 17
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64)  # large ratios: both clips fire
    roll = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.8).double()
    a, b = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    loss, m = ppo_clip_loss(a, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=c,
                            loss_agg_mode=mode, rollout_log_prob=roll, tis_cap=cap)
    ref = _transcription(b, old, adv, mask, roll, lo=0.2, hi=0.28, c=c, cap=cap, mode=mode)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert m["pg_clipfrac"] > 0 and (m["pg_clipfrac_lower"] > 0) == (c is not None)


def test_bad_settings_are_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
        ppo_clip_loss(x, x, x, x + 1, dual_clip=1.0)
    with pytest.raises(ValueError, match="tis_cap"):
        ppo_clip_loss(x, x, x, x + 1, rollout_log_prob=x, tis_cap=0.0)


def test_every_registered_loss_reports_entropy_when_given():
    from megatron_lpreg.loss.registry import LOSSES

    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 8, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 8, dtype=torch.float64)
    mask[0, 4:] = 0
    ent = torch.rand(3, 8, generator=g, dtype=torch.float64)
    want = float((ent * mask).sum() / mask.sum())
    for name, fn in ((n, spec.fn) for n, spec in LOSSES.items()):
        extra = {"proxy_log_prob": lp + 0.1} if name == "lp_reg" else {}
        args = (lp, lp.detach() - 0.01, *extra.values(), adv, mask)
        _, m = fn(*args, entropy=ent)
        assert m["entropy"] == pytest.approx(want), name

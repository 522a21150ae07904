"""lp_reg_loss against a token-by-token transcription of the reference's semantics
(docs/reference_semantics.md, "Lp-Reg, per token")."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.loss.aggregation import AGG_MODES, aggregate
from megatron_lpreg.loss.lp_reg import lp_reg_loss
from tests.loss.transcribe import aggregate_tokens


def _transcription(lp, old, px, adv, mask, *, clip_low, clip_high, neg, pos, coef, kl_type, mode):
    """Loops over tokens; every step written as the design document states it."""
    B, T = lp.shape
    valid = [(b, t) for b in range(B) for t in range(T) if mask[b, t] > 0]
    per = {}
    for b, t in valid:
        r = torch.exp(lp[b, t] - old[b, t])
        a = adv[b, t]
        per[b, t] = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
    for is_neg, pct in ((True, neg), (False, pos)):
        cands = [(b, t) for b, t in valid if (adv[b, t] < 0 if is_neg else adv[b, t] > 0)]
        k = max(1, int(len(cands) * pct))
        if k <= 1:
            continue
        for b, t in sorted(cands, key=lambda bt: lp[bt].item())[:k]:
            if lp[b, t].item() < px[b, t].item():
                r = torch.exp(lp[b, t] - old[b, t])
                if kl_type == "low_var_kl":
                    d = px[b, t] - lp[b, t]
                    est = torch.exp(d) - d - 1
                elif kl_type == "kl":
                    est = lp[b, t] - px[b, t]
                elif kl_type == "abs":
                    est = (lp[b, t] - px[b, t]).abs()
                else:
                    est = 0.5 * (lp[b, t] - px[b, t]) ** 2
                per[b, t] = -adv[b, t] * r + coef * torch.clamp(est, -10, 10)
    return aggregate_tokens(per, B, T, mode, lp.sum() * 0)


def _batch(seed=0, B=6, T=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 8 - 0.01
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    # about half the tokens have a proxy above their log-prob, the rest are filtered
    px = torch.where(torch.rand(B, T, generator=g) < 0.5, lp + torch.rand(B, T, generator=g, dtype=dtype) * 3,
                     torch.full_like(lp, -1e4))
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    mask = (torch.rand(B, T, generator=g) < 0.85).to(dtype)
    return lp, old, px, adv, mask


@pytest.mark.parametrize("kl_type", ["low_var_kl", "kl", "abs", "mse"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_transcription_values_and_gradients(kl_type, mode):
    lp, old, px, adv, mask = _batch()
    kw = dict(clip_low=0.2, clip_high=0.28, neg=0.1, pos=0.05, coef=0.7, kl_type=kl_type, mode=mode)
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    loss, metrics = lp_reg_loss(a, old, px, adv, mask, clip_low=0.2, clip_high=0.28, neg_percent=0.1,
                                pos_percent=0.05, kl_coef=0.7, kl_type=kl_type, loss_agg_mode=mode)
    ref = _transcription(b, old, px, adv, mask, **kw)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert metrics["lp_reg/regularised_tokens"] > 0  # the regularised branch is exercised


def test_published_clip_setting_and_defaults_select_and_regularise():
    """rho 0.01 over 600 negative tokens selects k = 6; eps 1.0/9.0 keeps ratio in [0, 10]."""
    lp, old, px, adv, mask = _batch(seed=1, B=20, T=40)
    adv = -adv.abs()
    mask = torch.ones_like(mask)
    loss, m = lp_reg_loss(lp, old, px, adv, mask, clip_low=1.0, clip_high=9.0)
    ref = _transcription(lp, old, px, adv, mask, clip_low=1.0, clip_high=9.0, neg=0.01, pos=0.0, coef=1.0,
                         kl_type="low_var_kl", mode="token-mean")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert m["lp_reg/selected_tokens"] == 8  # int(800 * 0.01)


def _plain_ppo(lp, old, adv, mask, clip=0.2):
    r = torch.exp(lp - old)
    return aggregate(torch.maximum(-adv * r, -adv * r.clamp(1 - clip, 1 + clip)), mask)


def test_k_equal_one_applies_no_selection():
    lp, old, px, adv, mask = _batch(seed=2, B=2, T=100)
    adv = -adv.abs()
    mask = torch.ones_like(mask)
    # 200 negative tokens x 0.009 -> int(1.8) = 1 -> the reference selects nothing
    loss, m = lp_reg_loss(lp, old, px, adv, mask, neg_percent=0.009)
    assert m["lp_reg/selected_tokens"] == 0
    torch.testing.assert_close(loss, _plain_ppo(lp, old, adv, mask))


def test_no_negative_tokens_and_all_gated_out():
    lp, old, px, adv, mask = _batch(seed=3)
    loss, m = lp_reg_loss(lp, old, px, adv.abs(), mask, neg_percent=0.5)
    assert m["lp_reg/selected_tokens"] == 0
    torch.testing.assert_close(loss, _plain_ppo(lp, old, adv.abs(), mask))
    below = lp - 1.0  # every proxy below the policy: selected, but none passes the gate
    loss, m = lp_reg_loss(lp, old, below, -adv.abs(), mask, neg_percent=0.5)
    assert m["lp_reg/selected_tokens"] > 0 and m["lp_reg/regularised_tokens"] == 0
    torch.testing.assert_close(loss, _plain_ppo(lp, old, -adv.abs(), mask))


def test_empty_mask_and_sentinels_give_finite_gradients():
    lp, old, px, adv, mask = _batch(seed=4)
    px = torch.full_like(px, -1e4)  # every token outside the proxy
    for m in (mask, torch.zeros_like(mask)):
        for mode in AGG_MODES:
            leaf = lp.clone().requires_grad_(True)
            loss, _ = lp_reg_loss(leaf, old, px, -adv.abs(), m, neg_percent=0.5, loss_agg_mode=mode)
            loss.backward()
            assert math.isfinite(loss.item()) and torch.isfinite(leaf.grad).all()
    leaf = lp.clone().requires_grad_(True)
    loss, _ = lp_reg_loss(leaf, old, px, adv, torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0.0 and (leaf.grad == 0).all()


def test_gradcheck():
    lp, old, px, adv, mask = _batch(seed=5, B=3, T=12)
    # well separated log-probs so that finite differences cannot change the selection
    lp = -torch.arange(36, dtype=torch.float64).reshape(3, 12) * 0.3 - 0.05
    px = lp + 0.5
    f = lambda x: lp_reg_loss(x, old, px, -adv.abs(), mask, neg_percent=0.3, kl_type="low_var_kl")[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(True),))


def _micro_batches(rank: int):
    """Two micro-batches per rank, of different sizes, distinct log-probs everywhere."""
    lp, old, px, adv, mask = _batch(seed=10 + rank, B=5, T=30)
    lp = lp + rank * 1e-7  # no ties across ranks
    return [(lp[:2], old[:2], px[:2], adv[:2], mask[:2]), (lp[2:], old[2:], px[2:], adv[2:], mask[2:])]


def _rank_global_selection():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lpreg.loss.lp_reg import global_thresholds

    mbs = _micro_batches(dist.get_rank())
    thr = global_thresholds([m[0] for m in mbs], [m[3] for m in mbs], [m[4] for m in mbs],
                            neg_percent=0.05, pos_percent=0.03, group=ps.get_data_parallel_group())
    selected = []
    for lp, old, px, adv, mask in mbs:
        _, m = lp_reg_loss(lp, old, px, adv, mask, neg_percent=0.05, pos_percent=0.03, thresholds=thr)
        selected.append(m["lp_reg/selected_tokens"])
    return thr, selected


def test_global_selection_dp2_equals_single_process_over_the_concatenation():
    from tests.distributed import Layout, run_ranks

    results = run_ranks(_rank_global_selection, Layout(dp=2))
    assert results[0][0] == results[1][0]  # every rank agrees on the thresholds
    # single process over the whole mini-batch (both ranks' micro-batches), micro-batch semantics
    parts = [mb for r in range(2) for mb in _micro_batches(r)]
    width = max(p[0].shape[1] for p in parts)
    cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
    assert all(p[0].shape[1] == width for p in parts)
    _, m = lp_reg_loss(*cat, neg_percent=0.05, pos_percent=0.03)
    assert sum(sum(r[1]) for r in results) == m["lp_reg/selected_tokens"] > 2
    # and the very same tokens: the global thresholds select exactly the reference's set
    from megatron_lpreg.loss.lp_reg import select_lowest

    lp, _, _, adv, mask = cat
    ref_neg = select_lowest(lp, (mask > 0) & (adv < 0), 0.05)
    thr_neg = results[0][0][0]
    assert torch.equal(ref_neg, (mask > 0) & (adv < 0) & (lp <= thr_neg))


def test_tis_weights_scale_each_token_and_registry_names():
    from megatron_lpreg.loss.registry import loss_spec

    lp, old, px, adv, mask = _batch(seed=6)
    roll = old - 0.7  # exp(0.7) = 2.01 > cap: every weight is the cap
    plain, _ = lp_reg_loss(lp, old, px, adv, mask, neg_percent=0.1)
    weighted, _ = lp_reg_loss(lp, old, px, adv, mask, neg_percent=0.1, rollout_log_prob=roll, tis_cap=1.5)
    torch.testing.assert_close(weighted, 1.5 * plain)
    assert loss_spec("lp_reg").fn is lp_reg_loss and loss_spec("lp_reg").needs_proxy
    with pytest.raises(ValueError, match="registered"):
        loss_spec("nope")


@pytest.mark.parametrize("kl_type", ["low_var_kl", "kl", "abs", "mse"])
def test_kl_pull_is_minus_the_estimates_gradient_clamp_included(kl_type):
    from megatron_lpreg.loss.lp_reg import kl_estimate, kl_pull

    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(400, generator=g, dtype=torch.float64) * 12  # d up to ~12: k3 past its clamp
    ref = -torch.rand(400, generator=g, dtype=torch.float64) * 12
    x = lp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kl_estimate(x, ref, kl_type).sum(), x)
    torch.testing.assert_close(kl_pull(lp, ref, kl_type), -grad, rtol=0, atol=1e-12)
    if kl_type == "low_var_kl":
        assert (kl_pull(lp, ref, kl_type) == 0).any()  # the clamp holds somewhere: no pull there


def test_pull_and_advantage_metrics_sum_over_the_regularised_tokens():
    """``pull_sum``: the regulariser's upward pull (beta (pi_proxy / pi - 1) for k3) summed
    over exactly the tokens the transcription regularises; ``adv_abs..._sum`` their |A|."""
    lp, old, px, adv, mask = _batch(seed=4, B=10, T=40)
    loss, m = lp_reg_loss(lp, old, px, adv, mask, neg_percent=0.1, kl_coef=0.7)
    valid = mask > 0
    neg = valid & (adv < 0)
    k = int(int(neg.sum()) * 0.1)
    lowest = lp[neg].sort().values[k - 1]
    reg = neg & (lp <= lowest) & (lp < px)
    assert int(reg.sum()) == m["lp_reg/regularised_tokens"] > 0
    d = px - lp
    pull = 0.7 * torch.where(torch.exp(d) - d - 1 < 10, torch.exp(d) - 1, torch.zeros_like(d))  # none past the clamp
    assert math.isclose(m["lp_reg/pull_sum"], float(pull[reg].sum()), rel_tol=1e-9)
    assert math.isclose(m["lp_reg/adv_abs_on_regularised_sum"], float(adv[reg].abs().sum()), rel_tol=1e-9)

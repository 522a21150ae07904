"""The Lp-Reg identity (``docs/lp_reg_per_token.md``), through the real op and loss.

On-policy (ratio 1, the proxy built from the same weights) the gradient of
``lp_reg_loss`` equals the gradient of GRPO's clipped loss (``ppo_clip_loss``) with
the advantage ``A`` replaced by ``A + pull`` on the regularised tokens, where

    pull = -beta * d KL_est / d log pi   (zero where the [-10, 10] clamp holds)

derived per estimator, with ``d = log pi_proxy - log pi = -log S_K`` on-policy (``S_K``:
the proxy's share of the mass at that position):

    low_var_kl (k3)  beta (pi_proxy / pi - 1) = beta (1 / S_K - 1)   while e^d - d - 1 < 10
    kl               -beta                                            while d < 10
    abs              +beta                                            while d < 10
    mse              beta d = -beta log S_K                           while d^2 / 2 < 10

Every number on the right is computed here from ``token_stats``'s outputs and these
formulas, not from ``megatron_lpreg.loss.lp_reg``'s own helpers; the regularised set is
recomputed from the definition (the lowest rho of the negative-advantage tokens,
inside the proxy). Off-policy the same holds with ``A`` replaced by ``A + pull / r``
(``r`` the ratio, ``pull`` at the current policy) under the paper's clip (1.0 / 9.0).

Run: ``pytest -k lpreg_identity``.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lpreg.loss.aggregation import AGG_MODES
from megatron_lpreg.loss.lp_reg import KL_TYPES, global_thresholds, lp_reg_loss
from megatron_lpreg.loss.ppo import ppo_clip_loss
from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob

KAPPA = 0.02
BETA = 0.7   # not 1, so a missing beta shows
RHO = 0.9    # reaches past the filtered tail into the proxy at most positions
V = 8192     # a tail this wide can hold most of the mass: S_K down to ~0.006 (both clamps)


def _logits(seed: int, B: int, T: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, V]`` logits whose proxies keep 0.6 % to ~100 % of the mass, and targets
    most inside the proxy (the top token or another kept one), a fifth in the filtered tail."""
    g = torch.Generator().manual_seed(seed)
    edge = math.log(KAPPA)
    # tail just below the min-p edge (S_K tiny) to far below it (S_K ~ 1)
    depth = torch.exp(torch.empty(B, T, 1, dtype=dtype).uniform_(math.log(0.01), math.log(12.0), generator=g))
    z = edge - depth - torch.rand(B, T, V, generator=g, dtype=dtype) * 0.05
    top = torch.randint(0, V, (B, T), generator=g)
    z.scatter_(2, top.unsqueeze(2), 0.0)
    kept = torch.randint(0, V, (B, T, 3), generator=g)  # up to three more inside the proxy
    z.scatter_(2, kept, torch.empty(B, T, 3, dtype=dtype).uniform_(edge + 0.05, -0.05, generator=g))
    z.scatter_(2, top.unsqueeze(2), 0.0)
    tail = torch.randint(0, V, (B, T), generator=g)
    pick = torch.rand(B, T, generator=g)
    target = torch.where(pick < 0.45, top, torch.where(pick < 0.8, kept[..., 0], tail))
    return z, target


def _batch(seed: int = 0, B: int = 8, T: int = 16, dtype=torch.float64):
    z, target = _logits(seed, B, T, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.tensor([-2.5, -1.0, -0.3, 0.0, 0.4, 1.2, -0.05, -1.7], dtype=dtype)[torch.randperm(B, generator=g)]
    adv = adv.unsqueeze(1).expand(B, T).clone()
    mask = torch.ones(B, T, dtype=dtype)
    mask[torch.arange(B), torch.randint(T // 2, T, (B,), generator=g)] = 0  # some padding
    mask = torch.where(torch.arange(T) > T - 3, torch.zeros_like(mask), mask)
    return z, target, adv, mask


def _expected_pull(d: torch.Tensor, kl_type: str) -> torch.Tensor:
    """``-beta dKL/dlog pi`` from the estimators' formulas, zero past the clamp."""
    if kl_type == "low_var_kl":
        est, pull = torch.exp(d) - d - 1, BETA * (torch.exp(d) - 1)
    elif kl_type == "kl":
        est, pull = -d, torch.full_like(d, -BETA)
    elif kl_type == "abs":
        est, pull = d.abs(), BETA * torch.sign(d)
    else:
        est, pull = 0.5 * d * d, BETA * d
    return torch.where(est.abs() < 10, pull, torch.zeros_like(pull))


def _lowest(lp: torch.Tensor, cand: torch.Tensor, rho: float) -> torch.Tensor:
    """The definition of the selection: the k = max(1, int(n rho)) candidates of lowest
    log-prob, none unless k > 1 (sorted here, not ``topk``)."""
    n = int(cand.sum())
    k = max(1, int(n * rho))
    out = torch.zeros_like(cand)
    if n and k > 1:
        idx = cand.reshape(-1).nonzero().squeeze(1)
        order = lp.detach().reshape(-1)[idx].sort().indices[:k]
        out.view(-1)[idx[order]] = True
    return out


def _grads(z, target, adv, mask, kl_type, mode, scope, old_z=None, clip=(0.2, 0.28)):
    """Gradient w.r.t. the logits of Lp-Reg and of GRPO with the shifted advantage;
    also the regularised set and the pulls, for the checks on what was exercised."""
    old = token_stats((z if old_z is None else old_z).detach(), target, proxy="minp", proxy_threshold=KAPPA)
    m = mask > 0

    z1 = z.detach().clone().requires_grad_(True)
    lp1 = vocab_parallel_logprob(z1, target)
    thresholds = None
    if scope == "global":
        thresholds = global_thresholds([old.logprob], [adv], [mask], neg_percent=RHO)
    loss, metrics = lp_reg_loss(lp1, old.logprob, old.proxy_logprob, adv, mask, clip_low=clip[0],
                                clip_high=clip[1], neg_percent=RHO, kl_coef=BETA, kl_type=kl_type,
                                loss_agg_mode=mode, thresholds=thresholds)
    loss.backward()

    with torch.no_grad():
        cand = m & (adv < 0)
        if scope == "global":
            # the old policy's rho-quantile of the candidates, applied to the current log-probs
            # (equal to ranking the old ones on-policy; the selection drifts off-policy)
            first = _lowest(old.logprob, cand, RHO)
            selected = cand & (lp1 <= old.logprob[first].max()) if first.any() else first
        else:
            selected = _lowest(lp1, cand, RHO)
        reg = selected & old.in_proxy & (lp1 < old.proxy_logprob)
        d = old.proxy_logprob - lp1.detach()
        ratio = torch.exp(lp1.detach() - old.logprob)
        pull = torch.where(reg, _expected_pull(torch.where(reg, d, torch.zeros_like(d)), kl_type), 0.0)
        shifted = adv + pull / ratio
    z2 = z.detach().clone().requires_grad_(True)
    lp2 = vocab_parallel_logprob(z2, target)
    grpo, _ = ppo_clip_loss(lp2, old.logprob, shifted, mask, clip_low=clip[0], clip_high=clip[1], loss_agg_mode=mode)
    grpo.backward()
    return z1.grad, z2.grad, reg, pull, d, metrics


def _close(a: torch.Tensor, b: torch.Tensor, dtype) -> None:
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    assert err <= 1e-6 * scale if dtype == torch.float32 else err <= 1e-12 * scale, (err, scale)


@pytest.mark.parametrize("scope", ["global", "micro_batch"])
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lpreg_identity_on_policy(kl_type, dtype, scope):
    z, target, adv, mask = _batch(dtype=dtype)
    g_lp, g_grpo, reg, pull, d, metrics = _grads(z, target, adv, mask, kl_type, "token-mean", scope)
    _close(g_lp, g_grpo, dtype)
    # what the identity was tested on: many regularised tokens with S_K spread widely,
    # pulls that are not zero, and (k3, mse) tokens past the clamp
    n = int(reg.sum())
    assert n >= 20 and int(metrics["lp_reg/regularised_tokens"]) == n
    s_k = torch.exp(-d[reg])
    assert float(s_k.min()) < 0.012 and float(s_k.max()) > 0.9
    assert float(metrics["lp_reg/pull_sum"]) == pytest.approx(float(pull.sum()), rel=1e-5, abs=1e-6)
    clamped = int((pull[reg] == 0).sum())
    if kl_type in ("low_var_kl", "mse"):
        assert 0 < clamped < n
    # the per-estimator pull, on-policy, as a function of S_K alone
    if kl_type == "low_var_kl":
        live = (1 / s_k + torch.log(s_k) - 1) < 10
        torch.testing.assert_close(pull[reg][live], BETA * (1 / s_k[live] - 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_lpreg_identity_any_aggregation(mode):
    z, target, adv, mask = _batch(seed=3)
    g_lp, g_grpo, reg, *_ = _grads(z, target, adv, mask, "low_var_kl", mode, "global")
    assert int(reg.sum()) >= 20
    _close(g_lp, g_grpo, torch.float64)


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_lpreg_identity_off_policy_with_ratio(kl_type):
    """Off-policy (the current logits moved away from the old ones): the same identity
    with ``A + pull / r`` and ``pull`` at the current policy, under the paper's clip."""
    z, target, adv, mask = _batch(seed=5)
    g = torch.Generator().manual_seed(11)
    moved = z + 0.4 * torch.randn(z.shape, generator=g, dtype=z.dtype)
    g_lp, g_grpo, reg, pull, _, _ = _grads(moved, target, adv, mask, kl_type, "token-mean", "global",
                                           old_z=z, clip=(1.0, 9.0))
    assert int(reg.sum()) >= 10
    _close(g_lp, g_grpo, torch.float64)


def test_lpreg_identity_without_the_filter_is_grpo():
    """kappa -> 0 on-policy: the proxy is the policy itself (S_K = 1), nothing lies below
    it, so no token is regularised and the gradient is GRPO's."""
    z, target, adv, mask = _batch(seed=7)
    old = token_stats(z, target, proxy="minp", proxy_threshold=1e-30)
    z1 = z.clone().requires_grad_(True)
    loss, metrics = lp_reg_loss(vocab_parallel_logprob(z1, target), old.logprob, old.proxy_logprob, adv, mask,
                                neg_percent=RHO, kl_coef=BETA)
    loss.backward()
    z2 = z.clone().requires_grad_(True)
    ppo_clip_loss(vocab_parallel_logprob(z2, target), old.logprob, adv, mask)[0].backward()
    assert int(metrics["lp_reg/regularised_tokens"]) == 0
    _close(z1.grad, z2.grad, torch.float64)

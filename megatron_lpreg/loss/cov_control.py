"""Covariance-based entropy control baselines (KL-Cov and Clip-Cov), reference semantics.

Both rank valid tokens by the centred covariance term
``cov_t = (A_t - mean A) (log pi_t - mean log pi)`` (means over the valid tokens):
tokens with a large positive term are the ones whose update drives entropy down.

* KL-Cov: no ratio clipping; the ``k_percent`` % of valid tokens with the largest
  cov (at least one) get ``-A r + coef |log pi - log pi_old|`` instead of ``-A r``.
* Clip-Cov: standard clipped PPO; among the valid tokens not already clipped with
  ``lb < cov < ub``, a random ``clip_ratio`` share (at least one) is dropped from the
  gradient (its loss set to 0). The draw uses ``generator`` so runs are repeatable.
"""

from __future__ import annotations

import torch

from megatron_lpreg.loss.aggregation import aggregate, entropy_metric
from megatron_lpreg.loss.ppo import clipped_surrogate, tis_weights


def _cov(advantages, log_prob, mask):
    valid = mask > 0
    n = valid.sum().clamp(min=1)
    a_mean = torch.where(valid, advantages, 0).sum() / n
    lp = log_prob.detach()
    lp_mean = torch.where(valid, lp, 0).sum() / n
    return (advantages - a_mean) * (lp - lp_mean)


def kl_cov_loss(log_prob, old_log_prob, advantages, response_mask, *, k_percent: float = 0.2,
                kl_coef: float = 1.0, loss_agg_mode: str = "token-mean", rollout_log_prob=None,
                tis_cap=None, entropy=None):
    """Tensors ``[batch, response_len]``; ``k_percent`` is in percent (0.2 = 0.2 %)."""
    valid = response_mask > 0
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    pg = -advantages * ratio
    chosen = torch.zeros_like(valid)
    n = int(valid.sum())
    if n and k_percent > 0:
        k = max(1, int(n * min(k_percent, n) / 100))
        cov = _cov(advantages, log_prob, response_mask)[valid]
        idx = valid.reshape(-1).nonzero().squeeze(1)[cov.topk(k).indices]
        chosen.view(-1)[idx] = True
    pg = torch.where(chosen, pg + kl_coef * diff.abs(), pg)
    w = tis_weights(old_log_prob, rollout_log_prob, tis_cap)
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, response_mask, loss_agg_mode)
    return loss, entropy_metric({"cov/regularised_tokens": chosen.sum()}, entropy, response_mask)


def clip_cov_selection(log_prob, old_log_prob, advantages, response_mask, *, clip_low, clip_high,
                       clip_ratio, lb, ub, generator=None) -> torch.Tensor:
    """Bool ``[batch, len]``: the tokens Clip-Cov removes from the gradient."""
    valid = response_mask > 0
    ratio = torch.exp(log_prob.detach() - old_log_prob)
    _, clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    cov = _cov(advantages, log_prob, response_mask)
    cand = valid & ~clipped & (cov > lb) & (cov < ub)
    picked = torch.zeros_like(valid)
    idx = cand.reshape(-1).nonzero().squeeze(1)
    if len(idx):
        n_clip = max(int(clip_ratio * int(valid.sum())), 1)
        order = torch.randperm(len(idx), generator=generator)
        picked.view(-1)[idx[order[: min(n_clip, len(idx))]]] = True
    return picked


def clip_cov_loss(log_prob, old_log_prob, advantages, response_mask, *, clip_low: float = 0.2,
                  clip_high: float = 0.2, clip_ratio: float = 2e-4, lb: float = 1.0, ub: float = 5.0,
                  loss_agg_mode: str = "token-mean", generator=None, rollout_log_prob=None, tis_cap=None,
                  entropy=None):
    """Tensors ``[batch, response_len]``; returns ``(loss, metrics)``."""
    dropped = clip_cov_selection(log_prob, old_log_prob, advantages, response_mask, clip_low=clip_low,
                                 clip_high=clip_high, clip_ratio=clip_ratio, lb=lb, ub=ub, generator=generator)
    ratio = torch.exp(log_prob - old_log_prob)
    pg, _ = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    pg = torch.where(dropped, torch.zeros_like(pg), pg)
    w = tis_weights(old_log_prob, rollout_log_prob, tis_cap)
    if w is not None:
        pg = pg * w
    metrics = entropy_metric({"cov/dropped_tokens": dropped.sum()}, entropy, response_mask)
    return aggregate(pg, response_mask, loss_agg_mode), metrics

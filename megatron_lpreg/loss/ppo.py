"""PPO / GRPO clipped policy loss with Clip-Higher and optional dual clip.

Per token, ``r = exp(clamp(log pi - log pi_old, -20, 20))``::

    pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    if dual_clip c is set and A < 0:  pg = min(pg, -A c)

as in the reference framework (the clamp of the log-ratio keeps ``exp`` finite).
Truncated importance sampling (``tis_cap``) multiplies each token's loss by the
detached ``min(exp(log pi_old - log pi_rollout), cap)``, correcting for the rollout
engine's log-probs differing from the trainer's.
"""

from __future__ import annotations

import torch

from megatron_lpreg.loss.aggregation import aggregate, entropy_metric


def clipped_surrogate(ratio, advantages, clip_low: float, clip_high: float):
    """``pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` per token, and the
    mask of tokens where the clipped branch is the larger (the clip fraction's numerator)."""
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(pg1, pg2), pg2 > pg1


def tis_weights(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor | None, cap: float | None):
    """``[B, T]`` detached truncated importance weights, or None when disabled."""
    if cap is None or rollout_log_prob is None:
        return None
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    return torch.exp(old_log_prob - rollout_log_prob).clamp(max=cap).detach()


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_agg_mode: str = "token-mean",
    rollout_log_prob: torch.Tensor | None = None,
    tis_cap: float | None = None,
    entropy: torch.Tensor | None = None,
):
    """Tensors ``[batch, response_len]``; returns ``(loss, metrics)``. ``entropy``
    (optional, detached use) only feeds the ``entropy`` metric."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
    mask = response_mask > 0
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
    pg, clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    lower = torch.zeros_like(mask)
    if dual_clip is not None:
        pg3 = -advantages * dual_clip
        lower = (advantages < 0) & (pg > pg3)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg3), pg)
    w = tis_weights(old_log_prob, rollout_log_prob, tis_cap)
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, response_mask, loss_agg_mode)
    n = mask.sum().clamp(min=1)  # metrics stay 0-dim tensors: no host sync (see lp_reg_loss)
    metrics = {
        "pg_clipfrac": (clipped & mask).sum() / n,
        "pg_clipfrac_lower": (lower & mask).sum() / n,
    }
    return loss, entropy_metric(metrics, entropy, response_mask)

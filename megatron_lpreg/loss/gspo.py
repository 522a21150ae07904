"""GSPO: the importance ratio and its clipping at the sequence level.

``s_i = exp(mean_t (log pi - log pi_old))`` over response ``i``'s tokens; each token
carries ``s_i`` as value and ``pi / sg(pi)`` as gradient path::

    log s_{i,t} = log pi_t - sg(log pi_t) + sg(mean_t (log pi - log pi_old))   (<= 10)
    pg = max(-A s, -A clip(s, 1 - eps_low, 1 + eps_high))

aggregated with ``seq-mean-token-mean`` by default (GSPO's sequence average). The
published clip range is tiny (3e-4 / 4e-4) because sequence ratios stay near 1.
"""

from __future__ import annotations

import torch

from megatron_lpreg.loss.aggregation import aggregate, entropy_metric
from megatron_lpreg.loss.ppo import clipped_surrogate, tis_weights


def gspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    loss_agg_mode: str = "seq-mean-token-mean",
    rollout_log_prob: torch.Tensor | None = None,
    tis_cap: float | None = None,
    entropy: torch.Tensor | None = None,
):
    """Tensors ``[batch, response_len]``; returns ``(loss, metrics)``."""
    mask = response_mask > 0
    diff = torch.where(mask, log_prob - old_log_prob, torch.zeros_like(log_prob))
    seq_log_ratio = diff.sum(-1) / mask.sum(-1).clamp(min=1)
    log_s = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    s = torch.exp(log_s.clamp(max=10.0))
    pg, clipped = clipped_surrogate(s, advantages, clip_low, clip_high)
    w = tis_weights(old_log_prob, rollout_log_prob, tis_cap)
    if w is not None:
        pg = pg * w
    loss = aggregate(pg, response_mask, loss_agg_mode)
    n = mask.sum().clamp(min=1)
    return loss, entropy_metric({"pg_clipfrac": (clipped & mask).sum() / n}, entropy, response_mask)

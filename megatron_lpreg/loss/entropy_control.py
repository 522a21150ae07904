"""Entropy-based baselines from the paper's table: entropy bonus and 80/20.

* entropy bonus: ``loss - coef * agg(H)``; raises entropy everywhere, the
  indiscriminate remedy Lp-Reg is compared against.
* 80/20 ("beyond the 80/20 rule"): the policy gradient flows only through the
  ``top_fraction`` highest-entropy valid tokens; the others are masked out of the
  aggregation. The cut is the ``1 - top_fraction`` quantile of the valid tokens'
  entropy in the tensors given.
"""

from __future__ import annotations

import torch

from megatron_lpreg.loss.aggregation import aggregate


def entropy_bonus(loss: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor, *, coef: float,
                  loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """``loss - coef * aggregate(entropy)``; ``entropy [batch, len]`` with grad."""
    return loss - coef * aggregate(entropy, response_mask, loss_agg_mode)


def high_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, *, top_fraction: float = 0.2):
    """``[batch, len]`` mask (response_mask's dtype): valid tokens in the top
    ``top_fraction`` of entropy. Use it as the response mask of the policy loss."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    valid = response_mask > 0
    if not bool(valid.any()):
        return torch.zeros_like(response_mask)
    cut = torch.quantile(entropy.detach()[valid].double(), 1.0 - top_fraction)
    return (valid & (entropy.detach().double() >= cut)).to(response_mask.dtype)

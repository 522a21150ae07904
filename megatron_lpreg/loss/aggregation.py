"""Reduce a per-token loss matrix to a scalar, in the four modes the reference offers.

``loss_mat``, ``mask``: ``[batch, response_len]``; ``mask`` is 1 on response tokens.

* ``token-mean``: every valid token weighs the same (the default).
* ``seq-mean-token-sum``: sum per sequence, mean over sequences.
* ``seq-mean-token-mean``: mean per sequence, mean over sequences.
* ``seq-mean-token-sum-norm``: sum per sequence divided by the padded length
  (``response_len``), summed over sequences (Dr.GRPO's constant normaliser).

As in the reference, ``seq-mean-token-sum`` averages over all sequences. Where the
reference produces NaN (an empty mask; a sequence without a valid token in
``seq-mean-token-mean``) this gives 0, leaving such sequences out of that mean.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# the reference's weighting across micro-batches (trainer/update.py); a token-mean within one
REFERENCE_TOKEN_MEAN = "reference-token-mean"


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must both be [batch, len]")
    mask = mask.to(loss_mat.dtype)
    # where(), not multiplication: a NaN/inf loss on a padded position must not leak in
    masked = torch.where(mask > 0, loss_mat, torch.zeros_like(loss_mat))
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    per_seq_sum = masked.sum(dim=-1)
    counts = mask.sum(dim=-1)
    has_tokens = counts > 0
    n_seq = has_tokens.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return per_seq_sum.mean()
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / counts.clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return per_seq_sum.sum() / loss_mat.shape[-1]
    raise ValueError(f"loss_agg_mode={mode!r} is not one of {AGG_MODES}")


def entropy_metric(metrics: dict, entropy: torch.Tensor | None, mask: torch.Tensor) -> dict:
    """Adds ``metrics["entropy"]`` (a 0-dim tensor): the token-mean entropy of the valid
    tokens, when given."""
    if entropy is not None:
        metrics["entropy"] = aggregate(entropy.detach().double(), mask.double(), "token-mean")
    return metrics

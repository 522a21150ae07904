"""Outcome advantages for group-sampled responses (GRPO and Dr.GRPO).

Each prompt is sampled ``n`` times; the responses of one prompt form a group.
GRPO: ``A_i = (s_i - mean_g) / (std_g + eps)`` with the unbiased std of the group;
Dr.GRPO: ``A_i = s_i - mean_g`` (no std, paired with ``seq-mean-token-sum-norm``
aggregation). A group of one response has mean 0 and std 1, as in the reference.
The advantage is broadcast over the response tokens.
"""

from __future__ import annotations

import torch


def grpo_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Args:
        scores: ``[N]`` float, one outcome reward per response.
        group_ids: ``[N]`` int, responses with the same id share a prompt.
        response_mask: ``[N, T]``, 1 on response tokens.

    Returns:
        ``[N, T]`` float advantages (0 outside the mask).
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape or response_mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"scores {tuple(scores.shape)}, group_ids {tuple(group_ids.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must agree on the number of responses"
        )
    scores = scores.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    count = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, inverse, torch.ones_like(scores))
    mean = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, inverse, scores) / count
    centred = scores - mean[inverse]
    sq = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, inverse, centred.square())
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    single = count[inverse] == 1
    mean_i = torch.where(single, torch.zeros_like(scores), mean[inverse])
    std_i = torch.where(single, torch.ones_like(scores), std[inverse])
    adv = scores - mean_i
    if norm_by_std:
        adv = adv / (std_i + eps)
    return (adv.float().unsqueeze(1) * response_mask).to(torch.float32)

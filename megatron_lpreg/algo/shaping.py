"""Batch shaping from DAPO: dynamic sampling and the overlong reward penalty."""

from __future__ import annotations

import torch


def informative_groups(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: responses whose group does not have all-equal scores.

    A group where every response scored the same has zero GRPO advantage
    everywhere and contributes no gradient; DAPO drops it and samples more.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    lo = torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, scores.double(), "amin")
    hi = torch.full((n,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, scores.double(), "amax")
    return (hi > lo)[inverse]


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """``[N]`` float reward added to responses that run into the last ``buffer_length``
    tokens: linear from 0 at ``max - buffer`` to ``-penalty_factor`` at ``max``."""
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"buffer_length={buffer_length} must be in (0, max_response_length={max_response_length}]")
    exceed = response_lengths.double() - (max_response_length - buffer_length)
    return torch.clamp(-exceed / buffer_length * penalty_factor, max=0.0).float()

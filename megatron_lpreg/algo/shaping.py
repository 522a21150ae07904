"""Reward shaping from DAPO: the overlong penalty (its dynamic sampling is
:mod:`megatron_lpreg.algo.dynamic_sampling`)."""

from __future__ import annotations

import torch


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """``[N]`` float reward added to responses that run into the last ``buffer_length``
    tokens: linear from 0 at ``max - buffer`` to ``-penalty_factor`` at ``max``."""
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"buffer_length={buffer_length} must be in (0, max_response_length={max_response_length}]")
    exceed = response_lengths.double() - (max_response_length - buffer_length)
    return torch.clamp(-exceed / buffer_length * penalty_factor, max=0.0).float()

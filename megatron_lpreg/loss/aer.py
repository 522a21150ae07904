"""AER, adaptive entropy regularisation: the strongest entropy-control peer of Lp-Reg.

The source (``shared/seeds/003_*``) names three components but not their formulas;
this module implements the plainest reading of each and says so, so that a user
with the paper's exact settings can swap a formula without touching the trainer.

1. Initial-anchored target entropy: ``H* = target_ratio * H_0``, where ``H_0`` is the
   mean response-token entropy the first time the controller sees a batch
   (the policy before RL); balanced exploration sits *below* the initial entropy.
2. Dynamic global coefficient: after each step
   ``alpha <- clip(alpha + lr * (H* - H_t), 0, alpha_max)``: raised while entropy is
   under the target, lowered (to zero) above it.
3. Difficulty-aware allocation: each response's entropy term is weighted by its
   prompt's difficulty ``1 - accuracy`` of its group, normalised to mean 1 over the
   responses, so hard prompts explore more and solved prompts not at all.

The loss added to any policy loss is ``-alpha * sum_i w_i * sum_t H_it / N_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def difficulty_weights(group_accuracy: torch.Tensor) -> torch.Tensor:
    """``[N]`` weights ``(1 - acc)`` normalised to mean 1 (all ones if every group is solved)."""
    d = (1.0 - group_accuracy.double()).clamp(min=0.0)
    mean = d.mean()
    if float(mean) <= 0.0:
        return torch.ones_like(d, dtype=torch.float32)
    return (d / mean).float()


@dataclass
class AERController:
    target_ratio: float = 0.8
    lr: float = 0.01
    alpha: float = 0.0
    alpha_max: float = 0.05
    initial_entropy: float | None = None

    def __post_init__(self):
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        if self.lr < 0 or self.alpha_max < 0:
            raise ValueError("lr and alpha_max must be >= 0")

    @property
    def target(self) -> float | None:
        return None if self.initial_entropy is None else self.target_ratio * self.initial_entropy

    def update(self, batch_entropy: float) -> float:
        """Record this step's mean entropy; returns the coefficient for the next step."""
        if self.initial_entropy is None:
            self.initial_entropy = float(batch_entropy)
        self.alpha = min(max(self.alpha + self.lr * (self.target - batch_entropy), 0.0), self.alpha_max)
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "initial_entropy": self.initial_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.initial_entropy = float(state["alpha"]), state["initial_entropy"]


def aer_entropy_term(entropy: torch.Tensor, response_mask: torch.Tensor, weights: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """``-alpha * sum_i w_i sum_t H_it / N`` over valid tokens; ``entropy [N, T]`` with grad,
    ``weights [N]``. Add it to the policy loss."""
    mask = response_mask > 0
    per_seq = torch.where(mask, entropy, torch.zeros_like(entropy)).sum(-1)
    return -alpha * (weights.to(entropy.dtype) * per_seq).sum() / mask.sum().clamp(min=1)

"""AER, adaptive entropy regularisation (arXiv 2510.10959): Lp-Reg's strongest entropy-control peer.

The paper's abstract names three components but not their formulas; each is a named
piece here, chosen in the run config (``algo.aer_*``), so a user with the paper's exact
settings can swap one formula without touching the trainer. The pieces implemented are
the plainest reading of the abstract:

1. target entropy (``aer_target``), ``initial_anchored``: ``H* = target_ratio * H_0``,
   ``H_0`` the mean response-token entropy of the first batch the controller sees (the
   policy before RL); balanced exploration sits *below* the initial entropy.
2. coefficient rule (``aer_alpha_rule``), ``clipped_integral``: after each step
   ``alpha <- clip(alpha + lr * (H* - H_t), 0, alpha_max)``: raised while entropy is
   under the target, lowered (to zero) above it.
3. allocation (``aer_allocation``), ``difficulty``: each response's entropy term is
   weighted by its prompt's difficulty ``1 - accuracy`` of its group, normalised to mean
   1 over the step's responses, so hard prompts explore more and solved prompts not at
   all; ``uniform`` weighs every response 1.

The term added to the policy loss is ``-alpha * agg(w_i H_it)`` over valid tokens (with
``token-mean``: ``-alpha * sum_i w_i sum_t H_it / N_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lpreg.loss.aggregation import aggregate


def difficulty_weights(group_accuracy: torch.Tensor) -> torch.Tensor:
    """``[N]`` weights ``(1 - acc)`` normalised to mean 1 (all ones if every group is solved)."""
    d = (1.0 - group_accuracy.double()).clamp(min=0.0)
    mean = d.mean()
    if float(mean) <= 0.0:
        return torch.ones_like(d, dtype=torch.float32)
    return (d / mean).float()


def uniform_weights(group_accuracy: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(group_accuracy, dtype=torch.float32)


def initial_anchored_target(ratio: float, initial_entropy: float) -> float:
    return ratio * initial_entropy


def clipped_integral_alpha(alpha: float, *, lr: float, target: float, entropy: float, alpha_max: float) -> float:
    return min(max(alpha + lr * (target - entropy), 0.0), alpha_max)


TARGETS = {"initial_anchored": initial_anchored_target}
ALPHA_RULES = {"clipped_integral": clipped_integral_alpha}
ALLOCATIONS = {"difficulty": difficulty_weights, "uniform": uniform_weights}


def _pick(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"{what}={name!r} is not one of {sorted(table)}")
    return table[name]


@dataclass
class AERController:
    target_ratio: float = 0.8
    lr: float = 0.01
    alpha: float = 0.0
    alpha_max: float = 0.05
    initial_entropy: float | None = None
    target_rule: str = "initial_anchored"
    alpha_rule: str = "clipped_integral"
    allocation: str = "difficulty"

    def __post_init__(self):
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio must be in (0, 1], got {self.target_ratio}")
        if self.lr < 0 or self.alpha_max < 0:
            raise ValueError("lr and alpha_max must be >= 0")
        if not 0.0 <= self.alpha <= self.alpha_max:
            raise ValueError(f"the initial alpha={self.alpha} must be in [0, alpha_max={self.alpha_max}]")
        _pick(TARGETS, self.target_rule, "aer_target")
        _pick(ALPHA_RULES, self.alpha_rule, "aer_alpha_rule")
        _pick(ALLOCATIONS, self.allocation, "aer_allocation")

    @classmethod
    def from_config(cls, algo) -> AERController:
        """From a run's ``algo`` section (:class:`megatron_lpreg.config.AlgoConfig`)."""
        return cls(target_ratio=algo.aer_target_ratio, lr=algo.aer_lr, alpha=algo.aer_alpha_init,
                   alpha_max=algo.aer_alpha_max,
                   target_rule=algo.aer_target, alpha_rule=algo.aer_alpha_rule, allocation=algo.aer_allocation)

    @property
    def target(self) -> float | None:
        if self.initial_entropy is None:
            return None
        return TARGETS[self.target_rule](self.target_ratio, self.initial_entropy)

    def weights(self, group_accuracy: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-response weights of the entropy term from each response's group accuracy."""
        return ALLOCATIONS[self.allocation](group_accuracy)

    def update(self, batch_entropy: float) -> float:
        """Record this step's mean entropy; returns the coefficient for the next step."""
        if self.initial_entropy is None:
            self.initial_entropy = float(batch_entropy)
        self.alpha = ALPHA_RULES[self.alpha_rule](self.alpha, lr=self.lr, target=self.target,
                                                  entropy=float(batch_entropy), alpha_max=self.alpha_max)
        return self.alpha

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "initial_entropy": self.initial_entropy}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.initial_entropy = float(state["alpha"]), state["initial_entropy"]


def aer_entropy_term(entropy: torch.Tensor, response_mask: torch.Tensor, weights: torch.Tensor,
                     alpha: float, loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """``-alpha * agg(w_i H_it)`` over valid tokens; ``entropy [N, T]`` with grad,
    ``weights [N]``. Add it to the policy loss."""
    return -alpha * aggregate(weights.to(entropy.dtype)[:, None] * entropy, response_mask, loss_agg_mode)

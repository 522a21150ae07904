"""Policy losses by name, as chosen in a run's config (``loss.name``).

Every loss takes ``[batch, response_len]`` tensors and returns ``(loss, metrics)``.
Inputs beyond ``log_prob, old_log_prob, advantages, response_mask``:
``lp_reg`` needs ``proxy_log_prob`` (from the old-policy pass). Every loss takes
``rollout_log_prob`` and ``tis_cap`` for truncated importance sampling. The
entropy bonus and 80/20 baselines wrap any of them
(:mod:`megatron_lpreg.loss.entropy_control`).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_lpreg.loss.cov_control import clip_cov_loss, kl_cov_loss
from megatron_lpreg.loss.gspo import gspo_loss
from megatron_lpreg.loss.lp_reg import lp_reg_loss
from megatron_lpreg.loss.ppo import ppo_clip_loss

POLICY_LOSSES: dict[str, Callable] = {
    "grpo": ppo_clip_loss,
    "ppo": ppo_clip_loss,
    "lp_reg": lp_reg_loss,
    "gspo": gspo_loss,
    "kl_cov": kl_cov_loss,
    "clip_cov": clip_cov_loss,
}


def get_policy_loss(name: str) -> Callable:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def token_separable(name: str, *, global_selection: bool) -> bool:
    """Whether the loss's gradient for a token's log-prob depends on that token alone
    (its log-prob, entropy and fixed per-token inputs). Such losses let the fused output
    layer form gradients in the forward
    (:func:`megatron_lpreg.ops.fused_output.fused_logprob_loss`). Lp-Reg is separable
    with ``global`` selection (fixed thresholds), not with the reference's micro-batch
    ranking; GSPO (sequence ratios) and the covariance losses (batch statistics) never
    are. The entropy bonus and the 80/20 mask keep a loss separable."""
    get_policy_loss(name)
    if name in ("grpo", "ppo"):
        return True
    if name == "lp_reg":
        return global_selection
    return False

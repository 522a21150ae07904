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

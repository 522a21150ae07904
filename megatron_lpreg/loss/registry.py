"""Policy losses by name (``algo.loss``): one small spec per loss, the one place the
trainer learns what a loss needs.

Every loss takes ``[batch, response_len]`` tensors
``log_prob, old_log_prob, advantages, response_mask`` plus ``rollout_log_prob`` and
``entropy`` (the metric), and returns ``(loss, metrics)``. A spec says:

* ``options``: its keyword arguments, read from the run's ``algo`` section;
* ``needs_proxy``: it also takes ``proxy_log_prob`` and ``thresholds`` (Lp-Reg);
* ``separable``: whether, under this config, its gradient for a token's log-prob
  depends on that token alone (its log-prob, entropy and fixed per-token inputs).
  Such losses let the fused output layer form gradients in the forward
  (:func:`megatron_lpreg.ops.fused_output.fused_logprob_loss`). Lp-Reg is separable
  with ``global`` selection (fixed thresholds), not when it ranks within
  micro-batches; GSPO (sequence ratios) and the covariance losses (batch statistics)
  never are. The entropy controls (bonus, 80/20, AER) keep a loss separable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_lpreg.loss.aggregation import REFERENCE_TOKEN_MEAN
from megatron_lpreg.loss.cov_control import clip_cov_loss, kl_cov_loss
from megatron_lpreg.loss.gspo import gspo_loss
from megatron_lpreg.loss.lp_reg import lp_reg_loss
from megatron_lpreg.loss.ppo import ppo_clip_loss


def micro_batch_agg_mode(algo) -> str:
    """How a loss reduces one micro-batch: the reference's weighting is a token-mean there
    (the trainer applies its per-micro-batch weight)."""
    return "token-mean" if algo.loss_agg_mode == REFERENCE_TOKEN_MEAN else algo.loss_agg_mode


def _common(algo) -> dict:
    return {"loss_agg_mode": micro_batch_agg_mode(algo), "tis_cap": algo.tis_cap}


def _clipped(algo) -> dict:
    return {**_common(algo), "clip_low": algo.clip_low, "clip_high": algo.clip_high}


def _lp_reg(algo) -> dict:
    return {**_clipped(algo), "neg_percent": algo.neg_percent, "pos_percent": algo.pos_percent,
            "kl_coef": algo.kl_coef, "kl_type": algo.kl_type}


def _always(algo) -> bool:
    return True


def _never(algo) -> bool:
    return False


@dataclass(frozen=True)
class LossSpec:
    fn: Callable
    options: Callable[[object], dict]
    needs_proxy: bool = False
    separable: Callable[[object], bool] = _never


LOSSES: dict[str, LossSpec] = {
    "grpo": LossSpec(ppo_clip_loss, _clipped, separable=_always),
    "ppo": LossSpec(ppo_clip_loss, _clipped, separable=_always),
    "lp_reg": LossSpec(lp_reg_loss, _lp_reg, needs_proxy=True,
                       separable=lambda algo: algo.selection_scope == "global"),
    "gspo": LossSpec(gspo_loss, _clipped),
    "kl_cov": LossSpec(kl_cov_loss, lambda algo: {**_common(algo), "kl_coef": algo.kl_coef}),
    "clip_cov": LossSpec(clip_cov_loss, _clipped),
}


def loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[name]

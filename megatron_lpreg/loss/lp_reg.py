"""Lp-Reg policy loss, reference-exact (``docs/reference_semantics.md``, "Lp-Reg, per token").

Per token, with ``r = exp(log pi - log pi_old)``::

    pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))        # PPO, no dual clip

Among the valid tokens with ``A < 0`` the ``k = max(1, int(n_neg * rho_neg))`` of lowest
``log pi`` are selected (likewise ``A > 0`` with ``rho_pos``); the reference applies
the selection only when ``k > 1``. A selected token whose ``log pi`` is below its proxy
log-prob (detached comparison) gets instead::

    -A r (unclipped) + beta * KL_est(log pi, log pi_proxy)

with the reference's estimators (each clamped to [-10, 10]):
``low_var_kl`` (k3) ``exp(d) - d - 1`` with ``d = log pi_proxy - log pi``, ``kl``
``log pi - log pi_proxy``, ``abs`` ``|log pi - log pi_proxy|``, ``mse``
``0.5 (log pi - log pi_proxy)^2``.

Selection scope. Without ``thresholds`` (the trainer's ``micro_batch`` and
``reference`` scopes; the reference's behaviour) the rho% are counted within the
tensors given, so the result depends on how batches are cut
(``trainer/reference_batching.py`` cuts them as the reference does). ``global``: the rho%
of the whole mini-batch, over every micro-batch and data-parallel rank —
:func:`global_thresholds` turns the mini-batch's log-probs into one threshold per
sign (collectives on counts only, :mod:`megatron_lpreg.ops.global_select`) and
every micro-batch then selects ``log pi <= threshold``. Global is the better-defined
choice (the same tokens are regularised whatever the DP size or micro-batch
packing), so it is the default of the trainer's config.
"""

from __future__ import annotations

import torch

from megatron_lpreg.loss.aggregation import aggregate, entropy_metric
from megatron_lpreg.loss.ppo import clipped_surrogate, tis_weights
from megatron_lpreg.ops.global_select import global_count, kth_smallest

KL_TYPES = ("low_var_kl", "kl", "abs", "mse")


def kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate of the policy against ``ref_log_prob``, clamped to [-10, 10]."""
    if kl_type == "low_var_kl":
        d = ref_log_prob - log_prob
        est = torch.exp(d) - d - 1
    elif kl_type == "kl":
        est = log_prob - ref_log_prob
    elif kl_type == "abs":
        est = (log_prob - ref_log_prob).abs()
    elif kl_type == "mse":
        est = 0.5 * (log_prob - ref_log_prob).square()
    else:
        raise ValueError(f"kl_type={kl_type!r} is not one of {KL_TYPES}")
    return est.clamp(-10.0, 10.0)


def kl_pull(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str) -> torch.Tensor:
    """``-d kl_estimate / d log_prob`` per token: how hard the estimate pulls a token's
    log-prob up (k3: ``pi_ref / pi - 1``); zero where the [-10, 10] clamp holds."""
    # strictly inside the clamp after clamping iff strictly inside before it
    est = kl_estimate(log_prob, ref_log_prob, kl_type)
    d = ref_log_prob - log_prob
    if kl_type == "low_var_kl":
        pull = torch.exp(d) - 1
    elif kl_type == "kl":
        pull = -torch.ones_like(d)
    elif kl_type == "abs":
        pull = torch.sign(d)
    else:  # mse
        pull = d
    return torch.where((est > -10.0) & (est < 10.0), pull, torch.zeros_like(pull))


def select_lowest(log_prob: torch.Tensor, candidates: torch.Tensor, percent: float) -> torch.Tensor:
    """Bool ``[B, T]``: the ``k = max(1, int(n * percent))`` candidates of lowest log-prob,
    or nothing when ``k <= 1`` (the reference's quirk)."""
    picked = torch.zeros_like(candidates)
    k = _k(int(candidates.sum()), percent)
    if not k:
        return picked
    flat_idx = candidates.reshape(-1).nonzero().squeeze(1)
    lowest = log_prob.detach().reshape(-1)[flat_idx].topk(k, largest=False).indices
    picked.view(-1)[flat_idx[lowest]] = True
    return picked


def select_tokens(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, neg_percent: float,
                  pos_percent: float, thresholds: tuple[float | None, float | None] | None = None) -> torch.Tensor:
    """Bool ``[B, T]``: the tokens Lp-Reg considers among ``mask`` (bool): of the negative
    (positive) advantage ones, the lowest ``neg_percent`` (``pos_percent``) by log-prob in
    this batch (the reference's rule, :func:`select_lowest`), or with ``thresholds``
    (:func:`global_thresholds`) those at or below the negative (positive) threshold."""
    neg, pos = mask & (advantages < 0), mask & (advantages > 0)
    if thresholds is None:
        return select_lowest(log_prob, neg, neg_percent) | select_lowest(log_prob, pos, pos_percent)
    selected = torch.zeros_like(mask)
    for cand, thr in ((neg, thresholds[0]), (pos, thresholds[1])):
        if thr is not None:
            selected |= cand & (log_prob.detach() <= thr)
    return selected


def _k(n: int, percent: float) -> int:
    """The reference's count: max(1, int(n * percent)), and no selection unless > 1."""
    k = max(1, int(n * percent))
    return k if n and k > 1 else 0


def global_thresholds(
    log_probs: list[torch.Tensor],
    advantages: list[torch.Tensor],
    masks: list[torch.Tensor],
    *,
    neg_percent: float,
    pos_percent: float = 0.0,
    group=None,
) -> tuple[float | None, float | None]:
    """Thresholds (negative, positive) for ``global`` selection over a mini-batch.

    Each list holds this rank's micro-batches (``[batch, response_len]`` each);
    ``group`` is the data-parallel group. None means "select nothing". Every rank
    of ``group`` must call it.
    """
    out = []
    for sign, percent in ((-1, neg_percent), (1, pos_percent)):
        vals = [
            lp.detach()[(m > 0) & ((a < 0) if sign < 0 else (a > 0))]
            for lp, a, m in zip(log_probs, advantages, masks, strict=True)
        ]
        local = torch.cat(vals) if vals else torch.empty(0)
        n = int(global_count(local.numel(), group))
        k = _k(n, percent)
        out.append(kth_smallest(local, k, group) if k else None)
    return out[0], out[1]


def lp_reg_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    proxy_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    neg_percent: float = 0.01,
    pos_percent: float = 0.0,
    kl_coef: float = 1.0,
    kl_type: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    thresholds: tuple[float | None, float | None] | None = None,
    rollout_log_prob: torch.Tensor | None = None,
    tis_cap: float | None = None,
    entropy: torch.Tensor | None = None,
):
    """Lp-Reg loss over ``[batch, response_len]`` tensors.

    Args:
        log_prob: current policy log-probs (with grad), fp32.
        old_log_prob, proxy_log_prob: from the old-policy pass (no grad); proxy
            log-probs of tokens outside the proxy may be any sentinel not above
            ``log_prob`` (the op returns ``min(-1e4, log_prob)``).
        advantages: per token. response_mask: 1 on response tokens.
        thresholds: ``global`` scope: (negative, positive) from
            :func:`global_thresholds`; None: the reference's micro-batch selection.
        rollout_log_prob, tis_cap: truncated importance sampling, as in
            :func:`megatron_lpreg.loss.ppo.tis_weights` (off by default).
        entropy: optional per-token entropy, only for the ``entropy`` metric.

    Returns:
        ``(loss, metrics)``: scalar loss; metrics as 0-dim tensors on the loss's device
        (no host sync: the fused output layer calls this once per chunk; the trainer
        reads them once per micro-batch).
    """
    mask = response_mask > 0
    ratio = torch.exp(log_prob - old_log_prob)
    pg, clipped = clipped_surrogate(ratio, advantages, clip_low, clip_high)

    selected = select_tokens(log_prob, advantages, mask, neg_percent=neg_percent, pos_percent=pos_percent,
                             thresholds=thresholds)
    regularised = selected & (log_prob.detach() < proxy_log_prob)
    # Computed everywhere and selected with where(): the unselected branch's
    # gradient is multiplied by an exact zero, so sentinels cannot produce NaN.
    safe_proxy = torch.where(regularised, proxy_log_prob, log_prob.detach())
    kl = kl_estimate(log_prob, safe_proxy, kl_type)
    lp_term = -advantages * ratio + kl_coef * kl
    per_token = torch.where(regularised, lp_term, pg)
    w = tis_weights(old_log_prob, rollout_log_prob, tis_cap)
    if w is not None:
        per_token = per_token * w
    loss = aggregate(per_token, response_mask, loss_agg_mode)

    with torch.no_grad():
        n_valid = mask.sum().clamp(min=1)
        n_reg = regularised.sum()
        reg = regularised.to(kl.dtype)  # masks, not boolean indexing: that would sync with the host
        # the regulariser's pull on a token's log-prob, -d(beta KL)/d(log pi) (k3: beta (pi_proxy/pi - 1);
        # zero where the clamp holds), beside the advantage the policy gradient pushes with
        pull = kl_coef * kl_pull(log_prob.detach(), safe_proxy, kl_type) * reg
        metrics = {
            "pg_clipfrac": (clipped & mask).sum() / n_valid,
            "lp_reg/selected_tokens": selected.sum(),
            "lp_reg/regularised_tokens": n_reg,
            "lp_reg/regularised_share": n_reg / n_valid,
            "lp_reg/kl_on_regularised": (kl.detach() * reg).sum() / n_reg.clamp(min=1),
            "lp_reg/pull_sum": pull.sum(),
            "lp_reg/adv_abs_on_regularised_sum": (advantages.detach().abs() * reg).sum(),
        }
    return loss, entropy_metric(metrics, entropy, response_mask)

"""The policy update: PPO epochs over mini-batches of micro-batches, one optimiser step per mini-batch.

Loss normalisation. ``token-mean`` here is the exact mean over the tokens of the
whole *mini-batch* (all micro-batches, all DP ranks); the reference does not
average like this (``reference-token-mean`` below). Megatron's schedule divides each
micro-batch loss by the number of micro-batches and DDP averages gradients over
data-parallel ranks, so each micro-batch loss is multiplied by
``units_mb / units_global * n_micro * dp`` (units: tokens for ``token-mean``,
sequences for the sequence-mean modes). With that, micro-batch packing and DP
size do not change the gradient.

``reference-token-mean`` is the reference's weighting: each micro-batch's
token-mean times (its sequences / the rank's mini-batch sequences), averaged over
ranks, so a token's weight depends on how the batch was cut; micro-batches are then
cut the reference's way (:mod:`megatron_lpreg.trainer.reference_batching`), with
``micro_token_budget`` read as unpadded tokens.

Lp-Reg's ``global`` selection scope ranks the old-policy log-probs of the whole
mini-batch (all micro-batches, all DP ranks) before the first backward: on the
first epoch of an on-policy step they equal the current log-probs. ``reference``
and ``micro_batch`` rank the current log-probs within each micro-batch.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lpreg.config import REFERENCE_TOKEN_MEAN, AlgoConfig, uses_reference_batching
from megatron_lpreg.loss.entropy_control import entropy_bonus, high_entropy_mask
from megatron_lpreg.loss.lp_reg import global_thresholds
from megatron_lpreg.loss.registry import get_policy_loss, token_separable
from megatron_lpreg.model.forward import MicroBatch, run_micro_batches
from megatron_lpreg.trainer import reference_batching
from megatron_lpreg.trainer.batching import Sequences, token_budget_micro_batches


@dataclass
class UpdateBatch:
    """This rank's rows on the ``[N, L]`` grid: sequences, per-token advantages,
    old-policy stats and the sampler's log-probs (all fp32 except masks)."""

    seqs: Sequences
    advantages: torch.Tensor
    old_logprob: torch.Tensor
    old_entropy: torch.Tensor
    proxy_logprob: torch.Tensor
    rollout_logprob: torch.Tensor


def _loss_kwargs(fn, algo: AlgoConfig) -> dict:
    available = {
        "clip_low": algo.clip_low, "clip_high": algo.clip_high, "loss_agg_mode": _in_micro_batch_mode(algo),
        "neg_percent": algo.neg_percent, "pos_percent": algo.pos_percent, "kl_coef": algo.kl_coef,
        "kl_type": algo.kl_type,
    }
    params = inspect.signature(fn).parameters
    return {k: v for k, v in available.items() if k in params}


def _in_micro_batch_mode(algo: AlgoConfig) -> str:
    """How a loss reduces one micro-batch: the reference's mode is a token-mean there."""
    return "token-mean" if algo.loss_agg_mode == REFERENCE_TOKEN_MEAN else algo.loss_agg_mode


def _micro_batches(lengths: torch.Tensor, algo: AlgoConfig, dp_group) -> list[list[int]]:
    """Positions into ``lengths`` per micro-batch: padded-token budget, or the reference's cut
    (the same count on every DP rank: one MAX all-reduce)."""
    if not uses_reference_batching(algo):
        return token_budget_micro_batches(lengths, algo.micro_token_budget)
    count = torch.tensor([reference_batching.micro_batch_count(lengths.tolist(), algo.micro_token_budget)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=dp_group)
    return reference_batching.micro_batches(lengths.tolist(), int(count))


def _all_finite(model, local_bad: bool) -> bool:
    """All ranks agree whether the loss and every gradient are finite (one all-reduce)."""
    bad = torch.tensor([1.0 if local_bad else 0.0])
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None and not bool(torch.isfinite(g).all()):
            bad.fill_(1.0)
            break
    bad = bad.to(next(model.parameters()).device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def policy_update(model, optimizer, batch: UpdateBatch, algo: AlgoConfig, *, head,
                  temperature: float, mini_batch_rows: list[list[int]]) -> list[dict]:
    """One pass (an epoch) over ``mini_batch_rows`` (row indices of ``batch`` per
    optimiser step). Returns one metrics dict per mini-batch (filled on the last
    pipeline stage; ``skipped`` everywhere). ``head``: an
    :class:`megatron_lpreg.trainer.head.OutputHead` (logits or fused)."""
    from megatron.core import parallel_state as ps

    loss_fn = get_policy_loss(algo.loss)
    kwargs = _loss_kwargs(loss_fn, algo)
    dp_group = ps.get_data_parallel_group()
    dp = ps.get_data_parallel_world_size()
    device = next(model.parameters()).device
    token_mean = algo.loss_agg_mode in ("token-mean", REFERENCE_TOKEN_MEAN)
    out = []
    for rows in mini_batch_rows:
        micro = _micro_batches(batch.seqs.lengths[rows], algo, dp_group)
        micro = [[rows[i] for i in m] for m in micro]
        n_micro = len(micro)
        units = [float(batch.seqs.mask[m].sum()) if token_mean else float(len(m)) for m in micro]
        if algo.loss_agg_mode == REFERENCE_TOKEN_MEAN:
            # sequences of the micro-batch / of this rank's mini-batch; DDP's average over
            # ranks is the reference's
            scales = [len(m) / len(rows) * n_micro for m in micro]
        else:
            total = torch.tensor([sum(units)], dtype=torch.float64)
            dist.all_reduce(total, group=dp_group)
            scales = [u / max(float(total.item()), 1.0) * n_micro * dp for u in units]

        thresholds = None
        if algo.loss == "lp_reg" and algo.selection_scope == "global":
            thresholds = global_thresholds(
                [batch.old_logprob[m] for m in micro], [batch.advantages[m] for m in micro],
                [batch.seqs.mask[m] for m in micro],
                neg_percent=algo.neg_percent, pos_percent=algo.pos_percent, group=dp_group,
            )

        separable = token_separable(algo.loss, global_selection=thresholds is not None)

        def on_logits(mb: MicroBatch, logits: torch.Tensor, thresholds=thresholds, separable=separable):
            e = mb.extra
            w = logits.shape[1]
            cut = lambda t: t[:, :w].to(logits.device)  # noqa: E731
            mask = cut(e["mask"])
            if algo.high_entropy_fraction < 1.0:
                mask = high_entropy_mask(cut(e["old_entropy"]), mask, top_fraction=algo.high_entropy_fraction)
            extra_kw = dict(kwargs)
            if algo.loss == "lp_reg":
                extra_kw["proxy_log_prob"] = cut(e["proxy_logprob"])
                if thresholds is not None:
                    extra_kw["thresholds"] = thresholds
            old_logprob, advantages = cut(e["old_logprob"]), cut(e["advantages"])
            scale = e["scale"]

            def loss_of(logprob, entropy):
                loss, metrics = loss_fn(log_prob=logprob, old_log_prob=old_logprob, advantages=advantages,
                                        response_mask=mask, entropy=entropy, **extra_kw)
                if algo.entropy_coef > 0:
                    loss = entropy_bonus(loss, entropy, mask, coef=algo.entropy_coef,
                                         loss_agg_mode=_in_micro_batch_mode(algo))
                return loss * scale, dict(metrics, loss=float(loss.detach()))

            loss, metrics = head.loss(logits, e["targets"].to(logits.device), loss_of, temperature=temperature,
                                      separable=separable, placeholder_logprob=old_logprob,
                                      placeholder_entropy=cut(e["old_entropy"]))
            return loss, dict(metrics, units=e["units"])

        mbs = []
        for m, u, scale in zip(micro, units, scales, strict=True):
            sub = batch.seqs.rows(m)
            extra = {"targets": sub.targets, "mask": sub.mask, "units": u, "scale": scale}
            for k in ("advantages", "old_logprob", "old_entropy", "proxy_logprob"):
                extra[k] = getattr(batch, k)[m]
            mbs.append(MicroBatch(sub.tokens.to(device), extra))

        _zero_grads(model, optimizer)
        infos = run_micro_batches(model, mbs, on_logits, forward_only=False)
        record = _merge(infos)
        finite = _all_finite(model, not math.isfinite(record.get("loss", 0.0)))
        if finite:
            ok, grad_norm, _ = optimizer.step()
            record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            record["skipped"] = 0 if ok else 1
        else:
            record["grad_norm"] = float("nan")
            record["skipped"] = 1
            record["skip_reason"] = "non-finite loss or gradients"
            _zero_grads(model, optimizer)
        out.append(record)
    return out


def _zero_grads(model, optimizer) -> None:
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    optimizer.zero_grad()


def _merge(infos: list[dict]) -> dict:
    """Micro-batch metrics -> one record, weighted by each micro-batch's units."""
    if not infos:
        return {}
    total = sum(i["units"] for i in infos) or 1.0
    out: dict = {}
    for key in infos[0]:
        if key == "units":
            continue
        vals = [i[key] for i in infos if key in i]
        if key.endswith("_tokens"):
            out[key] = sum(vals)
        else:
            out[key] = sum(v * i["units"] for v, i in zip(vals, infos, strict=False)) / total
    return out

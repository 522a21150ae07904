"""One optimiser step on one mini-batch: micro-batches through the pipeline schedule,
the configured loss and entropy control, a collective finite check, the step.

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

import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from megatron_lpreg.collectives import all_reduce
from megatron_lpreg.config import AlgoConfig
from megatron_lpreg.loss.aer import aer_entropy_term
from megatron_lpreg.loss.aggregation import REFERENCE_TOKEN_MEAN
from megatron_lpreg.loss.entropy_control import entropy_bonus, high_entropy_mask
from megatron_lpreg.loss.lp_reg import global_thresholds
from megatron_lpreg.loss.registry import loss_spec, micro_batch_agg_mode
from megatron_lpreg.model.forward import MicroBatch, run_micro_batches
from megatron_lpreg.trainer import reference_batching
from megatron_lpreg.trainer.batching import Sequences, token_budget_micro_batches


@dataclass
class UpdateBatch:
    """This rank's rows on the ``[N, L]`` grid: sequences, per-token advantages,
    old-policy stats and the sampler's log-probs (all fp32 except masks);
    ``row_weights [N]``: AER's per-response weights of the entropy term (None: 1)."""

    seqs: Sequences
    advantages: torch.Tensor
    old_logprob: torch.Tensor
    old_entropy: torch.Tensor
    proxy_logprob: torch.Tensor
    rollout_logprob: torch.Tensor
    row_weights: torch.Tensor | None = None


@dataclass
class LossInputs:
    """One micro-batch's inputs to the loss, ``[b, w]`` (``w``: the logits' width) except
    ``row_weights [b]``; ``scale`` turns its loss into its share of the mini-batch's."""

    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logprob: torch.Tensor
    old_entropy: torch.Tensor
    proxy_logprob: torch.Tensor
    rollout_logprob: torch.Tensor
    row_weights: torch.Tensor | None
    units: float
    scale: float

    @classmethod
    def of_rows(cls, batch: UpdateBatch, rows: list[int], units: float, scale: float) -> LossInputs:
        sub = batch.seqs.rows(rows)
        w = sub.tokens.shape[1]
        return cls(sub.targets, sub.mask, batch.advantages[rows, :w], batch.old_logprob[rows, :w],
                   batch.old_entropy[rows, :w], batch.proxy_logprob[rows, :w], batch.rollout_logprob[rows, :w],
                   None if batch.row_weights is None else batch.row_weights[rows], units, scale)

    def cut(self, width: int, device) -> LossInputs:
        """The first ``width`` positions (a pipeline stage's logits can be narrower), on ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = (v[:, :width] if v.dim() == 2 else v).to(device)
            out[f.name] = v
        return LossInputs(**out)


def _micro_batches(lengths: torch.Tensor, algo: AlgoConfig, dp_group) -> list[list[int]]:
    """Positions into ``lengths`` per micro-batch: padded-token budget, or the reference's cut
    (the same count on every DP rank: one MAX all-reduce)."""
    if not reference_batching.uses_reference_batching(algo):
        return token_budget_micro_batches(lengths, algo.micro_token_budget)
    count = torch.tensor([reference_batching.micro_batch_count(lengths.tolist(), algo.micro_token_budget)])
    all_reduce(count, dist.ReduceOp.MAX, dp_group)
    return reference_batching.micro_batches(lengths.tolist(), int(count))


def _scales(batch: UpdateBatch, rows: list[int], micro: list[list[int]], algo: AlgoConfig,
            groups) -> tuple[list[float], list[float]]:
    """Per micro-batch: its units and its loss scale (module docstring)."""
    token_mean = algo.loss_agg_mode in ("token-mean", REFERENCE_TOKEN_MEAN)
    units = [float(batch.seqs.mask[m].sum()) if token_mean else float(len(m)) for m in micro]
    if algo.loss_agg_mode == REFERENCE_TOKEN_MEAN:
        # sequences of the micro-batch / of this rank's mini-batch; DDP's average over ranks is the reference's
        return units, [len(m) / len(rows) * len(micro) for m in micro]
    total = torch.tensor([sum(units)], dtype=torch.float64)
    all_reduce(total, dist.ReduceOp.SUM, groups.dp)
    return units, [u / max(float(total.item()), 1.0) * len(micro) * groups.dp_size for u in units]


def entropy_term(algo: AlgoConfig, entropy, inputs: LossInputs, mask, coef: float):
    """The entropy control's addition to the loss (None: nothing to add)."""
    agg = micro_batch_agg_mode(algo)
    if algo.entropy_control == "bonus":
        return entropy_bonus(torch.zeros((), dtype=entropy.dtype, device=entropy.device), entropy, mask,
                             coef=algo.entropy_coef, loss_agg_mode=agg)
    if algo.entropy_control == "aer" and coef > 0:
        weights = inputs.row_weights if inputs.row_weights is not None else torch.ones(entropy.shape[0])
        return aer_entropy_term(entropy, mask, weights.to(entropy.device), coef, agg)
    return None


def _all_finite(model, local_bad: bool, world) -> bool:
    """All ranks agree whether the loss and every gradient are finite: one fused max-norm
    over this rank's gradients (NaN or inf if any element is), one all-reduce over
    ``world`` and one host sync, not one per parameter."""
    grads = [g for p in model.parameters() if (g := _grad_of(p)) is not None]
    bad = torch.tensor([1.0 if local_bad else 0.0], device=next(model.parameters()).device)
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=math.inf)
        bad = torch.maximum(bad, (~torch.isfinite(norm)).to(bad.dtype).reshape(1).to(bad.device))
    all_reduce(bad, dist.ReduceOp.MAX, world)
    return bad.item() == 0


def _grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """megatron DDP's fp32 ``main_grad`` where it exists, else ``.grad``."""
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


def policy_update(model, optimizer, batch: UpdateBatch, rows: list[int], algo: AlgoConfig, *, head, groups,
                  temperature: float, aer_alpha: float = 0.0) -> dict:
    """One optimiser step on the mini-batch ``rows`` (row indices of ``batch``). Returns its
    metrics (filled on the last pipeline stage, averaged over DP ranks, counts summed;
    ``skipped`` everywhere). ``head``: an :class:`megatron_lpreg.trainer.head.OutputHead`
    (logits or fused); ``groups``: :class:`megatron_lpreg.job.Groups`; ``aer_alpha``: AER's
    current coefficient (``algo.entropy_control: aer``)."""
    spec = loss_spec(algo.loss)
    options = spec.options(algo)
    device = next(model.parameters()).device
    micro = [[rows[i] for i in m] for m in _micro_batches(batch.seqs.lengths[rows], algo, groups.dp)]
    units, scales = _scales(batch, rows, micro, algo, groups)

    thresholds = None
    if spec.needs_proxy and algo.selection_scope == "global":
        thresholds = global_thresholds(
            [batch.old_logprob[m] for m in micro], [batch.advantages[m] for m in micro],
            [batch.seqs.mask[m] for m in micro],
            neg_percent=algo.neg_percent, pos_percent=algo.pos_percent, group=groups.dp,
        )
    separable = spec.separable(algo)

    def on_logits(mb: MicroBatch, logits: torch.Tensor):
        x: LossInputs = mb.extra["inputs"].cut(logits.shape[1], logits.device)
        mask = x.mask
        if algo.entropy_control == "80_20":
            mask = high_entropy_mask(x.old_entropy, mask, top_fraction=algo.high_entropy_fraction)
        extra = {"proxy_log_prob": x.proxy_logprob, "thresholds": thresholds} if spec.needs_proxy else {}

        def loss_of(logprob, entropy):
            loss, metrics = spec.fn(log_prob=logprob, old_log_prob=x.old_logprob, advantages=x.advantages,
                                    response_mask=mask, rollout_log_prob=x.rollout_logprob, entropy=entropy,
                                    **options, **extra)
            added = entropy_term(algo, entropy, x, mask, aer_alpha)
            if added is not None:
                loss = loss + added
            return loss * x.scale, dict(metrics, loss=loss.detach())

        loss, metrics = head.loss(logits, x.targets, loss_of, temperature=temperature, separable=separable,
                                  old_logprob=x.old_logprob, old_entropy=x.old_entropy)
        return loss, dict(host_values(metrics), units=x.units)

    mbs = [MicroBatch(batch.seqs.rows(m).tokens.to(device), {"inputs": LossInputs.of_rows(batch, m, u, s)})
           for m, u, s in zip(micro, units, scales, strict=True)]
    _zero_grads(model, optimizer)
    record = _reduce_over_dp(_merge(run_micro_batches(model, mbs, on_logits, forward_only=False)), groups)
    if _all_finite(model, not math.isfinite(record.get("loss", 0.0)), groups.world):
        ok, grad_norm, _ = optimizer.step()
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        record["skipped"] = 0 if ok else 1
    else:
        record.update(grad_norm=float("nan"), skipped=1, skip_reason="non-finite loss or gradients")
        _zero_grads(model, optimizer)
    return record


def host_values(metrics: dict) -> dict:
    """A loss's metrics, 0-dim tensors on the device, as Python numbers (integer tensors as
    ints), through one device-to-host copy: once per micro-batch, not once per value or
    per fused chunk."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(metrics)
    values = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in keys]).tolist()
    out = dict(metrics)
    for k, v in zip(keys, values, strict=True):
        out[k] = int(v) if not metrics[k].is_floating_point() else v
    return out


def _zero_grads(model, optimizer) -> None:
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    optimizer.zero_grad()


def _additive(key: str) -> bool:
    """Counts (``*_tokens``) and sums (``*_sum``) add up over micro-batches and ranks; the
    rest are means, weighted by units."""
    return key.endswith(("_tokens", "_sum")) or key == "units"


def _merge(infos: list[dict]) -> dict:
    """Micro-batch metrics -> one record, weighted by each micro-batch's units."""
    if not infos:
        return {}
    total = sum(i["units"] for i in infos) or 1.0
    out: dict = {}
    for key in infos[0]:
        vals = [i[key] for i in infos if key in i]
        if _additive(key):
            out[key] = sum(vals)
        else:
            out[key] = sum(v * i["units"] for v, i in zip(vals, infos, strict=False)) / total
    return out


def _reduce_over_dp(record: dict, groups) -> dict:
    """This rank's record -> the DP group's: counts summed, the rest weighted by units.
    Ranks without metrics (earlier pipeline stages) have an empty record, as do their
    whole DP group."""
    if not record or groups.dp_size == 1:
        record.pop("units", None)
        return record
    keys = sorted(k for k, v in record.items() if isinstance(v, (int, float)))
    u = record["units"]
    t = torch.tensor([record[k] if _additive(k) else record[k] * u for k in keys], dtype=torch.float64)
    all_reduce(t, dist.ReduceOp.SUM, groups.dp)
    total = t[keys.index("units")].item() or 1.0
    out = {k: (v if _additive(k) else v / total) for k, v in zip(keys, t.tolist(), strict=True)
           if k != "units"}
    return out

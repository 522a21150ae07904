"""Will Lp-Reg act on this model and data? ``python -m megatron_lpreg.diagnose --config CONFIG [key=value ...]``.

One rollout step and the old-policy pass of the configured run, exactly as the trainer
does them (:func:`megatron_lpreg.trainer.loop.build`, ``sample``, ``prepare_update``),
**no update**, then what the configured Lp-Reg loss would do to that batch: the tokens
it selects and regularises at the config's rho and selection scope (mini-batch by
mini-batch as the trainer cuts them), and on the regularised tokens the proxy's share
of the mass ``S_K``, the regulariser's ``pull`` (k3: ``beta (pi_proxy/pi - 1)``), ``|A|``
and ``pull/|A|``; the share of sampled tokens that are low-probability and inside the
proxy; the batch's training accuracy; and where this places the run on the phase
diagram (``docs/phase_diagram.md``), in words. Background: ``docs/lp_reg_per_token.md``;
usage: ``docs/diagnose.md``.

Options (also accepted as ``diagnose.batches=N`` / ``diagnose.drift_updates=K`` among the
overrides, which is how ``python -m launch ... --diagnose`` passes them):

* ``--batches N``: N rollout steps (the first N steps' prompts of a run), each reported
  and pooled;
* ``--drift-updates K``: after each batch's on-policy report, K optimiser steps of the
  trainer's own update on that batch (its mini-batches in the trainer's order, a fresh
  optimiser), the trainer's Lp-Reg metrics of each, then the same report at the drifted
  weights (off-policy: the ratio and the proxy apart); the weights are then restored and
  the updates discarded.

Output: a table on stdout and ``diagnose.json`` in the diagnostic's own directory,
``--out`` or ``<train.out_dir>/diagnose``. It refuses a directory that holds a run
(checkpoints or metrics) and never writes a checkpoint. Self-launches under torchrun
like ``python -m megatron_lpreg.train``; one-line errors, exit status 2 before the ranks
start, 1 inside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lpreg import collectives
from megatron_lpreg.config import ConfigError, load_config
from megatron_lpreg.job import (
    die_with_parent,
    finish_job,
    init_job,
    relaunch_under_torchrun,
    report_failure,
)
from megatron_lpreg.loss.entropy_control import high_entropy_mask
from megatron_lpreg.loss.lp_reg import global_thresholds, kl_pull, select_tokens
from megatron_lpreg.preflight import UserError, check_run
from megatron_lpreg.trainer.batching import mini_batch_positions, token_budget_micro_batches
from megatron_lpreg.trainer.logprobs import StatsConfig, sequence_stats
from megatron_lpreg.trainer.metrics import precondition_stats
from megatron_lpreg.trainer.optim import make_optimizer, set_lr
from megatron_lpreg.trainer.reference_batching import uses_reference_batching
from megatron_lpreg.trainer.update import (  # the update's own micro-batch cut
    _micro_batches,
    policy_update,
)

if __name__ == "__mp_main__":  # a rank's spawn child: it goes when the rank goes
    die_with_parent()

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
VALUE_KEYS = ("S_K", "pull", "adv_abs", "pull_over_adv", "ratio")
OPTION_KEYS = {"diagnose.batches": "batches", "diagnose.drift_updates": "drift_updates"}
REPORT = "diagnose.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_lpreg.diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (see examples/)")
    ap.add_argument("--batches", type=int, default=None, help="rollout steps to measure (default 1)")
    ap.add_argument("--drift-updates", type=int, default=None,
                    help="also measure after K updates on each batch, discarded (default 0)")
    ap.add_argument("--out", default=None, help="the diagnostic's directory (default <train.out_dir>/diagnose)")
    ap.add_argument("--nproc", type=int, default=None, help="local processes when self-launching (default tp * pp)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algo.neg_percent=0.02")
    return ap.parse_args(argv)


def split_options(args) -> tuple[dict, list[str]]:
    """``{"batches", "drift_updates"}`` from the flags or ``diagnose.*=`` overrides, and the
    remaining run-config overrides."""
    opts = {"batches": args.batches, "drift_updates": args.drift_updates}
    rest = []
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key in OPTION_KEYS:
            try:
                opts[OPTION_KEYS[key]] = int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} must be an integer") from None
        elif key.startswith("diagnose."):
            raise ValueError(f"unknown option {key}; the diagnostic's are {sorted(OPTION_KEYS)}")
        else:
            rest.append(o)
    opts = {"batches": 1 if opts["batches"] is None else opts["batches"],
            "drift_updates": 0 if opts["drift_updates"] is None else opts["drift_updates"]}
    if opts["batches"] < 1 or opts["drift_updates"] < 0:
        raise ValueError(f"--batches must be >= 1 and --drift-updates >= 0, got {opts}")
    return opts, rest


def diagnose_dir(cfg, out: str | None) -> Path:
    """The diagnostic's own directory; refuses one that holds a run, whose checkpoints,
    metrics and config a diagnostic must never touch."""
    path = Path(out) if out else Path(cfg.train.out_dir) / "diagnose"
    for name in ("checkpoints", "metrics.jsonl"):
        if (path / name).exists():
            raise ValueError(f"{path} holds a run ({name}); the diagnostic writes a directory of its own: "
                             f"pass --out to another directory")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        opts, overrides = split_options(args)
        cfg = load_config(args.config, overrides)
        out = diagnose_dir(cfg, args.out)
        quiet(cfg, out)
        nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp
        check_run(cfg, world if world is not None else nproc)
    except (ConfigError, UserError, ValueError, OSError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"diagnose: error: {e}", file=sys.stderr)
        return 2
    errors = out / "errors"
    argv_ = ["--config", args.config, *(["--out", args.out] if args.out else []), *args.overrides]
    if args.batches is not None:
        argv_ += ["--batches", str(args.batches)]
    if args.drift_updates is not None:
        argv_ += ["--drift-updates", str(args.drift_updates)]
    rc = relaunch_under_torchrun("megatron_lpreg.diagnose", argv_, nproc, command="diagnose", error_dir=errors)
    if rc is not None:
        return rc
    groups = init_job(cfg.parallel.tp, cfg.parallel.pp)
    try:
        run(cfg, groups, **opts, config_path=args.config, overrides=args.overrides)
    except Exception as e:  # noqa: BLE001 - reported once, traceback in <out>/errors/
        return report_failure("diagnose", e, errors)
    finish_job()
    return 0


def quiet(cfg, out: Path) -> None:
    """The run config as the diagnostic runs it: its own directory, no evaluation, no
    TensorBoard or W&B run."""
    cfg.train.out_dir = str(out)
    cfg.train.tensorboard = False
    cfg.eval.every_n_steps = 0
    wandb = getattr(getattr(cfg, "logging", None), "wandb", None)
    if wandb is not None:
        wandb.project = ""


# ---------------------------------------------------------------------------- in the ranks


def run(cfg, groups, *, batches: int = 1, drift_updates: int = 0, config_path: str = "",
        overrides=()) -> dict | None:
    """Build the trainer's pieces (no checkpoint), measure ``batches`` steps; the report on
    the logging rank (None elsewhere)."""
    # megatron-core loads inside the ranks, after the self-launch (as in megatron_lpreg.train)
    from megatron_lpreg.trainer.loop import build, log, prepare_update, sample

    t = build(cfg, groups, initial_checkpoint=False)
    try:
        per_batch, pooled = [], Pool()
        for b in range(batches):
            timing: dict = {}
            samples = sample(t, b, timing)
            batch = prepare_update(t, samples, timing)
            rep, values = batch_report(t, samples, batch, b)
            pooled.add("on_policy", values)
            if drift_updates:
                drift, dvalues = drift_report(t, batch, drift_updates)
                rep["drift"] = drift
                pooled.add("drift", dvalues)
            per_batch.append(rep)
            log(f"diagnose: batch {b + 1}/{batches} measured")
        if not groups.logging_rank:
            return None
        report = {
            "config": config_path, "overrides": list(overrides), "out_dir": str(t.out),
            "lp_reg": lp_reg_settings(cfg),
            "batches": per_batch,
            "pooled": pooled.summary(per_batch),
        }
        report["placement"] = placement(report["pooled"]["on_policy"], report["pooled"].get("drift"),
                                        cfg.algo, drift_updates, report["pooled"]["accuracy"])
        (t.out / REPORT).write_text(json.dumps(report, indent=1))
        print(table(report), flush=True)
        return report
    finally:
        t.close()


def lp_reg_settings(cfg) -> dict:
    a = cfg.algo
    return {"loss": a.loss, "neg_percent": a.neg_percent, "pos_percent": a.pos_percent, "kl_coef": a.kl_coef,
            "kl_type": a.kl_type, "proxy": a.proxy, "proxy_threshold": a.proxy_threshold,
            "selection_scope": a.selection_scope, "mini_batches": a.mini_batches, "ppo_epochs": a.ppo_epochs,
            "clip_low": a.clip_low, "clip_high": a.clip_high, "entropy_control": a.entropy_control}


@dataclass
class Tokens:
    """What the Lp-Reg loss would select and regularise on this rank's rows (``[N, L]``
    bool); ``mini_batch [N]``: each row's mini-batch (the trainer's order); ``empty``: per
    mini-batch, whether its selection is empty (``int(n rho) <= 1`` for every sign)."""

    selected: torch.Tensor
    regularised: torch.Tensor
    mini_batch: torch.Tensor
    empty: list[bool]


def lp_reg_tokens(batch, algo, dp_group, logprob: torch.Tensor | None = None) -> Tokens:
    """The trainer's Lp-Reg selection on one step's rows (``batch``: an
    :class:`megatron_lpreg.trainer.update.UpdateBatch`), mini-batch by mini-batch and
    micro-batch by micro-batch as :func:`megatron_lpreg.trainer.update.policy_update` cuts
    them, with the current log-probs ``logprob`` (default: the old policy's, which the
    first update of a step sees). Every rank of ``dp_group`` must call it."""
    lp = batch.old_logprob if logprob is None else logprob
    selected = torch.zeros_like(batch.seqs.mask, dtype=torch.bool)
    mini_batch = torch.zeros(len(batch.seqs.lengths), dtype=torch.long)
    empty = []
    for i, rows in enumerate(mini_batch_positions(len(batch.seqs.lengths), algo.mini_batches,
                                                  reference=uses_reference_batching(algo))):
        mini_batch[rows] = i
        micro = [[rows[j] for j in m] for m in _micro_batches(batch.seqs.lengths[rows], algo, dp_group)]
        thresholds = None
        if algo.selection_scope == "global":
            thresholds = global_thresholds(
                [batch.old_logprob[m] for m in micro], [batch.advantages[m] for m in micro],
                [batch.seqs.mask[m] for m in micro],
                neg_percent=algo.neg_percent, pos_percent=algo.pos_percent, group=dp_group)
        for m in micro:
            mask = batch.seqs.mask[m]
            if algo.entropy_control == "80_20":
                mask = high_entropy_mask(batch.old_entropy[m], mask, top_fraction=algo.high_entropy_fraction)
            selected[m] = select_tokens(lp[m], batch.advantages[m], mask > 0, neg_percent=algo.neg_percent,
                                        pos_percent=algo.pos_percent, thresholds=thresholds)
        # global: no threshold for either sign; the micro-batch scopes: nothing selected anywhere
        empty.append(thresholds == (None, None) if thresholds is not None else not bool(selected[rows].any()))
    regularised = selected & (lp < batch.proxy_logprob)
    return Tokens(selected, regularised, mini_batch, empty)


def token_values(batch, tokens: Tokens, algo, logprob: torch.Tensor | None = None) -> dict:
    """On this rank's regularised tokens: ``S_K`` (the proxy's share of the mass there),
    ``pull`` (``-beta dKL/dlog pi``, zero past the clamp: :func:`megatron_lpreg.loss.lp_reg.kl_pull`),
    ``|A|``, ``pull/|A|``, the ratio ``pi / pi_old`` and the token's mini-batch; lists."""
    lp = batch.old_logprob if logprob is None else logprob
    reg = tokens.regularised
    old, proxy = batch.old_logprob[reg].double(), batch.proxy_logprob[reg].double()
    cur = lp[reg].double()
    pull = algo.kl_coef * kl_pull(cur, proxy, algo.kl_type)
    adv = batch.advantages[reg].double().abs()
    mini = tokens.mini_batch[:, None].expand_as(reg)[reg]
    return {"S_K": torch.exp(old - proxy).tolist(), "pull": pull.tolist(), "adv_abs": adv.tolist(),
            "pull_over_adv": (pull / adv.clamp(min=1e-12)).tolist(), "ratio": torch.exp(cur - old).tolist(),
            "mini_batch": mini.tolist()}


def _sum_dp(values: list[float], group) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    return collectives.all_reduce(t, collectives.ReduceOp.SUM, group).tolist()


def _gather_dp(values: dict, group) -> dict:
    parts = collectives.all_gather_object(values, group) if group is not None else [values]
    return {k: [x for p in parts for x in p[k]] for k in values}


def measure(batch, algo, groups, logprob=None) -> tuple[dict, dict]:
    """Counts summed over the DP group (in total and per mini-batch, with the sums of pull
    and |A| that the trainer logs) and the per-token values gathered from it."""
    tokens = lp_reg_tokens(batch, algo, groups.dp, logprob)
    mask = batch.seqs.mask > 0
    local = token_values(batch, tokens, algo, logprob)
    per_mini = []
    for i in range(len(tokens.empty)):
        rows = (tokens.mini_batch == i)[:, None]
        at = [j for j, b in enumerate(local["mini_batch"]) if b == i]
        per_mini += [float((tokens.selected & rows).sum()), float((tokens.regularised & rows).sum()),
                     float(tokens.empty[i]), sum(local["pull"][j] for j in at), sum(local["adv_abs"][j] for j in at)]
    summed = _sum_dp([float(mask.sum()), float((mask & (batch.advantages < 0)).sum()),
                      float(tokens.selected.sum()), float(tokens.regularised.sum()), *per_mini], groups.dp)
    n_tok, n_neg, n_sel, n_reg = summed[:4]
    # a mini-batch is empty when it is empty on every rank
    minis = [{"selected": int(summed[4 + 5 * i]), "regularised": int(summed[5 + 5 * i]),
              "empty": summed[6 + 5 * i] > groups.dp_size - 0.5, "pull_sum": summed[7 + 5 * i],
              "adv_abs_sum": summed[8 + 5 * i]}
             for i in range(len(tokens.empty))]
    counts = {"tokens": int(n_tok), "negative_tokens": int(n_neg), "selected": int(n_sel),
              "regularised": int(n_reg), "mini_batches": minis}
    values = _gather_dp({k: v for k, v in local.items() if k != "mini_batch"}, groups.dp)
    return counts, values


def describe(counts: dict, values: dict) -> dict:
    n_reg = max(counts["regularised"], 1)
    pull, adv = values["pull"], values["adv_abs"]
    out = dict(counts)
    out.update({
        "regularised_of_selected": counts["regularised"] / counts["selected"] if counts["selected"] else None,
        "regularised_share_of_tokens": counts["regularised"] / max(counts["tokens"], 1),
        "empty_mini_batches": sum(m["empty"] for m in counts["mini_batches"]),
        "pull_sum": sum(pull), "adv_abs_sum": sum(adv),
        "pull_gt_adv_share": sum(p > a for p, a in zip(pull, adv, strict=True)) / n_reg if pull else None,
        "quantiles": {k: quantiles(values[k]) for k in VALUE_KEYS},
    })
    return out


def quantiles(vals: list[float]) -> dict | None:
    if not vals:
        return None
    t = torch.tensor(vals, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"n": len(vals), "mean": float(t.mean()), **{f"q{int(p * 100)}": v for p, v in zip(QUANTILES, q,
                                                                                                strict=True)}}


def batch_report(t, samples, batch, index: int) -> tuple[dict, dict]:
    """The on-policy report of one step (the same on every rank of the last stage)."""
    cfg, groups = t.cfg, t.groups
    rep = {"batch": index, "responses": len(samples),
           "accuracy": float((samples.correct > 0.5).float().mean()),
           "reward_mean": float(samples.scores.mean()),
           "mixed_groups": _mixed_groups(samples)}
    values = {}
    if groups.last_stage:
        counts, values = measure(batch, cfg.algo, groups)
        rep["on_policy"] = describe(counts, values)
        pre = precondition_stats(batch.old_logprob, batch.proxy_logprob, batch.advantages, batch.seqs.mask,
                                 neg_percent=cfg.algo.neg_percent, group=groups.dp)
        tokens = max(counts["tokens"], 1)
        rep["in_proxy_low_prob_share"] = float(pre["in_proxy_lt_0.1"]) / tokens
        rep["lowest_neg_in_proxy_share"] = float(pre["lowest_neg_in_proxy"]) / max(float(pre["lowest_neg"]), 1.0)
    return rep, values


def _mixed_groups(samples) -> float:
    """The share of groups whose rewards differ (only they carry advantages)."""
    by: dict = {}
    for g, s in zip(samples.group, samples.scores.tolist(), strict=True):
        by.setdefault(g, set()).add(s)
    return sum(len(v) > 1 for v in by.values()) / max(len(by), 1)


def drift_report(t, batch, updates: int) -> tuple[dict, dict]:
    """``updates`` optimiser steps of the trainer's update on ``batch`` (its mini-batches in
    order, cycling), the trainer's own Lp-Reg metrics of each, then the report at the
    drifted weights; the weights are restored afterwards."""
    cfg, model = t.cfg, t.model
    saved = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    optimizer = make_optimizer(model, cfg.optim)  # fresh, discarded: the run's own is never stepped
    set_lr(optimizer, cfg.optim, 0, cfg.train.steps)
    minis = mini_batch_positions(len(batch.seqs.lengths), cfg.algo.mini_batches,
                                 reference=uses_reference_batching(cfg.algo))
    order = [rows for _ in range(cfg.algo.ppo_epochs) for rows in minis]
    alpha = t.state.aer.alpha if t.state.aer is not None else 0.0
    records = []
    try:
        for k in range(updates):
            rec = policy_update(model, optimizer, batch, order[k % len(order)], cfg.algo, head=t.head,
                                groups=t.groups, temperature=cfg.rollout.temperature, aer_alpha=alpha)
            records.append(_trainer_metrics(rec))
        model.eval()
        cur = sequence_stats(model, batch.seqs, token_budget_micro_batches(batch.seqs.lengths,
                                                                           cfg.algo.micro_token_budget),
                             t.head, StatsConfig(cfg.rollout.temperature, cfg.algo.proxy, cfg.algo.proxy_threshold))
        model.train()
        out, values = {"updates": updates, "trainer_updates": records}, {}
        if t.groups.last_stage:
            counts, values = measure(batch, cfg.algo, t.groups, logprob=cur["logprob"])
            out["after"] = describe(counts, values)
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s.to(p.device))
        del optimizer
    return out, values


TRAINER_KEYS = ("lp_reg/selected_tokens", "lp_reg/regularised_tokens", "lp_reg/pull_sum",
                "lp_reg/adv_abs_on_regularised_sum", "skipped", "grad_norm", "pg_clipfrac")


def _trainer_metrics(rec: dict) -> dict:
    """The update record's Lp-Reg numbers as plain floats (the losses may return 0-dim tensors)."""
    return {k: float(rec[k]) for k in TRAINER_KEYS if k in rec}


class Pool:
    """Per-token values pooled over the batches, per phase (on_policy, drift)."""

    def __init__(self):
        self.values: dict = {}

    def add(self, phase: str, values: dict) -> None:
        if not values:
            return
        acc = self.values.setdefault(phase, {k: [] for k in values})
        for k, v in values.items():
            acc[k] += v

    def summary(self, per_batch: list[dict]) -> dict:
        """Counts summed and quantiles over every batch's regularised tokens, per phase."""
        out = {}
        for phase in ("on_policy", "drift"):
            reps = [r for r in (_phase(b, phase) for b in per_batch) if r]
            if not reps:
                continue
            counts = {k: sum(r[k] for r in reps) for k in ("tokens", "negative_tokens", "selected", "regularised")}
            counts["mini_batches"] = [m for r in reps for m in r["mini_batches"]]
            values = self.values.get(phase) or {k: [] for k in VALUE_KEYS}
            out[phase] = {**describe(counts, values), "per_batch_regularised": [r["regularised"] for r in reps]}
        accs = [b["accuracy"] for b in per_batch]
        out["accuracy"] = sum(accs) / len(accs)
        shares = [b["in_proxy_low_prob_share"] for b in per_batch if "in_proxy_low_prob_share" in b]
        if shares:
            out["in_proxy_low_prob_share"] = sum(shares) / len(shares)
        return out


def _phase(b: dict, phase: str) -> dict | None:
    return b.get("on_policy") if phase == "on_policy" else (b.get("drift") or {}).get("after")


# ---------------------------------------------------------------------------- words and table


def placement(on: dict, drift: dict | None, algo, drift_updates: int, accuracy: float) -> str:
    """Where the measured batch sits on the phase diagram, in words, with the diagram's
    measured outcome at the nearest cell (``docs/phase_diagram.md``)."""
    lines = [_place(on, algo, "on-policy (the first update of a step)")]
    if drift is not None:
        lines.append(_place(drift, algo, f"after {drift_updates} update(s) on the batch (off-policy)"))
    if on["regularised"]:
        cell = diagram_cell(accuracy, on["quantiles"]["S_K"]["q50"], diagram_arm(algo, on))
        if cell:
            lines.append(cell)
    return "\n".join(lines)


def _place(d: dict, algo, when: str) -> str:
    n_mb = len(d["mini_batches"])
    if d["selected"] == 0:
        why = (f"every mini-batch's selection is empty: int(n_neg x rho) <= 1 with rho = {algo.neg_percent} "
               f"({d['negative_tokens']} negative-advantage tokens over the {n_mb} mini-batch(es) measured)"
               if d["empty_mini_batches"] == n_mb else "no token was selected")
        return (f"{when}: Lp-Reg does not reach any token: {why}. The loss is GRPO's token by token "
                f"(the phase diagram's empty-selection arm: identical to GRPO).")
    if d["regularised"] == 0:
        return (f"{when}: Lp-Reg does not reach any token: all {d['selected']} selected tokens lie outside the "
                f"min-p proxy (presumed noise, kappa = {algo.proxy_threshold}), so nothing is regularised and "
                f"the loss is GRPO's.")
    q = d["quantiles"]["pull_over_adv"]
    gt = d["pull_gt_adv_share"]
    head = (f"{when}: Lp-Reg regularises {d['regularised']} of {d['selected']} selected tokens "
            f"({100 * d['regularised_share_of_tokens']:.3f} % of all tokens), S_K median "
            f"{d['quantiles']['S_K']['q50']:.2f}; pull/|A| median {q['q50']:.2f} "
            f"(10-90 %: {q['q10']:.2f}-{q['q90']:.2f}), pull > |A| on {100 * gt:.0f} % of them")
    if gt < 0.1:
        verb = "damps the push down on those tokens (A -> A + pull with pull < |A|) and reverses it on none"
    elif gt <= 0.5:
        verb = "damps the push down on most of those tokens and reverses it on some (pull > |A|: pushed up)"
    else:
        verb = "reverses the push on most of those tokens (pull > |A|: negative samples are pushed up)"
    return f"{head}: it {verb}."


PHASE_DIAGRAM = Path(__file__).resolve().parents[1] / "docs" / "results" / "phase_diagram.json"
SPARKS = {"over": "over-penalised", "correct": "correctly penalised"}


def separates(diffs: list[float], floor: float) -> bool:
    """The phase diagram's separation criterion for paired differences from GRPO (one per
    seed): |mean| at least 3 standard errors and at least ``floor``, and the same sign in
    all but at most one seed."""
    if len(diffs) < 2:
        return False
    m, s = statistics.mean(diffs), statistics.stdev(diffs)
    same = sum(1 for d in diffs if d * m > 0)
    return abs(m) >= max(floor, 3 * s / math.sqrt(len(diffs))) and same >= len(diffs) - 1


def diagram_arm(algo, on: dict) -> str:
    """The phase diagram's arm nearest to the configured update schedule."""
    if all(m["empty"] for m in on["mini_batches"]):
        return "off-policy x8, empty selection"
    updates = algo.mini_batches * algo.ppo_epochs
    return "on-policy" if updates == 1 else ("off-policy x4" if updates <= 5 else "off-policy x8")


def diagram_cell(accuracy: float, s_k: float, arm: str, path: Path = PHASE_DIAGRAM) -> str | None:
    """The diagram's measured Lp-Reg minus GRPO spark survival at the cell nearest to
    (training accuracy, median S_K of the regularised tokens, arm), both spark kinds."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    p = data["protocol"]
    acc = min(p["acc"], key=lambda a: abs(a - accuracy))
    sk = min(p["s_k"], key=lambda v: abs(v - s_k))
    parts = []
    for spark in p["spark"]:
        runs = data["results"].get(f"{arm}|acc={acc}|spark={spark}|S_K={sk}")
        if not runs or "lp_reg" not in runs:
            continue
        base = {r["seed"]: r["spark_alive"] for r in runs["grpo"]}
        d = [r["spark_alive"] - base[r["seed"]] for r in runs["lp_reg"] if r["seed"] in base]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        parts.append(f"{SPARKS.get(spark, spark)} spark: GRPO keeps it in {sum(base.values()) / len(base):.2f} "
                     f"of contexts, Lp-Reg {statistics.mean(d):+.2f} ± {sd:.2f} "
                     f"({'separates' if separates(d, 0.05) else 'no separation'})")
    if not parts:
        return None
    return (f"Nearest phase-diagram cell (accuracy {acc}, S_K {sk}, {arm}; synthetic policy, 300 steps, "
            f"{p['seeds']} seeds): " + "; ".join(parts) + ". The diagram holds fixed that the selection "
            "reaches the low-probability tokens that matter; whether it does on your model is the count above.")


def table(report: dict) -> str:
    rows = [("batch", "phase", "tokens", "neg", "selected", "regularised", "empty mb", "S_K q50",
             "pull q50", "|A| q50", "pull/|A| q10/q50/q90", "pull>|A|")]
    for b in report["batches"]:
        for phase, d in (("on-policy", b.get("on_policy")), ("drift", (b.get("drift") or {}).get("after"))):
            if not d:
                continue
            q = d["quantiles"]
            rows.append((str(b["batch"]), phase, str(d["tokens"]), str(d["negative_tokens"]), str(d["selected"]),
                         str(d["regularised"]), f"{d['empty_mini_batches']}/{len(d['mini_batches'])}",
                         _q(q["S_K"], "q50"), _q(q["pull"], "q50"), _q(q["adv_abs"], "q50"),
                         "/".join(_q(q["pull_over_adv"], k) for k in ("q10", "q50", "q90")),
                         "-" if d["pull_gt_adv_share"] is None else f"{100 * d['pull_gt_adv_share']:.0f} %"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    p = report["pooled"]
    lines.append("")
    lines.append(f"training accuracy {p['accuracy']:.3f}; sampled tokens low-probability (p < 0.1) and inside "
                 f"the proxy: {100 * p.get('in_proxy_low_prob_share', math.nan):.2f} %")
    for b in report["batches"]:
        for u, r in enumerate((b.get("drift") or {}).get("trainer_updates", [])):
            if "lp_reg/selected_tokens" in r:
                n = max(r["lp_reg/regularised_tokens"], 1)
                lines.append(f"batch {b['batch']} update {u + 1} (the trainer's metrics): selected "
                             f"{r['lp_reg/selected_tokens']:.0f}, regularised {r['lp_reg/regularised_tokens']:.0f}, "
                             f"pull mean {r['lp_reg/pull_sum'] / n:.3f}, |A| mean "
                             f"{r['lp_reg/adv_abs_on_regularised_sum'] / n:.3f}")
    lines.append("")
    lines.append(report["placement"])
    lines.append(f"(report: {Path(report['out_dir']) / REPORT})")
    return "\n".join(lines)


def _q(d: dict | None, k: str) -> str:
    return "-" if d is None else f"{d[k]:.3g}"


if __name__ == "__main__":
    sys.exit(main())

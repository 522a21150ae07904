"""When does Lp-Reg act? A phase diagram of its regime on a synthetic policy.

    python tools/phase_diagram.py                      # the study (docs/phase_diagram.md), resumable
    python tools/phase_diagram.py --summarize          # table + heat maps from docs/results/phase_diagram.json
    python tools/phase_diagram.py --smoke --out /tmp/pd.json   # seconds: two cells, two seeds, 12 steps
    python tools/phase_diagram.py --pilot              # the GRPO-only pilot that fixed the step size

The protocol (written in ``docs/phase_diagram.md`` before any run; ``PROTOCOL`` below):

* **Policy.** ``contexts`` prompts, each a decision over ``vocab = 200`` tokens with free
  logits (one row per context). Token 0 is the majority, 1-3 alternatives (0.04 each),
  4 the *spark* (0.03, inside the min-p proxy), 5.. the *tail* (``1 - S_K`` spread evenly,
  each below kappa * p_max: outside the proxy). ``S_K`` is the proxy's share of the mass
  at the decision; the majority takes ``S_K - 0.15``.
* **Responses.** One decision then ``tokens - 1`` positions the policy is settled on:
  fixed tokens with p = 0.1 whose proxy is the policy (nothing regularised there) and
  that are not trained. They stand for the rest of an LLM response: they make the
  paper's rho = 1 % of the negative-advantage *tokens* (``k = n_neg_responses``
  with 100 tokens) reach every negative decision token below p = 0.1 (tail, spark,
  alternatives) and never the majority (p >= 0.2). So the selection reaches the spark
  in every cell where it is not empty: the precondition, held fixed.
* **Rewards** (Bernoulli; the accuracy regime ``acc``): majority, alternatives and tail
  succeed with probability ``acc`` (the tail is harmless, like the coin task's
  phrasings, so ``S_K`` stays a property of the cell). The spark is *over-penalised*:
  reward 2 with probability 0.55 acc (mean 1.1 acc, at least the majority's; variance
  4 q (1 - q), above acc (1 - acc)), so most of its samples fail and carry negative
  advantage; or *correctly penalised*: reward 1 with probability acc - 0.15.
* **Each step**: fresh rollouts (``group = 8`` per context) from the current policy,
  GRPO advantages (``algo/advantages.py``), the old-policy pass through the real op
  (``token_stats``: log-prob and min-p proxy rebuilt from the current weights), then
  ``updates`` optimiser steps on mini-batches cut by the trainer's
  ``mini_batch_positions``, each through the real ``vocab_parallel_logprob`` and the
  real losses (``lp_reg_loss`` with ``global`` selection; ``ppo_clip_loss``), the
  paper's clip (1.0 / 9.0), rho 1 %, kappa 0.02, beta 1, k3. Lp-Reg without the filter:
  kappa 1e-9 (the proxy is the old policy).
* **Optimiser**: plain SGD on the logits (per-logit Adam would move every logit by ~lr
  whatever its gradient, an artifact no shared-parameter network has), the trainer's
  fixed lr for every arm (off-policy arms move ``updates`` times per batch, as in the
  paper). The step size was fixed from a GRPO-only pilot (``--pilot``) before any
  Lp-Reg run: the smallest of (0.5, 1, 2, 4) at which GRPO drives the correctly
  penalised spark out of the proxy in at least half the contexts by the last step at
  acc 0.3, S_K 0.75, on-policy (mean over 4 seeds).
* **Arms**: on-policy (1 update per batch); off-policy 4 and 8 updates per batch; off-policy
  8 with responses of one token (every mini-batch then holds fewer than 2 / rho = 200
  negative tokens: ``int(n rho) <= 1`` and the selection is empty, as in the coin study).

Implementation note: every run of one arm (cells x methods x seeds) steps together in
one batched tensor: the op runs on all rows at once (it is per token), the loss is called
once per method on the runs' rows (their token-means summed, each run's own mean), and
the global-selection thresholds are computed per run in one batched pass
(:func:`thresholds`, asserted equal to the trainer's ``global_thresholds`` in
``tests/tools/test_phase_diagram.py``). Random numbers are common across methods and
cells of the same seed (paired comparisons).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg.algo.advantages import grpo_advantages  # noqa: E402
from megatron_lpreg.diagnose import SPARKS, separates  # noqa: E402
from megatron_lpreg.loss.lp_reg import lp_reg_loss  # noqa: E402
from megatron_lpreg.loss.ppo import ppo_clip_loss  # noqa: E402
from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob  # noqa: E402
from megatron_lpreg.trainer.batching import mini_batch_positions  # noqa: E402

MAJORITY, SPARK, TAIL = 0, 4, 5   # token ids; 1-3 are the alternatives
FILLER_P = 0.1
RESULTS = ROOT / "docs" / "results" / "phase_diagram.json"
FIGURES = ROOT / "docs" / "figures"

METHODS = {"grpo": None, "lp_reg": 0.02, "lp_reg_no_filter": 1e-9}  # name -> kappa (None: GRPO)
ARMS = {  # name -> (updates per batch, tokens per response)
    "on-policy": (1, 100),
    "off-policy x4": (4, 100),
    "off-policy x8": (8, 100),
    "off-policy x8, empty selection": (8, 1),
}


@dataclass(frozen=True)
class Protocol:
    vocab: int = 200
    contexts: int = 32
    group: int = 8
    steps: int = 300
    lr: float = 0.5           # SGD step per sample (``sgd_lr``): the pilot's choice (--pilot)
    clip_low: float = 1.0
    clip_high: float = 9.0
    rho: float = 0.01
    beta: float = 1.0
    p_spark: float = 0.03
    p_alternative: float = 0.04
    s_k: tuple = (0.95, 0.75, 0.5, 0.35)
    acc: tuple = (0.3, 0.85)
    spark: tuple = ("over", "correct")
    seeds: int = 8
    arms: tuple = tuple(ARMS)
    methods: tuple = tuple(METHODS)


PROTOCOL = Protocol()


@dataclass(frozen=True)
class Cell:
    s_k: float
    acc: float
    spark: str   # over | correct
    arm: str

    @property
    def key(self) -> str:
        return f"{self.arm}|acc={self.acc}|spark={self.spark}|S_K={self.s_k}"


def initial_probs(s_k: float, p: Protocol) -> torch.Tensor:
    """``[vocab]`` fp64: majority ``S_K - 0.15``, three alternatives, the spark, the tail."""
    probs = torch.full((p.vocab,), (1.0 - s_k) / (p.vocab - TAIL), dtype=torch.float64)
    probs[MAJORITY] = s_k - 3 * p.p_alternative - p.p_spark
    probs[1:SPARK] = p.p_alternative
    probs[SPARK] = p.p_spark
    edge = 0.02 * float(probs.max())
    if not (probs[TAIL] < edge < p.p_spark):
        raise ValueError(f"S_K={s_k}: the tail ({float(probs[TAIL]):.4f}) must lie below kappa * p_max ({edge:.4f}) "
                         f"and the spark ({p.p_spark}) above it")
    return probs


def reward_table(acc: float, spark: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(success probability, reward on success) of the spark; every other token: (acc, 1)."""
    if spark == "over":
        return torch.tensor(0.55 * acc), torch.tensor(2.0)
    if spark == "correct":
        return torch.tensor(acc - 0.15), torch.tensor(1.0)
    raise ValueError(f"spark={spark!r} is not over or correct")


def sgd_lr(p: Protocol, tokens: int) -> float:
    """The optimiser's lr such that, on-policy, one sample moves its context's logits by
    ``p.lr / group * A (onehot - pi)``: the loss is a token-mean over ``B * tokens``."""
    return p.lr * p.contexts * tokens


def thresholds(old_dec: torch.Tensor, neg: torch.Tensor, tokens: int, rho: float) -> torch.Tensor:
    """Per run, the ``global`` selection's threshold over one mini-batch: the k-th smallest
    old log-prob among its negative-advantage tokens, ``k = max(1, int(n rho))``, and
    ``-inf`` (nothing) unless ``k > 1``. The ``tokens - 1`` settled positions of each
    negative response all sit at log(FILLER_P). ``old_dec, neg: [R, b]``; returns ``[R]`` fp64."""
    fill = float(torch.tensor(math.log(FILLER_P)))  # the settled tokens' fp32 log-prob, exactly
    n_rows = neg.sum(1)
    n = n_rows * tokens
    k = torch.clamp((n.double() * rho).floor().long(), min=1)
    vals = torch.where(neg, old_dec.double(), torch.full_like(old_dec, math.inf, dtype=torch.float64))
    srt = vals.sort(1).values
    below = (srt < fill).sum(1)
    at = (srt == fill).sum(1) + n_rows * (tokens - 1)
    idx_low = (k - 1).clamp(max=srt.shape[1] - 1)
    idx_high = (k - 1 - n_rows * (tokens - 1)).clamp(min=0, max=srt.shape[1] - 1)
    thr = torch.where(k <= below, srt.gather(1, idx_low[:, None])[:, 0],
                      torch.where(k <= below + at, torch.full_like(srt[:, 0], fill),
                                  srt.gather(1, idx_high[:, None])[:, 0]))
    return torch.where((k > 1) & (n > 0), thr, torch.full_like(thr, -math.inf))


@dataclass
class Runs:
    """One arm's runs, stepped together: ``R = cells x methods x seeds``."""

    cells: list
    methods: list
    seeds: list
    p: Protocol
    index: list = field(default_factory=list)  # (cell, method, seed) per run

    def __post_init__(self):
        self.index = list(product(range(len(self.cells)), range(len(self.methods)), range(len(self.seeds))))


def run_arm(arm: str, cells: list[Cell], seeds: list[int], p: Protocol = PROTOCOL, *,
            steps: int | None = None, log=print) -> dict:
    """Every (cell, method, seed) of one arm; returns ``{cell key: {method: [per-seed result]}}``."""
    updates, tokens = ARMS[arm]
    steps = p.steps if steps is None else steps
    methods = list(p.methods)
    runs = Runs(cells, methods, seeds, p)
    R, C, G, V = len(runs.index), p.contexts, p.group, p.vocab
    B = C * G
    cell_of = torch.tensor([c for c, _, _ in runs.index])
    meth_of = torch.tensor([m for _, m, _ in runs.index])
    seed_of = torch.tensor([s for _, _, s in runs.index])

    start = torch.stack([initial_probs(c.s_k, p) for c in cells])[cell_of]            # [R, V]
    succ = torch.full((R, V), 0.0, dtype=torch.float64)
    value = torch.ones(R, V, dtype=torch.float64)
    for i, c in enumerate(cells):
        q, v = reward_table(c.acc, c.spark)
        rows = cell_of == i
        succ[rows] = c.acc
        succ[rows, SPARK] = q.double()
        value[rows, SPARK] = v.double()
    logits = start.log().float()[:, None, :].expand(R, C, V).contiguous().requires_grad_(True)
    lr = sgd_lr(p, tokens)
    gens = [torch.Generator().manual_seed(1_000_003 * s + 17) for s in seeds]
    groups = torch.arange(R * C).repeat_interleave(G)
    ctx = torch.arange(C).repeat_interleave(G)                                       # row -> context
    minis = mini_batch_positions(B, updates, reference=False)
    kind = {m: METHODS[m] for m in methods}
    by_method = {m: (meth_of == j).nonzero().squeeze(1) for j, m in enumerate(methods)}
    fill_lp = torch.full((1, 1, max(tokens - 1, 0)), math.log(FILLER_P))

    acc_stats = {k: torch.zeros(R, dtype=torch.float64) for k in (
        "spark_neg", "spark_neg_reg", "pull_over_adv_sum", "pull_gt_adv", "reg_tokens", "sel_tokens",
        "empty_minibatches", "pull_over_adv_early_sum", "spark_neg_reg_early")}
    t0 = time.time()
    for step in range(steps):
        with torch.no_grad():
            probs = torch.softmax(logits.double(), -1)                                # [R, C, V]
            u = torch.stack([torch.rand(C, G, generator=g, dtype=torch.float64) for g in gens])
            w = torch.stack([torch.rand(C, G, generator=g, dtype=torch.float64) for g in gens])
            cdf = probs.cumsum(-1)
            token = torch.searchsorted(cdf, u[seed_of].contiguous()).clamp(max=V - 1)  # [R, C, G]
            tok = token.reshape(R, B)
            ok = w[seed_of].reshape(R, B) < succ.gather(1, tok)
            score = torch.where(ok, value.gather(1, tok), torch.zeros_like(value.gather(1, tok)))
            adv = grpo_advantages(score.reshape(-1), groups, torch.ones(R * B, 1))[:, 0].reshape(R, B)
            neg = adv < 0
            rows_logits = logits.detach()[:, ctx, :]                                   # [R, B, V]
            old_lp = torch.empty(R, B)
            old_px = torch.empty(R, B)
            for m, idx in by_method.items():
                st = token_stats(rows_logits[idx], tok[idx], proxy="minp",
                                 proxy_threshold=kind[m] if kind[m] is not None else 0.02)
                old_lp[idx], old_px[idx] = st.logprob, st.proxy_logprob
        for rows in minis:
            rows_t = torch.tensor(rows)
            b = len(rows)
            lp_dec = vocab_parallel_logprob(logits[:, ctx[rows_t], :], tok[:, rows_t])           # [R, b]
            total = 0.0
            for m, idx in by_method.items():
                r_ = len(idx)
                lp = _full(lp_dec[idx], fill_lp, r_, b, tokens)
                old = _full(old_lp[idx][:, rows_t], fill_lp, r_, b, tokens)
                a = adv[idx][:, rows_t][:, :, None].expand(r_, b, tokens).reshape(r_ * b, tokens)
                mask = torch.ones(r_ * b, tokens)
                if kind[m] is None:
                    loss, _ = ppo_clip_loss(lp, old, a, mask, clip_low=p.clip_low, clip_high=p.clip_high)
                else:
                    px = _full(old_px[idx][:, rows_t], fill_lp, r_, b, tokens)
                    thr = thresholds(old_lp[idx][:, rows_t], neg[idx][:, rows_t], tokens, p.rho)
                    thr_rows = thr.float().repeat_interleave(b)[:, None]
                    loss, _ = lp_reg_loss(lp, old, px, a, mask, clip_low=p.clip_low, clip_high=p.clip_high,
                                          neg_percent=p.rho, kl_coef=p.beta, kl_type="low_var_kl",
                                          thresholds=(thr_rows, None))
                    _record(acc_stats, idx, lp_dec[idx].detach(), old_px[idx][:, rows_t], neg[idx][:, rows_t],
                            adv[idx][:, rows_t], tok[idx][:, rows_t], thr, p.beta, early=step < 20)
                total = total + loss * r_
            logits.grad = None
            total.backward()
            with torch.no_grad():
                logits -= lr * logits.grad
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"[phase_diagram] {arm}: step {step + 1}/{steps} ({time.time() - t0:.0f} s)")

    with torch.no_grad():
        probs = torch.softmax(logits.double(), -1)                                      # [R, C, V]
        p_max = probs.max(-1).values
        alive = (probs[..., SPARK] >= 0.02 * p_max).double().mean(1)
        ev = (probs * (succ * value)[:, None, :]).sum(-1).mean(1)
        noise = probs[..., TAIL:].sum(-1).mean(1)
        spark_p = probs[..., SPARK].mean(1)
        s_k_end = probs[..., :TAIL].sum(-1).mean(1)
    out: dict = {}
    for r, (ci, mi, si) in enumerate(runs.index):
        st = {k: float(v[r]) for k, v in acc_stats.items()}
        res = {
            "seed": seeds[si],
            "spark_alive": float(alive[r]),
            "spark_p": float(spark_p[r]),
            "expected_reward": float(ev[r]),
            "noise_mass": float(noise[r]),
            "s_k_end": float(s_k_end[r]),
        }
        if kind[methods[mi]] is not None:
            res.update({
                "regularised_per_step": st["reg_tokens"] / steps,
                "selected_per_step": st["sel_tokens"] / steps,
                "empty_selection_share": st["empty_minibatches"] / (steps * len(minis)),
                "spark_neg_regularised_share": st["spark_neg_reg"] / max(st["spark_neg"], 1.0),
                "pull_over_adv": st["pull_over_adv_sum"] / max(st["spark_neg_reg"], 1.0),
                "pull_over_adv_first20": st["pull_over_adv_early_sum"] / max(st["spark_neg_reg_early"], 1.0),
                "pull_gt_adv_share": st["pull_gt_adv"] / max(st["spark_neg_reg"], 1.0),
            })
        out.setdefault(cells[ci].key, {}).setdefault(methods[mi], []).append(res)
    return out


def _full(dec: torch.Tensor, fill: torch.Tensor, r: int, b: int, tokens: int) -> torch.Tensor:
    """``[r * b, tokens]``: the decision column then the settled positions (log 0.1)."""
    if tokens == 1:
        return dec.reshape(r * b, 1)
    return torch.cat([dec[:, :, None], fill.expand(r, b, tokens - 1).to(dec.dtype)], 2).reshape(r * b, tokens)


def _record(acc: dict, idx, lp, px, neg, adv, tok, thr, beta: float, early: bool) -> None:
    """What Lp-Reg did on this mini-batch's decision tokens (the settled ones are never
    regularised): selected, regularised, and on the spark's negative samples pull / |A|."""
    sel = neg & (lp.double() <= thr[:, None])
    reg = sel & (lp < px)
    pull = beta * (torch.exp(px.double() - lp.double()) - 1)
    d = px.double() - lp.double()
    pull = torch.where((torch.exp(d) - d - 1) < 10, pull, torch.zeros_like(pull))
    spark_neg = neg & (tok == SPARK)
    on = reg & spark_neg
    ratio = torch.where(on, pull / adv.abs().double().clamp(min=1e-12), torch.zeros_like(pull))
    acc["sel_tokens"][idx] += sel.sum(1).double()
    acc["reg_tokens"][idx] += reg.sum(1).double()
    acc["empty_minibatches"][idx] += (thr == -math.inf).double()
    acc["spark_neg"][idx] += spark_neg.sum(1).double()
    acc["spark_neg_reg"][idx] += on.sum(1).double()
    acc["pull_over_adv_sum"][idx] += ratio.sum(1)
    acc["pull_gt_adv"][idx] += (on & (ratio > 1)).sum(1).double()
    if early:
        acc["spark_neg_reg_early"][idx] += on.sum(1).double()
        acc["pull_over_adv_early_sum"][idx] += ratio.sum(1)


# ---------------------------------------------------------------------------- study


def all_cells(p: Protocol, arm: str) -> list[Cell]:
    return [Cell(s, a, sp, arm) for a in p.acc for sp in p.spark for s in p.s_k]


def study(path: Path, p: Protocol = PROTOCOL, *, arms=None, steps=None, seeds=None, log=print) -> dict:
    """Run (or continue) the study into ``path`` (one arm at a time, saved after each)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    if data and data.get("protocol") != _jsonable(p):
        raise SystemExit(f"{path} holds a study under another protocol; move it away or use --out")
    data.setdefault("protocol", _jsonable(p))
    data.setdefault("results", {})
    data.setdefault("wall_s", {})
    seeds = list(range(p.seeds)) if seeds is None else seeds
    for arm in arms or p.arms:
        if arm in data["wall_s"]:
            log(f"[phase_diagram] {arm}: done already")
            continue
        t0 = time.time()
        data["results"].update(run_arm(arm, all_cells(p, arm), seeds, p, steps=steps, log=log))
        data["wall_s"][arm] = round(time.time() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, separators=(",", ":")))
        log(f"[phase_diagram] {arm}: {data['wall_s'][arm]} s")
    return data


def merge(path: Path, other: Path) -> dict:
    """``other``'s finished arms added to ``path`` (both under the same protocol)."""
    data, more = json.loads(path.read_text()), json.loads(other.read_text())
    if data["protocol"] != more["protocol"]:
        raise SystemExit(f"{other} was run under another protocol than {path}")
    for arm, wall in more["wall_s"].items():
        data["wall_s"][arm] = wall
        data["results"].update({k: v for k, v in more["results"].items() if k.startswith(arm + "|")})
    path.write_text(json.dumps(data, separators=(",", ":")))
    return data


def _jsonable(p: Protocol) -> dict:
    return json.loads(json.dumps(asdict(p)))


# ---------------------------------------------------------------------------- summary

OUTCOMES = ("spark_alive", "expected_reward", "noise_mass")


def paired(runs: dict, method: str, key: str, base: str = "grpo") -> list[float]:
    """``method`` minus ``base`` at the same seed."""
    b = {r["seed"]: r[key] for r in runs[base]}
    return [r[key] - b[r["seed"]] for r in runs[method] if r["seed"] in b]


def separated(diffs: list[float], floor: float) -> bool:
    """The protocol's criterion (:func:`megatron_lpreg.diagnose.separates`, which the
    diagnostic also quotes): |mean| >= 3 standard errors and >= ``floor``, and the same sign
    in all but at most one seed."""
    return separates(diffs, floor)


FLOORS = {"spark_alive": 0.05, "expected_reward": 0.005, "noise_mass": 0.01}


def summarize(data: dict) -> dict:
    """Per cell: each method's mean +- std of every outcome, the paired differences from GRPO
    with their std and whether they separate, and Lp-Reg's own measurements."""
    out = {}
    for key, runs in data["results"].items():
        row = {}
        for m, rs in runs.items():
            row[m] = {k: _ms([r[k] for r in rs]) for k in rs[0] if k != "seed"}
            if m != "grpo" and "grpo" in runs:
                for k in OUTCOMES:
                    d = paired(runs, m, k)
                    row[m][f"{k}_minus_grpo"] = {**_ms(d), "separates": separated(d, FLOORS[k]),
                                                 "positive_seeds": sum(x > 0 for x in d), "n": len(d)}
        out[key] = row
    return out


def _ms(vals: list[float]) -> dict:
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def markdown(data: dict) -> str:
    s = summarize(data)
    p = data["protocol"]
    lines = [
        "| arm | acc | spark | S_K | pull/\\|A\\| on spark negatives (first 20 steps) | spark alive: GRPO | "
        "Lp-Reg - GRPO | no filter - GRPO | spark p: GRPO / Lp-Reg | expected reward: Lp-Reg - GRPO | "
        "noise mass: Lp-Reg - GRPO | no filter - GRPO | Lp-Reg empty selections |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in p["arms"]:
        for acc in p["acc"]:
            for spark in p["spark"]:
                for s_k in p["s_k"]:
                    key = Cell(s_k, acc, spark, arm).key
                    if key not in s:
                        continue
                    c = s[key]
                    lp, nf, g = c.get("lp_reg", {}), c.get("lp_reg_no_filter", {}), c["grpo"]
                    lines.append(
                        f"| {arm} | {acc} | {spark} | {s_k} | {_v(lp.get('pull_over_adv_first20'), 2)} | "
                        f"{_v(g['spark_alive'], 2)} | {_d(lp.get('spark_alive_minus_grpo'), 2)} | "
                        f"{_d(nf.get('spark_alive_minus_grpo'), 2)} | {_v(g['spark_p'], 3)} / {_v(lp.get('spark_p'), 3)} | "
                        f"{_d(lp.get('expected_reward_minus_grpo'), 3)} | "
                        f"{_d(lp.get('noise_mass_minus_grpo'), 3)} | {_d(nf.get('noise_mass_minus_grpo'), 3)} | "
                        f"{_v(lp.get('empty_selection_share'), 2)} |")
    return "\n".join(lines) + "\n"


def counts_markdown(data: dict) -> str:
    """Per arm, the cells (of each arm's) that separate from GRPO, per method and outcome,
    with how many of them are increases."""
    s = summarize(data)
    columns = [("lp_reg", "spark_alive"), ("lp_reg", "expected_reward"), ("lp_reg", "noise_mass"),
               ("lp_reg_no_filter", "spark_alive"), ("lp_reg_no_filter", "noise_mass")]
    lines = ["| arm | cells | Lp-Reg vs GRPO: spark survival | expected reward | noise mass | "
             "no filter vs GRPO: spark survival | noise mass |", "|---|---|---|---|---|---|---|"]
    for arm in data["protocol"]["arms"]:
        rows = [row for key, row in s.items() if key.split("|")[0] == arm]
        if not rows:
            continue
        cells = []
        for method, outcome in columns:
            diffs = [row[method][f"{outcome}_minus_grpo"] for row in rows if method in row]
            sep = [d for d in diffs if d["separates"]]
            same = all(d["mean"] == 0 and d["std"] == 0 for d in diffs)
            up = sum(d["mean"] > 0 for d in sep)
            cells.append(f"{len(sep)} ({up} up)" + (", identical in every run" if same else ""))
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _v(x, nd) -> str:
    return "-" if x is None else f"{x['mean']:.{nd}f}"


def _d(x, nd) -> str:
    if x is None:
        return "-"
    star = " **sep**" if x["separates"] else ""
    return f"{x['mean']:+.{nd}f} ± {x['std']:.{nd}f}{star}"


def heatmaps(data: dict, out_dir: Path) -> list[Path]:
    """One figure per regime (accuracy x spark): spark survival, Lp-Reg minus GRPO and
    without the filter minus GRPO, arms x S_K, separated cells outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(data)
    p = data["protocol"]
    arms = [a for a in p["arms"] if any(k.startswith(a + "|") for k in s)]
    paths = []
    for acc in p["acc"]:
        for spark in p["spark"]:
            fig, axes = plt.subplots(1, 3, figsize=(16, 1.3 + 0.75 * len(arms)), squeeze=False)
            for ax, (title, method, field_) in zip(axes[0], (
                    ("GRPO: spark alive at the end", "grpo", "spark_alive"),
                    ("Lp-Reg minus GRPO (paired)", "lp_reg", "spark_alive_minus_grpo"),
                    ("Lp-Reg without the filter minus GRPO", "lp_reg_no_filter", "spark_alive_minus_grpo")),
                    strict=True):
                grid = torch.full((len(arms), len(p["s_k"])), float("nan"))
                sep = []
                for i, arm in enumerate(arms):
                    for j, s_k in enumerate(p["s_k"]):
                        c = s.get(Cell(s_k, acc, spark, arm).key, {}).get(method)
                        if c is None or field_ not in c:
                            continue
                        grid[i, j] = c[field_]["mean"]
                        if c[field_].get("separates"):
                            sep.append((i, j))
                diff = method != "grpo"
                im = ax.imshow(grid.numpy(), cmap="RdBu" if diff else "viridis", vmin=-1 if diff else 0, vmax=1,
                               aspect="auto")
                for i in range(len(arms)):
                    for j in range(len(p["s_k"])):
                        if not math.isnan(grid[i, j]):
                            ax.text(j, i, f"{grid[i, j]:+.2f}" if diff else f"{grid[i, j]:.2f}", ha="center",
                                    va="center", fontsize=8, weight="bold" if (i, j) in sep else "normal")
                for i, j in sep:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
                ax.set_xticks(range(len(p["s_k"])), [str(x) for x in p["s_k"]])
                ax.set_xlabel("S_K at the spark's decision")
                ax.set_yticks(range(len(arms)), arms)
                ax.set_title(title, fontsize=10)
                fig.colorbar(im, ax=ax, fraction=0.04)
            fig.suptitle(f"spark survival, accuracy {acc}, spark {SPARKS.get(spark, spark)} "
                         f"({p['seeds']} seeds; outlined: separates by the protocol's criterion)", fontsize=10)
            fig.tight_layout()
            path = out_dir / f"phase_diagram_acc{acc}_{spark}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def pilot(p: Protocol = PROTOCOL, lrs=(0.5, 1.0, 2.0, 4.0), seeds=(0, 1, 2, 3), log=print) -> float:
    """GRPO only, acc 0.3, correctly penalised spark, S_K 0.75, on-policy: the smallest step
    size at which the spark leaves the proxy in at least half the contexts by the end."""
    for lr in lrs:
        q = replace(p, lr=lr, methods=("grpo",))
        res = run_arm("on-policy", [Cell(0.75, 0.3, "correct", "on-policy")], list(seeds), q, log=None)
        alive = statistics.mean(r["spark_alive"] for r in next(iter(res.values()))["grpo"])
        log(f"[phase_diagram] pilot lr {lr}: GRPO's spark alive in {alive:.2f} of contexts")
        if alive <= 0.5:
            return lr
    return lrs[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--figures", type=Path, default=FIGURES)
    ap.add_argument("--summarize", action="store_true", help="table and figures from --out, nothing run")
    ap.add_argument("--smoke", action="store_true", help="two cells, two seeds, 12 steps (CI)")
    ap.add_argument("--pilot", action="store_true", help="the GRPO-only pilot that fixed the step size")
    ap.add_argument("--table", choices=("cells", "counts"), default=None,
                    help="print one table from --out (every cell, or the separation counts per arm) and "
                         "nothing else: the commands beside docs/phase_diagram.md's tables")
    ap.add_argument("--arms", default=None, help="a subset of the arms, separated by ';'")
    ap.add_argument("--merge", type=Path, default=None,
                    help="add the arms of this results file (the same protocol, e.g. run by a second process "
                         "with --arms) to --out, then summarize")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine; the study is sized for one core
    if a.table:
        if not a.out.exists():
            raise SystemExit(f"{a.out}: no results; run the study first")
        data = json.loads(a.out.read_text())
        print(markdown(data) if a.table == "cells" else counts_markdown(data), end="")
        return 0
    if a.pilot:
        print(json.dumps({"lr": pilot()}))
        return 0
    if a.smoke:
        p = replace(PROTOCOL, s_k=(0.5,), acc=(0.3,), spark=("correct", "over"), seeds=2, steps=12, contexts=8)
        data = study(a.out, p, arms=[x for x in p.arms if x != "off-policy x4"])
    elif a.merge:
        data = merge(a.out, a.merge)
    elif not a.summarize:
        arms = [x.strip() for x in a.arms.split(";")] if a.arms else None
        unknown = set(arms or ()) - set(ARMS)
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}; the protocol's: {list(ARMS)}")
        data = study(a.out, PROTOCOL, arms=arms)
    else:
        if not a.out.exists():
            raise SystemExit(f"{a.out}: no results to summarize; run the study first")
        data = json.loads(a.out.read_text())
    print(markdown(data))
    if not a.smoke:
        for path in heatmaps(data, a.figures):
            print(f"[phase_diagram] {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

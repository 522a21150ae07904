"""The Lp-Reg mechanism on one decision: does the regulariser keep a low-probability,
in-proxy token alive where GRPO drives it out, and does the min-p filter keep it
from protecting noise? Real op (``token_stats``, ``vocab_parallel_logprob``) and real
losses (``lp_reg_loss``, ``ppo_clip_loss``, ``grpo_advantages``); no mock.

    python tools/mechanism.py                       # table over 8 seeds, JSON on stdout
    python tools/mechanism.py --plot docs/figures/mechanism.png
    python tools/mechanism.py > docs/results/mechanism.json    # the committed run
    python tools/mechanism.py --from docs/results/mechanism.json --markdown   # docs/studies.md's table

The scenario (fixed before any result was looked at; ``SCENARIO`` below):

* a policy over ``V = 300`` tokens with free logits: a majority token at p = 0.6,
  four alternatives at 0.08, the *spark* at 0.03 (inside the min-p proxy: kappa *
  p_max = 0.012), and 0.05 of *noise* spread over the other 294 tokens (each ~1.7e-4,
  outside the proxy);
* rewards are Bernoulli: 0.5 for the majority and the alternatives, 0.4 for the spark
  (it leads to reward, less often, so it is often sampled with negative advantage),
  0 for noise;
* one rollout batch of 32 prompts x 8 responses, GRPO advantages, then ``updates``
  optimiser steps on that batch (Adam, lr 0.05), as the paper's off-policy recipe
  takes several mini-batch steps per rollout batch, with the paper's ratio clip
  (clip_low 1.0, clip_high 9.0: no lower clip);
* Lp-Reg: beta 1, k3, kappa 0.02, rho_neg 0.2. One response here is one decision at
  an uncertain position; in an LLM batch most tokens are confident and never among
  the lowest, so rho = 1% of all tokens is a much larger share of the uncertain ones.
  With rho = 0.2 the selection reaches past the sampled noise tokens to the spark.

Measured outcomes (``tests/loss/test_mechanism.py`` asserts them with margins):
GRPO pushes the spark below kappa * p_max (out of the proxy, where nothing protects
it later); Lp-Reg holds it inside; without the filter (kappa -> 0) the noise mass
ends higher than with it. Two things this scenario also shows, stated in docs/studies.md:
with PPO's usual lower clip (0.2) GRPO's own clip already stops the spark's fall
within a batch, and on-policy (one update per batch) kappa -> 0 makes the proxy the
old policy itself, so nothing is regularised and Lp-Reg equals GRPO exactly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.algo.advantages import grpo_advantages  # noqa: E402
from megatron_lpreg.loss.lp_reg import lp_reg_loss  # noqa: E402
from megatron_lpreg.loss.ppo import ppo_clip_loss  # noqa: E402
from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob  # noqa: E402

SPARK = 5  # token ids: 0 majority, 1-4 alternatives, 5 the spark, 6.. noise


@dataclass(frozen=True)
class Scenario:
    vocab: int = 300
    p_majority: float = 0.6
    p_alternative: float = 0.08  # four of them
    p_spark: float = 0.03
    reward_in: float = 0.5  # majority and alternatives
    reward_spark: float = 0.4
    prompts: int = 32
    group: int = 8
    updates: int = 40
    lr: float = 0.05
    clip_low: float = 1.0
    clip_high: float = 9.0
    neg_percent: float = 0.2
    kappa: float = 0.02

    def initial_probs(self) -> torch.Tensor:
        """``[vocab]`` fp32."""
        noise = 1.0 - self.p_majority - 4 * self.p_alternative - self.p_spark
        p = torch.full((self.vocab,), noise / (self.vocab - SPARK - 1))
        p[0], p[1:SPARK], p[SPARK] = self.p_majority, self.p_alternative, self.p_spark
        return p

    def reward_rates(self) -> torch.Tensor:
        r = torch.zeros(self.vocab)
        r[:SPARK], r[SPARK] = self.reward_in, self.reward_spark
        return r


SCENARIO = Scenario()
METHODS = {  # name -> (loss, kappa override)
    "grpo": ("grpo", None),
    "lp_reg": ("lp_reg", None),
    "lp_reg_no_filter": ("lp_reg", 1e-9),  # kappa must be > 0; 1e-9 keeps every token
}


@dataclass
class Curve:
    """Per update (``updates + 1`` points): the spark's probability, the noise mass,
    kappa * p_max (the proxy's edge). ``spark_advantage``: the spark samples' summed
    advantage in the batch (the scenario needs it negative)."""

    spark: list[float]
    noise: list[float]
    proxy_edge: list[float]
    spark_samples: int
    spark_advantage: float


def run(method: str, seed: int, sc: Scenario = SCENARIO) -> Curve:
    """One rollout batch sampled with ``seed`` (the same batch for every method), then
    ``sc.updates`` steps of ``method`` on it."""
    loss_name, kappa = METHODS[method]
    kappa = kappa if kappa is not None else sc.kappa
    gen = torch.Generator().manual_seed(seed)
    probs = sc.initial_probs()
    n = sc.prompts * sc.group
    token = torch.multinomial(probs, n, replacement=True, generator=gen)
    score = (torch.rand(n, generator=gen) < sc.reward_rates()[token]).float()
    mask = torch.ones(n, 1)
    adv = grpo_advantages(score, torch.arange(n) // sc.group, mask)
    target = token.unsqueeze(1)

    logits = torch.nn.Parameter(probs.log())
    opt = torch.optim.Adam([logits], lr=sc.lr)
    old = token_stats(logits.detach().expand(n, sc.vocab).unsqueeze(1), target, proxy="minp", proxy_threshold=kappa)
    curve = Curve([], [], [], int((token == SPARK).sum()), float(adv[token == SPARK].sum()))
    for step in range(sc.updates + 1):
        p = logits.detach().softmax(0)
        curve.spark.append(float(p[SPARK]))
        curve.noise.append(float(p[SPARK + 1:].sum()))
        curve.proxy_edge.append(float(kappa * p.max()))
        if step == sc.updates:
            break
        lp = vocab_parallel_logprob(logits.expand(n, sc.vocab).unsqueeze(1), target)
        clip = dict(clip_low=sc.clip_low, clip_high=sc.clip_high)
        if loss_name == "grpo":
            loss, _ = ppo_clip_loss(lp, old.logprob, adv, mask, **clip)
        else:
            loss, _ = lp_reg_loss(lp, old.logprob, old.proxy_logprob, adv, mask, neg_percent=sc.neg_percent,
                                  kl_coef=1.0, **clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def table(seeds: list[int], sc: Scenario = SCENARIO, runs: dict[str, list[Curve]] | None = None) -> dict:
    """Final spark probability and noise mass per method and seed, with mean and std
    over the seeds whose spark advantage is negative (the scenario's precondition).
    ``runs``: the curves of every method and seed when already computed."""
    out = {"scenario": asdict(sc), "seeds": seeds, "methods": {}}
    for method in METHODS:
        curves = runs[method] if runs is not None else [run(method, s, sc) for s in seeds]
        kept = [c for c in curves if c.spark_advantage < 0]
        row = {
            "spark_final": [round(c.spark[-1], 5) for c in curves],
            "noise_final": [round(c.noise[-1], 5) for c in curves],
            "spark_advantage": [round(c.spark_advantage, 3) for c in curves],
            "spark_in_proxy": [c.spark[-1] >= c.proxy_edge[-1] for c in curves],
        }
        for key, vals in (("spark", [c.spark[-1] for c in kept]), ("noise", [c.noise[-1] for c in kept])):
            row[f"{key}_mean"] = round(statistics.mean(vals), 5) if vals else None
            row[f"{key}_std"] = round(statistics.stdev(vals), 5) if len(vals) > 1 else None
        out["methods"][method] = row
    return out


LABELS = {"grpo": "GRPO", "lp_reg": "Lp-Reg", "lp_reg_no_filter": "Lp-Reg without the filter (kappa -> 0)"}


def markdown(t: dict) -> str:
    """The table of :func:`table`'s result: mean ± std over the seeds whose spark samples
    carry negative advantage, how many of them end with the spark inside the proxy, and
    each seed's noise mass over Lp-Reg's at the same seed (min-max)."""
    sc = t["scenario"]
    kept = [i for i, a in enumerate(t["methods"]["grpo"]["spark_advantage"]) if a < 0]
    noise0 = 1 - sc["p_majority"] - 4 * sc["p_alternative"] - sc["p_spark"]
    lines = [f"| after {sc['updates']} updates (mean ± std, {len(kept)} seeds) | spark p (start {sc['p_spark']:.3f}) "
             f"| spark inside the proxy | noise mass (start {noise0:.3f}) | noise / Lp-Reg's, per seed |",
             "|---|---|---|---|---|"]
    lp = t["methods"]["lp_reg"]["noise_final"]
    for method, r in t["methods"].items():
        ratios = [r["noise_final"][i] / lp[i] for i in kept]
        inside = sum(r["spark_in_proxy"][i] for i in kept)
        lines.append(f"| {LABELS[method]} | {r['spark_mean']:.4f} ± {r['spark_std']:.4f} | {inside} of {len(kept)} "
                     f"| {r['noise_mean']:.4f} ± {r['noise_std']:.4f} | {min(ratios):.2f}-{max(ratios):.2f} |")
    return "\n".join(lines)


def plot(seeds: list[int], path: Path, sc: Scenario = SCENARIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"grpo": "tab:red", "lp_reg": "tab:blue", "lp_reg_no_filter": "tab:green"}
    for method, color in colors.items():
        curves = [c for c in (run(method, s, sc) for s in seeds) if c.spark_advantage < 0]
        for i, c in enumerate(curves):
            label = method if i == 0 else None
            axes[0].plot(c.spark, color=color, alpha=0.6, label=label)
            axes[1].plot(c.noise, color=color, alpha=0.6, label=label)
            if method == "lp_reg":
                axes[0].plot(c.proxy_edge, color="gray", ls=":", alpha=0.6,
                             label="kappa * p_max" if i == 0 else None)
    axes[0].set(title="spark probability (in the proxy at start)", xlabel="update on one rollout batch", yscale="log")
    axes[1].set(title="noise mass (outside the proxy)", xlabel="update on one rollout batch", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (default 8)")
    ap.add_argument("--updates", type=int, default=SCENARIO.updates)
    ap.add_argument("--clip-low", type=float, default=SCENARIO.clip_low,
                    help="1.0 = the paper's (no lower clip); 0.2 = PPO's usual")
    ap.add_argument("--plot", type=Path, help="also write the curves as a PNG")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown instead of JSON")
    ap.add_argument("--from", dest="source", type=Path,
                    help="read the JSON a run printed (e.g. docs/results/mechanism.json) instead of running")
    a = ap.parse_args()
    if a.seeds < 1 or a.updates < 1:
        raise SystemExit("mechanism: --seeds and --updates must be >= 1")
    sc = replace(SCENARIO, updates=a.updates, clip_low=a.clip_low)
    seeds = list(range(a.seeds))
    t = json.loads(a.source.read_text()) if a.source else table(seeds, sc)
    print(markdown(t) if a.markdown else json.dumps(t, indent=1))
    if a.plot:
        plot(seeds, a.plot, sc)
        print(f"mechanism: curves in {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()

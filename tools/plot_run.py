"""Plot training curves of one or several runs side by side, and print start/end numbers.

    python tools/plot_run.py runs/tiny_cpu --out runs/tiny_cpu/curves.png
    python tools/plot_run.py runs/grpo runs/lp_reg --labels GRPO Lp-Reg --out compare.png --summary
    python tools/plot_run.py docs/results/demo_tiny_cpu.jsonl --summary    # the table only

Each run is a directory holding the ``metrics.jsonl`` the trainer writes, or such a
file itself (labelled by its name without ``.jsonl``). ``--out``: one panel per
metric, one line per run (a moving average over ``--smooth`` steps, the raw values
faint behind it). ``--summary`` prints a markdown table of each metric's mean over
the first and the last ``--window`` steps.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.trainer.metrics import read_metrics  # noqa: E402

DEFAULT_METRICS = [
    "reward/mean",
    "reward/accuracy",
    "actor/entropy",
    "sparks/p_lt_0.1",
    "sparks/p_lt_0.01",
    "actor/lp_reg/regularised_share",
    "response/length_mean",
    "rollout/mismatch_abs_mean",
]


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.exists():
        raise SystemExit(f"no metrics at {path}")
    rows = read_metrics(path)
    if not rows:
        raise SystemExit(f"{path} is empty")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(v: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= k:
            acc -= v[i - k]
        out.append(acc / min(i + 1, k))
    return out


def summary_rows(runs: dict[str, list[dict]], metrics: list[str], window: int) -> list[tuple]:
    out = []
    for label, rows in runs.items():
        for m in metrics:
            _, v = series(rows, m)
            if v:
                w = min(window, len(v))
                out.append((label, m, sum(v[:w]) / w, sum(v[-w:]) / w))
    return out


def _panels(metrics: list[str], runs: list[list[dict]]):
    """``(plt, fig, axes, present)``: one panel per metric that some run records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in metrics if any(series(r, m)[1] for r in runs)]
    if not present:
        raise SystemExit(f"none of {metrics} is in the metrics")
    cols = 2 if len(present) > 1 else 1
    rows_n = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.2 * rows_n), squeeze=False)
    return plt, fig, axes, present


def _save(plt, fig, axes, n_used: int, out: Path, legend_size=None) -> None:
    for ax in list(axes.flat)[n_used:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=legend_size)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot(runs: dict[str, list[dict]], metrics: list[str], out: Path, k: int) -> None:
    plt, fig, axes, present = _panels(metrics, list(runs.values()))
    for ax, m in zip(axes.flat, present, strict=False):
        for i, (label, rows) in enumerate(runs.items()):
            s, v = series(rows, m)
            if not v:
                continue
            color = f"C{i}"
            ax.plot(s, v, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(s, smooth(v, k), color=color, label=label, linewidth=1.6)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _save(plt, fig, axes, len(present), out)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def seed_summary(groups: dict[str, list[list[dict]]], metrics: list[str], tail: float = 0.2,
                 seeds: dict[str, list] | None = None) -> list[dict]:
    """Per label and metric: the mean over the last ``tail`` of each run's records of it
    (``values``; ``start_values``: over the first ``tail``; ``seeds``: the runs' names,
    from ``seeds[label]`` when given, else their positions), then mean, standard deviation
    (n-1) and count over the runs (seeds) of the label."""
    out = []
    for label, runs in groups.items():
        names = (seeds or {}).get(label) or list(range(len(runs)))
        for m in metrics:
            starts, ends, have = [], [], []
            for name, rows in zip(names, runs, strict=True):
                _, v = series(rows, m)
                if v:
                    w = max(1, round(len(v) * tail))
                    starts.append(sum(v[:w]) / w)
                    ends.append(sum(v[-w:]) / w)
                    have.append(name)
            if ends:
                (mean, std), (smean, sstd) = _mean_std(ends), _mean_std(starts)
                out.append({"label": label, "metric": m, "mean": mean, "std": std, "n": len(ends), "values": ends,
                            "start_mean": smean, "start_std": sstd, "start_values": starts, "seeds": have})
    return out


def paired_differences(rows: list[dict], baseline: str) -> list[dict]:
    """Per label (other than ``baseline``) and metric: the end value minus the baseline's
    at the same seed, over the seeds both have (``values``), with mean, std and n. Runs
    that share a seed share the RL run's first rollout, so this removes the seed-to-seed
    spread that the plain std carries."""
    base = {r["metric"]: dict(zip(r["seeds"], r["values"], strict=True)) for r in rows if r["label"] == baseline}
    out = []
    for r in rows:
        ref = base.get(r["metric"], {})
        diffs = [v - ref[s] for s, v in zip(r["seeds"], r["values"], strict=True) if s in ref]
        if r["label"] != baseline and diffs:
            mean, std = _mean_std(diffs)
            out.append({"label": r["label"], "metric": r["metric"], "baseline": baseline, "mean": mean, "std": std,
                        "n": len(diffs), "values": diffs})
    return out


def plot_bands(groups: dict[str, list[list[dict]]], metrics: list[str], out: Path) -> None:
    """One panel per metric; per label the mean over its runs at each step recorded by
    all of them, with a +-1 std band."""
    plt, fig, axes, present = _panels(metrics, [r for runs in groups.values() for r in runs])
    for ax, m in zip(axes.flat, present, strict=False):
        for i, (label, runs) in enumerate(groups.items()):
            per_run = [dict(zip(*series(r, m), strict=True)) for r in runs]
            steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
            if not steps:
                continue
            vals = [[d[s] for d in per_run] for s in steps]
            mean = [sum(v) / len(v) for v in vals]
            std = [math.sqrt(sum((x - mu) ** 2 for x in v) / max(len(v) - 1, 1)) for v, mu in zip(vals, mean, strict=True)]
            color = f"C{i}"
            ax.plot(steps, mean, color=color, label=f"{label} (n={len(runs)})", linewidth=1.4)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], color=color, alpha=0.2)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _save(plt, fig, axes, len(present), out, legend_size=7)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    ap.add_argument("--labels", nargs="*", help="one label per run (default: directory names)")
    ap.add_argument("--out", type=Path, help="PNG path (without it: no figure)")
    ap.add_argument("--metrics", nargs="*", default=DEFAULT_METRICS)
    ap.add_argument("--smooth", type=int, default=5)
    ap.add_argument("--summary", action="store_true", help="print start/end means as a markdown table")
    ap.add_argument("--window", type=int, default=10)
    a = ap.parse_args(argv)
    if a.out is None and not a.summary:
        raise SystemExit("plot_run: nothing to do: give --out PNG, --summary or both")
    labels = a.labels or [r.name if r.is_dir() else r.parent.name if r.name == "metrics.jsonl" else r.stem
                          for r in a.runs]
    if len(labels) != len(a.runs):
        raise SystemExit(f"{len(a.runs)} runs but {len(labels)} labels")
    runs = {lab: load(r) for lab, r in zip(labels, a.runs, strict=True)}
    if a.out is not None:
        plot(runs, a.metrics, a.out, a.smooth)
    if a.summary:
        print(f"| run | metric | first {a.window} steps | last {a.window} steps |")
        print("|---|---|---|---|")
        for label, m, start, end in summary_rows(runs, a.metrics, a.window):
            print(f"| {label} | {m} | {start:.4f} | {end:.4f} |")
    if a.out is not None:
        print(f"plot: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the same task with several methods under identical seeds and budgets, then plot them side by side.

    python tools/compare_methods.py --spec examples/compare_tiny_cpu.yaml
    python tools/compare_methods.py --spec examples/compare_tiny_cpu.yaml --steps 3 --out runs/cmp_short

The spec (YAML) names a base run config, overrides common to every method and
one override list per method. Each method trains into ``<out>/<method>`` (an
existing complete run is resumed, so an interrupted comparison continues where it
stopped); then ``tools/plot_run.py`` draws ``<out>/comparison.png`` and the
end-of-run table is written to ``<out>/summary.md``.

With ``seeds: [1, 2, 3]`` in the spec every method runs once per seed
(``train.seed``: sampling and initial state of the RL run; the warm start and data
order stay those of the base config) into ``<out>/<method>/seed<k>``; the summary
then gives each metric's end value (mean over the last 20% of its records) as mean,
standard deviation and count over the seeds (``summary.md``: a table per metric and one
wide table of end values, ``summary.json``: start values too), and the figure the mean
over seeds with a +-1 std band. ``metrics:`` in the spec replaces the default list;
``figures:`` (name -> methods) draws ``comparison_<name>.png`` per group instead of one
figure of every method; ``baseline:`` (a method) adds each method's end value minus the
baseline's at the same seed (``summary.md`` and ``paired.json``). ``--summarize`` only
rewrites summary and figures from the results present (a finished or interrupted
study), without running anything; with ``--markdown wide|paired|long`` it only prints
that one table (for the docs' table markers, tools/docs_tables.py) and writes nothing;
with ``--export DIR`` it also copies each run's metrics, only the step and the spec's
metrics, to ``DIR/<method>/seed<k>/metrics.jsonl`` (the files the docs' tables are
printed from, small enough to commit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.plot_run import load, paired_differences, plot_bands, seed_summary  # noqa: E402
from tools.plot_run import main as plot_main  # noqa: E402

METRICS = ["reward/mean", "actor/entropy", "sparks/p_lt_0.1", "sparks/p_lt_0.01",
           "actor/lp_reg/regularised_share", "response/length_mean"]


def load_spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    for key in ("base", "methods"):
        if key not in spec:
            raise SystemExit(f"{path}: missing {key!r}")
    if not isinstance(spec["methods"], dict) or not spec["methods"]:
        raise SystemExit(f"{path}: methods must map names to override lists")
    return spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="default: the spec's out_dir")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps for every method")
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, replacing the spec's")
    ap.add_argument("--summarize", action="store_true", help="only summarize and plot the results present")
    ap.add_argument("--baseline", default=None, help="method for paired differences, replacing the spec's")
    ap.add_argument("--markdown", choices=["wide", "paired", "long"], default=None,
                    help="with --summarize and seeds: print only this table, write nothing")
    ap.add_argument("--export", type=Path, default=None,
                    help="with --summarize and seeds: copy each run's step and metrics to DIR")
    ap.add_argument("extra", nargs="*", help="key=value overrides for every method")
    a = ap.parse_args(argv)
    spec = load_spec(a.spec)
    out = a.out or Path(spec.get("out_dir", "runs/compare"))
    methods = spec["methods"]
    if a.methods:
        names = [m.strip() for m in a.methods.split(",")]
        unknown = [m for m in names if m not in methods]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; the spec has {sorted(methods)}")
        methods = {m: methods[m] for m in names}
    common = list(spec.get("common", [])) + list(a.extra)
    if a.steps is not None:
        common.append(f"train.steps={a.steps}")
    seeds = spec.get("seeds") or [None]
    if a.seeds:
        try:
            seeds = [int(x) for x in a.seeds.split(",")]
        except ValueError:
            raise SystemExit(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
    if not all(s is None or isinstance(s, int) for s in seeds):
        raise SystemExit(f"{a.spec}: seeds must be a list of integers")
    metrics = spec.get("metrics", METRICS)
    figures = spec.get("figures") or {}
    baseline = a.baseline or spec.get("baseline")
    if (a.markdown or a.export) and (not a.summarize or seeds == [None]):
        raise SystemExit("--markdown and --export need --summarize and seeds (the spec's or --seeds)")
    unknown = sorted({m for ms in figures.values() for m in ms} - set(spec["methods"]))
    if unknown:
        raise SystemExit(f"{a.spec}: figures name methods the spec does not have: {unknown}")
    if baseline is not None and baseline not in spec["methods"]:
        raise SystemExit(f"{a.spec}: baseline {baseline!r} is not one of the spec's methods")
    for name, overrides in ({} if a.summarize else methods).items():
        for seed in seeds:
            run_dir = out / name if seed is None else out / name / f"seed{seed}"
            extra = [] if seed is None else [f"train.seed={seed}"]
            t = time.monotonic()
            cmd = [sys.executable, "-m", "megatron_lpreg.train", "--config", str(spec["base"]), *common,
                   *overrides, *extra, f"train.out_dir={run_dir}"]
            label = name if seed is None else f"{name} seed {seed}"
            print(f"[compare] {label}: {' '.join(overrides + extra)}", flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc != 0:
                print(f"[compare] {label} failed with exit code {rc}", file=sys.stderr)
                return rc
            print(f"[compare] {label} done in {time.monotonic() - t:.0f}s", flush=True)
    if seeds != [None]:
        return summarize_seeds(out, list(spec["methods"]), seeds, metrics, figures, baseline,
                               markdown=a.markdown, export=a.export)
    # plot every method of the spec that has results, not only the ones run now
    done = [m for m in spec["methods"] if (out / m / "metrics.jsonl").exists()]
    runs = [str(out / m) for m in done]
    summary = out / "summary.md"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        plot_main([*runs, "--labels", *done, "--out", str(out / "comparison.png"), "--summary",
                   "--metrics", *metrics])
    summary.write_text(buf.getvalue())
    print(buf.getvalue())
    return 0


def summarize_seeds(out: Path, methods: list[str], seeds: list[int], metrics: list[str],
                    figures: dict[str, list[str]] | None = None, baseline: str | None = None,
                    markdown: str | None = None, export: Path | None = None) -> int:
    """``summary.md`` / ``summary.json`` (mean, std, n over seeds) and ``comparison.png``
    (bands; or one ``comparison_<name>.png`` per entry of ``figures``) from every method
    and seed that has results; with ``baseline``, ``paired.json`` and its table too.
    ``markdown``: print only that table (``long``, ``wide`` or ``paired``), write nothing.
    ``export``: copy each run's step and ``metrics`` to ``export/<method>/seed<k>``."""
    groups, present = {}, {}
    for m in methods:
        present[m] = [s for s in seeds if (out / m / f"seed{s}" / "metrics.jsonl").exists()]
        if present[m]:
            groups[m] = [load(out / m / f"seed{s}") for s in present[m]]
    if not groups:
        print(f"[compare] no results under {out}", file=sys.stderr)
        return 1
    rows = seed_summary(groups, metrics, seeds=present)
    long = ["| method | metric | start value, mean | std | end value, mean | std | seeds |", "|---|---|---|---|---|---|---|"]
    long += [f"| {r['label']} | {r['metric']} | {r['start_mean']:.4g} | {r['start_std']:.2g} | {r['mean']:.4g} "
             f"| {r['std']:.2g} | {r['n']} |" for r in rows]
    tables = {"long": "\n".join(long), "wide": wide_table(rows, list(groups), metrics)}
    paired = paired_differences(rows, baseline) if baseline in groups else None
    if paired is not None:
        tables["paired"] = wide_table(paired, [m for m in groups if m != baseline], metrics,
                                      f"method (end minus {baseline}'s at the same seed, mean ± std)")
    if markdown is not None:
        if markdown not in tables:
            raise SystemExit(f"no {markdown} table: the paired table needs a baseline with results")
        print(tables[markdown])
        return 0
    if export is not None:
        keep = ("step", *metrics)
        for m, runs in groups.items():
            for s, recs in zip(present[m], runs, strict=True):
                path = export / m / f"seed{s}" / "metrics.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in recs))
        print(f"[compare] exported {sum(map(len, groups.values()))} runs' metrics to {export}")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    if paired is not None:
        (out / "paired.json").write_text(json.dumps(paired, indent=1))
    text = "\n\n".join(tables.values())
    (out / "summary.md").write_text(text + "\n")
    plots = {name: [m for m in ms if m in groups] for name, ms in (figures or {}).items()}
    plots = {name: ms for name, ms in plots.items() if ms} or {"": list(groups)}
    for name, ms in plots.items():
        png = out / (f"comparison_{name}.png" if name else "comparison.png")
        plot_bands({m: groups[m] for m in ms}, metrics, png)
        print(f"plot: {png}")
    print(text)
    return 0


def wide_table(rows: list[dict], methods: list[str], metrics: list[str],
               title: str = "method (end, mean ± std over seeds)") -> str:
    """One row per method, one column per metric: ``mean ± std`` of the rows' values."""
    cell = {(r["label"], r["metric"]): f"{r['mean']:.4g} ± {r['std']:.2g}" for r in rows}
    out = [f"| {title} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    out += [f"| {m} | " + " | ".join(cell.get((m, k), "-") for k in metrics) + " |" for m in methods]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

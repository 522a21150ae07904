"""`make mutate`: mutation testing of the core with cosmic-ray, in a copy of the repository.

cosmic-ray (not mutmut) because it mutates the source file on disk and runs an ordinary
test command: the multi-rank tests spawn fresh gloo processes, which import the mutant
from disk like everything else. (mutmut 3 switches mutants in-process with trampolines
and learns which tests cover a function from calls it records in the pytest process,
so it never sees the code that only runs in spawned ranks, trainer/update.py above all.)
cosmic-ray restores each file after its test run, but a killed run can leave a mutant
behind, so it works in a copy (``--workdir``) and never in the checkout.

One session per module group (``SESSIONS``): the modules, the fast tests that cover
them (``-x``: a killed mutant stops at its first failure), a seeded random sample of
the mutants the operator filter keeps, sized so the whole run takes about 30 minutes on
a 2-core machine. Prints per session killed / survived / timeouts and the score
(killed + timeouts over mutants run), writes ``summary.json`` and each survivor's
diff to ``survivors.txt`` in the work directory.

    python tools/mutation/run.py [--workdir DIR] [--only SESSION ...] [--scale 0.5] [--seed 0]
    python tools/mutation/run.py --workdir DIR2 --survivors-of DIR   # after new tests: the survivors again
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider -p no:xdist --timeout 600"

# Operators left out: replacing an arithmetic or comparison operator by a bitwise one, a
# shift, `**`, `%`, `//` or `is` gives mostly type errors on tensors and floats, killed by
# any test that runs the line (a cost without information); `|` on types is annotation
# syntax here (`from __future__ import annotations`: never evaluated, so always equivalent).
EXCLUDE_OPERATORS = [
    r"core/ReplaceBinaryOperator_.*_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|FloorDiv)$",
    r"core/ReplaceBinaryOperator_BitOr_.*",
    r"core/ReplaceComparisonOperator_.*_(Is|IsNot)$",
    r"core/ReplaceUnaryOperator_.*_(Invert|Not|UAdd)$",
]

# name: (modules, tests, mutants sampled, seconds before a mutant counts as a timeout).
# The tests are each module's fast ones: no TP=4 / DP=4 spawns, no vLLM, no trainer runs.
SESSIONS = {
    "loss": (["megatron_lpreg/loss"],
             "tests/loss/test_aggregation.py tests/loss/test_lp_reg.py tests/loss/test_ppo.py tests/loss/test_aer.py "
             "tests/loss/test_cov_control.py tests/loss/test_gspo_entropy.py "
             "tests/ops/test_fused_output.py::test_losses_called_token_separable_are",
             20, 300),
    "vocab_parallel": (["megatron_lpreg/ops/vocab_parallel.py"],
                       "tests/ops/test_vocab_parallel.py -k 'not tp4'", 10, 300),
    "global_select": (["megatron_lpreg/ops/global_select.py"],
                      "tests/ops/test_global_select.py tests/loss/test_lp_reg.py", 6, 300),
    "fused_output": (["megatron_lpreg/ops/fused_output.py"],
                     "tests/ops/test_fused_output.py -k 'not tp4 and not bf16'",
                     6, 300),
    "update": (["megatron_lpreg/trainer/update.py"],
               "tests/trainer/test_update.py -k 'packing or formulas or difficulty or 80_20 or (dp_size and not 4)'",
               8, 600),
    "reference_batching": (["megatron_lpreg/trainer/reference_batching.py"],
                           "tests/trainer/test_reference_scope.py tests/trainer/test_dp_balance.py", 5, 300),
    "mapping": (["megatron_lpreg/model/mapping.py"],
                "tests/model/test_parity.py -k 'tp1 or round_trip or covers or unsupported or divide'", 5, 300),
}


def copy_repo(source: Path, workdir: Path) -> Path:
    src = workdir / "src"
    if src.exists():
        shutil.rmtree(src)
    ignore = shutil.ignore_patterns(".git", ".venv*", "runs", "mutants", "__pycache__", "*.egg-info", "locks")
    shutil.copytree(source, src, ignore=ignore)
    return src


def write_config(path: Path, modules: list[str], tests: str, timeout: float) -> None:
    lines = [
        "[cosmic-ray]",
        f"module-path = {json.dumps(modules)}",
        f"timeout = {timeout}",
        "excluded-modules = []",
        f"test-command = {json.dumps(f'{PYTEST} {tests}')}",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {json.dumps(EXCLUDE_OPERATORS)}",
    ]
    path.write_text("\n".join(lines) + "\n")


def _key(item) -> tuple:
    return tuple((str(m.module_path), tuple(m.start_pos), m.operator_name, m.occurrence) for m in item.mutations)


def sample(db_path: Path, keep: int, seed: int, only: set | None = None) -> tuple[int, int]:
    """Mark all but ``keep`` of the pending mutants (a seeded sample) skipped; with
    ``only``, all but those (keys of :func:`_key`). Returns the pool's size and how many
    mutants are left to run."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(db_path), WorkDB.Mode.open) as db:
        # job ids are random: order by place, so a seed picks the same mutants of the same code
        pending = sorted(db.pending_work_items, key=_key)
        if only is None:
            chosen = set(random.Random(seed).sample([_key(i) for i in pending], min(keep, len(pending))))
        else:
            chosen = only
        left = 0
        for item in pending:
            if _key(item) in chosen:
                left += 1
            else:
                db.set_result(item.job_id, WorkResult(output="not sampled", worker_outcome=WorkerOutcome.SKIPPED))
        return len(pending), left


def survivor_keys(db_path: Path) -> set:
    """The mutants that survived in an earlier run's session."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome

    with use_db(str(db_path), WorkDB.Mode.open) as db:
        return {_key(item) for item, r in db.completed_work_items if r.test_outcome == TestOutcome.SURVIVED}


def tally(db_path: Path) -> tuple[dict, list[str]]:
    """Counts over the mutants run (skipped ones are not), and each survivor's description."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    counts = {"killed": 0, "timeout": 0, "survived": 0, "incompetent": 0}
    survivors = []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                counts["survived"] += 1
                m = item.mutations[0]
                survivors.append(f"{m.module_path}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}\n"
                                 f"{result.diff}")
            elif result.test_outcome == TestOutcome.INCOMPETENT:
                counts["incompetent"] += 1
            elif result.output == "timeout":  # cosmic-ray's own marker (a traceback may say "timeout")
                counts["timeout"] += 1
            else:
                counts["killed"] += 1
    return counts, survivors


def score(counts: dict) -> float:
    ran = counts["killed"] + counts["timeout"] + counts["survived"]
    return 100.0 * (counts["killed"] + counts["timeout"]) / ran if ran else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/megatron-lpreg-mutate"))
    ap.add_argument("--only", nargs="*", choices=sorted(SESSIONS), help="these sessions (default: all)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every session's sample size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", type=Path, default=ROOT, help="the tree to copy (default: this checkout)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each session's tests")
    ap.add_argument("--survivors-of", type=Path, metavar="WORKDIR",
                    help="run only the mutants that survived in that earlier run (after adding tests)")
    args = ap.parse_args(argv)

    try:
        import cosmic_ray  # noqa: F401
    except ImportError:
        print("[mutate] cosmic-ray is not installed here: pip install 'cosmic-ray>=8.4' (the dev extra)",
              file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = copy_repo(args.source, args.workdir)
    cr = [sys.executable, "-m", "cosmic_ray.cli"]
    summary, all_survivors = {}, []
    for name in args.only or SESSIONS:
        modules, tests, keep, timeout = SESSIONS[name]
        cfg, db = args.workdir / f"{name}.toml", args.workdir / f"{name}.sqlite"
        db.unlink(missing_ok=True)
        write_config(cfg, modules, tests, timeout)
        only = None
        if args.survivors_of is not None:
            earlier = args.survivors_of / f"{name}.sqlite"
            only = survivor_keys(earlier) if earlier.exists() else set()
            if not only:
                print(f"[mutate] {name}: no earlier survivors", flush=True)
                continue
        t0 = time.monotonic()
        # the tests must pass on the unmutated code, or every mutant would count as killed
        if not args.no_baseline and subprocess.run([*cr, "baseline", str(cfg)], cwd=src).returncode != 0:
            print(f"[mutate] {name}: its tests fail without a mutation (output above); session skipped",
                  flush=True)
            summary[name] = {"baseline": "failed"}
            continue
        subprocess.run([*cr, "init", str(cfg), str(db)], cwd=src, check=True)
        subprocess.run([sys.executable, "-m", "cosmic_ray.tools.filters.operators_filter", str(db), str(cfg)],
                       cwd=src, check=True)
        pool, left = sample(db, max(1, round(keep * args.scale)), args.seed, only)
        if only is not None:  # a survivor whose code has moved since is not found again
            print(f"[mutate] {name}: re-running {left} of {len(only)} earlier survivors", flush=True)
        subprocess.run([*cr, "exec", str(cfg), str(db)], cwd=src, check=True)
        counts, survivors = tally(db)
        summary[name] = {**counts, "pool": pool, "score": round(score(counts), 1),
                         "seconds": round(time.monotonic() - t0)}
        all_survivors += survivors
        print(f"[mutate] {name}: {summary[name]}", flush=True)
    total = {k: sum(s.get(k, 0) for s in summary.values()) for k in ("killed", "timeout", "survived", "incompetent")}
    summary["total"] = {**total, "score": round(score(total), 1)}
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.workdir / "survivors.txt").write_text("\n".join(all_survivors))
    print(f"[mutate] total: {summary['total']}; survivors' diffs in {args.workdir / 'survivors.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

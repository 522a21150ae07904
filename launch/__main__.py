"""Launch a recipe: ``python -m launch <recipe> --executor local|slurm [--nodes N] [--dryrun] [key=value ...]``.

Recipes (``launch/recipes.py``): tiny_cpu, qwen3_14b_lpreg_{onpolicy,offpolicy},
qwen25_32b_lpreg_{onpolicy,offpolicy}, and the 14B baselines qwen3_14b_dapo,
qwen3_14b_aer. ``--method`` applies one of the comparison presets of
``examples/compare_tiny_cpu.yaml`` (grpo, entropy_bonus, 80_20, aer, dapo, lp_reg).
``--diagnose`` runs ``python -m megatron_lpreg.diagnose`` on the recipe instead of training
(one rollout step, no update: will Lp-Reg act on this model? ``docs/diagnose.md``).

* ``--executor local``: torchrun on this machine (``python -m megatron_lpreg.train``).
* ``--executor slurm``: through nemo-run's SlurmExecutor when nemo-run is installed
  (``pip install -e .[launch]``), else the plain sbatch script is submitted with
  ``sbatch``. ``--dryrun`` prints the script instead of submitting; ``--plain``
  forces the plain sbatch path. Plain templates: ``launch/sbatch/``.

Faults (``docs/launch.md``): ``--max-restarts N`` (launch.max_restarts, default 3) is how
often torchrun restarts a failed or hung trainer in place within one allocation, each
start resuming from the newest verified checkpoint; ``train.hang_timeout_s`` is when a
stuck rank counts as hung.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import nemo  # noqa: E402
from launch.recipes import COMPARISON_METHODS, RECIPES, method_overrides  # noqa: E402
from launch.script import JobSpec, render_sbatch  # noqa: E402

DIAGNOSE = "megatron_lpreg.diagnose"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", choices=sorted(RECIPES))
    ap.add_argument("--executor", choices=["local", "slurm"], default="slurm")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--procs-per-node", type=int, default=None,
                    help="ranks per node (default: the recipe's; GPU recipes: one per GPU)")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--time", help="HH:MM:SS (default: the recipe's)")
    ap.add_argument("--container-image")
    ap.add_argument("--container-mounts", help="comma-separated src:dst")
    ap.add_argument("--out-dir", help="default: runs/<recipe>[_<method>]")
    ap.add_argument("--python", default=None, help="interpreter on the nodes (default: this repo's .venv)")
    ap.add_argument("--method", choices=sorted(COMPARISON_METHODS))
    ap.add_argument("--diagnose", action="store_true",
                    help="run the pre-run diagnostic (python -m megatron_lpreg.diagnose: one rollout step, no "
                         "update; docs/diagnose.md) instead of training; its options as overrides "
                         "diagnose.batches=N diagnose.drift_updates=K")
    ap.add_argument("--signal-grace", type=int, default=180, help="seconds between USR1 and the time limit")
    ap.add_argument("--max-restarts", type=int, default=3,
                    help="launch.max_restarts: in-place restarts of a failed or hung trainer per job (default 3)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job (repeatable)")
    ap.add_argument("--dryrun", action="store_true")
    ap.add_argument("--plain", action="store_true", help="plain sbatch even if nemo-run is installed")
    ap.add_argument("overrides", nargs="*")
    return ap.parse_intermixed_args(argv)


def job_from_args(a) -> JobSpec:
    recipe = RECIPES[a.recipe]
    name = a.recipe + (f"_{a.method}" if a.method else "") + ("_diagnose" if a.diagnose else "")
    out_dir = a.out_dir or str(REPO / "runs" / name)
    python = a.python or str(REPO / ".venv" / "bin" / "python")
    overrides = (method_overrides(a.method, a.recipe) if a.method else []) + list(a.overrides)
    env = {}
    for kv in a.env:
        if "=" not in kv:
            raise SystemExit(f"--env {kv!r} is not KEY=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    if a.diagnose:
        env["LPREG_MODULE"] = DIAGNOSE  # launch/run_node.sh runs it instead of the trainer
    config = str(REPO / recipe.config)
    job = JobSpec.from_recipe(name, recipe, overrides=overrides, out_dir=str(Path(out_dir).resolve()),
                              repo=str(REPO), python=python, nodes=a.nodes, time=a.time, partition=a.partition,
                              account=a.account, container_image=a.container_image,
                              container_mounts=a.container_mounts, signal_grace_s=a.signal_grace,
                              max_restarts=a.max_restarts, procs_per_node=a.procs_per_node, env=env)
    job.config = config
    return job


def check_job(job) -> None:
    """What can be known on the submitting host: the config's keys and types with the
    overrides (values too when this environment can import the trainer's registries),
    and the job's processes against TP x PP. Paths are left to the nodes (cluster
    mounts often exist there only). Raises ``ValueError`` with one line."""
    from megatron_lpreg.config import load_config

    try:
        import torch  # noqa: F401 - the value checks import the loss registry
        values = True
    except ImportError:
        values = False
    run_overrides = [o for o in job.overrides if not o.startswith("diagnose.")]  # the diagnostic's own options
    cfg = load_config(job.config, run_overrides, check_values=values)
    procs = job.nodes * (job.gpus_per_node or job.procs_per_node)
    if procs % (cfg.parallel.tp * cfg.parallel.pp):
        raise ValueError(f"{job.nodes} node(s) x {job.gpus_per_node or job.procs_per_node} processes = {procs} do not "
                         f"split into tp={cfg.parallel.tp} x pp={cfg.parallel.pp}; use a multiple of "
                         f"{cfg.parallel.tp * cfg.parallel.pp} processes")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.max_restarts < 0:
        print(f"launch: error: --max-restarts {a.max_restarts} must be >= 0", file=sys.stderr)
        return 2
    job = job_from_args(a)
    try:
        check_job(job)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    if a.executor == "local":
        cmd = [job.python, "-m", job.env.get("LPREG_MODULE", "megatron_lpreg.train"), "--config", job.config,
               f"train.out_dir={job.out_dir}", *job.overrides]
        if a.dryrun:
            print(" ".join(cmd))
            return 0
        return subprocess.call(cmd, cwd=REPO)
    if nemo.available() and not a.plain:
        nemo.submit(job, dryrun=a.dryrun)
        return 0
    script = render_sbatch(job)
    if a.dryrun:
        print(script)
        return 0
    Path(job.logs).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", dir=job.logs, delete=False) as f:
        f.write(script)
    out = subprocess.run(["sbatch", f.name], capture_output=True, text=True)
    print(out.stdout.strip() or out.stderr.strip())
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())

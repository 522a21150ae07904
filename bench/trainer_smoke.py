"""The trainer itself on this machine, briefly: what ``bench/gpu_check.sh`` runs so that the
first GPU run's set-up paths (bf16 weights, megatron's DistributedOptimizer, checkpoints
before and after the first update, a resume, the rollout engine's sleep and wake) are
exercised before anyone spends a node-hour on them.

Two commands of ``python -m megatron_lpreg.train`` on the generated tiny task: steps 1-2
from scratch (a checkpoint at step 0, before any update, and after each step), then the
same run extended to step 3, which must resume from step 2. Checks, each a line in
``trainer.json`` (``checks``): every step recorded once with a finite reward; the resume
started at step 2; each checkpoint's record says whether it holds the optimiser (not at
step 0, yes after) and with which layout; bf16 weights on CUDA; per-phase GPU memory in
the metrics on CUDA; and with vLLM, a sync after every wake (its weights were discarded).

    python bench/trainer_smoke.py --out /tmp/smoke --device cuda          # one GPU: TP=1
    python bench/trainer_smoke.py --out /tmp/smoke --device cpu           # CI: TP=2 gloo ranks

Exit status 0 when every check passed, 1 otherwise; each command's log is kept in OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg.data.tiny_task import write_task  # noqa: E402
from megatron_lpreg.trainer.metrics import read_metrics  # noqa: E402

# small enough for a few minutes on two CPU cores, the demo's structure otherwise
SMALL = ["warm_start.steps=20", "rollout.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=6",
         "algo.mini_batches=2", "algo.neg_percent=0.5", "reward.workers=1", "train.save_every=1",
         "train.keep_last=10", "train.progress=false", "optim.use_distributed_optimizer=true"]


def train(out: Path, task: Path, steps: int, device: str, engine: str, timeout: float) -> tuple[float, str]:
    """One ``megatron_lpreg.train`` command; returns its seconds and where its log is."""
    tp = 2 if device == "cpu" else 1
    dtype = "bfloat16" if device == "cuda" else "float32"
    cmd = [sys.executable, "-m", "megatron_lpreg.train", "--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
           f"model.hf_dir={task / 'model'}", f"data.train_path={task / 'train.jsonl'}", f"parallel.tp={tp}",
           f"model.params_dtype={dtype}", f"rollout.engine={engine}", f"train.steps={steps}",
           f"train.out_dir={out / 'run'}", *SMALL]
    logfile = out / f"train_to_step{steps}.log"
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                            env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    if rc != 0:
        tail = logfile.read_text().splitlines()[-15:]
        raise RuntimeError(f"training to step {steps} exited {rc}; the end of {logfile}:\n" + "\n".join(tail))
    return time.perf_counter() - t0, str(logfile)


def checks(run: Path, device: str, engine: str) -> dict[str, bool]:
    recs = read_metrics(run / "metrics.jsonl")
    ckpts = run / "checkpoints"
    saved = {p.name: json.loads((p / "trainer_state.json").read_text()).get("checkpoint", {})
             for p in sorted(ckpts.glob("step_*")) if (p / "trainer_state.json").exists()}
    resumes = [json.loads(line) for line in (run / "resume_log.jsonl").read_text().splitlines() if line.strip()]
    out = {
        "every_step_once": [r["step"] for r in recs] == [1, 2, 3],
        "finite_rewards": all(math.isfinite(r["reward/mean"]) for r in recs),
        "resumed_from_step_2": [r.get("from_step") for r in resumes if "from_step" in r] == [2],
        "checkpoints_0_to_3": sorted(saved) == [f"step_{i:06d}" for i in range(4)],
        "no_optimizer_state_at_step_0": saved.get("step_000000", {}).get("optimizer") is False,
        "optimizer_state_after_updates": all(saved.get(f"step_{i:06d}", {}).get("optimizer") for i in (1, 2, 3)),
        "distributed_optimizer_layout": saved.get("step_000003", {}).get("optimizer_sharding") == "dp_reshardable",
    }
    if device == "cuda":
        out["phase_memory_in_metrics"] = all("memory/update_peak_gib" in r and "memory/rollout_peak_gib" in r
                                             for r in recs)
        config = (run / "config.yaml").read_text()
        out["bf16_weights"] = "params_dtype: bfloat16" in config
    if engine == "vllm":
        # level-2 sleep discards the weights: every step synced, none skipped as "already current"
        out["sync_after_every_wake"] = all(r.get("rollout/sync_direct_mb", 0) + r.get("rollout/sync_streamed_mb", 0)
                                           > 0 for r in recs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--engine", choices=["torch", "vllm", "auto"], default="auto",
                    help="rollout engine; auto: vLLM where it imports on CUDA, else torch")
    ap.add_argument("--timeout", type=float, default=520, help="seconds per training command")
    a = ap.parse_args(argv)
    engine = a.engine
    if engine == "auto":
        from megatron_lpreg.rollout.vllm_engine import vllm_available

        engine = "vllm" if a.device == "cuda" and vllm_available() else "torch"
    a.out.mkdir(parents=True, exist_ok=True)
    task = write_task(a.out / "task", train_rows=200)
    res: dict = {"device": a.device, "engine": engine, "seconds": {}, "logs": {}}
    try:
        for steps in (2, 3):
            secs, logfile = train(a.out, task, steps, a.device, engine, a.timeout)
            res["seconds"][f"to_step_{steps}"] = round(secs, 1)
            res["logs"][f"to_step_{steps}"] = logfile
        res["checks"] = checks(a.out / "run", a.device, engine)
        res["metrics"] = read_metrics(a.out / "run" / "metrics.jsonl")
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        res["error"] = str(e)
    (a.out / "trainer.json").write_text(json.dumps(res, indent=1))
    failed = [k for k, ok in res.get("checks", {}).items() if not ok]
    if "error" in res or failed:
        print(f"trainer_smoke: {res.get('error') or 'failed checks: ' + ', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"trainer_smoke: {len(res['checks'])} checks passed ({engine}, {a.device}): {res['seconds']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

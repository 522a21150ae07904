#!/usr/bin/env bash
# Validate and benchmark one GPU machine in under 10 minutes, with no network.
#
#   bench/gpu_check.sh OUT_DIR [--wheels DIR] [--device cuda|cpu] [--quick]
#
# 1. environment: python, torch, CUDA device, triton, megatron-core -> OUT_DIR/env.json
# 2. the CUDA test subset: tests/test_cuda.py (op, fused output, a TP=1 megatron model
#    against HF transformers, on the GPU) and tests/ops/test_triton.py (the Triton
#    kernels against the torch path) -> OUT_DIR/tests.txt
# 3. bench/gpu_ops.py: the op at 8k and 32k tokens x 151,936 bf16 (torch path, Triton,
#    megatron-core's CE, the reference's naive path), fused vs unfused output at hidden
#    5,120, Lp-Reg vs GRPO update step of a bf16 GPT -> OUT_DIR/{op,fused,step}.json
# 4. bench/trainer_smoke.py: the trainer itself, 3 steps of the tiny task in bf16 with
#    megatron's DistributedOptimizer, checkpoints at step 0 (no optimiser state yet) and
#    after each update, a resume from step 2; the Torch rollout engine, or vLLM with
#    sleep level 2 and wake when its wheel is installed -> OUT_DIR/trainer/trainer.json
# then OUT_DIR/summary.json and one line per part on stdout.
#
# --wheels DIR: packages missing on the machine, as wheels made by tools/gpu_wheels.sh
#   (everything beyond CUDA torch and Triton), installed with pip --no-index into
#   OUT_DIR/site.
# --device cpu: tiny sizes on the CPU (Triton in its interpreter, CUDA tests skipped):
#   checks this script's logic where there is no GPU; CI runs it so.
# --quick: fewer repeats and the 8k point only.
# Every command is limited to 540 s (a device machine allows 600 s per command) and the
# whole check fits 8 minutes on one H100/H200. A missing package the check needs
# (pytest, megatron-core, transformers, ...) fails it at once with one line naming it.
# Exit status: 0 when the tests, benchmarks and trainer smoke passed, 1 when one failed,
# 2 on bad arguments or a missing package.
set -uo pipefail

usage() { echo "usage: bench/gpu_check.sh OUT_DIR [--wheels DIR] [--device cuda|cpu] [--quick]" >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -*) usage ;; esac
out=$1; shift
wheels=""; device=cuda; quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
        --device) [ $# -ge 2 ] || usage; device=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "gpu_check: unknown argument $1" >&2; usage ;;
    esac
done
[ "$device" = cuda ] || [ "$device" = cpu ] || { echo "gpu_check: --device must be cuda or cpu" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
start=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - start ))s] $*"; }

if [ -n "$wheels" ]; then
    ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "gpu_check: no .whl files in $wheels" >&2; exit 2; }
    say "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $out/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$out/site" \
        "$wheels"/*.whl > "$out/pip.txt" 2>&1 || { echo "gpu_check: pip install from $wheels failed (see $out/pip.txt)" >&2; exit 2; }
    export PYTHONPATH="$out/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$repo:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
cd "$repo" || exit 2

# 1. environment
"$py" - "$out/env.json" 2> "$out/env_log.txt" <<'EOF'
import importlib.util, json, platform, sys
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for mod in ("triton", "megatron.core", "transformers", "pytest"):
    spec = importlib.util.find_spec(mod)
    if spec is None:
        env[mod] = None
        continue
    try:
        m = __import__(mod, fromlist=["_"])
        env[mod] = getattr(m, "__version__", "present")
    except Exception as e:  # a package that imports badly is as good as missing, and says why
        env[mod] = f"import failed: {e}"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(" ".join(f"{k}={v}" for k, v in env.items()))
EOF
[ $? -eq 0 ] || { echo "gpu_check: python ($py) with torch is needed (see $out/env_log.txt)" >&2; exit 2; }
if [ "$device" = cuda ]; then
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check: torch sees no CUDA GPU (use --device cpu to check the script's logic)" >&2; exit 2; }
fi
# what the tests, benchmarks and trainer import: a check that skipped them would pass untested
for mod in pytest megatron.core transformers tokenizers safetensors numpy yaml xxhash einops tqdm math_verify triton; do
    "$py" -c "import $mod" 2>/dev/null || {
        echo "gpu_check: python package '$mod' is missing or does not import; bring it: tools/gpu_wheels.sh DIR here, then --wheels DIR" >&2
        exit 2; }
done
limit=540  # seconds per command: a device machine allows 600

# 2. tests
say "tests: tests/test_cuda.py tests/ops/test_triton.py"
timeout $limit "$py" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/ops/test_triton.py > "$out/tests.txt" 2>&1
rc=$?
if [ $rc -eq 0 ]; then tests_status=passed; elif [ $rc -eq 5 ]; then tests_status=none-collected
elif [ $rc -eq 124 ]; then tests_status=timed-out; else tests_status=failed; fi
say "tests: $tests_status ($(tail -n 1 "$out/tests.txt"))"

# 3. benchmarks
if [ "$device" = cpu ]; then
    sizes=(--device cpu --tokens 64 --vocab 1000 --hidden 64 --fused-tokens 64 --step-hidden 64 --step-layers 2
           --step-batch 8 --step-seq 32 --repeats 2)
elif [ $quick = 1 ]; then
    sizes=(--tokens 8192 --repeats 3)
else
    sizes=()
fi
say "benchmarks: bench/gpu_ops.py ${sizes[*]}"
timeout $limit "$py" bench/gpu_ops.py --out "$out" "${sizes[@]}" 2> "$out/bench_log.txt"
bench_rc=$?
grep '^\[gpu_ops\]' "$out/bench_log.txt" | sed 's/^/  /'
if [ $bench_rc -ne 0 ]; then
    say "benchmarks failed (exit $bench_rc); the end of $out/bench_log.txt:"
    tail -n 15 "$out/bench_log.txt"
fi

# 4. the trainer (its own commands are limited inside; the whole under the same limit)
say "trainer: bench/trainer_smoke.py --device $device"
timeout $limit "$py" bench/trainer_smoke.py --out "$out/trainer" --device "$device" --timeout 240 \
    2> "$out/trainer_log.txt"
trainer_rc=$?
tail -n 1 "$out/trainer_log.txt" | sed 's/^/  /'

"$py" - "$out" "$tests_status" "$bench_rc" "$trainer_rc" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
from pathlib import Path
out, tests = Path(sys.argv[1]), sys.argv[2]
bench_rc, trainer_rc, secs = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
summary = {"tests": tests, "benchmarks_exit": bench_rc, "trainer_exit": trainer_rc, "seconds": secs, "parts": {}}
for name in ("op", "fused", "step"):
    p = out / f"{name}.json"
    summary["parts"][name] = "written" if p.exists() else "missing"
    if p.exists():
        d = json.loads(p.read_text())
        if "skipped" in d:
            summary["parts"][name] = f"skipped: {d['skipped']}"
        if name == "step" and "lp_reg_over_grpo" in d:
            summary["lp_reg_over_grpo"] = d["lp_reg_over_grpo"]
        if name == "fused" and "time_ratio_fused_over_unfused" in d:
            summary["fused_over_unfused_time"] = d["time_ratio_fused_over_unfused"]
smoke = out / "trainer" / "trainer.json"
summary["parts"]["trainer"] = "written" if smoke.exists() else "missing"
if smoke.exists():
    d = json.loads(smoke.read_text())
    summary["trainer"] = {"engine": d.get("engine"), "seconds": d.get("seconds"), "checks": d.get("checks"),
                          **({"error": d["error"][-500:]} if "error" in d else {})}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
EOF
say "done: $out"
[ "$tests_status" = passed ] || exit 1
[ $bench_rc -eq 0 ] || exit 1
[ $trainer_rc -eq 0 ] || exit 1
exit 0

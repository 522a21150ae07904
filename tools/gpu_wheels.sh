#!/usr/bin/env bash
# Download, here (where pip reaches an index), the wheels a GPU machine without network
# needs for bench/gpu_check.sh and the trainer: megatron-core for Python 3.12 on x86-64
# Linux. Its other needs (torch, numpy, packaging) and ours (pyyaml, xxhash,
# safetensors, transformers) are on a CUDA PyTorch image already.
#
#   tools/gpu_wheels.sh DIR [--print]     # then, there: bench/gpu_check.sh OUT --wheels DIR
#
# The megatron-core version is the one CI's tests run with (tools/setup_env.sh pins
# it; tests/test_gpu_check.py checks the two agree), so the GPU machine runs what was
# tested. MEGATRON_CORE_VERSION overrides it. --print shows the command instead.
set -euo pipefail
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { echo "usage: tools/gpu_wheels.sh DIR [--print]" >&2; exit 2; }
dir=$1; shift
print=0
[ "${1:-}" = --print ] && print=1
py=${PYTHON:-python3}
version=${MEGATRON_CORE_VERSION:-0.16.1}
cmd=("$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 -d "$dir" "megatron-core==$version")
if [ $print = 1 ]; then echo "${cmd[*]}"; exit 0; fi
mkdir -p "$dir"
"${cmd[@]}"
echo "gpu_wheels: $(ls "$dir"/*.whl | wc -l) wheel(s) in $dir ($(du -sh "$dir" | cut -f1)); on the GPU machine:"
echo "  bench/gpu_check.sh OUT_DIR --wheels $dir"

#!/usr/bin/env bash
# Download, here (where pip reaches an index), every wheel a GPU machine without network
# needs beyond CUDA torch and Triton for bench/gpu_check.sh and the trainer, for Python
# 3.12 on x86-64 Linux: megatron-core, transformers and its tokenizer/hub stack, pytest,
# math-verify, numpy, pyyaml, xxhash, einops, tqdm, safetensors, packaging and what they
# need. What CUDA torch brings itself (sympy, jinja2, networkx, filelock, fsspec, ...) is
# left out, and so are vLLM and Transformer Engine (GBs; the check runs without them).
#
#   tools/gpu_wheels.sh DIR [--print]     # then, there: bench/gpu_check.sh OUT --wheels DIR
#
# Versions are the GPU lock's (locks/gpu-py312.txt; megatron-core is the one CI's tests
# run with, tests/test_gpu_check.py checks it), so the GPU machine runs what was tested.
# The folder travels with the working tree to a device machine, whose limit is 64 MiB in
# all: the script prints the total and fails above 56 MiB (the repository needs the rest).
# --print shows the pip commands instead of running them.
set -euo pipefail
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { echo "usage: tools/gpu_wheels.sh DIR [--print]" >&2; exit 2; }
dir=$1; shift
print=0
[ "${1:-}" = --print ] && print=1
py=${PYTHON:-python3}
lock="$(cd "$(dirname "$0")/.." && pwd)/locks/gpu-py312.txt"
[ -f "$lock" ] || { echo "gpu_wheels: no GPU lock at $lock (make lock)" >&2; exit 2; }
version=${MEGATRON_CORE_VERSION:-$(sed -n 's/^megatron-core==\([^ ]*\).*/\1/p' "$lock")}
limit_mib=56
# what a CUDA torch wheel installs with itself: never downloaded
provided_by_torch="sympy mpmath filelock fsspec jinja2 markupsafe networkx typing-extensions typing_extensions setuptools"

target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
constraints="$dir/.constraints.txt"
# megatron-core alone: its own requirements (torch) are the machine's
core=("$py" -m pip download -q --no-deps "${target[@]}" -d "$dir" "megatron-core==$version")
# the rest with their dependencies, pinned to the lock (torch is none of theirs)
rest=("$py" -m pip download -q "${target[@]}" -d "$dir" -c "$constraints" numpy packaging pyyaml einops tqdm
      xxhash safetensors transformers pytest math-verify)
if [ $print = 1 ]; then echo "${core[*]}"; echo "${rest[*]}"; exit 0; fi
mkdir -p "$dir"
sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' "$lock" > "$constraints"
"${core[@]}"
"${rest[@]}"
rm -f "$constraints"
for name in $provided_by_torch; do rm -f "$dir/$name"-[0-9]*.whl; done
count=$(ls "$dir"/*.whl | wc -l)
mib=$(du -sm "$dir" | cut -f1)
echo "gpu_wheels: $count wheel(s) in $dir, $mib MiB; on the GPU machine:"
echo "  bench/gpu_check.sh OUT_DIR --wheels $dir"
if [ "$mib" -gt $limit_mib ]; then
    echo "gpu_wheels: $mib MiB is over $limit_mib MiB: with the repository it would not fit the 64 MiB a device run carries" >&2
    exit 1
fi

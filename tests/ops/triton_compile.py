"""Compile every Triton kernel variant the project launches, ahead of time, for CUDA
targets, on a machine without a GPU (and without torch: only ``triton`` is imported).

    python -m tests.ops.triton_compile --arch 80 --arch 90      # JSON on stdout

Prints ``{"triton": version, "results": {"<variant>/sm<arch>": "ok" | error}}``. A
variant fails when Triton refuses it or when its PTX divides approximately
(``div.full.f32``: the kernels must divide by the temperature exactly). Run by
``tests/ops/test_triton_compile.py`` with the installed Triton and the oldest
supported one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_lpreg.ops import triton_kernels  # noqa: E402


def compile_variant(kernel, signature: dict, constexprs: dict, arch: int) -> str:
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32))
    except Exception as e:  # noqa: BLE001 - reported per variant
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    if not compiled.asm.get("cubin"):
        return "no cubin produced"
    if "div.full" in compiled.asm["ptx"]:
        return "approximate division (div.full) in the PTX"
    return "ok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", required=True, help="compute capability, e.g. 90")
    ap.add_argument("--only", default="", help="compile the variants whose name starts with this")
    args = ap.parse_args(argv)
    results = {}
    for name, kernel, sig, cx in triton_kernels.variants():
        if not name.startswith(args.only):
            continue
        for arch in args.arch:
            results[f"{name}/sm{arch}"] = compile_variant(kernel, sig, cx, arch)
    print(json.dumps({"triton": triton.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

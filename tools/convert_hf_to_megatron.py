#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (safetensors) to a megatron-core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-14B-Base --out ckpt/qwen3-14b-mcore

The output loads at any tensor/pipeline-parallel layout (megatron reshards at load
time). Tensors are read one at a time; nothing is downloaded. The output directory
appears only when the conversion finished (written to a temporary sibling first).
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_lpreg.atomic_dir import OutputExists
from megatron_lpreg.manifest import verify_output
from megatron_lpreg.model.convert import DTYPES, ConversionError, hf_to_megatron
from megatron_lpreg.model.hf_config import UnsupportedConfig

REQUIRED = {"--hf-dir": "hf_dir", "--out": "out"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", help="directory with config.json and *.safetensors")
    ap.add_argument("--out", help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the checkpoint's)")
    ap.add_argument("--check-tp", type=int, help="fail now if this TP size cannot split the model")
    ap.add_argument("--check-pp", type=int, help="fail now if this PP size cannot split the layers")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--verify", metavar="DIR", help="check a directory this tool wrote against its manifest "
                                                    "(sizes and checksums of every file) and exit")
    args = ap.parse_args(argv)
    if args.verify:
        return verify_output(args.verify)
    missing = [f for f, v in REQUIRED.items() if not getattr(args, v)]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        meta = hf_to_megatron(args.hf_dir, args.out, dtype=args.dtype, check_tp=args.check_tp,
                              check_pp=args.check_pp, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConversionError, UnsupportedConfig, OutputExists, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "tensors": len(meta["tensors"]), "content_sha256": meta["content_sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

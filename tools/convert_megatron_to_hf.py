#!/usr/bin/env python
"""Convert a megatron-core distributed checkpoint (any TP/PP) to Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/qwen3-14b-mcore --out qwen3-14b-hf

Writes sharded ``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json``,
``config.json`` and the tokenizer files; padded vocabulary rows are dropped. The HF
config comes from the checkpoint's ``lpreg_meta.json`` (written by
convert_hf_to_megatron.py) or from ``--hf-config-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_lpreg.atomic_dir import OutputExists
from megatron_lpreg.manifest import verify_output
from megatron_lpreg.model.convert import DTYPES, ConversionError, megatron_to_hf
from megatron_lpreg.model.hf_config import UnsupportedConfig

REQUIRED = {"--megatron-dir": "megatron_dir", "--out": "out"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-dir", help="torch_dist checkpoint directory (has .metadata)")
    ap.add_argument("--out", help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--hf-config-dir", help="directory with the source config.json and tokenizer files")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the checkpoint's)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GiB)")
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
        wm = megatron_to_hf(args.megatron_dir, args.out, hf_config_dir=args.hf_config_dir, dtype=args.dtype,
                            max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite,
                            progress=not args.no_progress)
    except (ConversionError, UnsupportedConfig, OutputExists, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "tensors": len(wm), "files": len(set(wm.values()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

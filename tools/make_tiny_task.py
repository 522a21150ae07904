"""Generate the tiny demo task: a random Qwen3-shaped model, a character tokenizer with a
chat template, and addition problems in the DAPO-Math layout. Deterministic; nothing
is downloaded.

    python tools/make_tiny_task.py --out runs/tiny_task
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.data.tiny_task import write_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny_task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--max-operand", type=int, default=50)
    a = ap.parse_args()
    out = write_task(a.out, seed=a.seed, train_rows=a.train_rows, max_operand=a.max_operand)
    print(f"tiny task in {out}: model/, train.jsonl, test.jsonl")


if __name__ == "__main__":
    main()

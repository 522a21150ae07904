"""Generate the coin task (``megatron_lpreg/data/coin_task.py``): a word-level
tokenizer, a tiny Qwen3-shaped model warm-started on traces of three strategies at
85/12/3 % (each opened by a plan word), training rows and held-out problems.
Deterministic; nothing is downloaded.

    python tools/make_coin_task.py --out runs/coin_task      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lpreg.data.coin_task import write_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/coin_task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-rows", type=int, default=20000)
    ap.add_argument("--warm-steps", type=int, default=1200)
    a = ap.parse_args()
    if a.train_rows < 1 or a.warm_steps < 0:
        raise SystemExit("make_coin_task: --train-rows must be >= 1 and --warm-steps >= 0")
    out = write_task(a.out, seed=a.seed, train_rows=a.train_rows, warm_steps=a.warm_steps)
    print(f"coin task in {out}: model/ (warm-started), train.jsonl, coins_heldout.jsonl")


if __name__ == "__main__":
    main()

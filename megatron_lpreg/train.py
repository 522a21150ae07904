"""Train: ``python -m megatron_lpreg.train --config examples/tiny_cpu.yaml [key=value ...]``.

Run it under torchrun (``torchrun --nproc_per_node=N -m megatron_lpreg.train ...``)
or Slurm; started directly it relaunches itself under torchrun with
``parallel.tp * parallel.pp`` local processes. A run whose ``train.out_dir``
holds a complete checkpoint resumes from the newest one that verifies.

Mistakes that can be found before the ranks start (unknown config keys, wrong
types, missing model or data, a TP/PP that does not split the model) are one line
on stderr and exit status 2; an error inside the ranks is one line too, its
traceback in ``<train.out_dir>/errors/rank<r>.txt`` (exit status 1); a rank that makes
no progress for ``train.hang_timeout_s`` writes its stacks to
``<train.out_dir>/errors/rank<r>-hang.txt`` and exits 75 (``trainer/watchdog.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_lpreg.job import (
    die_with_parent,
    finish_job,
    init_job,
    relaunch_under_torchrun,
    report_failure,
)
from megatron_lpreg.trainer.watchdog import collective_timeout_s

if __name__ == "__mp_main__":  # a rank's spawn child: it goes when the rank goes
    die_with_parent()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m megatron_lpreg.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config (see examples/)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="local processes when self-launching (default: tp * pp)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=20 algo.loss=grpo")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_lpreg.config import ConfigError, load_config
    from megatron_lpreg.preflight import UserError, check_run

    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        cfg = load_config(args.config, args.overrides)
        nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp
        check_run(cfg, world if world is not None else nproc)
    except (ConfigError, UserError, OSError) as e:
        # every rank finds the same mistake; one line is enough
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train: error: {e}", file=sys.stderr)
        return 2
    errors = Path(cfg.train.out_dir) / "errors"
    rc = relaunch_under_torchrun("megatron_lpreg.train", ["--config", args.config, *args.overrides], nproc,
                                 command="train", error_dir=errors)
    if rc is not None:
        return rc
    groups = init_job(cfg.parallel.tp, cfg.parallel.pp, timeout_s=collective_timeout_s(cfg.train.hang_timeout_s))
    from megatron_lpreg.trainer.loop import train

    try:
        train(cfg, groups)
    except Exception as e:  # noqa: BLE001 - reported once, traceback in <out_dir>/errors/
        return report_failure("train", e, errors)
    finish_job()
    return 0


if __name__ == "__main__":
    sys.exit(main())

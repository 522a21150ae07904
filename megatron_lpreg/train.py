"""Train: ``python -m megatron_lpreg.train --config examples/tiny_cpu.yaml [key=value ...]``.

Run it under torchrun (``torchrun --nproc_per_node=N -m megatron_lpreg.train ...``)
or Slurm; started directly it relaunches itself under torchrun with
``parallel.tp * parallel.pp`` local processes. A run whose ``train.out_dir``
holds a complete checkpoint resumes from the newest one.
"""

from __future__ import annotations

import argparse
import sys

from megatron_lpreg.job import finish_job, init_job, relaunch_under_torchrun


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
    from megatron_lpreg.config import load_config

    cfg = load_config(args.config, args.overrides)
    rc = relaunch_under_torchrun("megatron_lpreg.train", ["--config", args.config, *args.overrides],
                                 args.nproc or cfg.parallel.tp * cfg.parallel.pp)
    if rc is not None:
        return rc
    groups = init_job(cfg.parallel.tp, cfg.parallel.pp)
    from megatron_lpreg.trainer.loop import train

    train(cfg, groups)
    finish_job()
    return 0


if __name__ == "__main__":
    sys.exit(main())

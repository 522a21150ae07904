"""Train: ``python -m megatron_lpreg.train --config examples/tiny_cpu.yaml [key=value ...]``.

Run it under torchrun (``torchrun --nproc_per_node=N -m megatron_lpreg.train ...``)
or Slurm; started directly it relaunches itself under torchrun with
``parallel.tp * parallel.pp`` local processes. A run whose ``train.out_dir``
holds a complete checkpoint resumes from the newest one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


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
    if "RANK" not in os.environ:
        n = args.nproc or cfg.parallel.tp * cfg.parallel.pp
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "megatron_lpreg.train", "--config", args.config, *args.overrides]
        return subprocess.call(cmd)

    import torch
    import torch.distributed as dist

    from megatron_lpreg import platform

    platform.install_cpu_shims()
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(platform.default_backend())
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tp,
                                 pipeline_model_parallel_size=cfg.parallel.pp)
    from megatron_lpreg.trainer.loop import train

    train(cfg)
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

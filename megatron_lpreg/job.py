"""Process-level set-up shared by the command lines (train, eval): torchrun
self-launch, process groups, megatron parallel state, and their teardown."""

from __future__ import annotations

import os
import subprocess
import sys


def relaunch_under_torchrun(module: str, argv: list[str], nproc: int) -> int | None:
    """Outside torchrun (no ``RANK``): run ``python -m module argv`` under torchrun
    with ``nproc`` local processes and return its exit code; inside: None."""
    if "RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    return subprocess.call(cmd)


def init_job(tp: int, pp: int = 1) -> None:
    """CPU shims when there is no GPU, this rank's device, the default process group
    (nccl or gloo) and megatron's parallel state."""
    import torch
    import torch.distributed as dist

    from megatron_lpreg import platform

    platform.install_cpu_shims()
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(platform.default_backend())
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def broadcast_object(obj, src: int = 0):
    """``obj`` from global rank ``src`` to every rank (picklable objects)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def finish_job() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():  # an in-process vLLM engine's shutdown may have done it
        dist.destroy_process_group()

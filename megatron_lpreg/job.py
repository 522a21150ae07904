"""Process-level set-up shared by the command lines (train, eval): torchrun
self-launch, process groups, megatron parallel state, and their teardown."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass


def relaunch_under_torchrun(module: str, argv: list[str], nproc: int) -> int | None:
    """Outside torchrun (no ``RANK``): run ``python -m module argv`` under torchrun
    with ``nproc`` local processes and return its exit code; inside: None."""
    if "RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    return subprocess.call(cmd)


@dataclass(frozen=True)
class Groups:
    """This rank's process groups, built once at job set-up and passed to what runs
    collectives (trainer, weight sync) instead of being read from globals deep inside.
    ``world`` is every rank of the job (decisions all ranks must share)."""

    tp: object
    pp: object
    dp: object
    world: object
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def logging_rank(self) -> bool:
        """The one rank that writes metrics: last pipeline stage, first TP and DP rank."""
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @classmethod
    def from_parallel_state(cls) -> Groups:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(), world=dist.group.WORLD,
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
        )


def init_job(tp: int, pp: int = 1) -> Groups:
    """CPU shims when there is no GPU, this rank's device, the default process group
    (nccl or gloo) and megatron's parallel state; returns this rank's groups."""
    import torch
    import torch.distributed as dist

    from megatron_lpreg import platform

    platform.install_cpu_shims()
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(platform.default_backend())
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return Groups.from_parallel_state()


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

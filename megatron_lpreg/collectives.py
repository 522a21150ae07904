"""All-reduce of small host-side values (counts, sums, flags) on any backend.

NCCL reduces CUDA tensors only; gloo, CPU ones. The trainer's bookkeeping values
(token counts, metric sums, selection thresholds) live on the host, so they go to
the current CUDA device and back when the group's backend is NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_host(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``t`` (a CPU tensor) reduced over ``group`` in place; returns it."""
    if group is not None and dist.get_world_size(group) == 1:
        return t
    if dist.get_backend(group) == "nccl":
        dev = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(dev, op=op, group=group)
        t.copy_(dev.cpu())
    else:
        dist.all_reduce(t, op=op, group=group)
    return t

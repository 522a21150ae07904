"""How megatron-core lays a parameter out over tensor-parallel ranks.

A tensor-parallel parameter carries ``partition_dim`` and ``partition_stride``
attributes. With stride ``s`` the full tensor is cut along ``partition_dim``
into ``s * tp`` equal pieces and rank ``r`` holds pieces ``r, tp + r, 2 tp + r,
...`` concatenated (stride 2 is the SwiGLU ``linear_fc1``: each rank holds its
slice of the gate rows followed by its slice of the up rows).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lpreg import collectives


def tp_partition(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition_dim, stride) of a tensor-parallel parameter, or None if replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def shard_of(full: torch.Tensor, rank: int, tp: int, dim: int, stride: int = 1) -> torch.Tensor:
    """The piece of ``full`` that TP rank ``rank`` of ``tp`` holds (a new tensor)."""
    pieces = full.chunk(stride * tp, dim=dim)
    if len(pieces) != stride * tp or full.shape[dim] % (stride * tp):
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} does not split into "
            f"{stride} x {tp} equal pieces"
        )
    return torch.cat([pieces[j * tp + rank] for j in range(stride)], dim=dim).clone()


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_of`: the full tensor from the shards of all ranks (rank order)."""
    split = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([split[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def gather_full(t: torch.Tensor, dim: int, stride: int, group) -> torch.Tensor:
    """All-gather this rank's shard over ``group`` and reassemble the full tensor."""
    tp = dist.get_world_size(group)
    if tp == 1:
        return t.detach().clone()
    return unshard(collectives.all_gather(t.detach().contiguous(), group), dim, stride)

"""Every collective this package issues, in one device-aware place.

NCCL moves CUDA tensors only; gloo, CPU ones. The trainer's bookkeeping values (token
counts, metric sums, selection thresholds, AER's entropy, stop flags) live on the host,
the op's partial sums on the logits' device, and some groups are gloo groups beside an
NCCL world (vLLM's data-parallel ``cpu_group``). So each function here takes a tensor on
any device, runs the collective on the device the group's backend needs (moving the
tensor there and back only when it is elsewhere) and names its group. Nothing else in
``megatron_lpreg`` calls a ``torch.distributed`` collective: ``tests/test_collectives.py``
scans the source, so a CPU tensor cannot reach NCCL by a new direct call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def backend_device(group=None) -> torch.device:
    """Where tensors must be for ``group``'s backend: the current CUDA device for NCCL,
    the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _single(group) -> bool:
    return group is not None and dist.get_world_size(group) == 1


def _staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` itself when it is already on ``device`` (and contiguous), else a copy there."""
    if t.device == device and t.is_contiguous():
        return t
    return t.to(device).contiguous()


def _in_place(collective, t: torch.Tensor, group, **kw) -> torch.Tensor:
    """Run an in-place ``collective`` on ``t`` where the backend needs it; ``t`` gets the result."""
    if _single(group):
        return t
    staged = _staged(t, backend_device(group))
    collective(staged, group=group, **kw)
    if staged is not t:
        t.copy_(staged)
    return t


def all_reduce(t: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """``t`` reduced over ``group`` in place (any device); returns it."""
    return _in_place(dist.all_reduce, t, group, op=op)


def broadcast(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``t`` from global rank ``src`` to every rank of ``group``, in place; returns it."""
    return _in_place(dist.broadcast, t, group, src=src)


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape everywhere), in rank order, on ``t``'s device."""
    world = dist.get_world_size(group)
    if world == 1:
        return [t]
    staged = _staged(t, backend_device(group))
    parts = [torch.empty_like(staged) for _ in range(world)]
    dist.all_gather(parts, staged, group=group)
    return [p if p.device == t.device else p.to(t.device) for p in parts]


def all_gather_host(t: torch.Tensor, group=None) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (a small tensor), stacked, on the host."""
    return torch.stack([p.cpu() for p in all_gather(t, group)])


def reduce_scatter(out: torch.Tensor, t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of every rank's ``t`` ``[world * n, ...]``, this rank's ``n`` rows into ``out``."""
    device = backend_device(group)
    staged_out = _staged(out, device)
    dist.reduce_scatter_tensor(staged_out, _staged(t, device), group=group)
    if staged_out is not out:
        out.copy_(staged_out)
    return out


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (torch stages it on the backend's device)."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` from global rank ``src`` to every rank of ``group`` (picklable objects)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    dist.barrier(group=group)

"""Stream the trainer's weights, shard by shard, into a rollout engine.

Names and fused layouts go through :mod:`megatron_lpreg.model.mapping`, the table
the checkpoint converter uses, so there is one definition of "the HF tensor held
by this megatron parameter".

Parameters are visited in the mapping's order, a *bucket* at a time: the TP
shards of a bucket's parameters are all-gathered on the pipeline stage that owns
them, broadcast to the other stages, converted to HF names and layouts and
handed to the engine, which copies them into its own weights; then the bucket
is dropped. The full model is never held twice: the extra memory is one bucket
(plus whatever the engine buffers, one layer for vLLM's layer-wise reload).

A bucket never splits one megatron parameter, so the q/k/v (and gate/up) parts
of a fused tensor always arrive together, which vLLM's layer-wise reload needs.

The engine lives in the trainer's processes (vLLM's ``external_launcher``), so
handing tensors over is a function call on both CPU and GPU: no serialisation,
no CUDA IPC handles.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lpreg.model.builder import canonical_name
from megatron_lpreg.model.forward import unwrap
from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.model.mapping import all_rules, hf_shapes, megatron_shape, to_hf
from megatron_lpreg.rollout.engine import RolloutEngine
from megatron_lpreg.tp_layout import gather_full, tp_partition

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass
class SyncStats:
    seconds: float = 0.0
    bytes: int = 0
    buckets: int = 0
    max_bucket_bytes: int = 0
    per_bucket: list[int] = field(default_factory=list)


def _buckets(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for n in names:
        if out[-1] and size + nbytes[n] > limit:
            out.append([])
            size = 0
        out[-1].append(n)
        size += nbytes[n]
    return [b for b in out if b]


def hf_weight_stream(
    model, spec: ModelSpec, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, stats: SyncStats | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every HF weight of the model, bucket by bucket.

    Every rank of the job must consume the stream to the end in the same order
    (it runs collectives). ``model``: this rank's (possibly wrapped) GPTModel stage.
    """
    from megatron.core import parallel_state as ps

    gpt = unwrap(model)
    rules = all_rules(spec)
    local: dict[str, torch.Tensor] = {}
    for name, p in gpt.named_parameters():
        local.setdefault(canonical_name(gpt, name, spec), p)
    unknown = set(local) - set(rules)
    if unknown:
        raise KeyError(f"parameters without a mapping entry: {sorted(unknown)}")

    pp_group = ps.get_pipeline_model_parallel_group()
    pp = ps.get_pipeline_model_parallel_world_size()
    owner_rank: dict[str, int] = {}  # global rank in my PP group that sends each tensor
    if pp > 1:
        names_by_stage: list = [None] * pp
        dist.all_gather_object(names_by_stage, sorted(local), group=pp_group)
        ranks = dist.get_process_group_ranks(pp_group)
        for stage in reversed(range(pp)):  # the lowest stage wins (tied embedding copies)
            for n in names_by_stage[stage]:
                owner_rank[n] = ranks[stage]
    missing = set(rules) - (set(owner_rank) if pp > 1 else set(local))
    if missing:
        raise KeyError(f"no pipeline stage holds {sorted(missing)[:5]}")

    dtype = next(iter(local.values())).dtype
    padded = gpt.vocab_size
    shapes = hf_shapes(spec)
    full_shape = {n: megatron_shape(n, r, shapes, padded) for n, r in rules.items()}
    nbytes = {n: torch.Size(s).numel() * dtype.itemsize for n, s in full_shape.items()}
    device = next(iter(local.values())).device
    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    me = dist.get_rank()

    for bucket in _buckets(list(rules), nbytes, bucket_bytes):
        full: dict[str, torch.Tensor] = {}
        for n in bucket:  # gather on the owning stage first, so stages do not wait on each other
            if n in local and (pp == 1 or owner_rank[n] == me):
                p = local[n]
                part = tp_partition(p)
                # replicated or TP=1: the parameter itself (the engine copies what it is given)
                full[n] = p.detach() if part is None or tp == 1 else gather_full(p, *part, tp_group)
        if pp > 1:
            for n in bucket:
                if n not in full:
                    full[n] = torch.empty(full_shape[n], dtype=dtype, device=device)
                elif owner_rank[n] == me:
                    full[n] = full[n].contiguous()
                dist.broadcast(full[n], src=owner_rank[n], group=pp_group)
        size = sum(nbytes[n] for n in bucket)
        if stats is not None:
            stats.buckets += 1
            stats.bytes += size
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
            stats.per_bucket.append(size)
        for n in bucket:
            yield from to_hf(spec, n, rules[n], full.pop(n))


class WeightSync:
    """Keeps a rollout engine's weights equal to the trainer's, with a version number."""

    def __init__(self, model, spec: ModelSpec, engine: RolloutEngine, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.model, self.spec, self.engine, self.bucket_bytes = model, spec, engine, bucket_bytes

    @torch.no_grad()
    def sync(self, version: int) -> SyncStats:
        """Push the current weights and mark the engine as holding ``version``."""
        stats = SyncStats()
        t0 = time.perf_counter()
        if not self.engine.shares_trainer_weights:
            self.engine.load_weights(hf_weight_stream(self.model, self.spec, bucket_bytes=self.bucket_bytes,
                                                      stats=stats))
        self.engine.set_version(version)
        stats.seconds = time.perf_counter() - t0
        return stats

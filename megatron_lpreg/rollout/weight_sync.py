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

Direct shard copy (the default when the engine exposes its parameters): when the
rollout TP equals the trainer's, TP rank r of vLLM holds exactly the heads,
FFN columns and rows that megatron's TP rank r holds, only laid out differently
for the fused q/k/v (megatron interleaves per key/value group, vLLM stacks q, k,
v). So each rank copies its own shards straight into vLLM's parameters, q/k/v
de-interleaved on the way; no TP collective, no bucket. Under pipeline
parallelism each stage's shards are broadcast to the other stages of the same TP
rank (vLLM holds every layer). Tensors whose shards do not line up (the
vocabulary rows, when vLLM pads the vocabulary differently) go through the
bucketed stream above.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lpreg import collectives
from megatron_lpreg.job import Groups
from megatron_lpreg.model.builder import canonical_name
from megatron_lpreg.model.forward import unwrap
from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.model.mapping import (
    FusedQKV,
    all_rules,
    hf_shapes,
    megatron_shape,
    split_qkv,
    to_hf,
)
from megatron_lpreg.rollout.engine import RolloutEngine
from megatron_lpreg.tp_layout import gather_full, tp_partition

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass
class SyncStats:
    seconds: float = 0.0
    bytes: int = 0  # through the bucketed stream (full HF tensors)
    buckets: int = 0
    max_bucket_bytes: int = 0
    per_bucket: list[int] = field(default_factory=list)
    direct_bytes: int = 0  # copied shard to shard
    direct_tensors: int = 0


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


def _local_params(gpt, spec: ModelSpec, rules) -> dict[str, torch.Tensor]:
    local: dict[str, torch.Tensor] = {}
    for name, p in gpt.named_parameters():
        local.setdefault(canonical_name(gpt, name, spec), p)
    unknown = set(local) - set(rules)
    if unknown:
        raise KeyError(f"parameters without a mapping entry: {sorted(unknown)}")
    return local


def _owners(local: dict[str, torch.Tensor], rules, pp_group, pp: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Each parameter -> (global rank in my PP group that holds it, its local shape).
    The lowest stage wins (tied embedding copies). Collective over the PP group."""
    if pp == 1:
        owners = {n: (dist.get_rank(), tuple(p.shape)) for n, p in local.items()}
    else:
        by_stage = collectives.all_gather_object({n: tuple(p.shape) for n, p in local.items()}, group=pp_group)
        ranks = dist.get_process_group_ranks(pp_group)
        owners = {}
        for stage in reversed(range(pp)):
            for n, shape in by_stage[stage].items():
                owners[n] = (ranks[stage], shape)
    missing = set(rules) - set(owners)
    if missing:
        raise KeyError(f"no pipeline stage holds {sorted(missing)[:5]}")
    return owners


@dataclass
class _Layout:
    """Where every parameter lives, seen from this rank: computed once per model (one
    gather over the PP group), then reused by every sync."""

    rules: dict
    local: dict[str, torch.Tensor]  # canonical megatron name -> this stage's parameter (TP shard)
    owners: dict[str, tuple[int, tuple[int, ...]]]  # name -> (global rank holding it, local shape)


def _layout(model, spec: ModelSpec, groups: Groups) -> _Layout:
    gpt = unwrap(model)
    rules = all_rules(spec)
    local = _local_params(gpt, spec, rules)
    return _Layout(rules, local, _owners(local, rules, groups.pp, groups.pp_size))


def hf_weight_stream(
    model, spec: ModelSpec, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, stats: SyncStats | None = None,
    groups: Groups | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every HF weight of the model, bucket by bucket.

    Every rank of the job must consume the stream to the end in the same order
    (it runs collectives). ``model``: this rank's (possibly wrapped) GPTModel stage;
    ``groups``: this rank's process groups (default: megatron's parallel state).
    """
    groups = groups or Groups.from_parallel_state()
    yield from _stream(unwrap(model), spec, _layout(model, spec, groups), bucket_bytes, stats, None, groups)


def _stream(gpt, spec: ModelSpec, layout: _Layout, bucket_bytes: int, stats: SyncStats | None,
            only: set[str] | None, groups: Groups) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`hf_weight_stream` over a known layout; ``only``: megatron names to stream
    (default: all), the same on every rank."""
    local = layout.local
    owner_rank = {n: r for n, (r, _) in layout.owners.items()}
    rules = layout.rules if only is None else {n: r for n, r in layout.rules.items() if n in only}
    pp_group, pp = groups.pp, groups.pp_size

    dtype = next(iter(local.values())).dtype
    padded = gpt.vocab_size
    shapes = hf_shapes(spec)
    full_shape = {n: megatron_shape(n, r, shapes, padded) for n, r in rules.items()}
    nbytes = {n: torch.Size(s).numel() * dtype.itemsize for n, s in full_shape.items()}
    device = next(iter(local.values())).device
    tp_group, tp = groups.tp, groups.tp_size
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
                collectives.broadcast(full[n], src=owner_rank[n], group=pp_group)
        size = sum(nbytes[n] for n in bucket)
        if stats is not None:
            stats.buckets += 1
            stats.bytes += size
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
            stats.per_bucket.append(size)
        for n in bucket:
            yield from to_hf(spec, n, rules[n], full.pop(n))


# vLLM's Qwen2/Qwen3/Llama stack HF q/k/v into qkv_proj and gate/up into gate_up_proj
_ENGINE_STACKED = {".q_proj.": ".qkv_proj.", ".gate_proj.": ".gate_up_proj."}


def _engine_name(rule) -> str:
    name = rule if isinstance(rule, str) else rule.q if isinstance(rule, FusedQKV) else rule.gate
    for hf, fused in _ENGINE_STACKED.items():
        name = name.replace(hf, fused)
    return name


def _direct_plan(rules, owners, engine_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron name -> the engine parameter its local shard is copied into, for every
    parameter whose shard lines up with the engine's (same number of elements, and the
    same shape unless it is a fused q/k/v that is re-laid out). The same on every rank
    of a TP group, since shapes are."""
    plan = {}
    for n, rule in rules.items():
        dst = engine_params.get(_engine_name(rule))
        shape = owners[n][1]
        if dst is None or dst.numel() != torch.Size(shape).numel():
            continue
        if isinstance(rule, FusedQKV) or tuple(dst.shape) == tuple(shape):
            plan[n] = dst
    return plan


def _copy_shard(src: torch.Tensor, rule, dst: torch.Tensor, local_spec: ModelSpec) -> None:
    if isinstance(rule, FusedQKV):
        offset = 0
        for part in split_qkv(src, local_spec):
            dst[offset:offset + part.shape[0]].copy_(part)
            offset += part.shape[0]
    else:  # plain, FusedGateUp ([gate_r; up_r] on both sides) and vocabulary rows that line up
        dst.copy_(src)


class WeightSync:
    """Keeps a rollout engine's weights equal to the trainer's, with a version number.

    ``direct``: copy shard to shard where the engine's TP layout matches the trainer's
    (see the module docstring); the rest, or everything with ``direct=False``, goes
    through the bucketed stream."""

    def __init__(self, model, spec: ModelSpec, engine: RolloutEngine, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 direct: bool = True, groups: Groups | None = None):
        """``groups``: this rank's process groups (default: megatron's parallel state)."""
        self.model, self.spec, self.engine, self.bucket_bytes = model, spec, engine, bucket_bytes
        self.direct = direct
        self.groups = groups or Groups.from_parallel_state()
        self._layout: _Layout | None = None  # and the plan below, made at the first sync
        self._direct: dict[str, torch.Tensor] = {}  # megatron name -> engine parameter it is copied into
        self._streamed: set[str] = set()
        self._local_spec: ModelSpec | None = None

    def _make_plan(self) -> None:
        layout = _layout(self.model, self.spec, self.groups)
        tp = self.groups.tp_size
        engine_params = self.engine.local_params(tp_rank=self.groups.tp_rank, tp_size=tp) if self.direct else None
        plan = _direct_plan(layout.rules, layout.owners, engine_params) if engine_params is not None else {}
        # the stream of the rest runs collectives over the whole job: every rank must agree on it
        everyone = collectives.all_gather_object(sorted(plan), group=self.groups.world)
        common = set.intersection(*(set(x) for x in everyone))
        self._layout = layout
        self._direct = {n: dst for n, dst in plan.items() if n in common}
        self._streamed = set(layout.rules) - set(self._direct)
        self._local_spec = dataclasses.replace(self.spec, num_attention_heads=self.spec.num_attention_heads // tp,
                                               num_query_groups=self.spec.num_query_groups // tp)

    def _copy_direct(self, stats: SyncStats) -> None:
        local, owners = self._layout.local, self._layout.owners
        pp_group = self.groups.pp
        me, pp = dist.get_rank(), dist.get_world_size(pp_group)
        dtype = next(iter(local.values())).dtype
        for n, dst in self._direct.items():
            owner, shape = owners[n]
            src = local[n].detach() if owner == me else torch.empty(shape, dtype=dtype, device=dst.device)
            if pp > 1:  # vLLM holds every layer: the owning stage sends its shard to the others
                src = src.contiguous()
                collectives.broadcast(src, src=owner, group=pp_group)
            _copy_shard(src, self._layout.rules[n], dst, self._local_spec)
            stats.direct_bytes += dst.numel() * dst.element_size()
            stats.direct_tensors += 1

    @torch.no_grad()
    def sync(self, version: int) -> SyncStats:
        """Push the current weights and mark the engine as holding ``version``."""
        stats = SyncStats()
        t0 = time.perf_counter()
        if not self.engine.shares_trainer_weights:
            if self._layout is None:
                self._make_plan()
            self._copy_direct(stats)
            if self._streamed:
                self.engine.load_weights(_stream(unwrap(self.model), self.spec, self._layout, self.bucket_bytes,
                                                 stats, self._streamed, self.groups))
            self.engine.weights_updated()
        self.engine.set_version(version)
        stats.seconds = time.perf_counter() - t0
        return stats


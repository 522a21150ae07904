"""megatron-core distributed checkpoints of model weights, written and read one tensor at a time.

The on-disk format is megatron-core's ``torch_dist`` format (a
``torch.distributed.checkpoint`` directory plus ``metadata.json`` and
``common.pt``), so megatron's own ``dist_checkpointing.load`` reads it at any
TP/PP layout and reshards on load. Keys are megatron's sharded keys: decoder
layers are stacked along a leading layer axis (``decoder.layers.<rest>`` with
global shape ``[num_layers, ...]``), the pre-norms use the Transformer Engine
names, and every tensor holds the full (TP=1) canonical layout of
:mod:`megatron_lpreg.model.mapping`.

Writing never holds more than one tensor: the save plan lists one chunk per
(tensor, layer) with its shape alone, and a lazy planner produces each chunk's
data only when the writer asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.model.mapping import TE_RENAMES, all_rules, to_megatron

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@contextlib.contextmanager
def _original_errors():
    """torch.distributed.checkpoint wraps every failure in a CheckpointException;
    re-raise the first underlying one (a missing file, a failed read) as itself."""
    try:
        yield
    except CheckpointException as e:
        for failure in getattr(e, "failures", {}).values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, BaseException):
                raise exc from e
        raise


def sharded_key(canonical: str) -> tuple[str, int | None]:
    """Canonical megatron name -> (megatron sharded key, layer index or None)."""
    parts = canonical.split(".")
    if parts[:2] != ["decoder", "layers"]:
        return canonical, None
    rest = ".".join(parts[3:])
    return "decoder.layers." + TE_RENAMES.get(rest, rest), int(parts[2])


@dataclasses.dataclass
class _Chunk:
    key: str
    layer: int | None
    canonical: str
    shape: tuple[int, ...]


class _LazySavePlanner(DefaultSavePlanner):
    """A save plan from shapes alone; tensor data is fetched at write time."""

    def __init__(self, items: list[WriteItem], fetch: Callable[[MetadataIndex], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False,
                         dedup_save_to_lowest_rank=False)
        self._items = items
        self._fetch = fetch

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True) -> None:
        self.state_dict = {}
        self.storage_meta = storage_meta
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self._fetch(write_item.index)


def write_checkpoint(
    spec: ModelSpec,
    get: Callable[[str], torch.Tensor],
    out_dir: str | Path,
    *,
    padded_vocab: int,
    meta_of: Callable[[str], tuple[tuple[int, ...], torch.dtype]],
    dtype: torch.dtype | None = None,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Write the model weights held by HF tensors as a megatron-core checkpoint.

    Args:
        get: ``hf_name -> tensor``, called once per HF tensor, when its chunk is written.
        out_dir: an existing empty directory.
        padded_vocab: rows of the embedding / output layer on disk. Megatron loads
            them at any other padding (its vocab tensors allow a shape mismatch).
        meta_of: ``canonical megatron name -> (full shape, stored dtype)``, known
            without reading data (the plan is made before any tensor is read). The
            dtype is what ``get`` returns (before ``dtype`` casts it).
        dtype: cast every tensor to this dtype (default: keep).
        on_tensor: ``(canonical name, tensor)`` for each tensor as it is written
            (progress, hashing).

    Returns:
        ``{sharded key: global shape}`` of what was written.
    """
    rules = all_rules(spec)

    def build(canonical: str) -> torch.Tensor:
        t = to_megatron(spec, canonical, rules[canonical], get, padded_vocab)
        if dtype is not None:
            t = t.to(dtype)
        t = t.contiguous()
        if on_tensor is not None:
            on_tensor(canonical, t)
        return t

    chunks: dict[tuple[str, tuple[int, ...]], _Chunk] = {}
    global_shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    items = []
    for canonical in rules:
        key, layer = sharded_key(canonical)
        shape, dt = meta_of(canonical)
        dt = dtype or dt
        if layer is None:
            gshape, offsets, sizes = shape, (0,) * len(shape), shape
        else:
            gshape = (spec.num_layers, *shape)
            offsets, sizes = (layer,) + (0,) * len(shape), (1, *shape)
        if global_shapes.setdefault(key, gshape) != gshape or dtypes.setdefault(key, dt) != dt:
            raise ValueError(f"{canonical}: {dt} {shape} differs from other layers of {key}")
        chunks[(key, offsets)] = _Chunk(key, layer, canonical, shape)
        items.append(
            WriteItem(
                index=MetadataIndex(key, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=dt),
                    size=torch.Size(gshape),
                ),
            )
        )

    def fetch(index: MetadataIndex) -> torch.Tensor:
        c = chunks[(index.fqn, tuple(index.offset))]
        t = build(c.canonical)
        if tuple(t.shape) != c.shape or t.dtype != dtypes[c.key]:
            raise ValueError(
                f"{c.canonical}: got {t.dtype} {tuple(t.shape)}, planned {dtypes[c.key]} {c.shape}"
            )
        return t if c.layer is None else t.unsqueeze(0)

    out_dir = Path(out_dir)
    writer = FileSystemWriter(out_dir, single_file_per_rank=True, thread_count=1, sync_files=False)
    with _original_errors():
        dcp_save({}, storage_writer=writer, planner=_LazySavePlanner(items, fetch), no_dist=True)
    torch.save({}, out_dir / "common.pt")
    (out_dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
    return global_shapes


def load_into(model, path: str | Path, *, allow_extra: bool = False) -> None:
    """Load a checkpoint into this rank's model shard through megatron's own loader
    (resharding to the current TP/PP). Every weight must be found (``allow_extra``:
    the checkpoint may hold more, e.g. a training checkpoint's optimiser); the per-layer
    ``_extra_state`` objects (Transformer Engine metadata) are loaded when the
    checkpoint has them (megatron saved it) and otherwise left as built
    (converted checkpoints carry weights only)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored_objects = {k.split("/shard_")[0] for k in stored}

    def wanted(sh_key: str, value) -> bool:
        return not sh_key.endswith("._extra_state") or getattr(value, "key", None) in stored_objects

    sharded = {k: v for k, v in model.sharded_state_dict().items() if wanted(k, v)}
    strict = StrictHandling.ASSUME_OK_UNEXPECTED if allow_extra else StrictHandling.RAISE_ALL
    state = dist_checkpointing.load(sharded, str(path), strict=strict)
    if allow_extra:  # a training checkpoint's common state (optimiser param groups) comes back too
        state = {k: v for k, v in state.items() if k in sharded}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")


def stored_dtypes(path: str | Path) -> dict[str, torch.dtype]:
    """Sharded key -> dtype of every tensor in a checkpoint (metadata only)."""
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: v.properties.dtype for k, v in meta.items() if hasattr(v, "properties")}


def read_tensors(path: str | Path, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, full tensor) for every model weight, one at a time, in
    mapping order. Works on any checkpoint in this format, whatever TP/PP wrote it."""
    reader_meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for canonical in all_rules(spec):
        key, layer = sharded_key(canonical)
        if key not in reader_meta:
            raise KeyError(f"checkpoint {path} has no tensor {key!r} (needed for {canonical})")
        meta = reader_meta[key]
        shape = tuple(meta.size) if layer is None else tuple(meta.size)[1:]
        yield canonical, _read_region(path, key, layer, shape, meta.properties.dtype, tuple(meta.size))


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads one region (offsets, shape of ``dest``) of one stored tensor into ``dest``."""

    def __init__(self, fqn: str, offsets: tuple[int, ...], dest: torch.Tensor):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._fqn, self._offsets, self._dest = fqn, offsets, dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._dest.shape)
        md = self.metadata.state_dict_metadata[self._fqn]
        return LoadPlan(create_read_items_for_chunk_list(self._fqn, md, [chunk]))

    def resolve_tensor(self, read_item):
        view = self._dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of dest: the data is already there


def _read_region(path, key, layer, shape, dtype, gshape) -> torch.Tensor:
    """One tensor, or one layer of a stacked tensor, whatever chunks it was saved in."""
    dest = torch.empty((1, *shape) if layer is not None else shape, dtype=dtype)
    offsets = (layer,) + (0,) * len(shape) if layer is not None else (0,) * len(shape)
    planner = _RegionLoadPlanner(key, offsets, dest)
    with _original_errors():
        dcp_load({}, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)
    return dest[0] if layer is not None else dest

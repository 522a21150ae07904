"""HF safetensors <-> megatron-core distributed checkpoint, streaming one tensor at a time.

``hf_to_megatron`` reads safetensors shards tensor by tensor (memory-mapped, never
the whole model) and writes a megatron-core ``torch_dist`` checkpoint that loads at
any TP/PP layout, plus ``lpreg_meta.json`` (source config, content hash).
``megatron_to_hf`` reads any such checkpoint, also one written by a sharded
megatron model, and writes sharded safetensors with an index, ``config.json`` and
the tokenizer files. Both write into a temporary directory renamed at the end.
The command lines are ``tools/convert_hf_to_megatron.py`` and
``tools/convert_megatron_to_hf.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_lpreg.atomic_dir import atomic_directory
from megatron_lpreg.manifest import hash_files, list_files, write_manifest
from megatron_lpreg.model import checkpoint
from megatron_lpreg.model.hf_config import ModelSpec, load_spec, spec_from_hf_config
from megatron_lpreg.model.hf_shards import ConversionError, HFShards
from megatron_lpreg.model.mapping import all_rules, hf_names, hf_shapes, megatron_shape, to_hf
from megatron_lpreg.model.safetensors_io import Planned, StreamingShardWriter

META_FILE = "lpreg_meta.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------
# HF side


def check_hf_weights(spec: ModelSpec, shards: HFShards) -> None:
    """Every tensor the config implies is present with the implied shape."""
    for name, want in hf_shapes(spec).items():
        got = shards.shape(name)
        if got != want:
            raise ConversionError(
                f"config/weights mismatch: {name} has shape {got}, config.json implies {want}"
            )


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copy2(src / fname, dst / fname)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # a bar only on a terminal: redirected output (Slurm logs) gets no carriage-return lines
    return tqdm(total=total, desc=desc, unit="tensor", disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True)


class _BackgroundHasher:
    """SHA-256 of each written tensor on a worker thread (hashlib releases the GIL), so
    hashing overlaps the next tensor's read and write instead of adding to them. At most
    one tensor waits for its hash, so memory stays bounded by the tensor size."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self.pending = None
        self.hashes: dict[str, str] = {}

    def _collect(self) -> None:
        if self.pending is not None:
            name, fut = self.pending
            self.hashes[name] = fut.result()
            self.pending = None

    def submit(self, name: str, t: torch.Tensor) -> None:
        self._collect()
        data = memoryview(t.detach().contiguous().view(torch.uint8).numpy())
        self.pending = (name, self.pool.submit(lambda: hashlib.sha256(data).hexdigest()))

    def finish(self) -> dict[str, str]:
        try:
            self._collect()
        finally:
            self.pool.shutdown(wait=True)
        return self.hashes


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    check_tp: int | None = None,
    check_pp: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert; returns the metadata written to ``lpreg_meta.json``."""
    hf_dir = Path(hf_dir)
    spec = load_spec(hf_dir)
    if check_tp or check_pp:
        spec.check_parallel(check_tp or 1, check_pp or 1)
    shards = HFShards(hf_dir)
    check_hf_weights(spec, shards)
    cast = DTYPES[dtype] if dtype else None
    padded = spec.padded_vocab_size(1)  # loads at any other padding
    rules = all_rules(spec)
    shapes = hf_shapes(spec)
    bar = _progress(len(rules), "hf -> megatron", progress)
    hasher = _BackgroundHasher()

    def written_tensor(name: str, t: torch.Tensor) -> None:
        hasher.submit(name, t)
        bar.update(1)

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        try:
            written = checkpoint.write_checkpoint(
                spec,
                shards.get,
                tmp,
                padded_vocab=padded,
                dtype=cast,
                meta_of=lambda n: (megatron_shape(n, rules[n], shapes, padded), shards.dtype(hf_names(rules[n])[0])),
                on_tensor=written_tensor,
            )
        finally:
            hashes = hasher.finish()
        bar.close()
        # one digest of the content, independent of the order tensors were written in
        digest = hashlib.sha256("".join(f"{k}:{hashes[k]}\n" for k in sorted(hashes)).encode())
        meta = dict(
            format="megatron-core torch_dist (megatron-lpreg)",
            source=str(hf_dir.resolve()),
            source_files=sorted(set(shards.weight_map.values())),
            hf_config=spec.hf_config,
            padded_vocab_size=padded,
            tensors={k: list(v) for k, v in written.items()},
            content_sha256=digest.hexdigest(),
            tensor_sha256=hashes,
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        _copy_tokenizer_files(hf_dir, tmp)  # so that the reverse direction can restore them
        _write_manifest(tmp)
    return meta


# ---------------------------------------------------------------------------
# megatron side


def _find_config(ckpt_dir: Path, hf_config_dir: Path | None) -> tuple[dict, Path | None]:
    if hf_config_dir is not None:
        path = hf_config_dir / "config.json"
        if not path.is_file():
            raise ConversionError(f"{path} does not exist")
        return json.loads(path.read_text()), hf_config_dir
    meta = ckpt_dir / META_FILE
    if meta.is_file():
        return json.loads(meta.read_text())["hf_config"], ckpt_dir
    raise ConversionError(
        f"{ckpt_dir} has no {META_FILE} (not converted by this project); pass --hf-config-dir "
        "with the config.json of the model it was trained from"
    )


def megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_dir: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Convert; returns the weight map (HF tensor name -> shard file)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise ConversionError(f"{ckpt_dir} is not a megatron-core torch_dist checkpoint (no .metadata)")
    cfg, extras_dir = _find_config(ckpt_dir, Path(hf_config_dir) if hf_config_dir else None)
    spec = spec_from_hf_config(cfg)
    rules = all_rules(spec)
    cast = DTYPES[dtype] if dtype else None
    bar = _progress(len(rules), "megatron -> hf", progress)

    stored = checkpoint.stored_dtypes(ckpt_dir)
    shapes = hf_shapes(spec)
    plan = [
        Planned(hf_name, cast or stored[checkpoint.sharded_key(canonical)[0]], shapes[hf_name])
        for canonical, rule in rules.items()
        for hf_name in hf_names(rule)
    ]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writer = StreamingShardWriter(tmp, plan, max_shard_bytes)
        for canonical, full in checkpoint.read_tensors(ckpt_dir, spec):
            for hf_name, t in to_hf(spec, canonical, rules[canonical], full):
                writer.add(hf_name, t if cast is None else t.to(cast))
            bar.update(1)
        writer.close()
        bar.close()
        weight_map = writer.weight_map
        total = sum(p.nbytes for p in plan)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        out_cfg = dict(cfg)
        if cast is not None:
            out_cfg["torch_dtype"] = out_cfg["dtype"] = str(cast).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2, default=str))
        if extras_dir is not None:
            _copy_tokenizer_files(extras_dir, tmp)
        _write_manifest(tmp)
    return weight_map


def _write_manifest(tmp: Path) -> None:
    """Size and checksum of every file written, last (``tools/convert_* --verify DIR``
    checks an output against it). The files were just written, so this reads the page
    cache, not the disk."""
    write_manifest(tmp, hash_files(tmp, list_files(tmp)))

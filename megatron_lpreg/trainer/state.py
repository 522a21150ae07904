"""Training checkpoints: model, optimiser, RNG states, data position, step, atomically,
with a manifest that proves them on resume.

Layout of ``<out_dir>/checkpoints``::

    step_000010/           a complete checkpoint (renamed into place when done)
        dist/              megatron-core distributed checkpoint: model + optimiser
        trainer_state.json step, policy version, data order, bad-step count, AER state
        rng_rank<r>.pt     this rank's RNG states (tensors and ints only)
        manifest.json      every file above with its size and xxh3 checksum, written last
    step_000012.partial/   a write in progress (or a killed one): never loaded, removed at the next save
    rejected/step_000011/  a checkpoint that failed verification, moved aside (never deleted)

Every rank writes its shards into ``step_N.partial``; rank 0 writes the trainer
state; the ranks hash the files (each a share) and rank 0 writes the manifest, renames
the directory, checks the sizes, and only then prunes all but the newest
``keep_last``, so the last verified checkpoint is never deleted before the new one
has verified. A write that fails on any rank (a full disk) stops every rank with one
message; the partial directory is removed and the previous checkpoints stay. A
SIGKILL at any moment leaves either the previous complete checkpoints or the new
one, never a half one that looks complete.

On resume (:func:`resumable_checkpoint`) the newest checkpoint is verified against
its manifest (``train.verify_checkpoint``: ``full`` checksums, ``sizes``, ``off``); one
that fails is moved to ``rejected/`` with a line naming the file and the reason, and
the next newest is tried. Checkpoints written before manifests existed are accepted
with a warning. Loading uses megatron's ``dist_checkpointing.load``
(resharding-capable) and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lpreg.collectives import all_gather_object, barrier, broadcast_object
from megatron_lpreg.manifest import (
    MANIFEST,
    ManifestError,
    check_files,
    hash_files,
    list_files,
    read_manifest,
    write_manifest,
)
from megatron_lpreg.model.forward import unwrap
from megatron_lpreg.trainer.optim import (
    DIST_OPTIM_SHARDING,
    checkpoint_metadata,
    has_state,
    is_distributed,
    prime_state,
    restore_step_counts,
)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python_version": py[0],
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2] if py[2] is not None else float("nan"),
        "numpy": _numpy_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()),
                     None if gauss != gauss else gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded(model, optimizer, is_loading: bool, *, with_optimizer: bool = True) -> dict:
    """megatron's sharded state dict of the model (and the optimiser); the optimiser part
    only after the first update: before it Adam holds no moments, and megatron's
    DistributedOptimizer (without TE or apex) cannot even describe its empty state."""
    # the bare GPTModel's keys: a checkpoint must not depend on the DDP wrapper
    model_sd = unwrap(model).sharded_state_dict()
    out = {"model": model_sd}
    if with_optimizer:
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                        metadata=checkpoint_metadata(optimizer))
    return out


class CheckpointError(RuntimeError):
    pass


def _on_every_rank(what: str, fn):
    """Run ``fn`` on every rank; if it raised anywhere, every rank raises one
    :class:`CheckpointError` naming the rank and the error (no rank is left waiting in a
    collective). Returns ``fn``'s result."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported below, on every rank
        error = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
    errors = all_gather_object(error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {failed[0]}")
    return result


def save_checkpoint(out_dir, step: int, model, optimizer, trainer_state: dict, *, keep_last: int,
                    manifest: bool = True) -> Path:
    """Every rank calls this. Returns the final checkpoint path; raises
    :class:`CheckpointError` on every rank if a write failed anywhere (the previous
    checkpoints are then untouched). ``manifest=False`` only for measuring its cost."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.partial"
    rank, world = dist.get_rank(), dist.get_world_size()

    def prepare():
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "dist").mkdir(parents=True)

    # what load_checkpoint must ask for: the optimiser's part exists only after an update
    saved = {"optimizer": has_state(optimizer), "optimizer_sharding": DIST_OPTIM_SHARDING if
             is_distributed(optimizer) else None, "data_parallel_size": parallel_state.get_data_parallel_world_size()}

    def write():
        dist_checkpointing.save(_sharded(model, optimizer, False, with_optimizer=saved["optimizer"]),
                                str(tmp / "dist"))
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump({**trainer_state, "checkpoint": saved}, f, indent=1)

    try:
        # each phase ends in a collective that every rank reaches, failed or not
        _on_every_rank(f"preparing checkpoint step {step}", prepare)
        _on_every_rank(f"saving checkpoint step {step}", write)
        if manifest:
            names = broadcast_object(list_files(tmp) if rank == 0 else None)
            mine = _on_every_rank(f"hashing checkpoint step {step}", lambda: hash_files(tmp, names[rank::world]))
            shares = all_gather_object(mine)
    except CheckpointError as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in _complete(root)]
        raise CheckpointError(f"{e}; the partial checkpoint was removed, the previous ones are intact: "
                              f"{kept or 'none'}") from None
    problems = None
    if rank == 0:
        entries = {}
        if manifest:
            for share in shares:
                entries.update(share)
            write_manifest(tmp, entries)
        if final.exists():  # a complete checkpoint of the same step (a re-run): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        problems = check_files(final, entries, checksums=False)
        if not problems:  # never prune before the new checkpoint has verified
            _prune(root, keep_last)
    problems = broadcast_object(problems)
    if problems:
        raise CheckpointError(f"checkpoint {final} does not verify right after writing: {problems[0]}")
    return final


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    return [p for _, p in steps if (p / "trainer_state.json").exists()]


def _prune(root: Path, keep_last: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: Path, mode: str) -> list[str]:
    """Every rank calls this: problems of the checkpoint at ``path`` against its manifest
    (sizes on rank 0; with ``full`` each rank checksums a share of the files). ``[]``:
    verified. A checkpoint without a manifest (older than manifests) passes."""
    if mode == "off":
        return []
    rank, world = dist.get_rank(), dist.get_world_size()
    entries = None
    if rank == 0:
        try:
            entries = read_manifest(path)
        except ManifestError as e:
            entries = str(e)
    entries = broadcast_object(entries)
    if entries is None:
        return []
    if isinstance(entries, str):
        return [entries]
    sizes = broadcast_object(check_files(path, entries, checksums=False) if rank == 0 else None)
    if sizes or mode == "sizes":
        return sizes
    names = sorted(entries)[rank::world]
    found = all_gather_object(check_files(path, {n: entries[n] for n in names}, checksums=True))
    return [p for share in found for p in share]


def resumable_checkpoint(out_dir, mode: str = "full", log=print) -> Path | None:
    """Every rank calls this. The newest complete checkpoint that verifies (``mode``: see
    :func:`verify_checkpoint`); each newer one that fails is moved to
    ``checkpoints/rejected/`` (rank 0) with one line naming the file and the reason.
    None when there is no checkpoint; :class:`CheckpointError` when none verifies."""
    root = checkpoint_root(out_dir)
    candidates = broadcast_object([str(p) for p in reversed(_complete(root))] if dist.get_rank() == 0 else None)
    rejected = []
    for c in map(Path, candidates):
        problems = verify_checkpoint(c, mode)
        if not problems:
            if dist.get_rank() == 0 and mode != "off" and not (c / MANIFEST).exists():
                log(f"checkpoint {c.name} has no manifest (written before manifests): loading it unverified")
            return c
        rejected.append(f"{c.name}: {problems[0]}")
        if dist.get_rank() == 0:
            aside = root / "rejected" / c.name
            n = 1
            while aside.exists():
                aside, n = root / "rejected" / f"{c.name}.{n}", n + 1
            aside.parent.mkdir(exist_ok=True)
            c.rename(aside)
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            log(f"checkpoint {c.name} fails verification: {problems[0]}{more}; moved to {aside}, "
                "trying the previous one")
        barrier()
    if candidates:
        raise CheckpointError(f"no checkpoint in {root} verifies ({'; '.join(rejected)}); they are in "
                              f"{root / 'rejected'}; restore a good copy there or start with a new train.out_dir")
    return None


def _check_same_optimizer_layout(path: Path, saved: dict, optimizer) -> None:
    """A distributed optimiser's dp_reshardable state resumes at the data-parallel size and
    optimiser kind it was written with: say so in one line instead of a resharding error."""
    dp = parallel_state.get_data_parallel_world_size()
    sharding = DIST_OPTIM_SHARDING if is_distributed(optimizer) else None
    if saved.get("optimizer_sharding", None) != sharding:
        raise CheckpointError(
            f"checkpoint {path.name} holds a {'distributed' if saved.get('optimizer_sharding') else 'plain'} "
            f"optimiser's state and this run uses a {'distributed' if sharding else 'plain'} one: set "
            f"optim.use_distributed_optimizer as the run that wrote it did")
    if sharding and saved.get("data_parallel_size", dp) != dp:
        raise CheckpointError(
            f"checkpoint {path.name} holds the distributed optimiser's state for data-parallel size "
            f"{saved['data_parallel_size']}; this run has {dp}: resume with TP x PP x {saved['data_parallel_size']} "
            f"ranks, as the run that wrote it")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimiser and this rank's RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    with open(path / "trainer_state.json") as f:
        trainer_state = json.load(f)
    # checkpoints written before this record: the optimiser's part came with every update
    saved = trainer_state.pop("checkpoint", {"optimizer": trainer_state["step"] > 0})
    if saved["optimizer"]:
        _check_same_optimizer_layout(path, saved, optimizer)
        prime_state(optimizer)
    # without the optimiser's part a fresh optimiser is exactly the saved state (no moments yet)
    sharded = _sharded(model, optimizer, True, with_optimizer=saved["optimizer"])
    state = dist_checkpointing.load(sharded, str(path / "dist"))
    unwrap(model).load_state_dict(state["model"])
    if saved["optimizer"]:
        with torch.no_grad():  # megatron's fp32 main params are views of the weights: copy_ into them
            optimizer.load_state_dict(state["optimizer"])
        restore_step_counts(optimizer, state["optimizer"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer_state

"""Training checkpoints: model, optimiser, RNG states, data position, step, atomically.

Layout of ``<out_dir>/checkpoints``::

    step_000010/           a complete checkpoint (renamed into place when done)
        dist/              megatron-core distributed checkpoint: model + optimiser
        trainer_state.json step, policy version, data order, bad-step count, AER state
        rng_rank<r>.pt     this rank's RNG states (tensors and ints only)
    step_000012.partial/   a write in progress (or a killed one): never loaded

Every rank writes its shards into ``step_N.partial``; after a barrier rank 0
writes the trainer state and renames the directory, then prunes all but the
newest ``keep_last``. A SIGKILL at any moment leaves either the previous
complete checkpoints or the new one, never a half one that looks complete.
Loading uses megatron's ``dist_checkpointing.load`` (resharding-capable) and
``torch.load(weights_only=True)``.
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

from megatron_lpreg.model.forward import unwrap

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, p in reversed(steps):
        if (p / "trainer_state.json").exists():
            return p
    return None


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


def _sharded(model, optimizer, is_loading: bool) -> dict:
    # the bare GPTModel's keys: a checkpoint must not depend on the DDP wrapper
    model_sd = unwrap(model).sharded_state_dict()
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading)}


def save_checkpoint(out_dir, step: int, model, optimizer, trainer_state: dict, *, keep_last: int) -> Path:
    """Every rank calls this. Returns the final checkpoint path."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.partial"
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dist").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(model, optimizer, False), str(tmp / "dist"))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(trainer_state, f, indent=1)
        if final.exists():  # a complete checkpoint of the same step (a re-run): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimiser and this rank's RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded(model, optimizer, True), str(path / "dist"))
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    with open(path / "trainer_state.json") as f:
        return json.load(f)

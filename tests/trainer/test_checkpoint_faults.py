"""Checkpoint faults on two gloo ranks (TP=2) with a real megatron model and optimiser:
each fault ends with the resume falling back to the last good checkpoint, or a clean
stop, and nothing already saved lost."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.rollout.tiny_model import CONFIG


def _setup(out):
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = RunConfig()
    model = wrap_ddp(build_gpt(spec_from_hf_config(CONFIG)), cfg)
    opt = make_optimizer(model, cfg.optim)
    tokens = torch.arange(1, 9).unsqueeze(0)  # one step, so the optimiser has state to save
    model(tokens, torch.arange(8).unsqueeze(0), None).float().mean().backward()
    model.finish_grad_sync()
    opt.step()
    return model, opt


def _save(out, step, model, opt, keep_last=5):
    from megatron_lpreg.trainer.state import save_checkpoint

    with torch.no_grad():  # each step's weights differ
        next(model.parameters()).add_(1.0)
    return save_checkpoint(out, step, model, opt, {"step": step}, keep_last=keep_last)


def _corrupt(path, fault):
    """Rank 0 damages one file of the checkpoint at ``path``."""
    victim = sorted((path / "dist").glob("*.distcp"))[-1]
    if fault == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif fault == "flipped_byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif fault == "missing_rank_file":
        (path / "rng_rank1.pt").unlink()
    elif fault == "no_manifest":
        (path / "manifest.json").unlink()
    return victim.name


CASES = [  # fault, verify mode, whether the resume must fall back to step 1
    ("truncated", "full", True), ("truncated", "sizes", True), ("flipped_byte", "full", True),
    ("flipped_byte", "sizes", False), ("missing_rank_file", "sizes", True), ("no_manifest", "full", False),
]


def _fallback(root):
    """Every case in one pair of ranks: save steps 1 and 2, damage step 2, resume."""
    import torch.distributed as dist

    from megatron_lpreg.trainer.state import load_checkpoint, resumable_checkpoint

    model, opt = _setup(root)
    out = {"rng": _rng_round_trip(root / "rng", model, opt)}
    for i, (fault, mode, _) in enumerate(CASES):
        run = root / f"case{i}"
        _save(run, 1, model, opt)
        _save(run, 2, model, opt)
        victim = _corrupt(run / "checkpoints" / "step_000002", fault) if dist.get_rank() == 0 else None
        dist.barrier()
        lines = []
        chosen = resumable_checkpoint(run, mode, log=lines.append)
        state = load_checkpoint(chosen, model, opt)  # the chosen one loads
        rejected = run / "checkpoints" / "rejected"
        out[i] = {"chosen": chosen.name, "lines": lines, "victim": victim, "state": state,
                  "rejected": sorted(p.name for p in rejected.glob("*")) if rejected.exists() else []}
    return out


def _draws() -> dict:
    """One draw from every generator a step may consume: torch's, Python's, numpy's and
    megatron's tensor-parallel tracker (per TP rank)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return {"torch": torch.rand(4), "python": random.random(), "numpy": float(np.random.rand()), "tracker": tracker}


def _rng_round_trip(run, model, opt):
    """Save a checkpoint, draw from every generator, load it: the draws after the load
    repeat the ones after the save (the resume continues the generators, not a reseed)."""
    from megatron_lpreg.trainer.state import load_checkpoint

    _draws()  # away from the seeds' states
    path = _save(run, 1, model, opt)
    after_save = _draws()
    _draws()
    load_checkpoint(path, model, opt)
    return after_save, _draws()


@pytest.fixture(scope="module")
def fallbacks(tmp_path_factory):
    return run_ranks(_fallback, Layout(tp=2), tmp_path_factory.mktemp("faults"), timeout=600)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumed(fallbacks, case):
    fault, mode, falls_back = CASES[case]
    r = fallbacks[0][case]
    if not falls_back:  # sizes cannot see a flipped byte; a checkpoint older than manifests is trusted
        assert r["chosen"] == "step_000002" and r["rejected"] == []
        if fault == "no_manifest":
            assert r["lines"] == ["checkpoint step_000002 has no manifest (written before manifests): "
                                  "loading it unverified"]
        return
    assert [x[case]["chosen"] for x in fallbacks] == ["step_000001"] * 2 and r["state"] == {"step": 1}
    assert r["rejected"] == ["step_000002"]  # moved aside, not deleted
    assert len(r["lines"]) == 1
    line = r["lines"][0]
    name = "rng_rank1.pt" if fault == "missing_rank_file" else f"dist/{r['victim']}"
    assert line.startswith(f"checkpoint step_000002 fails verification: {name}: ") and "moved to" in line
    assert {"truncated": "truncated", "flipped_byte": "checksum differs", "missing_rank_file": "missing"}[fault] in line


def test_a_loaded_checkpoint_restores_every_generator_of_its_rank(fallbacks):
    for r in fallbacks:
        after_save, after_load = r["rng"]
        assert after_save.keys() == after_load.keys()
        for name in after_save:
            assert torch.equal(torch.as_tensor(after_load[name]), torch.as_tensor(after_save[name])), name
    # the tracker differs per TP rank: each rank must load its own file
    assert not torch.equal(fallbacks[0]["rng"][0]["tracker"], fallbacks[1]["rng"][0]["tracker"])


def _none_verifies(out):
    import torch.distributed as dist

    from megatron_lpreg.trainer.state import CheckpointError, resumable_checkpoint

    model, opt = _setup(out)
    _save(out, 1, model, opt)
    if dist.get_rank() == 0:
        _corrupt(out / "checkpoints" / "step_000001", "truncated")
    dist.barrier()
    try:
        resumable_checkpoint(out, "full", log=lambda m: None)
    except CheckpointError as e:
        return str(e)
    return None


def test_no_checkpoint_verifies_stops_with_a_clear_message(tmp_path):
    msg = run_ranks(_none_verifies, Layout(tp=2), tmp_path / "run", timeout=300)[0]
    assert msg.startswith(f"no checkpoint in {tmp_path / 'run' / 'checkpoints'} verifies (step_000001: dist/")
    assert "restore a good copy" in msg and (tmp_path / "run" / "checkpoints" / "rejected" / "step_000001").is_dir()


def _disk_full_during_save(out):
    import torch.distributed as dist

    from megatron_lpreg.trainer.state import CheckpointError, resumable_checkpoint

    model, opt = _setup(out)
    _save(out, 1, model, opt)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if dist.get_rank() == 1 and "rng_rank" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    torch.save = full_disk
    try:
        _save(out, 2, model, opt)
        msg = None
    except CheckpointError as e:
        msg = str(e)
    finally:
        torch.save = real_save
    dist.barrier()
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    return msg, left, resumable_checkpoint(out, "full", log=lambda m: None).name


def test_a_full_disk_during_save_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    res = run_ranks(_disk_full_during_save, Layout(tp=2), tmp_path / "run", timeout=300)
    for msg, left, resumable in res:
        assert msg.startswith("saving checkpoint step 2 failed on 1 rank(s): rank 1: OSError: [Errno 28] No space")
        assert "the previous ones are intact: ['step_000001']" in msg
        assert left == ["step_000001"] and resumable == "step_000001"  # no .partial left behind


def _partial_and_keep_last(out):
    import torch.distributed as dist

    from megatron_lpreg.trainer import state

    model, opt = _setup(out)
    _save(out, 1, model, opt, keep_last=1)
    root = out / "checkpoints"
    if dist.get_rank() == 0:  # what a SIGKILL during the next save leaves
        shutil.copytree(root / "step_000001", root / "step_000002.partial")
        _corrupt(root / "step_000002.partial", "truncated")
    dist.barrier()
    chosen = state.resumable_checkpoint(out, "full", log=lambda m: None).name
    # a new checkpoint that fails its own check after the rename must not prune the last good one
    real = state.check_files
    state.check_files = lambda *a, **k: ["dist/x.distcp: 1 bytes, the manifest says 2"]
    try:
        _save(out, 2, model, opt, keep_last=1)
        err = None
    except state.CheckpointError as e:
        err = str(e)
    finally:
        state.check_files = real
    dist.barrier()
    after_bad = sorted(p.name for p in root.iterdir())
    _save(out, 3, model, opt, keep_last=1)
    return chosen, err, after_bad, sorted(p.name for p in root.iterdir())


def test_leftover_partial_is_ignored_and_keep_last_waits_for_verification(tmp_path):
    chosen, err, after_bad, final = run_ranks(_partial_and_keep_last, Layout(tp=2), tmp_path / "run", timeout=300)[0]
    assert chosen == "step_000001"
    assert err.startswith("checkpoint") and "does not verify right after writing" in err
    assert after_bad == ["step_000001", "step_000002"]  # the last verified one stays
    assert final == ["step_000003"]  # keep_last=1 once the new one verifies; the .partial is gone


def _one_save(out):
    model, opt = _setup(out)
    return _save(out, 1, model, opt)


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    from megatron_lpreg.manifest import file_checksum, list_files, read_manifest, verify_dir

    path = run_ranks(_one_save, Layout(tp=2), tmp_path / "run", timeout=300)[0]
    entries = read_manifest(path)
    assert sorted(entries) == list_files(path)
    assert {"trainer_state.json", "rng_rank0.pt", "rng_rank1.pt", "dist/.metadata"} <= set(entries)
    for name, e in entries.items():
        assert e["size"] == (path / name).stat().st_size and e["xxh3"] == file_checksum(path / name)
    assert verify_dir(path, "full") == []

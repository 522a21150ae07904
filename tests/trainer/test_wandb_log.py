"""W&B logging (``logging.wandb``) in offline mode, read back from the run files W&B
writes (``<out_dir>/wandb/offline-run-*/run-<id>.wandb``): the run's config is the
resolved run config, every step's metrics are in its history, and a resumed training
run continues the same W&B run (the id from the checkpoint). No network: offline."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from megatron_lpreg.config import load_config
from megatron_lpreg.preflight import UserError, check_run
from tests.trainer.runs import CONFIG, run_training

wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Nothing reaches W&B's servers, nothing is written outside tmp."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def read_wandb_file(path: Path) -> list:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log records (4-byte checksum, 2-byte length, 1-byte type: full, first,
    middle, last) in 32 KiB blocks, each payload a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _checksum, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full or last
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def offline_runs(root: Path) -> list[dict]:
    """Each offline run under ``root/wandb`` in start order: id, project, name, config
    (top-level key -> value) and history rows (key -> value)."""
    runs = []
    for d in sorted((root / "wandb").glob("offline-run-*")):
        recs = read_wandb_file(next(d.glob("run-*.wandb")))
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        config = {i.key: json.loads(i.value_json) for i in run.config.update if i.key != "_wandb"}
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in recs if r.WhichOneof("record_type") == "history"]
        runs.append({"id": run.run_id, "project": run.project, "name": run.display_name, "config": config,
                     "history": history})
    return runs


def test_a_run_logs_config_and_steps_and_continues_under_its_id(tmp_path):
    from megatron_lpreg.trainer.wandb_log import WandbRun

    cfg = load_config(CONFIG, ["logging.wandb.project=lpreg-test", "logging.wandb.run_name=tiny",
                               "logging.wandb.mode=offline", "algo.kl_coef=0.5"])
    first = WandbRun(cfg, tmp_path, "abc12345")
    assert first.location.startswith(str(tmp_path / "wandb" / "offline-run-"))
    for step in (1, 2):
        first.log({"step": step, "reward/mean": 0.25 * step, "note": "not a number", "x": float("nan")})
    first.close()
    time.sleep(1.1)  # W&B names a piece's folder by the second it starts in
    second = WandbRun(cfg, tmp_path, "abc12345")  # as a resumed training run does
    second.log({"step": 3, "reward/mean": 0.75})
    second.close()
    # a training process's exit ends W&B's service, which is what finishes its files: under
    # load the service can still be writing a finished run's records when finish() returns
    wandb.teardown()

    runs = offline_runs(tmp_path)
    assert [r["id"] for r in runs] == ["abc12345", "abc12345"]
    assert runs[0]["project"] == "lpreg-test" and runs[0]["name"] == "tiny"
    assert runs[0]["config"] == json.loads(json.dumps(cfg.to_dict()))  # the resolved config, every section
    assert runs[0]["config"]["algo"]["kl_coef"] == 0.5
    steps = [(h["step"], h["reward/mean"]) for r in runs for h in r["history"]]
    assert steps == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert all("note" not in h and "x" not in h for r in runs for h in r["history"])


def test_missing_wandb_package_is_one_line_before_any_rank(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(CONFIG, ["logging.wandb.project=p"])
    with pytest.raises(UserError, match=r"^logging.wandb.project is set but the wandb package is not installed"):
        check_run(cfg)


@pytest.mark.slow
def test_a_training_run_resumes_into_the_same_wandb_run(tmp_path):
    """Two steps, then two more from the checkpoint: one W&B run id in both pieces, the
    same as the checkpoint's, and the four steps' rewards equal metrics.jsonl's."""
    from megatron_lpreg.data.tiny_task import write_task
    from megatron_lpreg.trainer.metrics import read_metrics

    task = write_task(tmp_path / "task", train_rows=100)
    out = tmp_path / "run"
    wb = ["logging.wandb.project=lpreg-test", "logging.wandb.mode=offline", "warm_start.steps=10"]
    run_training(out, task, "train.steps=2", *wb)
    run_training(out, task, "train.steps=4", *wb)

    runs = offline_runs(out)
    state = json.loads(sorted((out / "checkpoints").glob("step_*"))[-1].joinpath("trainer_state.json").read_text())
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] == state["wandb_run_id"]
    assert runs[1]["config"]["train"]["steps"] == 4
    logged = {h["step"]: h["reward/mean"] for r in runs for h in r["history"]}
    assert logged == {r["step"]: r["reward/mean"] for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(logged) == [1, 2, 3, 4]

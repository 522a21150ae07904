"""``python -m megatron_lpreg.diagnose`` (``docs/diagnose.md``): its options, the directory it
refuses, and a real run on the tiny task through the launcher's local mode whose numbers
equal the trainer's own Lp-Reg metrics for the same batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg import diagnose

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu.yaml"


def test_diagnose_options_from_flags_and_overrides():
    args = diagnose.parse_args(["--config", "x.yaml", "--batches", "2", "diagnose.drift_updates=3", "algo.loss=grpo"])
    opts, rest = diagnose.split_options(args)
    assert opts == {"batches": 2, "drift_updates": 3} and rest == ["algo.loss=grpo"]
    with pytest.raises(ValueError, match="diagnose.batches"):
        diagnose.split_options(diagnose.parse_args(["--config", "x", "diagnose.batchez=1"]))
    with pytest.raises(ValueError, match=">= 1"):
        diagnose.split_options(diagnose.parse_args(["--config", "x", "--batches", "0"]))


@pytest.mark.parametrize("content", ["checkpoints", "metrics.jsonl"])
def test_diagnose_refuses_a_run_directory(tmp_path, capsys, content):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True) if content == "checkpoints" else (
        run.mkdir(), (run / content).write_text("{}\n"))
    assert diagnose.main(["--config", str(CONFIG), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run" in err[0] and "--out" in err[0]
    assert sorted(p.name for p in run.iterdir()) == [content]  # nothing written there


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The tiny task, diagnosed through ``python -m launch tiny_cpu --executor local --diagnose``
    with one drift update (the trainer's own update, discarded) on 2 mini-batches."""
    pytest.importorskip("vllm")
    from megatron_lpreg.data.tiny_task import write_task

    task = write_task(tmp_path_factory.mktemp("task"), train_rows=300)
    job = tmp_path_factory.mktemp("job")
    cmd = [sys.executable, "-m", "launch", "tiny_cpu", "--executor", "local", "--diagnose", "--out-dir", str(job),
           f"model.hf_dir={task / 'model'}", f"data.train_path={task / 'train.jsonl'}",
           "warm_start.steps=40", "warm_start.batch_size=32", "rollout.prompts_per_step=8", "rollout.n=4",
           "rollout.max_new_tokens=6", "algo.mini_batches=2", "algo.neg_percent=0.5", "reward.workers=1",
           "diagnose.drift_updates=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return job, proc.stdout, json.loads((job / "diagnose" / diagnose.REPORT).read_text())


def test_diagnose_runs_through_the_launcher_and_writes_no_checkpoint(launched):
    job, stdout, report = launched
    assert not [p for p in job.rglob("checkpoints")]
    assert not (job / "metrics.jsonl").exists()
    assert "pull/|A|" in stdout and "Lp-Reg" in report["placement"] and report["placement"] in stdout
    b = report["batches"][0]
    assert 0.0 <= b["accuracy"] <= 1.0 and b["responses"] == 32
    on = b["on_policy"]
    assert on["tokens"] > on["negative_tokens"] > 0 and on["selected"] >= on["regularised"] > 0
    assert len(on["mini_batches"]) == 2
    q = on["quantiles"]
    assert q["S_K"]["n"] == on["regularised"] and 0 < q["S_K"]["q50"] <= 1
    # on-policy k3: pull = beta (1/S_K - 1) on every regularised token
    assert q["pull"]["mean"] == pytest.approx(on["pull_sum"] / on["regularised"])


def test_diagnose_equals_the_trainers_own_metrics_for_the_same_batch(launched):
    """The first drift update is the trainer's own update of the first mini-batch at the
    weights that sampled it (on-policy): its logged Lp-Reg metrics are the diagnostic's
    numbers for that mini-batch."""
    _, _, report = launched
    b = report["batches"][0]
    mine = b["on_policy"]["mini_batches"][0]
    trainer = b["drift"]["trainer_updates"][0]
    # The trainer compares the update's own forward log-probs with the old policy's threshold
    # (the k-th lowest old log-prob): its micro-batches pad differently from the old-policy
    # pass, so float noise can move the one token that sits at the threshold across it.
    # Anything else (a missed mini-batch cut, a wrong pull) moves more than that token.
    flips = abs(trainer["lp_reg/selected_tokens"] - mine["selected"])
    assert flips <= 1, (trainer, mine)
    assert abs(trainer["lp_reg/regularised_tokens"] - mine["regularised"]) <= flips
    if flips == 0:
        assert trainer["lp_reg/regularised_tokens"] == mine["regularised"]
        assert trainer["lp_reg/pull_sum"] == pytest.approx(mine["pull_sum"], rel=1e-4, abs=1e-6)
        assert trainer["lp_reg/adv_abs_on_regularised_sum"] == pytest.approx(mine["adv_abs_sum"], rel=1e-5)
    else:  # one token's share at most: k3's pull is below beta (1/0.073 - 1) < 13 before its
        # clamp, and a GRPO advantage in a group of 8 is at most sqrt(7) < 3 in size
        assert abs(trainer["lp_reg/pull_sum"] - mine["pull_sum"]) < 13.0
        assert abs(trainer["lp_reg/adv_abs_on_regularised_sum"] - mine["adv_abs_sum"]) < 3.0
    # and after the update the report is the off-policy one: ratios away from 1
    after = b["drift"]["after"]
    assert after["quantiles"]["ratio"] is None or after["quantiles"]["ratio"]["q90"] != 1.0

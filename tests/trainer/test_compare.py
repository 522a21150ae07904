"""The method comparison driver, short: every method runs, produces metrics, and the
comparison plot and table are written. No assertion on which method wins."""

from __future__ import annotations

import pytest

from megatron_lpreg.data.tiny_task import write_task
from tests.trainer.runs import FAST, ROOT, metrics, task_overrides

pytest.importorskip("vllm")


def test_short_comparison(tmp_path):
    from tools.compare_methods import main

    task = write_task(tmp_path / "task", train_rows=200)
    out = tmp_path / "cmp"
    rc = main(["--spec", str(ROOT / "examples" / "compare_tiny_cpu.yaml"), "--out", str(out), "--steps", "2",
               *task_overrides(task), *FAST, "warm_start.steps=20"])
    assert rc == 0
    methods = ["grpo", "entropy_bonus", "80_20", "aer", "dapo", "lp_reg"]
    for m in methods:
        recs = metrics(out / m)
        assert [r["step"] for r in recs] == [1, 2]
        assert all("reward/mean" in r and "actor/entropy" in r for r in recs)
    assert all("aer/alpha" in r for r in metrics(out / "aer"))
    assert all("rollout/sampling_rounds" in r and "reward/overlong_penalty_mean" in r for r in metrics(out / "dapo"))
    png = out / "comparison.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    table = (out / "summary.md").read_text()
    for m in methods:
        assert f"| {m} | reward/mean |" in table

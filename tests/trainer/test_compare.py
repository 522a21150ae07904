"""The method comparison driver, short: every method of the spec is a valid run (the
checks before ranks start), two of them train, produce metrics, and the comparison plot
and table are written. No assertion on which method wins."""

from __future__ import annotations

import math

import pytest

from megatron_lpreg.data.tiny_task import write_task
from tests.trainer.runs import FAST, ROOT, metrics, task_overrides

pytest.importorskip("vllm")


def test_every_method_of_the_tiny_spec_passes_the_run_checks(tmp_path):
    """Each method's overrides on the spec's base (with the tiny task) load and pass every
    check a run makes before its ranks start; a misspelt key or a value out of range fails."""
    from megatron_lpreg.config import ConfigError, load_config
    from megatron_lpreg.preflight import UserError, check_run
    from tools.compare_methods import load_spec

    spec = load_spec(ROOT / "examples" / "compare_tiny_cpu.yaml")
    task = write_task(tmp_path / "task", train_rows=20)
    assert set(spec["methods"]) == {"grpo", "entropy_bonus", "80_20", "aer", "dapo", "lp_reg"}
    for overrides in spec["methods"].values():
        cfg = load_config(ROOT / spec["base"], [*spec["common"], *task_overrides(task), *overrides])
        check_run(cfg, world_size=cfg.parallel.tp)
    with pytest.raises(ConfigError, match="algo.entropy_coef"):
        load_config(ROOT / spec["base"], [*task_overrides(task), "algo.entropy_coef=-1"])
    with pytest.raises(UserError, match="model.hf_dir"):
        check_run(load_config(ROOT / spec["base"], [*task_overrides(task), f"model.hf_dir={tmp_path}/none"]), 2)


def test_short_comparison(tmp_path):
    from tools.compare_methods import main

    task = write_task(tmp_path / "task", train_rows=200)
    out = tmp_path / "cmp"
    # the others: AER and DAPO train in tests/trainer/test_resume.py, the bonus and 80/20 in test_update.py
    methods = ["grpo", "lp_reg"]
    rc = main(["--spec", str(ROOT / "examples" / "compare_tiny_cpu.yaml"), "--out", str(out), "--steps", "2",
               "--methods", ",".join(methods), *task_overrides(task), *FAST, "warm_start.steps=20"])
    assert rc == 0
    for m in methods:
        recs = metrics(out / m)
        assert [r["step"] for r in recs] == [1, 2]
        assert all("reward/mean" in r and "actor/entropy" in r for r in recs)
    png = out / "comparison.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    table = (out / "summary.md").read_text()
    for m in methods:
        assert f"| {m} | reward/mean |" in table


def test_coin_study_smoke(tmp_path, capsys):
    """The issue-17 study's spec, 2 steps, 2 methods (one per arm: on-policy GRPO,
    off-policy Lp-Reg) x 2 seeds, on a coin task with a token warm start: every run records
    the precondition and held-out metrics, and the summary gives mean and std over the seeds."""
    import json

    import yaml

    from megatron_lpreg.data.coin_task import write_task as write_coin_task
    from tools.compare_methods import main

    task = write_coin_task(tmp_path / "coins", train_rows=100, warm_steps=10, warm_batch=8, log=lambda *_: None)
    out = tmp_path / "study"
    rc = main(["--spec", str(ROOT / "examples" / "compare_coin_cpu.yaml"), "--out", str(out), "--steps", "2",
               "--methods", "grpo,off_lp_reg", "--seeds", "1,2", f"model.hf_dir={task / 'model'}",
               f"data.train_path={task / 'train.jsonl'}", f"eval.data_dir={task}", "eval.every_n_steps=2",
               "eval.k=2", "eval.limit=4", "rollout.prompts_per_step=8", "rollout.n=4", "reward.workers=1",
               "train.save_every=2"])
    assert rc == 0
    for m in ("grpo", "off_lp_reg"):
        for seed in (1, 2):
            recs = metrics(out / m / f"seed{seed}")
            assert [r["step"] for r in recs] == [1, 2]
            assert all("sparks/in_proxy_lt_0.1" in r and "sparks/lowest_neg_in_proxy" in r for r in recs)
            assert "eval/coins_heldout/pass@k" in recs[-1] and "eval/coins_heldout/strategies" in recs[-1]
    rows = {(r["label"], r["metric"]): r for r in json.loads((out / "summary.json").read_text())}
    r = rows[("grpo", "reward/mean")]
    assert r["n"] == 2 and len(r["values"]) == 2 and abs(r["mean"] - sum(r["values"]) / 2) < 1e-12
    assert ("off_lp_reg", "actor/lp_reg/regularised_share") in rows
    for m, steps in (("grpo", 1), ("off_lp_reg", 4)):  # the arms differ in optimiser steps per batch
        assert yaml.safe_load((out / m / "seed1" / "config.yaml").read_text())["algo"]["mini_batches"] == steps
    for arm in ("on_policy", "off_policy"):  # the spec's figures, each drawn with the methods present
        assert (out / f"comparison_{arm}.png").read_bytes()[:4] == b"\x89PNG"
    wide = (out / "summary.md").read_text().split("\n\n")[1].splitlines()
    assert wide[0].startswith("| method (end, mean ± std over seeds) | eval/coins_heldout/avg@k |")
    assert [w.split(" | ")[0] for w in wide[2:]] == ["| grpo", "| off_lp_reg"]
    assert math.isclose(r["start_mean"], sum(r["start_values"]) / 2)
    # the spec's baseline: each method's end value minus GRPO's at the same seed
    paired = {(d["label"], d["metric"]): d for d in json.loads((out / "paired.json").read_text())}
    d, o = paired[("off_lp_reg", "reward/mean")], rows[("off_lp_reg", "reward/mean")]
    assert d["n"] == 2 and d["values"] == [a - b for a, b in zip(o["values"], r["values"], strict=True)]
    assert not any(label == "grpo" for label, _ in paired)
    rc = main(["--spec", str(ROOT / "examples" / "compare_coin_cpu.yaml"), "--out", str(out), "--summarize"])
    assert rc == 0 and rows == {(r["label"], r["metric"]): r for r in json.loads((out / "summary.json").read_text())}
    # the docs' tables: one table printed, nothing written; and printed again from an export
    # that keeps only the step and the spec's metrics
    tables = (out / "summary.md").read_text().rstrip("\n").split("\n\n")
    spec = ["--spec", str(ROOT / "examples" / "compare_coin_cpu.yaml"), "--summarize"]
    (out / "summary.md").unlink()
    for name, table in (("long", tables[0]), ("wide", tables[1]), ("paired", tables[2])):
        capsys.readouterr()
        assert main([*spec, "--out", str(out), "--markdown", name]) == 0
        assert capsys.readouterr().out == table + "\n"
    assert not (out / "summary.md").exists()
    assert main([*spec, "--out", str(out), "--export", str(tmp_path / "kept")]) == 0
    kept = metrics(tmp_path / "kept" / "grpo" / "seed2")
    assert [r["step"] for r in kept] == [1, 2] and set(kept[0]) < set(metrics(out / "grpo" / "seed2")[0])
    capsys.readouterr()
    assert main([*spec, "--out", str(tmp_path / "kept"), "--markdown", "paired"]) == 0
    assert capsys.readouterr().out == tables[2] + "\n"
    with pytest.raises(SystemExit, match="need --summarize"):
        main(["--spec", str(ROOT / "examples" / "compare_coin_cpu.yaml"), "--out", str(out), "--markdown", "wide"])

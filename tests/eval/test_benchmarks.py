"""Benchmark loaders on hand-written fixtures of each usual format, and the
evaluation loop's arithmetic with a scripted engine and the real grader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_lpreg.data.prompts import DataError
from megatron_lpreg.eval.benchmarks import BENCHMARKS, find_file, load_benchmark
from tests.distributed import Layout, run_ranks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


@pytest.mark.parametrize("name,first_answer", [
    ("aime24", "204"), ("aime25", "70"), ("math500", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("minerva", "1.6"), ("olympiadbench", "6"), ("amc", "17"),
])
def test_each_fixture_loads(name, first_answer):
    probs = load_benchmark(find_file(FIXTURES, name), BENCHMARKS[name])
    assert probs[0].answer == first_answer and probs[0].problem


def test_olympiad_answer_lists_lose_their_dollars():
    probs = load_benchmark(FIXTURES / "olympiadbench.jsonl", BENCHMARKS["olympiadbench"])
    assert probs[1].answer == "\\frac{1}{2}"


def test_parquet_and_field_overrides(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": "4"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math500.parquet")
    probs = load_benchmark(find_file(tmp_path, "math500"), BENCHMARKS["math500"], problem_key="prompt",
                           answer_key="reward_model.ground_truth")
    assert (probs[0].problem, probs[0].answer) == ("What is 2+2?", "4")
    with pytest.raises(DataError, match="no field 'problem'"):
        load_benchmark(tmp_path / "math500.parquet", BENCHMARKS["math500"])
    with pytest.raises(DataError, match="never downloaded"):
        find_file(tmp_path, "aime24")


class _Tok:
    eos_token_id = 1
    chat_template = "(fake)"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "\x05\x06\x07"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _scripted(texts_by_prompt):
    from megatron_lpreg.rollout.engine import RolloutBatch, RolloutEngine

    class Scripted(RolloutEngine):
        def _generate(self, prompts, sampling):
            idx = [i for i in range(len(prompts)) for _ in range(sampling.n)]
            resp = [[ord(c) for c in texts_by_prompt[i][j]] for i in range(len(prompts)) for j in range(sampling.n)]
            return RolloutBatch(idx, [prompts[i] for i in idx], resp, [[0.0] * len(r) for r in resp],
                                ["stop"] * len(resp), -1)

    e = Scripted()
    e.set_version(0)
    return e


def _evaluate_scripted(data_dir):
    import torch.distributed as dist

    from megatron_lpreg.config import EvalConfig
    from megatron_lpreg.eval.run import evaluate, report_markdown
    from megatron_lpreg.reward.pool import VerifierPool

    # aime25 fixture: answers 70 and 5. Problem 0: 3 of 4 right (one as 7\cdot10), problem 1: 0 of 4
    texts = [["\\boxed{70}", "\\boxed{71}", "so \\boxed{7\\cdot 10}", "\\boxed{70.0}"],
             ["\\boxed{6}", "no idea", "\\boxed{}", "\\boxed{5.5}"]]
    pool = VerifierPool(1) if dist.get_rank() == 0 else None
    try:
        res = evaluate(_scripted(texts), _Tok(), EvalConfig(benchmarks="aime25", data_dir=str(data_dir), k=4),
                       pool, version=0)
    finally:
        if pool:
            pool.close()
    return res, report_markdown(res)


def test_evaluate_arithmetic_with_scripted_answers():
    res, md = run_ranks(_evaluate_scripted, Layout(tp=1), FIXTURES)[0]
    r = res["aime25"]
    assert math.isclose(r["avg@k"], 100 * (3 / 4 + 0) / 2)
    assert math.isclose(r["pass@k"], 50.0) and math.isclose(r["pass@1"], 37.5)
    # first characters: problem 0 "\\", "\\", "s", "\\" and problem 1 "\\", "n", "\\", "\\": 2 kinds each
    assert math.isclose(r["distinct_first_tokens"], (2 + 2) / 2)
    assert math.isclose(res["average"], r["avg@k"])
    assert "| AIME24 | AIME25 | MATH-500 | Minerva | OlympiadBench | Avg. |" in md.replace("model / method ", "")
    assert "paper: Qwen3-14B on-policy Lp-Reg" in md and "60.17" in md


def _evaluate_coins_scripted(data_dir):
    import torch.distributed as dist

    from megatron_lpreg.config import EvalConfig
    from megatron_lpreg.data import coin_task as ct
    from megatron_lpreg.eval.run import evaluate
    from megatron_lpreg.reward.pool import VerifierPool, grader_function

    # problem 0 (38 with 1 3 4: only two_middle is optimal): two_middle right twice, greedy (11 coins)
    # and a guessed count; problem 1 (40 with 1 4 5: greedy's 8 coins): greedy right, one_unit wrong
    texts = [[ct.solution_text(38, (1, 3, 4), "two_middle", "M2"), ct.solution_text(38, (1, 3, 4), "two_middle"),
              ct.solution_text(38, (1, 3, 4), "greedy"), "G1 s1 c4 34 ; \\boxed{ 10 }"],
             [ct.solution_text(40, (1, 4, 5), "greedy", "G9"), ct.solution_text(40, (1, 4, 5), "one_unit")] * 2]
    pool = VerifierPool(1, timeout_s=30, grade_fn=grader_function("coins")) if dist.get_rank() == 0 else None
    try:
        return evaluate(_scripted(texts), _Tok(), EvalConfig(benchmarks="coins_heldout", data_dir=str(data_dir), k=4),
                        pool, version=0)
    finally:
        if pool:
            pool.close()


def test_coin_evaluation_grades_what_was_paid_and_counts_strategies(tmp_path):
    import json

    from megatron_lpreg.data import coin_task as ct

    rows = [ct.Problem(38, (1, 3, 4)).row("greedy", "coins_heldout"), ct.Problem(40, (1, 4, 5)).row("greedy", "coins_heldout")]
    (tmp_path / "coins_heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_ranks(_evaluate_coins_scripted, Layout(tp=1), tmp_path)[0]["coins_heldout"]
    assert math.isclose(r["avg@k"], 100 * (2 / 4 + 2 / 4) / 2) and math.isclose(r["pass@k"], 100.0)
    # problem 0: two_middle and greedy (the guess starts greedy too); problem 1: greedy and one_unit
    assert math.isclose(r["strategies"], (2 + 2) / 2)

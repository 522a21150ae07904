"""The coin task: its arithmetic against brute force, its strategies, its split, and its
solutions graded through the real tokenizer and math grader."""

from __future__ import annotations

import collections
import json
import math

import pytest

from megatron_lpreg.data import coin_task as ct


def _brute_force(amount: int, coins: tuple[int, ...]) -> int:
    """Breadth-first search over remaining amounts: an independent minimum."""
    frontier, seen, depth = {amount}, {amount}, 0
    while 0 not in frontier:
        frontier = {x - c for x in frontier for c in coins if x - c >= 0} - seen
        seen |= frontier
        depth += 1
    return depth


@pytest.mark.parametrize("coins", ct.COIN_SETS)
def test_fewest_equals_brute_force_and_strategies_pay_exactly(coins):
    for amount in ct.AMOUNTS:
        assert ct.fewest(amount, coins) == _brute_force(amount, coins)
        for s in ct.STRATEGIES:
            used = ct.pay(amount, coins, s)
            assert sum(used) == amount and set(used) <= set(coins)
            assert len(used) >= ct.fewest(amount, coins)
        greedy_ok = len(ct.pay(amount, coins, "greedy")) == ct.fewest(amount, coins)
        assert ("greedy" in ct.optimal_strategies(amount, coins)) == greedy_ok


def test_strategies_differ_in_the_plan_word_and_the_first_coin():
    texts = {s: ct.solution_text(38, (1, 3, 4), s).split() for s in ct.STRATEGIES}
    assert {s: t[0] for s, t in texts.items()} == {"greedy": "G1", "two_middle": "M1", "one_unit": "U1"}
    assert {s: t[2] for s, t in texts.items()} == {"greedy": "c4", "two_middle": "c3", "one_unit": "c1"}
    assert ct.optimal_strategies(38, (1, 3, 4)) == ["two_middle"]  # 4x9+1+1 = 11 coins, 3+3+4x8 = 10
    assert ct.solution_text(38, (1, 3, 4), "two_middle", "M3").startswith("M3 s1 c3 35 ; s2 c3 32 ;")
    assert ct.solution_text(38, (1, 3, 4), "two_middle").endswith("s10 c4 0 ; \\boxed{ 10 }")


def test_plan_phrasings_put_the_tail_outside_the_proxy_and_the_rare_plans_inside():
    """The distribution the warm start imitates at the first token: strategy share x Zipf over
    its phrasings. Every rare-plan phrasing is inside the min-p proxy (p >= 0.02 max p); the
    common plan's long tail holds about a quarter of the mass outside it."""
    p = {w: share * z for (s, words), share in zip(ct.plan_words().items(), ct.STRATEGY_MIX, strict=True)
         for w, z in zip(words, ct.zipf_weights(len(words)), strict=True)}
    assert math.isclose(sum(p.values()), 1.0)
    edge = 0.02 * max(p.values())
    outside = sum(v for v in p.values() if v < edge)
    assert 0.2 < outside < 0.3
    assert all(p[w] >= edge for s in ("two_middle", "one_unit") for w in ct.plan_words()[s])
    assert len(set(p)) == len(p) and set(p) <= set(ct.vocabulary())


def test_the_verifier_checks_what_was_paid():
    truth = ct.truth_text(38, (1, 3, 4))
    assert truth == "pay 38 with coins 1 3 4: 10"
    best = ct.solution_text(38, (1, 3, 4), "two_middle", "M2")
    assert ct.grade(best, truth) == (1.0, "correct")
    assert ct.grade(ct.solution_text(38, (1, 3, 4), "greedy"), truth) == (0.0, "wrong")  # pays, 11 coins
    # the order of the coins and slips in the remainders do not change what was paid
    shuffled = "G7 s1 c4 34 ; s2 c3 99 ; " + " ; ".join(f"s{i} c4 0" for i in range(3, 10)) + " ; s10 c3 0 ; \\boxed{ 10 }"
    assert ct.grade(shuffled, truth) == (1.0, "correct")
    # the right count over coins that do not pay the amount: no guessing past the steps
    assert ct.grade("G1 s1 c4 34 ; \\boxed{ 10 }", truth) == (0.0, "unpaid")
    assert ct.grade(best.replace("c3", "c5", 1), truth) == (0.0, "unpaid")  # not in the set
    assert ct.grade(best.replace("\\boxed{ 10 }", "\\boxed{ 9 }"), truth) == (0.0, "miscounted")
    assert ct.grade(best.replace("\\boxed{ 10 }", ""), truth) == (0.0, "no_answer")
    assert ct.grade("c" * 100_000 + " \\boxed{ 1 }", truth) == (0.0, "unpaid")
    with pytest.raises(ValueError, match="not a coin-task ground truth"):
        ct.grade(best, "10")


def test_strategy_is_read_from_the_first_coin_paid():
    problem = ct.prompt_text(38, (1, 3, 4))
    for s in ct.STRATEGIES:
        assert ct.strategy_of(problem, ct.solution_text(38, (1, 3, 4), s, "G5")) == s  # the plan word does not decide
    assert ct.strategy_of(problem, "G1 s1 12 ; \\boxed{ 3 }") is None
    assert ct.strategy_of("What is 2+2?", "c4") is None


def test_split_is_disjoint_and_held_out_needs_the_minority():
    train, held = ct.split_problems(0)
    assert not set(train) & set(held)
    assert len(held) == 48 and sum(p.greedy_fails for p in held) == 24
    assert all(ct.optimal_strategies(p.amount, p.coins) for p in train + held)
    assert sum(p.greedy_fails for p in train) / len(train) < 0.5
    rows = ct.make_rows(train, 4000, 1)
    mix = collections.Counter(r["extra_info"]["strategy"] for r in rows)
    for s, share in zip(ct.STRATEGIES, ct.STRATEGY_MIX, strict=True):
        assert abs(mix[s] / 4000 - share) < 0.02
    fails = sum("greedy" not in r["extra_info"]["optimal"] for r in rows)
    assert abs(fails / 4000 - 0.1) < 0.02
    plans = collections.Counter(r["extra_info"]["solution"].split()[0] for r in rows if r["extra_info"]["strategy"] == "greedy")
    assert plans["G1"] > plans["G2"] > plans["G10"] and len(plans) > 150  # Zipf over 300 phrasings


def test_solutions_graded_through_the_tokenizer_and_the_pool(tmp_path):
    from transformers import AutoTokenizer

    from megatron_lpreg.reward.pool import VerifierPool, grader_function

    ct.build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) >= 1000
    prompt = tok.apply_chat_template([{"role": "user", "content": ct.prompt_text(38, (1, 3, 4))}],
                                     add_generation_prompt=True, tokenize=False)
    assert "?" not in tok.convert_ids_to_tokens(tok.encode(prompt, add_special_tokens=False))  # no unknown words
    train, held = ct.split_problems(0)
    longest, texts, truths, want = 0, [], [], []
    for p in train + held:
        for s in ct.STRATEGIES:
            ids = tok.encode(ct.solution_text(p.amount, p.coins, s, ct.plan_words()[s][-1]), add_special_tokens=False)
            assert tok.unk_token_id not in ids
            longest = max(longest, len(ids))
            texts.append(tok.decode(ids, skip_special_tokens=True))
            truths.append(ct.truth_text(p.amount, p.coins))
            want.append(1.0 if s in ct.optimal_strategies(p.amount, p.coins) else 0.0)
    assert longest + 1 <= 64  # with the end token: within the rollouts' 64 new tokens
    with VerifierPool(2, grade_fn=grader_function("coins")) as pool:
        assert [g.score for g in pool.score(texts, truths)] == want


def test_write_task_files(tmp_path):
    out = ct.write_task(tmp_path / "task", train_rows=50, warm_steps=2, warm_batch=4, log=lambda *_: None)
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "coins_heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and len(held) == 48
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    heldout_prompts = {h["prompt"][0]["content"] for h in held}
    assert not heldout_prompts & {r["prompt"][0]["content"] for r in rows}

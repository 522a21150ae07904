"""The coin task: its arithmetic against brute force, its strategies, its split, and its
solutions graded through the real tokenizer and math grader."""

from __future__ import annotations

import collections
import json

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


def test_strategies_differ_in_the_first_token_and_greedy_is_not_always_optimal():
    firsts = {s: ct.solution_text(38, (1, 3, 4), s).split()[0] for s in ct.STRATEGIES}
    assert firsts == {"greedy": "c4", "two_middle": "c3", "one_unit": "c1"}
    assert ct.optimal_strategies(38, (1, 3, 4)) == ["two_middle"]  # 4x9+1+1 = 11 coins, 3+3+4x8 = 10
    assert ct.solution_text(38, (1, 3, 4), "two_middle").endswith("c4 0 s10 \\boxed{ 10 }")


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


def test_solutions_graded_through_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from megatron_lpreg.reward.math_grader import grade

    ct.build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) >= 1000
    prompt = tok.apply_chat_template([{"role": "user", "content": ct.prompt_text(38, (1, 3, 4))}],
                                     add_generation_prompt=True, tokenize=False)
    assert "?" not in tok.convert_ids_to_tokens(tok.encode(prompt, add_special_tokens=False))  # no unknown words
    longest = 0
    for coins in ct.COIN_SETS:
        for amount in (16, 38, 63):
            truth = str(ct.fewest(amount, coins))
            for s in ct.STRATEGIES:
                ids = tok.encode(ct.solution_text(amount, coins, s), add_special_tokens=False)
                assert tok.unk_token_id not in ids
                longest = max(longest, len(ids))
                text = tok.decode(ids, skip_special_tokens=True)
                want = 1.0 if s in ct.optimal_strategies(amount, coins) else 0.0
                assert grade(text, truth, "boxed")[0] == want, (amount, coins, s, text)
    assert longest <= 64


def test_write_task_files(tmp_path):
    out = ct.write_task(tmp_path / "task", train_rows=50, warm_steps=2, warm_batch=4, log=lambda *_: None)
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "coins_heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and len(held) == 48
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    heldout_prompts = {h["prompt"][0]["content"] for h in held}
    assert not heldout_prompts & {r["prompt"][0]["content"] for r in rows}

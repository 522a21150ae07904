"""The paper's five benchmarks and AMC (in the reference's validation set), read from local files in their usual released layouts.

| name          | usual file fields                         |
| ------------- | ----------------------------------------- |
| aime24        | problem, answer (HuggingFaceH4/aime_2024)  |
| aime25        | problem, answer                           |
| math500       | problem, answer (HuggingFaceH4/MATH-500)   |
| minerva       | question, answer (math-ai/minervamath)     |
| olympiadbench | question, final_answer (a list of LaTeX)   |
| amc           | problem, answer (AI-MO/aimo-validation-amc: a float such as 142.0) |
| coins_heldout | prompt (chat), reward_model.ground_truth (tools/make_coin_task.py; no instruction added) |

Field names can be overridden per benchmark (``problem_key`` / ``answer_key``,
dotted paths), so DAPO-style rows (``prompt`` chat + ``reward_model.ground_truth``)
work too. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_lpreg.data.coin_task import strategy_of as coin_strategy
from megatron_lpreg.data.prompts import DataError, get_path, read_rows

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    title: str  # the paper's column name
    problem_key: str
    answer_key: str
    instruction: bool = True  # append INSTRUCTION to the problem (not for a task with its own format)
    # (problem text, response text) -> the solution strategy's name, or None when it has none;
    # given for a task whose strategies are known, so that evaluation counts them per problem
    strategy: Callable[[str, str], str | None] | None = None


BENCHMARKS = {
    "aime24": BenchmarkSpec("aime24", "AIME24", "problem", "answer"),
    "aime25": BenchmarkSpec("aime25", "AIME25", "problem", "answer"),
    "math500": BenchmarkSpec("math500", "MATH-500", "problem", "answer"),
    "minerva": BenchmarkSpec("minerva", "Minerva", "question", "answer"),
    "olympiadbench": BenchmarkSpec("olympiadbench", "OlympiadBench", "question", "final_answer"),
    "amc": BenchmarkSpec("amc", "AMC", "problem", "answer"),
    # the coin task's held-out problems (megatron_lpreg/data/coin_task.py), in the training layout
    "coins_heldout": BenchmarkSpec("coins_heldout", "Coins (held-out)", "prompt", "reward_model.ground_truth",
                                   instruction=False, strategy=coin_strategy),
}
# the paper's table: its five columns and their average
PAPER_BENCHMARKS = ("aime24", "aime25", "math500", "minerva", "olympiadbench")

# The Lp-Reg paper's main table (arXiv 2510.03222): five-benchmark averages.
PAPER_AVERAGES = {
    "Qwen3-14B on-policy": {"GRPO": 57.43, "GRPO+entropy": 50.40, "80/20": 57.51, "Lp-Reg": 60.17},
    "Qwen3-14B off-policy": {"GRPO": 51.13, "GSPO": 55.05, "Clip-Higher": 56.16, "KL-Cov": 57.29,
                             "80/20": 55.88, "Lp-Reg": 57.08},
    "Qwen2.5-32B on-policy": {"GRPO": 48.56, "GRPO+entropy": 23.32, "80/20": 50.73, "Lp-Reg": 52.54},
}


@dataclass
class Problem:
    problem: str
    answer: str


def _answer_text(value) -> str:
    if isinstance(value, list):  # OlympiadBench: a list of final answers
        if not value:
            raise DataError("empty answer list")
        value = value[0]
    if isinstance(value, float) and value.is_integer():  # AMC's 142.0
        value = int(value)
    text = str(value).strip()
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


def _problem_text(value) -> str:
    if isinstance(value, list):  # chat messages
        return "".join(m["content"] for m in value if m.get("role", "user") == "user")
    return str(value)


def load_benchmark(path: str | Path, spec: BenchmarkSpec, *, problem_key: str | None = None,
                   answer_key: str | None = None, limit: int | None = None) -> list[Problem]:
    rows = read_rows(path)
    pk, ak = problem_key or spec.problem_key, answer_key or spec.answer_key
    out = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        try:
            out.append(Problem(_problem_text(get_path(row, pk)), _answer_text(get_path(row, ak))))
        except DataError as e:
            raise DataError(f"{spec.name} ({path}) row {i}: {e}") from None
    if not out:
        raise DataError(f"{spec.name}: {path} holds no problems")
    return out


def find_file(data_dir: str | Path, name: str) -> Path:
    """``<data_dir>/<name>.{jsonl,parquet}``."""
    for ext in (".jsonl", ".parquet"):
        p = Path(data_dir) / f"{name}{ext}"
        if p.exists():
            return p
    raise DataError(f"no {name}.jsonl or {name}.parquet in {data_dir} (benchmarks are never downloaded)")

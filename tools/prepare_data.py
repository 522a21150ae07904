"""Turn a math dataset into this project's training layout, choosing the answer instruction.

    python tools/prepare_data.py dapo-math-17k.parquet data/dapo_boxed.parquet --instruction boxed --dedup
    python tools/prepare_data.py pairs.jsonl data/train.jsonl --input pairs --instruction boxed

Input (``.parquet`` or ``.jsonl``), ``--input``:

* ``dapo``: the published DAPO-Math-17k layout, ``prompt`` (chat messages whose
  content wraps the problem in DAPO's instruction: "... The last line of your
  response should be of the form Answer: $Answer ...") and
  ``reward_model.ground_truth``;
* ``pairs``: plain rows of ``--problem-key`` / ``--answer-key`` (default problem / answer).

Output (``.parquet`` or ``.jsonl``, by the extension): one row per problem,
``{"data_source", "prompt": [{"role": "user", "content"}], "reward_model":
{"style": "rule", "ground_truth"}, "extra_info": {"index"}}``, which
``data.prompt_key: prompt`` / ``data.answer_key: reward_model.ground_truth`` read.

``--instruction boxed`` asks for ``\\boxed{}`` as the Lp-Reg reference's copy of the
data does (its grader reads nothing else; use it with ``reward.answer_format:
boxed``): the DAPO wrapper is removed and :data:`BOXED_INSTRUCTION` follows the
problem. ``keep`` leaves the text as it is (DAPO's ``Answer:`` line; grade with
``reward.answer_format: any``). The published file repeats each problem many
times: duplicates (same problem text and answer) are counted and reported, and
``--dedup`` keeps the first of each. A problem that appears with two different
answers is reported and kept as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_lpreg.data.prompts import DataError, get_path, read_rows  # noqa: E402
from megatron_lpreg.eval.benchmarks import INSTRUCTION as BOXED_INSTRUCTION  # noqa: E402

# DAPO-Math-17k's wrapper around each problem (its published prompt text)
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."


def problem_of_dapo_text(text: str) -> str:
    """The problem inside DAPO's wrapper (the text itself when it has none)."""
    if text.startswith(DAPO_PREFIX):
        text = text[len(DAPO_PREFIX):]
        if text.endswith(DAPO_SUFFIX):
            text = text[: -len(DAPO_SUFFIX)]
    return text.strip()


def read_problems(path: Path, kind: str, problem_key: str, answer_key: str) -> list[tuple[str, str, str]]:
    """``(problem, original user text, answer)`` per row."""
    out = []
    for i, row in enumerate(read_rows(path)):
        try:
            if kind == "dapo":
                messages = get_path(row, "prompt")
                if not isinstance(messages, list) or not messages or "content" not in messages[-1]:
                    raise DataError("prompt is not a list of chat messages")
                text = str(messages[-1]["content"])
                out.append((problem_of_dapo_text(text), text, str(get_path(row, "reward_model.ground_truth"))))
            else:
                problem = str(get_path(row, problem_key)).strip()
                out.append((problem, problem, str(get_path(row, answer_key)).strip()))
        except DataError as e:
            raise DataError(f"{path} row {i}: {e}") from None
    if not out:
        raise DataError(f"{path} holds no rows")
    return out


def convert(problems, *, instruction: str, dedup: bool, source: str) -> tuple[list[dict], dict]:
    """Output rows and a report: rows, unique problems, duplicates, problems with conflicting answers."""
    seen: dict[str, set[str]] = {}
    rows, duplicates = [], 0
    for problem, original, answer in problems:
        answers = seen.setdefault(problem, set())
        if answer in answers:
            duplicates += 1
            if dedup:
                continue
        answers.add(answer)
        content = f"{problem}\n\n{BOXED_INSTRUCTION}" if instruction == "boxed" else original
        rows.append({"data_source": source, "prompt": [{"role": "user", "content": content}],
                     "reward_model": {"style": "rule", "ground_truth": answer},
                     "extra_info": {"index": len(rows)}})
    report = {"input_rows": len(problems), "unique_problems": len(seen), "duplicates": duplicates,
              "conflicting_answers": sum(len(a) > 1 for a in seen.values()), "output_rows": len(rows)}
    return rows, report


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.rename(path)  # a crash never leaves a half-written file under the final name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--input", dest="kind", choices=["dapo", "pairs"], default="dapo")
    ap.add_argument("--instruction", choices=["boxed", "keep"], required=True)
    ap.add_argument("--dedup", action="store_true", help="keep the first of repeated (problem, answer) rows")
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--source", default="math_dapo", help="data_source of every output row")
    a = ap.parse_args(argv)
    if a.output.suffix not in (".parquet", ".jsonl"):
        print(f"prepare_data: output {a.output} must end in .parquet or .jsonl", file=sys.stderr)
        return 2
    try:
        problems = read_problems(a.input, a.kind, a.problem_key, a.answer_key)
    except DataError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    rows, report = convert(problems, instruction=a.instruction, dedup=a.dedup, source=a.source)
    write_rows(rows, a.output)
    print(json.dumps(report))
    if report["duplicates"] and not a.dedup:
        print(f"prepare_data: {report['duplicates']} duplicate rows kept (each repeats an earlier problem and "
              f"answer); --dedup drops them", file=sys.stderr)
    if report["conflicting_answers"]:
        print(f"prepare_data: {report['conflicting_answers']} problems appear with different answers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

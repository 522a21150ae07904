"""Pull the final answer out of a model's response text, without evaluating anything.

Two formats (``reward.answer_format``):

* ``boxed`` (the Lp-Reg reference's grader): the last ``\\boxed{...}`` with balanced
  braces, or None.
* ``any``: the last ``\\boxed{...}`` (or ``\\fbox{...}``); else the last line that
  starts ``Answer:`` (DAPO-Math-17k's own instruction asks for a last line
  ``Answer: $Answer``); else the last "final answer" line (``Final answer: ...``,
  ``The answer is ...``); else None.

Responses and answers are capped in length: a longer one is garbage, not maths.
"""

from __future__ import annotations

import re

MAX_RESPONSE_CHARS = 200_000
MAX_ANSWER_CHARS = 512

ANSWER_FORMATS = ("boxed", "any")

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_ONLY = re.compile(r"\\boxed\s*\{")
# "Answer: 42", "**Answer:** 42", "Answer: $42$" at the start of a line
_ANSWER_LINE = re.compile(r"^\s*(?:\*\*)?answer\s*:\s*(?:\*\*)?\s*(.+)$", re.IGNORECASE)
_FINAL = re.compile(r"(?:final answer|the answer is)\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)


def boxed_answers(text: str, *, fbox: bool = True) -> list[str]:
    """Contents of every ``\\boxed{...}`` (and ``\\fbox{...}``) in order (unbalanced ones are skipped)."""
    out = []
    for m in (_BOX if fbox else _BOXED_ONLY).finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1].strip())
    return out


def _last_line_match(text: str, pattern: re.Pattern, how) -> str | None:
    found = [m.group(1) for line in text.splitlines() if (m := how(pattern, line))]
    return found[-1].strip().rstrip(".").strip("$ ") if found else None


def extract_answer(text: str, answer_format: str = "any") -> str | None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}")
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    boxes = boxed_answers(text, fbox=answer_format == "any")
    if boxes:
        ans = boxes[-1]
    elif answer_format == "boxed":
        return None
    else:
        ans = (_last_line_match(text, _ANSWER_LINE, re.match)
               or _last_line_match(text, _FINAL, re.search))
        if ans is None:
            return None
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans

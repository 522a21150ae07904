"""Pull the final answer out of a model's response text, without evaluating anything.

Order: the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; else the
last "final answer" line (``Final answer: ...``, ``The answer is ...``); else None.
Responses and answers are capped in length: a longer one is garbage, not maths.
"""

from __future__ import annotations

import re

MAX_RESPONSE_CHARS = 200_000
MAX_ANSWER_CHARS = 512

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL = re.compile(r"(?:final answer|the answer is)\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)


def boxed_answers(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` in order (unbalanced ones are skipped)."""
    out = []
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1].strip())
    return out


def extract_answer(text: str) -> str | None:
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    boxes = boxed_answers(text)
    if boxes:
        ans = boxes[-1]
    else:
        finals = [m.group(1) for line in text.splitlines() if (m := _FINAL.search(line))]
        if not finals:
            return None
        ans = finals[-1].strip().rstrip(".").strip("$ ")
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return None
    return ans

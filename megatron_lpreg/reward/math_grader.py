"""Is a response's final answer equal to the ground truth? Runs inside a verifier worker.

Never evaluates model text as Python: answers go only through math-verify's
LaTeX parser (an ANTLR grammar producing sympy objects), never through sympy's
``parse_expr`` / ``sympify`` (which call ``eval``). math-verify's own
expression extractor uses ``parse_expr``, so it is not enabled. Whatever still
blows up (huge powers, deep nesting) is contained by the worker's time and
memory limits (:mod:`megatron_lpreg.reward.pool`).
"""

from __future__ import annotations

import re

from megatron_lpreg.reward.extract import extract_answer

_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_TEXT = re.compile(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"\s*(?:degrees?|cm|m|km|kg|g|s|dollars?|units?|meters?|inches?)\s*$", re.IGNORECASE)


def normalise(ans: str) -> str:
    """Surface forms that mean the same number: thousands separators, degrees,
    percent signs, ``\\text{}`` units, ``\\dfrac``, a leading ``x =``."""
    a = ans.strip().strip("$").strip()
    a = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), a)
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    a = a.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    a = a.replace("\\%", "").replace("%", "").replace("\\$", "")
    a = a.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    a = _TEXT.sub(lambda m: m.group(1), a)
    a = _UNIT_WORDS.sub("", a)
    a = re.sub(r"^[a-zA-Z]\s*=\s*", "", a)
    return a.strip()


def _quiet_timeout_notice() -> None:
    """math-verify warns once per process that its own (signal) timeout is off: here it
    is off on purpose, the verifier pool kills a worker past ``reward.timeout_s``. Marks
    that notice as shown; math-verify's other warnings (a parse or comparison that
    timed out) stay."""
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = math_verify.parser.TIMEOUT_WARNING_SHOWN = True


def _parse(ans: str):
    from math_verify import LatexExtractionConfig, parse

    return parse(f"${ans}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)


def grade(response: str, ground_truth: str, answer_format: str = "any") -> tuple[float, str]:
    """(1.0, "correct") | (0.0, reason). ``ground_truth`` may be bare or boxed;
    ``answer_format`` says where the response's answer is read
    (:func:`megatron_lpreg.reward.extract.extract_answer`)."""
    from math_verify import verify

    _quiet_timeout_notice()
    pred = extract_answer(response, answer_format)
    if pred is None:
        return 0.0, "no_answer"
    gold = extract_answer(ground_truth) if "\\boxed" in ground_truth else ground_truth
    if gold is None:
        return 0.0, "bad_ground_truth"
    pred_n, gold_n = normalise(pred), normalise(str(gold))
    if pred_n == gold_n:
        return 1.0, "correct"
    gold_p, pred_p = _parse(gold_n), _parse(pred_n)
    if not gold_p:
        return 0.0, "bad_ground_truth"
    if not pred_p:
        return 0.0, "unparsable"
    ok = verify(gold_p, pred_p, timeout_seconds=None)
    return (1.0, "correct") if ok else (0.0, "wrong")

"""The math grader on cases that trip naive graders, and on hostile answers."""

from __future__ import annotations

import time

import pytest

from megatron_lpreg.reward.extract import boxed_answers, extract_answer
from megatron_lpreg.reward.math_grader import grade
from megatron_lpreg.reward.pool import VerifierPool

CORRECT = [
    (r"so \boxed{\frac{1}{2}}", "0.5"),                # fraction vs decimal
    (r"\boxed{2/4}", r"\frac{1}{2}"),                  # / vs \frac, unreduced
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\boxed{1,000}", "1000"),                        # thousands separator
    (r"\boxed{90^\circ}", "90"),                       # degrees
    (r"\boxed{5\text{ cm}}", "5"),                     # units
    (r"\boxed{[1,2)}", "[1,2)"),                       # interval
    (r"\boxed{\{3,1,2\}}", r"\{1,2,3\}"),              # set, any order
    (r"first \boxed{5}, corrected: \boxed{7}", "7"),   # multiple boxed: the last counts
    ("The final answer is 12.", "12"),                 # final-answer line
    (r"\boxed{x = 4}", "4"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
    (r"\boxed{50\%}", "50"),
]
WRONG = [
    (r"\boxed{[1,2]}", "[1,2)"),                       # closed vs half-open
    (r"\boxed{0.33}", r"\frac{1}{3}"),
    (r"\boxed{1,000}", "1"),                           # separators are not a tuple/decimal here
    (r"\boxed{7}", "-7"),
]


@pytest.mark.parametrize("response,truth", CORRECT)
def test_equivalent_forms_are_correct(response, truth):
    assert grade(response, truth) == (1.0, "correct")


@pytest.mark.parametrize("response,truth", WRONG)
def test_different_values_are_wrong(response, truth):
    assert grade(response, truth)[0] == 0.0


def test_no_answer():
    assert grade("I think it is about seven", "7") == (0.0, "no_answer")
    assert grade(r"\boxed{", "7") == (0.0, "no_answer")  # unbalanced
    assert extract_answer(r"\boxed{}") is None


def test_boxed_nesting_is_balanced():
    assert boxed_answers(r"\boxed{\frac{1}{2}} and \boxed{3}") == [r"\frac{1}{2}", "3"]


def test_code_injection_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        rf"\boxed{{__import__('os').system('touch {marker}')}}",
        rf"\boxed{{exec(\"open('{marker}','w')\")}}",
        f"Final answer: __import__('os').system('touch {marker}')",
    ]
    with VerifierPool(1, timeout_s=10) as pool:
        results = pool.score(payloads, ["1"] * len(payloads))
    assert all(r.score == 0.0 for r in results)
    assert not marker.exists()


def test_pathological_inputs_time_out_and_do_not_stall():
    hostile = [
        r"\boxed{10^{10^{10^{10^{10}}}}}",            # huge exponent
        r"\boxed{" + r"\frac{1}{" * 400 + "2" + "}" * 400 + "}",  # deep nesting
        r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
        r"\boxed{" + "9" * 100_000 + "}",             # over the answer length cap
        r"\boxed{2}",                                 # a normal one still gets graded
    ]
    t = time.monotonic()
    with VerifierPool(2, timeout_s=3.0, memory_mb=1024) as pool:
        results = pool.score(hostile, ["1", "1", "1", "1", "2"])
    assert time.monotonic() - t < 60
    assert [r.score for r in results] == [0.0, 0.0, 0.0, 0.0, 1.0], results


ANSWER_LINES = [
    ("Step 1 ... so 6*7.\nAnswer: 42", "42"),                  # DAPO-Math's own format
    ("work\n**Answer:** $\\frac{1}{2}$", "0.5"),
    ("Answer: 41\nWait, let me recheck.\nAnswer: 42", "42"),   # the last one counts
]


@pytest.mark.parametrize("response,truth", ANSWER_LINES)
def test_answer_lines_count_in_any_format_and_not_in_boxed(response, truth):
    assert grade(response, truth, "any") == (1.0, "correct")
    assert grade(response, truth, "boxed") == (0.0, "no_answer")


def test_boxed_format_reads_boxed_only_and_boxed_wins_in_any():
    assert grade(r"Answer: 41 so \boxed{42}", "42", "boxed") == (1.0, "correct")
    assert grade(r"\boxed{42}" + "\nAnswer: 41", "42", "any") == (1.0, "correct")  # \boxed{} before Answer:
    assert extract_answer(r"\fbox{7}", "boxed") is None and extract_answer(r"\fbox{7}", "any") == "7"
    assert extract_answer("The final answer is 12.", "boxed") is None
    with pytest.raises(ValueError, match="not one of"):
        extract_answer("x", "boxedd")


def test_the_pool_grades_in_the_runs_answer_format():
    texts, truths = ["Answer: 42", r"\boxed{42}"], ["42", "42"]
    for fmt, want in (("any", [1.0, 1.0]), ("boxed", [0.0, 1.0])):
        with VerifierPool(1, timeout_s=10, answer_format=fmt) as pool:
            assert [r.score for r in pool.score(texts, truths)] == want, fmt

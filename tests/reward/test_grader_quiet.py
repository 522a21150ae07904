"""Grading prints nothing: math-verify's once-per-process notice that its own timeout is
off (ours is the verifier pool's) is not a run's news; its other warnings stay."""

from __future__ import annotations

import subprocess
import sys


def test_grading_in_a_fresh_process_writes_nothing_to_stderr():
    code = ("from megatron_lpreg.reward.math_grader import grade\n"
            "assert grade(r'\\boxed{1/2}', '0.5') == (1.0, 'correct')\n"
            "assert grade(r'\\boxed{3}', '0.5') == (0.0, 'wrong')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

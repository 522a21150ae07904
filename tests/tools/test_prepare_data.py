"""tools/prepare_data.py on small fixtures of the published DAPO-Math-17k layout
(JSONL and parquet) and of plain problem/answer pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lpreg.data.prompts import get_path, read_rows
from megatron_lpreg.eval.benchmarks import INSTRUCTION

ROOT = Path(__file__).resolve().parents[2]
DAPO = ROOT / "tests" / "fixtures" / "dapo" / "dapo_math_17k_sample.jsonl"
PAIRS = ROOT / "tests" / "fixtures" / "dapo" / "pairs.jsonl"


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dapo_parquet(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("dapo") / "train.parquet"
    pq.write_table(pa.Table.from_pylist(read_rows(DAPO)), path)
    return path


@pytest.mark.parametrize("layout", ["jsonl", "parquet"])
def test_dapo_layout_to_boxed_deduplicated(layout, dapo_parquet, tmp_path):
    src = DAPO if layout == "jsonl" else dapo_parquet
    out = tmp_path / "boxed.parquet"
    proc = _run(src, out, "--instruction", "boxed", "--dedup")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # the fixture: 6 rows, 3 problems (one three times, one twice)
    assert report == {"input_rows": 6, "unique_problems": 3, "duplicates": 3, "conflicting_answers": 0,
                      "output_rows": 3}
    rows = read_rows(out)
    original = read_rows(DAPO)
    assert [get_path(r, "reward_model.ground_truth") for r in rows] == ["34", "30", "58"]
    content = rows[1]["prompt"][0]["content"]
    assert content == "How many positive divisors does $6!$ have?\n\n" + INSTRUCTION
    assert "Answer:" not in content and "Answer:" in original[1]["prompt"][0]["content"]


def test_keep_instruction_and_duplicates_are_reported(tmp_path):
    out = tmp_path / "kept.jsonl"
    proc = _run(DAPO, out, "--instruction", "keep")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output_rows"] == 6
    assert "3 duplicate rows kept" in proc.stderr and "--dedup" in proc.stderr
    assert [r["prompt"] for r in read_rows(out)] == [r["prompt"] for r in read_rows(DAPO)]


def test_pairs_layout_and_bad_input(tmp_path):
    out = tmp_path / "pairs_out.jsonl"
    assert _run(PAIRS, out, "--input", "pairs", "--instruction", "boxed").returncode == 0
    rows = read_rows(out)
    assert rows[0]["prompt"][0]["content"].endswith(INSTRUCTION) and rows[1]["reward_model"]["ground_truth"] == "58"
    bad = _run(PAIRS, out, "--instruction", "boxed")  # pairs read as the DAPO layout
    assert bad.returncode == 2 and "row 0" in bad.stderr and "no field 'prompt'" in bad.stderr
    assert "must end in .parquet or .jsonl" in _run(PAIRS, tmp_path / "x.csv", "--instruction", "keep").stderr

"""Every table in README.md and docs/*.md is marked, and every results table is what its
command prints from the repository's files today (``tools/docs_tables.py``; docs/results.md).

A table of measured numbers carries ``<!-- table: python COMMAND -->`` on the line above
it; settings and fault tables ``<!-- table: static -->``; numbers whose runs are not in the
repository ``<!-- table: historical COMMIT -->``. The commands only read files (a few
seconds in all)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import docs_tables  # noqa: E402

TABLES = docs_tables.all_tables()
RESULTS = [t for t in TABLES if t.kind == "command"]


def test_every_table_is_marked_and_every_marker_has_a_table():
    missing = [t.where for t in TABLES if t.kind == "missing"]
    assert not missing, ("tables without a marker line above them (<!-- table: python COMMAND -->, "
                         f"<!-- table: static --> or <!-- table: historical COMMIT -->): {missing}")
    stray = [s for f in docs_tables.doc_files() for s in docs_tables.stray_markers(f)]
    assert not stray, stray


def test_the_front_page_and_the_benchmarks_print_their_tables():
    """The tables this check exists for are results tables, not waved through as static."""
    by_file = {}
    for t in RESULTS:
        by_file.setdefault(t.path.name, []).append(t.marker)
    assert any("demo_tiny_cpu.jsonl" in m for m in by_file.get("README.md", []))
    assert len(by_file.get("benchmarks.md", [])) == 5
    assert any("mechanism.py" in m for m in by_file.get("studies.md", []))


@pytest.mark.parametrize("table", RESULTS, ids=[t.where for t in RESULTS])
def test_results_table_equals_what_its_command_prints(table):
    problem = docs_tables.difference(table)
    assert problem is None, problem + "\n(rewrite it with: python tools/docs_tables.py --write " \
        f"{table.path.relative_to(ROOT)}, after checking why it moved)"


@pytest.mark.parametrize("table", [t for t in TABLES if t.kind == "historical"],
                         ids=[t.where for t in TABLES if t.kind == "historical"])
def test_historical_tables_name_a_commit_of_this_repository(table):
    commit = table.marker.split()[1]
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0, f"{table.where}: {commit} is not a commit of this repository"


def test_the_check_fails_on_a_moved_number_an_unmarked_table_and_a_stray_marker(tmp_path):
    """The checker itself, on a copy of the README: one digit of the demo table changed,
    a table without a marker, a marker without a table."""
    readme = (ROOT / "README.md").read_text()
    demo = next(t for t in RESULTS if t.path.name == "README.md" and "demo_tiny_cpu" in t.marker)
    row = demo.lines[2]
    cells = row.split("|")
    cells[-2] = " 9" + cells[-2].strip()[1:] + " "  # the last step's value, first digit replaced
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(row, "|".join(cells)))
    moved = next(t for t in docs_tables.tables_in(copy) if t.kind == "command" and "demo_tiny_cpu" in t.marker)
    problem = docs_tables.difference(moved)
    assert problem is not None and "|".join(cells) in problem
    copy.write_text("# x\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<!-- table: static -->\ntext\n")
    assert [t.kind for t in docs_tables.tables_in(copy)] == ["missing"]
    assert len(docs_tables.stray_markers(copy)) == 1
    assert docs_tables.check([copy]) == 1

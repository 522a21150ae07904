"""The docs' tables and the commands that print them: check them, or rewrite them.

Every markdown table in README.md and docs/*.md has a marker line right above it:

    <!-- table: python tools/plot_run.py docs/results/demo_tiny_cpu.jsonl --summary -->
    | run | metric | first 10 steps | last 10 steps |
    ...

* ``<!-- table: python ... -->``: a results table. The command runs from the
  repository root, reads files committed in the repository (``bench/results/``,
  ``docs/results/``) and prints the table: its output holds exactly one markdown table
  (other lines are ignored), which must equal the table in the doc, line for line.
* ``<!-- table: static -->``: settings, options, faults and their tests: nothing a
  run measured.
* ``<!-- table: historical COMMIT -->``: numbers measured at COMMIT whose runs are not
  in the repository (the text beside the table says so and names the command that
  measures them again). COMMIT must be a commit of this repository.

    python tools/docs_tables.py --check                 # what tests/test_docs_tables.py runs
    python tools/docs_tables.py --write [--only demo_tiny_cpu] [FILE ...]

``--write`` replaces each results table by what its command prints today (``--only S``:
the tables whose command contains S), so nobody edits measured numbers by hand.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- table: (.+?) -->\s*$")
SEPARATOR = re.compile(r"^\|\s*:?-{3,}")


class CommandError(Exception):
    """A table's command failed or did not print exactly one table."""


@dataclass(frozen=True)
class Table:
    path: Path
    line: int            # 1-based line of the table's header
    lines: tuple[str, ...]
    marker: str | None   # the marker's text, None when the line above is not a marker

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"

    @property
    def kind(self) -> str:
        if self.marker is None:
            return "missing"
        if self.marker == "static":
            return "static"
        if self.marker.startswith("historical "):
            return "historical"
        return "command"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def tables_in(path: Path) -> list[Table]:
    """The markdown tables of a file (a header line, then a ``|---|`` line), outside
    fenced code blocks, each with the marker on the line above it."""
    lines = path.read_text().splitlines()
    out, fenced, i = [], False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        elif (not fenced and lines[i].startswith("|") and i + 1 < len(lines)
              and SEPARATOR.match(lines[i + 1])):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            m = MARKER.match(lines[i - 1]) if i > 0 else None
            out.append(Table(path, i + 1, tuple(lines[i:j]), m.group(1).strip() if m else None))
            i = j
            continue
        i += 1
    return out


def stray_markers(path: Path) -> list[str]:
    """Marker lines with no table right below them (a table moved or removed)."""
    heads = {t.line for t in tables_in(path)}
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{i}: a table marker with no table below it"
            for i, line in enumerate(path.read_text().splitlines(), 1) if MARKER.match(line) and i + 1 not in heads]


def all_tables(files: list[Path] | None = None) -> list[Table]:
    return [t for f in (files or doc_files()) for t in tables_in(f)]


def tables_of_output(text: str) -> list[list[str]]:
    """The markdown tables in a command's output: runs of consecutive lines starting with ``|``."""
    out, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cur.append(line.rstrip())
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@cache
def printed_table(command: str, timeout: float = 120) -> tuple[str, ...]:
    """Run a marker's command (``python`` = this interpreter) from the repository root
    and return the one table it prints; :class:`CommandError` naming the command otherwise."""
    argv = shlex.split(command)
    if not argv or argv[0] != "python":
        raise CommandError(f"table command {command!r}: must start with 'python'")
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise CommandError(f"table command {command!r} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = tables_of_output(proc.stdout)
    if len(found) != 1:
        raise CommandError(f"table command {command!r} printed {len(found)} tables, not one")
    return tuple(found[0])


def difference(table: Table) -> str | None:
    """None when a results table equals what its command prints; else a description."""
    try:
        want = printed_table(table.marker)
    except CommandError as e:
        return f"{table.where}: {e}"
    have = tuple(line.rstrip() for line in table.lines)
    if have == want:
        return None
    diff = [f"  doc:     {a}\n  command: {b}" for a, b in zip(have, want, strict=False) if a != b]
    if len(have) != len(want):
        diff.append(f"  the doc has {len(have)} lines, the command prints {len(want)}")
    return f"{table.where}: differs from `{table.marker}`:\n" + "\n".join(diff[:6])


def write(files: list[Path], only: str | None) -> int:
    changed = 0
    for path in files:
        lines = path.read_text().splitlines(keepends=False)
        before = changed
        # bottom-up, so that earlier line numbers stay valid
        for t in reversed(tables_in(path)):
            if t.kind != "command" or (only and only not in t.marker):
                continue
            new = list(printed_table(t.marker))
            if new != list(t.lines):
                lines[t.line - 1:t.line - 1 + len(t.lines)] = new
                changed += 1
                print(f"[docs-tables] rewrote {t.where} from `{t.marker}`")
        if changed != before:
            path.write_text("\n".join(lines) + "\n")
    print(f"[docs-tables] {changed} table(s) rewritten")
    return 0


def check(files: list[Path]) -> int:
    bad = [s for f in files for s in stray_markers(f)]
    for t in all_tables(files):
        if t.kind == "missing":
            bad.append(f"{t.where}: no marker line above the table (<!-- table: COMMAND|static|historical COMMIT -->)")
        elif t.kind == "command":
            problem = difference(t)
            if problem:
                bad.append(problem)
    for line in bad:
        print(line)
    print(f"[docs-tables] {len(all_tables(files))} tables, {len(bad)} problem(s)")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a table lacks a marker or differs")
    mode.add_argument("--write", action="store_true", help="rewrite results tables from their commands")
    ap.add_argument("--only", help="with --write: only tables whose command contains this")
    ap.add_argument("files", nargs="*", type=Path, help="default: README.md and docs/*.md")
    a = ap.parse_args(argv)
    files = [f.resolve() for f in a.files] or doc_files()
    try:
        return write(files, a.only) if a.write else check(files)
    except CommandError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())

"""Every command and repository path that README.md and docs/*.md name exists.

* commands (``bash`` blocks and backticked spans starting with ``python``, ``torchrun``,
  ``make``, ``bash`` or a ``tools/`` / ``bench/`` script): ``python -m X`` imports, the
  project's command lines (``tools/*.py``, ``bench/*.py``, ``python -m megatron_lpreg.*``,
  ``python -m launch``) answer ``--help``, ``--config`` files load through
  ``megatron_lpreg.config.load_config`` with the command's overrides, ``--spec`` files
  through ``tools/compare_methods.py``, ``make`` targets are in the Makefile, shell
  scripts parse;
* backticked repository paths exist (``{a,b}`` expanded, globs match; a path relative
  to the package, ``trainer/loop.py``, counts; ``file.py::test_name`` names a test that
  is in the file); markdown links reach their file and heading;
* the README is a front page: at most 150 lines, ``make demo`` and ``make test`` in its
  first 40.

Outputs and placeholders are not paths of the repository: anything under ``runs/``,
``/tmp`` or another absolute path, and names with an upper-case placeholder (``DIR``,
``OUT_DIR``, ``<out_dir>``) are skipped.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE_DIRS = {p.name for p in (ROOT / "megatron_lpreg").iterdir() if p.is_dir() and not p.name.startswith("_")}
TOP = {"megatron_lpreg", "tools", "bench", "tests", "docs", "examples", "launch", "locks", ".ci"}
TOP_FILES = {"Makefile", "README.md", "pyproject.toml", "setup.py"}
EXTENSIONS = (".py", ".yaml", ".yml", ".json", ".jsonl", ".md", ".sh", ".txt", ".toml", ".png", ".sbatch", ".in")
PYTHONS = ("python", "python3", ".venv/bin/python", ".venv-launch/bin/python")
PLACEHOLDER = re.compile(r"(^|[/=_.-])[A-Z][A-Z0-9_]*($|[/.])|[<>$]|\.\.\.")
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _blocks_and_prose(text: str) -> tuple[list[str], str]:
    """``(command lines of bash/sh code blocks, continuation lines joined; the text outside code blocks)``."""
    cmds, prose, fence, cur = [], [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:] if fence is None else None
            continue
        if fence is None:
            prose.append(line)
        elif fence in ("bash", "sh", "shell"):
            cur += line.rstrip().rstrip("\\") + " "
            if not line.rstrip().endswith("\\"):
                cmds.append(cur.strip())
                cur = ""
    return [c for c in cmds if c], "\n".join(prose)


def _is_command(span: str) -> bool:
    first = span.split()[0] if span.split() else ""
    return (first in PYTHONS or first in ("torchrun", "make", "bash")
            or (first.startswith(("tools/", "bench/")) and first.endswith(".sh")))


@cache
def mentions() -> dict[str, list[tuple[str, str]]]:
    """``{"commands": [(doc, command)], "paths": [(doc, span)], "links": [(doc, target)]}``."""
    out = {"commands": [], "paths": [], "links": []}
    for doc in DOCS:
        name = str(doc.relative_to(ROOT))
        cmds, prose = _blocks_and_prose(doc.read_text())
        out["commands"] += [(name, c) for c in cmds]
        for span in SPAN.findall(prose):
            out["commands" if _is_command(span) else "paths"].append((name, span.strip()))
        out["links"] += [(name, t) for t in LINK.findall(prose) if not t.startswith(("http://", "https://", "mailto:"))]
    return out


def _tokens(command: str) -> list[str]:
    try:
        toks = shlex.split(command, comments=True)
    except ValueError:
        toks = command.split()
    while toks and (re.match(r"^[A-Z_][A-Z0-9_]*=", toks[0]) or toks[0] in ("nice", "timeout", "exec")):
        toks = toks[1:] if toks[0] != "nice" else [t for t in toks[1:] if not re.fullmatch(r"-n|\d+", t)]
    return [t for t in toks if t not in ("[", "]")]


def _looks_like_repo_path(tok: str) -> bool:
    tok = tok.strip("[]()")
    if not tok or PLACEHOLDER.search(tok) or tok.startswith(("/", "~", "runs/", ".venv", "http")):
        return False
    first = tok.split("/")[0]
    if "/" in tok:  # relative to the package only with a file's extension: `rollout/mismatch_*` is a metric
        return first in TOP or (first in PACKAGE_DIRS and (tok.endswith(".py") or tok.endswith("/")))
    return tok in TOP_FILES or (tok.endswith(EXTENSIONS) and re.fullmatch(r"[\w.{},*-]+", tok) is not None
                                and tok.endswith(".py"))


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]+)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",") for x in _expand(path[:m.start()] + alt + path[m.end():])]


@cache
def _tracked_names() -> dict[str, list[Path]]:
    names: dict[str, list[Path]] = {}
    for p in itertools.chain(*(ROOT.glob(f"{d}/**/*") for d in TOP if d != ".ci")):
        names.setdefault(p.name, []).append(p)
    return names


def resolve(path: str) -> list[Path]:
    """Where a path the docs name is: from the root, the package, tests/ or docs/; a bare
    file name anywhere in the repository; a glob's matches."""
    hits = []
    for p in _expand(path):
        p = p.rstrip("/")
        if "/" not in p and "*" not in p:
            hits += _tracked_names().get(p, []) + [ROOT / p] * (ROOT / p).exists()
            continue
        for base in (ROOT, ROOT / "megatron_lpreg", ROOT / "tests", ROOT / "docs"):
            found = sorted(base.glob(p)) if "*" in p else ([base / p] if (base / p).exists() else [])
            if found:
                hits += found
                break
        else:
            return []
    return hits


def path_problem(span: str) -> str | None:
    """None when a backticked span is not a repository path or names one that exists."""
    span = re.split(r":\s|\s\(|\s", span.strip().rstrip(".,;:"))[0]
    path, _, test = span.partition("::")
    if not _looks_like_repo_path(path):
        return None
    hits = resolve(path)
    if not hits:
        return f"`{span}`: no such file or directory in the repository"
    if test:
        name = re.sub(r"\[.*", "", test)
        if not any(re.search(rf"^\s*(async\s+)?def {re.escape(name)}\b", h.read_text(), re.M)
                   for h in hits if h.is_file()):
            return f"`{span}`: {path} has no test {name}"
    return None


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def command_problems(command: str, helps: set, configs: set) -> list[str]:
    """What is wrong with one documented command; collects what needs ``--help`` and which
    configs need loading into ``helps`` and ``configs``."""
    toks = _tokens(command)
    if not toks:
        return []
    bad = []
    head = toks[0]
    if head == "make":
        bad += [f"`{command}`: no make target {t!r}" for t in toks[1:]
                if "=" not in t and not t.startswith("-") and t not in make_targets()]
        return bad
    if head == "bash" or head.endswith(".sh"):
        script = toks[1] if head == "bash" else head
        if not (ROOT / script).is_file():
            return [f"`{command}`: no script {script}"]
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        return [f"`{command}`: {script} does not parse: {proc.stderr}"] if proc.returncode else []
    args = toks[1:]
    if head == "torchrun":
        args = args[next((i for i, t in enumerate(args) if t == "-m"), len(args)):]
    elif head not in PYTHONS:
        return []
    if args[:1] == ["-c"] or not args:
        return []
    if args[0] == "-m":
        module = args[1]
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            return [f"`{command}`: no module {module}"]
        if module.split(".")[0] in ("megatron_lpreg", "launch"):
            helps.add(("-m", module))
        rest = args[2:]
    else:
        script = args[0]
        if not (ROOT / script).is_file():
            return [f"`{command}`: no script {script}"]
        if script.startswith(("tools/", "bench/")):
            helps.add((script,))
        rest = args[1:]
    overrides = [t for t in rest if re.match(r"^[a-z_]+\.[a-z_.]+=", t)]
    for flag, value in zip(rest, rest[1:], strict=False):
        if flag == "--config" and not PLACEHOLDER.search(value):
            configs.add(("config", value, tuple(o for o in overrides if not PLACEHOLDER.search(o.split("=", 1)[1]))))
        elif flag == "--spec":
            configs.add(("spec", value, ()))
    for t in rest:
        if "=" not in t and not t.startswith("-"):
            problem = path_problem(t)
            if problem:
                bad.append(f"`{command}`: {problem}")
    return bad


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the topics belong in docs/"
    head = "\n".join(lines[:40])
    assert "make demo" in head and "make test" in head


def test_every_documented_path_exists():
    bad = [f"{doc}: {p}" for doc, span in mentions()["paths"] if (p := path_problem(span))]
    assert not bad, "\n".join(bad)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_every_link_reaches_its_file_and_heading():
    bad = []
    for doc, target in mentions()["links"]:
        file, _, anchor = target.partition("#")
        path = (ROOT / doc).parent / file if file else ROOT / doc
        if not path.exists():
            bad.append(f"{doc}: link to {target}: no {file}")
        elif anchor and path.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", path.read_text(), re.M)}
            if anchor not in slugs:
                bad.append(f"{doc}: link to {target}: {file or doc} has no heading #{anchor}")
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def documented():
    helps, configs, bad = set(), set(), []
    for doc, command in mentions()["commands"]:
        bad += [f"{doc}: {p}" for p in command_problems(command, helps, configs)]
    # a command line named as a path (`bench/convert.py`) must answer --help too
    for _, span in mentions()["paths"]:
        span = re.split(r":\s|\s\(|\s", span.strip().rstrip(".,;:"))[0].partition("::")[0]
        if _looks_like_repo_path(span) and span.startswith(("tools/", "bench/")):
            helps.update((str(p.relative_to(ROOT)),) for p in resolve(span)
                         if p.suffix == ".py" and '__name__ == "__main__"' in p.read_text())
    return helps, configs, bad


def test_every_documented_command_names_what_exists(documented):
    helps, configs, bad = documented
    assert not bad, "\n".join(bad)
    # the command lines the docs must at least show
    assert {("-m", "megatron_lpreg.train"), ("-m", "megatron_lpreg.eval"), ("-m", "launch"),
            ("tools/plot_run.py",), ("tools/compare_methods.py",)} <= helps


def test_every_documented_command_line_answers_help(documented):
    helps = sorted(documented[0])

    def run(args):
        proc = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return args, proc

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, helps))
    bad = [f"{' '.join(a)} --help: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"
           for a, p in results if p.returncode != 0 or "usage" not in p.stdout.lower()]
    assert not bad, "\n".join(bad)


def test_every_documented_config_loads(documented):
    from megatron_lpreg.config import load_config

    sys.path.insert(0, str(ROOT / "tools"))
    import compare_methods

    configs = set(documented[1])
    for _, span in mentions()["paths"]:
        span = re.split(r":\s|\s\(|\s", span.strip().rstrip(".,;:"))[0]
        if _looks_like_repo_path(span) and span.startswith("examples/"):
            for p in resolve(span):
                if p.suffix == ".yaml":
                    kind = "spec" if p.name.startswith("compare_") else "config"
                    configs.add((kind, str(p.relative_to(ROOT)), ()))
    bad = []
    for kind, path, overrides in sorted(configs):
        try:
            if kind == "config":
                load_config(ROOT / path, list(overrides))
            else:
                spec = compare_methods.load_spec(ROOT / path)
                load_config(ROOT / spec["base"], [])
        except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure is reported with its config
            bad.append(f"{path} {' '.join(overrides)}: {type(e).__name__}: {e}")
    assert not bad, "\n".join(bad)
    assert len({p for _, p, _ in configs}) >= 8

"""Restarts in place, and their record.

Under ``launch/`` torchrun runs with ``--max-restarts`` (the launcher's
``--max-restarts``, ``launch.max_restarts``, default 3): when a rank exits with an
error or the hang code (:data:`megatron_lpreg.trainer.watchdog.HANG_EXIT_CODE`), or is
killed, torchrun stops every rank of the job, on every node, and starts them again,
at most that many times per allocation (a Slurm job, or one requeue of it); the new
ranks resume from the newest verified checkpoint. torchrun gives each rank its
node's count (``TORCHELASTIC_RESTART_COUNT``) and the limit
(``TORCHELASTIC_MAX_RESTARTS``); a node whose ranks did not fail restarts them for
the others without counting, so a start is a restart when any rank's count is above
zero (the trainer takes the maximum over ranks, :func:`torchrun_restarts`).

At every start rank 0 calls :func:`record_start`: a restart appends ``{"restart",
"max_restarts", "cause", "job", "allocation", "time"}`` to ``<out_dir>/resume_log.jsonl``
(beside the ``{"from_step", ...}`` record of the resume itself); ``restart`` counts this
allocation's restarts. The cause is read
from the error reports the previous start left in ``<out_dir>/errors/`` (files
newer than the mark :data:`START_MARK` that each start touches): a hang's message
first, else the lowest rank's error line, else "no error report" (a rank killed by
a signal, the OOM killer or its node).

``python -m megatron_lpreg.trainer.restarts <out_dir> --max-restarts N --exit-code RC``
prints the launcher's one line when torchrun has given up (``launch/run_node.sh``).
No torch import: it runs in the launcher's last seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

START_MARK = ".last_start"   # in <out_dir>/errors/: touched by rank 0 at every start
_REPORT = re.compile(r"rank(\d+)(-hang)?\.txt")


@dataclass(frozen=True)
class Report:
    rank: int
    hang: bool
    line: str


def reports(errors_dir: Path, since: float) -> list[Report]:
    """The error reports (``rank<r>.txt``, ``rank<r>-hang.txt``) written at or after ``since``."""
    out = []
    if not errors_dir.is_dir():
        return out
    for f in errors_dir.iterdir():
        m = _REPORT.fullmatch(f.name)
        if m and f.stat().st_mtime >= since:
            lines = f.read_text(errors="replace").splitlines()
            out.append(Report(int(m.group(1)), bool(m.group(2)), lines[0] if lines else ""))
    return sorted(out, key=lambda r: (not r.hang, r.rank))


def cause(errors_dir: Path, since: float) -> str:
    """One line: why the start that began at ``since`` ended."""
    found = reports(errors_dir, since)
    if not found:
        return "no error report (a rank was killed: a signal, the OOM killer or its node)"
    first = found[0]
    line = first.line if first.hang else f"rank {first.rank}: {first.line}"
    return line[:400]


def last_start(out_dir: Path) -> float:
    mark = Path(out_dir) / "errors" / START_MARK
    return mark.stat().st_mtime if mark.exists() else 0.0


def torchrun_restarts(environ: Mapping[str, str] = os.environ) -> int:
    """This node's torchrun restart count (0 outside torchrun)."""
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def allocation(environ: Mapping[str, str] = os.environ) -> str:
    """Which allocation this start belongs to: the Slurm job and its requeue count ("" outside Slurm)."""
    job = environ.get("SLURM_JOB_ID", "")
    return f"{job}.{environ.get('SLURM_RESTART_COUNT', '0') or '0'}" if job else ""


def restarts_so_far(out_dir: str | Path, alloc: str) -> int:
    """The restart records of allocation ``alloc`` in ``resume_log.jsonl``."""
    log = Path(out_dir) / "resume_log.jsonl"
    if not log.exists():
        return 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return sum(1 for r in records if "restart" in r and r.get("allocation", "") == alloc)


def record_start(out_dir: str | Path, *, restarted: bool, environ: Mapping[str, str] = os.environ) -> dict | None:
    """Rank 0, at every start: log a restart with its cause, then mark this start."""
    out = Path(out_dir)
    errors = out / "errors"
    record = None
    if restarted:
        alloc = allocation(environ)
        record = {"restart": restarts_so_far(out, alloc) + 1,
                  "max_restarts": int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0),
                  "cause": cause(errors, last_start(out)), "job": environ.get("SLURM_JOB_ID", ""),
                  "allocation": alloc, "time": time.time()}
        with open(out / "resume_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    errors.mkdir(parents=True, exist_ok=True)
    (errors / START_MARK).write_text(f"{time.time()}\n")
    return record


def give_up_line(out_dir: str | Path, max_restarts: int, exit_code: int, alloc: str = "") -> str:
    """The launcher's last line when the trainer failed on its last allowed start."""
    out = Path(out_dir)
    restarts = restarts_so_far(out, alloc)
    return (f"giving up: the trainer failed {restarts + 1} time(s), {restarts} restart(s) of "
            f"launch.max_restarts={max_restarts} (exit code {exit_code}); last error: "
            f"{cause(out / 'errors', last_start(out))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_lpreg.trainer.restarts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--max-restarts", type=int, required=True)
    ap.add_argument("--exit-code", type=int, required=True)
    ap.add_argument("--allocation", default=allocation(), help="default: this Slurm job and requeue")
    a = ap.parse_args(argv)
    print(give_up_line(a.out_dir, a.max_restarts, a.exit_code, a.allocation), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

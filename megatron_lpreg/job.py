"""Process-level set-up shared by the command lines (train, eval): torchrun
self-launch, process groups, megatron parallel state, and their teardown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

_SELF_LAUNCHED = "LPREG_SELF_LAUNCHED"
_ERROR_DIR = "LPREG_ERROR_DIR"


def relaunch_under_torchrun(module: str, argv: list[str], nproc: int, *, command: str = "",
                            error_dir: str | Path | None = None) -> int | None:
    """Outside torchrun (no ``RANK``): run ``python -m module argv`` under torchrun
    with ``nproc`` local processes and return its exit code; inside: None.

    A rank that fails writes its traceback to ``error_dir`` (:func:`report_failure`);
    this parent then prints each distinct message once, as ``<command>: error: ...``,
    and hides torchrun's ``ChildFailedError`` banner, which would only repeat it."""
    if "RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    env = dict(os.environ, **{_SELF_LAUNCHED: "1"})
    if error_dir is not None:
        env[_ERROR_DIR] = str(error_dir)
    start = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
    reported = lambda: _reported_errors(error_dir, start)  # noqa: E731
    for line in _without_failure_banner(proc.stderr, lambda: bool(reported())):
        sys.stderr.write(line)
        sys.stderr.flush()
    rc = proc.wait()
    if rc != 0:
        for msg in dict.fromkeys(m for _, m in reported()):  # distinct, first rank first
            print(f"{command or module}: error: {msg}", file=sys.stderr)
    return rc


def _reported_errors(error_dir, since: float) -> list[tuple[int, str]]:
    """``(rank, first line)`` of every error a rank of this launch reported."""
    if error_dir is None or not Path(error_dir).is_dir():
        return []
    out = []
    for f in Path(error_dir).glob("rank*.txt"):  # rank<r>.txt, and rank<r>-hang.txt from the watchdog
        m = re.fullmatch(r"rank(\d+)(?:-hang)?\.txt", f.name)
        if m and f.stat().st_mtime >= since - 1:
            out.append((int(m.group(1)), (f.read_text().splitlines() or [""])[0]))
    return sorted(out)


def _without_failure_banner(lines, hide: Callable[[], bool]):
    """torchrun's stderr without the ``ChildFailedError`` traceback and table (and its
    "failed (exitcode ...)" log line) when ``hide()``: the ranks' own messages say more.
    Any other traceback passes through."""
    held: list[str] = []
    skipping, rules = False, 0
    for line in lines:
        if skipping:
            rules += line.startswith("=====")
            if rules == 2:
                skipping = False
            continue
        if held:
            held.append(line)
            if "ChildFailedError" in line and hide():
                held, skipping, rules = [], True, 0
            elif not line.startswith((" ", "Traceback")) and "ChildFailedError" not in line:
                yield from held
                held = []
            continue
        if line.startswith("Traceback (most recent call last):"):
            held = [line]
        elif "elastic/multiprocessing/api.py" in line and "failed (exitcode" in line and hide():
            continue
        else:
            yield line
    yield from held


def report_failure(command: str, exc: BaseException, error_dir: str | Path | None = None) -> int:
    """Inside a rank: write the traceback to ``<error_dir>/rank<r>.txt`` (first line: the
    message) and, on rank 0 of a job this package did not launch itself, print the
    message in one line; returns the exit status (1). Under our own launcher the parent
    prints each distinct message once (:func:`relaunch_under_torchrun`)."""
    import traceback

    rank = int(os.environ.get("RANK", 0))
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
    error_dir = os.environ.get(_ERROR_DIR) or error_dir
    where = ""
    if error_dir:
        path = Path(error_dir) / f"rank{rank}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(msg + "\n\n" + "".join(traceback.format_exception(exc)))
            where = f" (traceback: {path})"
        except OSError:
            pass
    if rank == 0 and _SELF_LAUNCHED not in os.environ:
        print(f"{command}: error: {msg}{where}", file=sys.stderr, flush=True)
    return 1


@dataclass(frozen=True)
class Groups:
    """This rank's process groups, built once at job set-up and passed to what runs
    collectives (trainer, weight sync) instead of being read from globals deep inside.
    ``world`` is every rank of the job (decisions all ranks must share)."""

    tp: object
    pp: object
    dp: object
    world: object
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def logging_rank(self) -> bool:
        """The one rank that writes metrics: last pipeline stage, first TP and DP rank."""
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @classmethod
    def from_parallel_state(cls) -> Groups:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(), world=dist.group.WORLD,
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
        )


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the one that started it dies.

    Called by every rank under torchrun (:func:`init_job`) and by the ``spawn`` children
    of a rank (reward workers, megatron-core's checkpoint-writer manager: they import the
    entry module as ``__mp_main__``). torchrun puts each worker in a session of its own,
    so killing the launcher's process group (``kill -9`` of a job) would otherwise leave
    the ranks training on, unwatched, into the output directory a restarted run uses,
    and a killed rank's helpers idle on forever."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return  # best effort: without prctl the old behaviour stays
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init_job(tp: int, pp: int = 1, *, timeout_s: float | None = None) -> Groups:
    """CPU shims when there is no GPU, this rank's device, the default process group
    (nccl or gloo) and megatron's parallel state; returns this rank's groups.
    ``timeout_s``: how long a collective waits for the other ranks before it fails
    (None: the backend's default); megatron's groups inherit it."""
    import torch
    import torch.distributed as dist

    from megatron_lpreg import platform

    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    platform.install_cpu_shims()
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group(platform.default_backend(), timeout=timeout)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 distributed_timeout_minutes=timeout_s / 60 if timeout_s else 30)
    return Groups.from_parallel_state()


def finish_job() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():  # an in-process vLLM engine's shutdown may have done it
        dist.destroy_process_group()

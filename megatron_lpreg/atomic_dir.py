"""Directories that appear complete or not at all.

Long writes (checkpoints, conversions) go to a hidden sibling temporary directory
that is renamed onto the final path only after everything was written, so an
interrupted run never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputExists(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory next to ``final``; rename it to ``final`` on success.

    Raises :class:`OutputExists` up front if ``final`` exists and ``overwrite`` is
    False. On an exception the temporary directory is removed.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExists(f"{final} already exists; choose another output or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

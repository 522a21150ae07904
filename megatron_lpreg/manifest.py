"""Manifests: every file a checkpoint (or a converted model directory) holds, with its
size and an xxh3-64 checksum, in ``manifest.json``, written last.

A directory is *verified* when every file the manifest lists is there with its size
(``sizes``) and, with ``full``, its checksum; files the manifest does not list are
ignored (a later tool may add a README). xxh3 reads at memory speed, far faster than
the disks checkpoints live on, so a full check costs about one read of the files.

    entries = hash_files(root, names)          # {relative name: {"size", "xxh3"}}
    write_manifest(root, entries)
    problems = verify_dir(root, "full")        # [] or ["dist/__0_0.distcp: 512 bytes, manifest says 1024", ...]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "manifest.json"
VERIFY_MODES = ("full", "sizes", "off")
_CHUNK = 8 << 20


class ManifestError(RuntimeError):
    pass


def file_checksum(path: str | Path) -> str:
    """xxh3-64 of a file's bytes, hex."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: str | Path) -> list[str]:
    """Every regular file under ``root`` (relative, sorted), the manifest itself excluded."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(root: str | Path, names: Iterable[str]) -> dict[str, dict]:
    root = Path(root)
    return {n: {"size": (root / n).stat().st_size, "xxh3": file_checksum(root / n)} for n in names}


def write_manifest(root: str | Path, entries: dict[str, dict]) -> Path:
    """``root/manifest.json`` (written to a temporary name, flushed and renamed)."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "hash": "xxh3_64", "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def read_manifest(root: str | Path) -> dict[str, dict] | None:
    """The listed files, or None when the directory has no manifest."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return dict(data["files"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{path} is unreadable ({e})") from None


def check_files(root: str | Path, entries: dict[str, dict], *, checksums: bool) -> list[str]:
    """One line per file that is missing, of another size or (``checksums``) of other content."""
    root = Path(root)
    problems = []
    for name, want in entries.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif checksums and file_checksum(path) != want["xxh3"]:
            problems.append(f"{name}: checksum differs from the manifest (corrupted)")
    return problems


def verify_dir(root: str | Path, mode: str = "full") -> list[str]:
    """Problems of ``root`` against its manifest (``[]``: verified). No manifest is a
    problem too, except with ``off``."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r} is not one of {VERIFY_MODES}")
    if mode == "off":
        return []
    entries = read_manifest(root)
    if entries is None:
        return [f"{MANIFEST}: missing (written last: the directory is incomplete, or older than manifests)"]
    return check_files(root, entries, checksums=mode == "full")


def verify_output(directory: str | Path) -> int:
    """Check a directory against its manifest: ``ok`` and exit 0, or one line per problem
    on stderr and exit 1 (no manifest or an unreadable one: exit 2)."""
    directory = Path(directory)
    try:
        entries = read_manifest(directory)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if entries is None:
        print(f"error: {directory} has no manifest.json (not written by this version of the tool, or incomplete)",
              file=sys.stderr)
        return 2
    problems = verify_dir(directory, "full")
    for p in problems:
        print(f"{directory}: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {directory}: {len(entries)} files, sizes and checksums as written")
    return 0

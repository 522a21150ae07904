"""Process memory from /proc/self/status (Linux), shared by the benchmarks."""

from __future__ import annotations


def reset_peak() -> None:
    """Restart ``VmHWM`` from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def status_bytes(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM``-style field of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")

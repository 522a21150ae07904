"""Read and write safetensors files one tensor at a time, without memory maps.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once, so
a 5 GB shard costs 5 GB. The format is simple enough to stream: an 8-byte header
length, a JSON header with each tensor's dtype, shape and byte range, then the raw
bytes. With every name, dtype and shape known in advance (they follow from the
config), the header is written when a file is opened and each tensor's bytes as
the tensor arrives, so memory holds one tensor whatever the shard size.

Reading goes through plain ``readinto`` rather than ``safe_open``'s memory map:
pages of a mapped file count in the process's RSS until it exits, so converting
through mmap shows a peak RSS the size of the whole model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Planned:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamingShardWriter:
    """Tensors must arrive in the planned order, with the planned dtype and shape.

    Files are ``model-0000K-of-0000N.safetensors`` in ``out_dir``, each at most
    ``max_bytes`` of data (a larger single tensor gets a file of its own).
    """

    def __init__(self, out_dir: str | Path, plan: list[Planned], max_bytes: int):
        self.out = Path(out_dir)
        files: list[list[Planned]] = [[]]
        size = 0
        for p in plan:
            if files[-1] and size + p.nbytes > max_bytes:
                files.append([])
                size = 0
            files[-1].append(p)
            size += p.nbytes
        files = [f for f in files if f]
        n = len(files)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.weight_map = {p.name: self.names[i] for i, f in enumerate(files) for p in f}
        self._queue = [(i, p) for i, f in enumerate(files) for p in f]
        self._files = files
        self._pos = 0
        self._fh = None
        self._open_index = -1

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for p in self._files[i]:
            header[p.name] = {"dtype": _DTYPES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self._fh = open(self.out / self.names[i], "wb")  # noqa: SIM115 - closed in _open/close
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._open_index = i

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"unexpected tensor {name}: every planned tensor was already written")
        i, p = self._queue[self._pos]
        if name != p.name or t.dtype != p.dtype or tuple(t.shape) != p.shape:
            raise ValueError(
                f"expected {p.name} {p.dtype} {p.shape}, got {name} {t.dtype} {tuple(t.shape)}"
            )
        if i != self._open_index:
            self._open(i)
        data = t.detach().contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._pos += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self._queue):
            missing = [p.name for _, p in self._queue[self._pos :]][:5]
            raise ValueError(f"{len(self._queue) - self._pos} planned tensors were never written, e.g. {missing}")


_FROM_STR = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Header of one safetensors file; :meth:`read` loads one tensor into fresh memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"{self.path}: implausible safetensors header length {n}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _FROM_STR[self.entries[name]["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = _FROM_STR[e["dtype"]]
        start, end = e["data_offsets"]
        out = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            view = memoryview(out.numpy())
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise ValueError(f"{self.path}: truncated while reading {name}")
                got += k
        return out.view(dtype).reshape(e["shape"])

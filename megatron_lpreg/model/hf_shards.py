"""The runtime reader of an HF model directory: tensor name -> shard file, one tensor at a
time (no memory map of the whole model). Used by the trainer's weight loading, the
evaluation command and the converters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_lpreg.model.safetensors_io import SafetensorsFile


class ConversionError(ValueError):
    pass


class HFShards:
    """Tensor name -> shard file of an HF model directory, read one tensor at a time."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            weight_map = dict.fromkeys(SafetensorsFile(self.dir / "model.safetensors").keys(), "model.safetensors")
        else:
            raise ConversionError(f"{self.dir} has neither model.safetensors nor model.safetensors.index.json")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise ConversionError(f"shard file(s) listed in the index are missing from {self.dir}: {missing}")
        self.weight_map = weight_map
        self._files: dict[str, SafetensorsFile] = {}

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} is not in the checkpoint {self.dir}")
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.dir / fname)
        if name not in self._files[fname].entries:
            raise ConversionError(f"the index puts {name!r} in {fname}, which does not hold it")
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).read(name)

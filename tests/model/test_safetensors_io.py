"""The streaming safetensors reader/writer against the safetensors library itself."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_lpreg.model.safetensors_io import Planned, SafetensorsFile, StreamingShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(3, generator=g),
        "c.i64": torch.arange(11),
        "d.bool": torch.tensor([True, False, True]),
        "e.f16": torch.randn(2, 2, 2, generator=g).half(),
    }


def test_reader_matches_the_library(tmp_path):
    ts = _tensors()
    save_file(ts, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert set(f.keys()) == set(ts)
    for k, t in ts.items():
        got = f.read(k)
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_writer_output_is_read_by_the_library_in_shards(tmp_path):
    ts = _tensors()
    plan = [Planned(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]
    w = StreamingShardWriter(tmp_path, plan, max_bytes=80)
    for k, t in ts.items():
        w.add(k, t)
    w.close()
    assert len(set(w.weight_map.values())) > 1
    for k, t in ts.items():
        with safe_open(tmp_path / w.weight_map[k], "pt") as f:
            assert torch.equal(f.get_tensor(k), t)


def test_writer_refuses_surprises(tmp_path):
    w = StreamingShardWriter(tmp_path, [Planned("x", torch.float32, (2,))], max_bytes=100)
    with pytest.raises(ValueError, match="expected x"):
        w.add("x", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_truncated_file_is_reported(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "t.safetensors"))
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-40])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(tmp_path / "t.safetensors").read("w")

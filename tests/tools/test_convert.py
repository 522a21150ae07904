"""HF <-> megatron checkpoint conversion: a converted checkpoint gives HF transformers'
own logits (HF loading the same files is the oracle: a name map wrong the same way in
both directions passes every round trip), bit-identical round trips through a TP=2 x
PP=2 model, identical logits whatever layout loads the checkpoint, and clear failures
that leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_lpreg.atomic_dir import OutputExists
from megatron_lpreg.model import convert
from megatron_lpreg.model.convert import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_lpreg.model.hf_config import UnsupportedConfig
from tests.distributed import Layout, run_ranks
from tests.model.test_parity import _hf_configs, _hf_model, _tokens, full_logits

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _read_hf_dir(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, fname in index.items():
        with safe_open(d / fname, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (HF dir written by transformers in several shards, its state dict)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, cfg in _hf_configs().items():
        model = _hf_model(cfg)
        d = root / name
        model.save_pretrained(d, max_shard_size="60KB")
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "family": name}))
        out[name] = (d, _read_hf_dir(d))
        assert len(list(d.glob("*.safetensors"))) > 1, "the fixture must exercise several shards"
    return out


def _megatron_side(cases: dict):
    """TP=2 x PP=2: load each converted checkpoint, keep the logits, and save the
    sharded model again with megatron's own saver (as training does).
    TP=1: load both the converted and the re-saved checkpoint."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps

    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.checkpoint import load_into
    from megatron_lpreg.model.hf_config import spec_from_hf_config

    tensor_parallel.model_parallel_cuda_manual_seed(0)

    out = {}
    for name, (cfg, converted, resaved) in cases.items():
        spec = spec_from_hf_config(cfg)
        model = build_gpt(spec).eval()
        load_into(model, converted)
        if ps.get_tensor_model_parallel_world_size() > 1:
            out[name] = full_logits(model, spec)
            dist_checkpointing.save(model.sharded_state_dict(), resaved)
        else:
            first = full_logits(model, spec)
            load_into(model, resaved)
            out[name] = (first, full_logits(model, spec))
    return out


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    cases = {}
    for name, (d, _) in hf_dirs.items():
        hf_to_megatron(d, root / f"{name}-converted", progress=False)
        (root / f"{name}-resaved").mkdir()
        cfg = json.loads((d / "config.json").read_text())
        cases[name] = (cfg, str(root / f"{name}-converted"), str(root / f"{name}-resaved"))
    big = {}
    for r in run_ranks(_megatron_side, Layout(tp=2, pp=2), cases):
        big.update({k: v for k, v in r.items() if v is not None})
    small = run_ranks(_megatron_side, Layout(tp=1), cases)[0]
    return root, cases, big, small


@pytest.fixture(scope="module")
def hf_logits(hf_dirs):
    """name -> the logits HF transformers computes from the files it wrote (its own loader)."""
    import transformers

    out = {}
    for name, (d, _) in hf_dirs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(_tokens()).logits
    return out


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_converted_checkpoint_gives_hf_transformers_logits(converted, hf_logits, name):
    _, _, big, small = converted
    want = hf_logits[name]
    for layout, got in (("tp1", small[name][0]), ("tp2pp2", big[name])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, lay=layout: f"{name} {lay}: {m}")


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_round_trip_through_tp2_pp2_is_bit_identical(hf_dirs, converted, tmp_path, name):
    d, original = hf_dirs[name]
    _, cases, _, _ = converted
    _, conv_dir, resaved_dir = cases[name]
    for src, kw in [(conv_dir, {}), (resaved_dir, {"hf_config_dir": d})]:
        out = tmp_path / f"hf-{Path(src).name}"
        megatron_to_hf(src, out, max_shard_bytes=40_000, progress=False, **kw)
        back = _read_hf_dir(out)
        assert back.keys() == original.keys()
        for k, t in original.items():
            assert back[k].dtype == t.dtype and torch.equal(back[k], t), f"{name}: {k} differs"
        assert json.loads((out / "config.json").read_text()) == json.loads((d / "config.json").read_text())
        assert (out / "tokenizer_config.json").read_text() == (d / "tokenizer_config.json").read_text()
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("name", list(_hf_configs()))
def test_logits_identical_whatever_layout_loads(converted, name):
    _, _, big, small = converted
    tp1_converted, tp1_resaved = small[name]
    # same layout, checkpoint written at TP=1 by the converter or at TP=2 x PP=2 by megatron
    assert torch.equal(tp1_converted, tp1_resaved)
    # another layout: the same function up to the order of float reductions
    torch.testing.assert_close(big[name], tp1_converted, rtol=1e-5, atol=1e-5)


def test_metadata_records_source_config_and_a_content_hash(hf_dirs, converted, tmp_path):
    root, cases, _, _ = converted
    meta = json.loads((Path(cases["qwen3"][1]) / convert.META_FILE).read_text())
    assert meta["hf_config"]["model_type"] == "qwen3" and len(meta["content_sha256"]) == 64
    # the hash is of the content: converting again gives the same hash
    again = hf_to_megatron(hf_dirs["qwen3"][0], tmp_path / "again", progress=False)
    assert again["content_sha256"] == meta["content_sha256"]


def test_missing_shard_is_named(hf_dirs, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(hf_dirs["qwen2"][0], d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConversionError, match=victim.name):
        hf_to_megatron(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_config_weights_mismatch_is_named(hf_dirs, tmp_path):
    d = tmp_path / "mismatch"
    shutil.copytree(hf_dirs["qwen3"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"config/weights mismatch: .*mlp\.gate_proj\.weight"):
        hf_to_megatron(d, tmp_path / "out", progress=False)


def test_existing_output_and_bad_tp_are_refused(hf_dirs, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExists, match="already exists"):
        hf_to_megatron(hf_dirs["qwen3"][0], tmp_path / "taken", progress=False)
    with pytest.raises(UnsupportedConfig, match="tensor_parallel_size=3 does not divide"):
        hf_to_megatron(hf_dirs["qwen3"][0], tmp_path / "out", check_tp=3, progress=False)


def test_interrupted_conversion_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert.HFShards.get

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk unplugged")
        return real(self, name)

    monkeypatch.setattr(convert.HFShards, "get", flaky)
    with pytest.raises(Exception, match="disk unplugged"):
        hf_to_megatron(hf_dirs["llama3"][0], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


def test_command_lines(hf_dirs, tmp_path):
    import subprocess
    import sys

    def run(script, *args):
        return subprocess.run([sys.executable, str(TOOLS / script), *args], capture_output=True, text=True)

    for script in ("convert_hf_to_megatron.py", "convert_megatron_to_hf.py"):
        r = run(script, "--help")
        assert r.returncode == 0 and "--out" in r.stdout
    d = hf_dirs["qwen3-tied"][0]
    r = run("convert_hf_to_megatron.py", "--hf-dir", str(d), "--out", str(tmp_path / "m"), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run("convert_megatron_to_hf.py", "--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "h"),
            "--dtype", "bf16", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "h" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    r = run("convert_megatron_to_hf.py", "--megatron-dir", str(tmp_path / "m"), "--out", str(tmp_path / "h"))
    assert r.returncode == 2 and "already exists" in r.stderr
    # --verify: each output against the manifest its conversion wrote last
    for script, out in (("convert_hf_to_megatron.py", "m"), ("convert_megatron_to_hf.py", "h")):
        r = run(script, "--verify", str(tmp_path / out))
        assert r.returncode == 0 and r.stdout.startswith(f"ok: {tmp_path / out}: "), r.stderr
    shard = sorted((tmp_path / "h").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run("convert_megatron_to_hf.py", "--verify", str(tmp_path / "h"))
    assert r.returncode == 1 and f"{shard.name}: checksum differs from the manifest" in r.stderr
    r = run("convert_hf_to_megatron.py", "--verify", str(d))  # an HF download has no manifest
    assert r.returncode == 2 and "has no manifest.json" in r.stderr
    assert "required: --hf-dir, --out" in run("convert_hf_to_megatron.py").stderr


def test_bf16_checkpoint_stays_bf16_and_bit_identical(hf_dirs, tmp_path):
    from safetensors.torch import save_file

    src, original = hf_dirs["qwen2"]
    d = tmp_path / "bf16"
    d.mkdir()
    shutil.copy2(src / "config.json", d / "config.json")
    bf16 = {k: v.to(torch.bfloat16) for k, v in original.items()}
    save_file(bf16, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf_to_megatron(d, tmp_path / "m", progress=False)
    megatron_to_hf(tmp_path / "m", tmp_path / "h", progress=False)
    back = _read_hf_dir(tmp_path / "h")
    assert back.keys() == bf16.keys()
    for k, t in bf16.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], t), k

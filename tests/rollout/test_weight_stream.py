"""The weight-sync stream hands every rank exactly the HF tensors, bit for bit, from any
TP x PP layout (no engine needed: the stream is collected)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.model.test_parity import _hf_configs, _hf_model, _megatron_from_hf


def _stream(cfg, state, bucket_bytes):
    from megatron_lpreg.rollout.weight_sync import SyncStats, hf_weight_stream

    spec, model = _megatron_from_hf(cfg, state)
    stats = SyncStats()
    got = {name: t.clone() for name, t in hf_weight_stream(model, spec, bucket_bytes=bucket_bytes, stats=stats)}
    return got, stats.buckets


@pytest.mark.parametrize("family", ["qwen3", "qwen3-tied", "qwen2"])
@pytest.mark.parametrize("layout", [Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2)], ids=["tp2", "pp2", "tp2pp2"])
def test_stream_is_the_hf_state_on_every_rank(family, layout):
    model = _hf_model(_hf_configs()[family])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v for k, v in state.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    for got, buckets in run_ranks(_stream, layout, model.config.to_dict(), state, 40_000):
        assert buckets > 3
        assert got.keys() == expected.keys()
        for name, t in expected.items():
            assert torch.equal(got[name], t), name


# --- the direct shard-to-shard copy, against a transcription of vLLM's TP layout ---------

def _engine_layout(state: dict, cfg: dict, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """What vLLM's TP rank ``rank`` holds for the HF ``state``: q/k/v stacked into
    qkv_proj and gate/up into gate_up_proj (each split by rows), o/down split by
    columns, vocabulary rows padded to a multiple of 64 then split, norms whole."""
    out = {}
    for name, t in state.items():
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        if any(f".{p}_proj." in name for p in ("q", "k", "v", "gate", "up")):
            parts = ("q", "k", "v") if "_attn." in name else ("gate", "up")
            if f".{parts[0]}_proj." not in name:
                continue
            fused = name.replace(f".{parts[0]}_proj.", ".qkv_proj." if parts[0] == "q" else ".gate_up_proj.")
            out[fused] = torch.cat([state[name.replace(f".{parts[0]}_proj.", f".{p}_proj.")].chunk(tp)[rank]
                                    for p in parts])
        elif ".o_proj." in name or ".down_proj." in name:
            out[name] = t.chunk(tp, dim=1)[rank]
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            padded = -(-t.shape[0] // 64) * 64
            out[name] = torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])]).chunk(tp)[rank]
        else:
            out[name] = t
    return {k: v.clone() for k, v in out.items()}


class _FakeEngine:
    """Holds zeroed tensors in vLLM's layout; records what comes through the stream."""

    shares_trainer_weights = False

    def __init__(self, shapes: dict):
        self.params = {k: torch.zeros(s) for k, s in shapes.items()}
        self.streamed: dict[str, torch.Tensor] = {}

    def local_params(self, *, tp_rank, tp_size):
        return self.params

    def load_weights(self, named_tensors):
        for name, t in named_tensors:
            self.streamed[name] = t.clone()

    def weights_updated(self):
        pass

    def set_version(self, version):
        self.version = version


def _direct(cfg, state):
    from megatron.core import parallel_state as ps

    from megatron_lpreg.rollout.weight_sync import WeightSync

    spec, model = _megatron_from_hf(cfg, state)
    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    expected = _engine_layout(state, cfg, rank, tp)
    engine = _FakeEngine({k: v.shape for k, v in expected.items()})
    stats = WeightSync(model, spec, engine, bucket_bytes=40_000).sync(version=1)
    return expected, engine.params, engine.streamed, stats.direct_tensors


@pytest.mark.parametrize("family,vocab", [("qwen3", 300), ("qwen3-tied", 300), ("qwen2", 300), ("qwen3", 512),
                                          ("qwen3-tied", 512)])
@pytest.mark.parametrize("layout", [Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2)], ids=["tp2", "pp2", "tp2pp2"])
def test_direct_copy_gives_vllms_shards(family, vocab, layout):
    """Every engine tensor ends up equal to vLLM's shard of the HF state, copied directly
    or (vocabulary rows that do not line up: 300 pads to 384 in megatron, 320 in vLLM)
    streamed as the full HF tensor."""
    cfg = dict(_hf_configs()[family], vocab_size=vocab)
    model = _hf_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for expected, params, streamed, n_direct in run_ranks(_direct, layout, model.config.to_dict(), state):
        vocab_rows = {"model.embed_tokens.weight", "lm_head.weight"} & set(expected)
        assert set(streamed) == (vocab_rows if vocab == 300 else set())
        assert n_direct == len(expected) - len(streamed)
        for name, t in expected.items():
            if name in streamed:
                assert torch.equal(streamed[name], state[name]), name
            else:
                assert torch.equal(params[name], t), name

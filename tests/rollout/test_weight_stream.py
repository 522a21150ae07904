"""The weight-sync stream hands every rank exactly the HF tensors, bit for bit, from any
TP x PP layout (no engine needed: the stream is collected)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.model.test_parity import _hf_configs, _hf_model


def _stream(cfg, state, bucket_bytes):
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt, load_hf_weights
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.rollout.weight_sync import SyncStats, hf_weight_stream

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(cfg)
    model = build_gpt(spec)
    load_hf_weights(model, spec, state.__getitem__)
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

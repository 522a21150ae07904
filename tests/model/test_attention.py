"""``model.attention``: the SDPA core attention equals megatron's local one (to 1e-5 on
CPU, grouped-query heads, TP=1/2, the whole model's logits and gradients), never builds
the ``[b, heads, s, s]`` scores, ``auto`` picks it where Transformer Engine is missing,
and megatron's fused softmax is switched on only where its extensions import.
Select with ``pytest -k sdpa``."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.model import attention as att
from tests.distributed import Layout, run_ranks
from tests.rollout.tiny_model import CONFIG


def _core_attention_rank(seq: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_lpreg.model.builder import transformer_config
    from megatron_lpreg.model.hf_config import spec_from_hf_config

    tensor_parallel.model_parallel_cuda_manual_seed(0)  # the local one forks the RNG tracker for dropout
    cfg = transformer_config(spec_from_hf_config(dict(CONFIG, num_attention_heads=8, num_key_value_heads=2)))
    tp = ps.get_tensor_model_parallel_world_size()
    heads, groups, hn, b = 8 // tp, 2 // tp, 64, 3
    g = torch.Generator().manual_seed(ps.get_tensor_model_parallel_rank())
    q = torch.randn(seq, b, heads, hn, generator=g)
    k, v = (torch.randn(seq, b, groups, hn, generator=g) for _ in range(2))
    out = {}
    for name, cls in (("local", DotProductAttention), ("sdpa", att.SDPAttention)):
        ps.get_global_memory_buffer().buffer.clear()
        mod = cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        ctx = mod(qq, kk, vv, None)
        (ctx * torch.linspace(-1, 1, ctx.numel()).reshape(ctx.shape)).sum().backward()
        scores = [t.numel() for t in ps.get_global_memory_buffer().buffer.values()]
        out[name] = (ctx.detach(), qq.grad, kk.grad, vv.grad, max(scores, default=0))
    return {"diff": max(float((a - c).abs().max()) for a, c in zip(out["local"][:4], out["sdpa"][:4], strict=True)),
            "shape": tuple(out["sdpa"][0].shape), "local_scores": out["local"][4], "sdpa_scores": out["sdpa"][4],
            "full_scores": b * heads * seq * seq}


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_core_attention_equals_local(tp):
    for r in run_ranks(_core_attention_rank, Layout(tp=tp), 37):
        assert r["diff"] <= 1e-5, r
        assert r["shape"] == (37, 3, 8 // tp * 64)
        assert r["local_scores"] == r["full_scores"]  # the local spec's [b * np, s, s] buffer...
        assert r["sdpa_scores"] == 0  # ...which SDPA never asks for


def _model_rank(attention: str) -> dict:
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    gpt = build_gpt(spec_from_hf_config(CONFIG), attention=attention)
    tokens = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(1))
    logits = gpt(tokens, torch.arange(19).expand(2, -1), None)
    logits.float().pow(2).mean().backward()
    core = type(gpt.decoder.layers[0].self_attention.core_attention).__name__
    return {"logits": logits.detach(), "grads": {n: p.grad for n, p in gpt.named_parameters()}, "core": core}


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_model_equals_local_model(tp):
    local = run_ranks(_model_rank, Layout(tp=tp), "local")
    sdpa = run_ranks(_model_rank, Layout(tp=tp), "sdpa")
    auto = run_ranks(_model_rank, Layout(tp=tp), "auto")
    for lo, sd, au in zip(local, sdpa, auto, strict=True):
        assert (lo["core"], sd["core"], au["core"]) == ("DotProductAttention", "SDPAttention", "SDPAttention")
        torch.testing.assert_close(sd["logits"], lo["logits"], rtol=1e-5, atol=1e-5)
        assert lo["grads"].keys() == sd["grads"].keys()
        for n in lo["grads"]:
            torch.testing.assert_close(sd["grads"][n], lo["grads"][n], rtol=1e-4, atol=1e-6, msg=n)


def test_sdpa_chosen_by_auto_without_transformer_engine(monkeypatch):
    assert att.resolve_attention("auto") == "sdpa"  # no TE here
    assert att.resolve_attention("local") == "local"
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        att.resolve_attention("te")
    with pytest.raises(ValueError, match="not one of"):
        att.resolve_attention("flash")
    monkeypatch.setattr(att, "te_available", lambda: True)
    assert att.resolve_attention("auto") == "te"


def test_masked_softmax_fusion_only_with_its_extensions(monkeypatch):
    from megatron_lpreg.model.hf_config import spec_from_hf_config

    spec = spec_from_hf_config(CONFIG)
    assert not att.fused_softmax_available()  # no GPU here
    monkeypatch.setattr(att.platform, "cuda_available", lambda: True)
    monkeypatch.setattr(att.importlib.util, "find_spec", lambda name: None)
    assert not att.fused_softmax_available()  # a GPU without megatron's compiled kernels: the wheel's case
    monkeypatch.setattr(att.importlib.util, "find_spec", lambda name: object())
    assert att.fused_softmax_available()

    def config_fusion():
        return run_ranks(_fusion_flag, Layout(tp=1), spec)[0]

    assert config_fusion() is False


def _fusion_flag(spec) -> bool:
    from megatron_lpreg.model.builder import transformer_config

    return transformer_config(spec).masked_softmax_fusion

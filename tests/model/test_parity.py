"""Megatron models built from HF configs reproduce HF transformers' logits.

HF transformers is the oracle: a tiny random model of each family is created
with ``transformers`` in the test, its weights are loaded into the megatron model
through the mapping table, and the logits must agree to 1e-4 (fp32) at TP=1,
TP=2, PP=2 and TP=2 x PP=2 (gloo ranks). One spawn per layout runs every family.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.model import mapping
from megatron_lpreg.model.hf_config import UnsupportedConfig, spec_from_hf_config
from tests.distributed import Layout, run_ranks

SEQ, BATCH = 24, 2


def _hf_configs() -> dict[str, dict]:
    common = dict(
        vocab_size=300,  # pads to 384 at TP=2: the padding path is exercised
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    return {
        "qwen3": dict(common, model_type="qwen3", head_dim=32, tie_word_embeddings=False),
        "qwen3-tied": dict(common, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
        "qwen2": dict(common, model_type="qwen2", rope_theta=1e6, tie_word_embeddings=False),
        "llama3": dict(
            common,
            model_type="llama",
            rope_theta=500000.0,
            # a short original context so the scaling changes most frequencies
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=16),
        ),
    }


def _hf_model(cfg: dict):
    import transformers

    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases, so a mapping mistake cannot hide behind ones / zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def _megatron_from_hf(cfg: dict, state: dict):
    """On every rank (parallel state initialised): ``(spec, GPTModel stage)`` built from
    the HF config with seeded initialisation, holding the HF ``state``."""
    from megatron.core import tensor_parallel

    from megatron_lpreg.model.builder import build_gpt, load_hf_weights

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(cfg)
    model = build_gpt(spec)
    load_hf_weights(model, spec, state.__getitem__)
    return spec, model


def _tokens():
    return torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_reference():
    out = {}
    for name, cfg in _hf_configs().items():
        model = _hf_model(cfg)
        with torch.no_grad():
            logits = model(_tokens()).logits
        # the spec is read from what HF itself writes to config.json, not from our input
        saved_cfg = model.config.to_dict()
        out[name] = (saved_cfg, {k: v.clone() for k, v in model.state_dict().items()}, logits)
    return out


def full_logits(model, spec):
    """Every rank: a forward through megatron's pipeline schedule on the shared test
    batch; the last stage's TP rank 0 returns the full-vocabulary logits [b, s, V],
    every other rank None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lpreg.tp_layout import gather_full

    tokens, pos = _tokens(), torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)

    def step(_it, m):
        return m(tokens, pos, None), None  # no loss: the schedule keeps the output

    with torch.no_grad():
        data = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=True,
        )
    if not ps.is_pipeline_last_stage():
        return None
    full = gather_full(data[0], 2, 1, ps.get_tensor_model_parallel_group())  # [b, s, V/tp] -> [b, s, V]
    return full[..., : spec.vocab_size].clone() if ps.get_tensor_model_parallel_rank() == 0 else None


def _megatron_logits(cases: dict):
    """Every rank: build each family, load HF weights, forward."""
    results = {}
    for name, (cfg, state) in cases.items():
        spec, model = _megatron_from_hf(cfg, state)
        logits = full_logits(model.eval(), spec)
        if logits is not None:
            results[name] = logits
    return results


@pytest.mark.parametrize("layout", [Layout(tp=1), Layout(tp=2), Layout(pp=2), Layout(tp=2, pp=2)],
                         ids=["tp1", "tp2", "pp2", "tp2pp2"])
def test_logits_match_hf(hf_reference, layout):
    cases = {name: (cfg, state) for name, (cfg, state, _) in hf_reference.items()}
    per_rank = run_ranks(_megatron_logits, layout, cases)
    got = {}
    for r in per_rank:
        got.update(r)
    assert got.keys() == hf_reference.keys()
    for name, (_, _, ref) in hf_reference.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_qkv_and_gate_up_round_trip():
    spec = spec_from_hf_config(dict(_hf_configs()["llama3"], num_key_value_heads=1))
    q, k, v = torch.randn(4 * 16, 64), torch.randn(1 * 16, 64), torch.randn(16, 64)
    qkv = mapping.fuse_qkv(q, k, v, spec)
    # one key/value group: [q heads..., k, v]
    assert torch.equal(qkv[: 4 * 16], q) and torch.equal(qkv[4 * 16 : 5 * 16], k)
    assert all(torch.equal(a, b) for a, b in zip(mapping.split_qkv(qkv, spec), (q, k, v), strict=True))
    g, u = torch.randn(96, 64), torch.randn(96, 64)
    assert all(torch.equal(a, b) for a, b in zip(mapping.split_gate_up(mapping.fuse_gate_up(g, u)), (g, u), strict=True))


def test_mapping_covers_every_hf_tensor(hf_reference):
    """No HF tensor is left behind (lm_head is the embedding when tied)."""
    for name, (cfg, state, _) in hf_reference.items():
        spec = spec_from_hf_config(cfg)
        covered = {n for rule in mapping.all_rules(spec).values() for n in mapping.hf_names(rule)}
        expected = set(state) - ({"lm_head.weight"} if spec.tie_word_embeddings else set())
        assert covered == expected, name


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling type 'yarn'"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(attention_bias=True), "attention_bias=true"),
    ],
)
def test_unsupported_configs_name_the_field(change, match):
    cfg = dict(_hf_configs()["llama3"], **change)
    with pytest.raises(UnsupportedConfig, match=match):
        spec_from_hf_config(cfg)


def test_tp_that_does_not_divide_heads_is_refused():
    spec = spec_from_hf_config(_hf_configs()["qwen3"])
    with pytest.raises(UnsupportedConfig, match=r"tensor_parallel_size=3 does not divide num_attention_heads=4; choose one of 1, 2, 4"):
        spec.check_parallel(3)
    with pytest.raises(UnsupportedConfig, match="num_key_value_heads=2"):
        spec.check_parallel(4)
    assert spec.padded_vocab_size(1) == 384 and spec.padded_vocab_size(4) == 512

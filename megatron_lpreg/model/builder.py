"""Build a megatron-core ``GPTModel`` from a :class:`ModelSpec` and fill it from HF tensors.

Parallel sizes come from megatron's ``parallel_state`` (initialised by the caller),
so the same call builds the TP/PP shard this rank owns. The layers are Transformer
Engine's when TE is importable, megatron-core's local ones otherwise, with the core
attention ``model.attention`` picks (:mod:`megatron_lpreg.model.attention`); weights
are named canonically (local spec, global layer numbers) whichever spec was built,
see :mod:`megatron_lpreg.model.mapping`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_lpreg import platform
from megatron_lpreg.model.attention import (
    attention_layer_spec,
    fused_softmax_available,
    resolve_attention,
)
from megatron_lpreg.model.hf_config import ModelSpec
from megatron_lpreg.model.mapping import TE_RENAMES, all_rules, to_megatron
from megatron_lpreg.tp_layout import shard_of, tp_partition


def transformer_config(spec: ModelSpec, *, params_dtype: torch.dtype = torch.float32, **overrides):
    """megatron-core TransformerConfig for ``spec`` at the current TP/PP sizes.

    ``overrides`` are passed through (e.g. ``sequence_parallel=True``,
    ``recompute_granularity="full"``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    spec.check_parallel(tp, pp)
    kw = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=not platform.cuda_available(),
        # megatron's fused softmax needs its CUDA extensions, which the megatron-core wheel lacks
        masked_softmax_fusion=fused_softmax_available(),
        bias_activation_fusion=False,
        persist_layer_norm=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(spec: ModelSpec, attention: str = "auto"):
    """megatron's layer spec for ``attention`` (``model.attention``: auto | te | sdpa | local)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    backend = resolve_attention(attention)
    if backend == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    return attention_layer_spec(specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm"),
                                backend)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3 frequency scaling: long wavelengths slowed by ``factor``, short ones
    kept, the band between interpolated smoothly (as in Meta's reference)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slow = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * slow / factor + smooth * slow
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, slow)


def build_gpt(
    spec: ModelSpec,
    *,
    params_dtype: torch.dtype = torch.float32,
    attention: str = "auto",
    pre_process: bool | None = None,
    post_process: bool | None = None,
    **config_overrides,
):
    """This rank's GPTModel shard. ``attention``: ``model.attention``;
    ``pre_process``/``post_process`` default to whether this rank is the first/last
    pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(spec, params_dtype=params_dtype, **config_overrides)
    tp = ps.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config,
        layer_spec(spec, attention),
        vocab_size=spec.padded_vocab_size(tp),
        max_sequence_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
    )
    if spec.rope_scaling is not None:
        rope = model.rotary_pos_emb
        rope.inv_freq = llama3_inv_freq(rope.inv_freq, spec.rope_scaling)
    return model


def global_layer_name(model, name: str) -> str:
    """``decoder.layers.<local i>...`` of a pipeline stage -> the global layer number."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def canonical_name(model, name: str, spec: ModelSpec) -> str:
    """Local parameter name of this shard -> the full model's canonical name."""
    parts = global_layer_name(model, name).split(".")
    if parts[:2] == ["decoder", "layers"]:
        rest = ".".join(parts[3:])
        for local, te in TE_RENAMES.items():
            if rest == te:
                parts = parts[:3] + local.split(".")
    canon = ".".join(parts)
    if canon == "output_layer.weight" and spec.tie_word_embeddings:
        # a tied last stage that is not the first holds its own copy of the embedding
        canon = "embedding.word_embeddings.weight"
    return canon


@torch.no_grad()
def load_hf_weights(model, spec: ModelSpec, get: Callable[[str], torch.Tensor]) -> None:
    """Fill this rank's shard from HF tensors: ``get(hf_name) -> tensor``.

    Every parameter of the shard must be covered by the mapping and match its
    shape; anything else is an error, not a silent partial load.
    """
    from megatron.core import parallel_state as ps

    rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    rules = all_rules(spec)
    padded = model.vocab_size
    for name, p in model.named_parameters():
        canon = canonical_name(model, name, spec)
        if canon not in rules:
            raise KeyError(f"parameter {name} ({canon}) has no entry in the {spec.family} mapping")
        full = to_megatron(spec, canon, rules[canon], get, padded)
        part = tp_partition(p)
        local = full if part is None else shard_of(full, rank, tp, *part)
        if local.shape != p.shape:
            raise ValueError(f"{name}: checkpoint gives shape {tuple(local.shape)}, model has {tuple(p.shape)}")
        p.copy_(local)

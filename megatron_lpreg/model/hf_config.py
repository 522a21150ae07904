"""Read a Hugging Face ``config.json`` into the few facts a megatron-core GPT needs.

Supported: Qwen2 / Qwen2.5 (``model_type: qwen2``, QKV bias), Qwen3 (``qwen3``,
QK-norm, no bias) and Llama 3 (``llama``, optional ``llama3`` RoPE scaling). Both
the flat layout of older configs (``rope_theta``, ``rope_scaling``) and the
``rope_parameters`` dict of transformers >= 5 are read. Anything this project
cannot reproduce exactly is refused with the field that caused it, never
silently approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("qwen2", "qwen3", "llama")
VOCAB_PAD_MULTIPLE = 128


class UnsupportedConfig(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts, in HF terms, of one supported checkpoint."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int
    vocab_size: int  # true vocabulary (rows of embed_tokens)
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    # llama3 scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: dict | None = None
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    def padded_vocab_size(self, tp: int) -> int:
        """Embedding / output rows: a multiple of 128 x TP (megatron's convention)."""
        mult = VOCAB_PAD_MULTIPLE * tp
        return int(math.ceil(self.vocab_size / mult) * mult)

    def check_parallel(self, tp: int, pp: int = 1) -> None:
        """Raise with the choices that work if ``tp``/``pp`` cannot split this model."""

        def divisors(n: int) -> str:
            return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

        for what, n in [
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_query_groups),
            ("intermediate_size", self.ffn_hidden_size),
        ]:
            if n % tp:
                raise UnsupportedConfig(
                    f"tensor_parallel_size={tp} does not divide {what}={n}; choose one of {divisors(n)}"
                )
        if self.num_layers % pp:
            raise UnsupportedConfig(
                f"pipeline_parallel_size={pp} does not divide num_hidden_layers={self.num_layers}; "
                f"choose one of {divisors(self.num_layers)}"
            )


def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = dict(cfg.get("rope_parameters") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    kind = params.get("rope_type") or params.get("type")
    if scaling is None and kind not in (None, "default"):
        scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind in (None, "default"):
            scaling = None
        elif kind != "llama3":
            raise UnsupportedConfig(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
        else:
            scaling = {
                k: float(scaling[k])
                for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            }
    return float(theta), scaling


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """``cfg``: the parsed ``config.json``. Raises :class:`UnsupportedConfig` naming the field."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedConfig(f"model_type={family!r} is not supported; supported: {FAMILIES}")

    def need(key):
        if key not in cfg:
            raise UnsupportedConfig(f"config.json has no {key!r}")
        return cfg[key]

    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfig(f"hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias"):
        raise UnsupportedConfig("mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise UnsupportedConfig("use_sliding_window=true is not supported")
    qkv_bias = family == "qwen2" or bool(cfg.get("attention_bias", False))
    if family == "qwen3" and cfg.get("attention_bias"):
        raise UnsupportedConfig("attention_bias=true is not supported for qwen3")
    if family == "llama" and cfg.get("attention_bias"):
        raise UnsupportedConfig("attention_bias=true is not supported for llama (o_proj bias)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise UnsupportedConfig(f"pretraining_tp={cfg['pretraining_tp']} is not supported (must be 1)")

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = cfg.get("head_dim") or hidden // heads
    theta, scaling = _rope(cfg)
    if scaling is not None and family != "llama":
        raise UnsupportedConfig(f"rope_scaling is only supported for llama, not {family}")
    return ModelSpec(
        family=family,
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
        hf_config=dict(cfg),
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a Hugging Face model directory")
    return spec_from_hf_config(json.loads(path.read_text()))

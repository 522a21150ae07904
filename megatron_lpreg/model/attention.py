"""Which core attention the model's layers use (``model.attention``), and an SDPA one for
machines without Transformer Engine.

megatron-core's local spec computes attention as ``baddbmm`` -> softmax -> ``bmm`` and so
materialises ``[batch, heads/tp, seq, seq]`` scores: at the paper's 8k-token responses
(a 9k sequence, 40 heads over TP=4) that is 1.6 GB per layer per sequence in bf16 before
the softmax's copies, out of memory with a few sequences. :class:`SDPAttention` is the
same module with its core replaced by ``torch.nn.functional.scaled_dot_product_attention``
(causal, grouped-query heads), which runs flash or memory-efficient kernels on CUDA and
never builds the scores; on CPU it equals the local spec to 1e-5 (``pytest -k sdpa``).

``auto`` picks Transformer Engine's attention when TE imports (GPU), SDPA otherwise.
"""

from __future__ import annotations

import importlib.util

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_lpreg import platform
from megatron_lpreg.config import ATTENTION_BACKENDS

# megatron's fused softmax kernels: built with Megatron-LM or apex, not in the megatron-core wheel
_FUSED_SOFTMAX_EXTENSIONS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                             "scaled_softmax_cuda")


def te_available() -> bool:
    """Transformer Engine imports and there is a GPU for it."""
    if not platform.cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def fused_softmax_available() -> bool:
    """megatron's fused masked-softmax CUDA extensions import (a GPU and the compiled
    modules). megatron's config switch ``masked_softmax_fusion`` must follow this: the
    local spec imports them for bf16/fp16 shapes in the kernels' range."""
    return platform.cuda_available() and all(importlib.util.find_spec(m) is not None
                                             for m in _FUSED_SOFTMAX_EXTENSIONS)


def resolve_attention(choice: str) -> str:
    """``auto`` -> ``te`` when Transformer Engine runs here, else ``sdpa``; ``te`` where it
    does not is a one-line error."""
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention={choice!r} is not one of {ATTENTION_BACKENDS}")
    if choice == "auto":
        return "te" if te_available() else "sdpa"
    if choice == "te" and not te_available():
        raise ValueError("model.attention=te needs Transformer Engine on a GPU; use sdpa (or auto) here")
    return choice


class SDPAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` (same constructor, heads per partition, softmax
    scale) with the scores never materialised.

    Inputs are megatron's layout: query ``[sq, b, np/tp, hn]``, key and value
    ``[sk, b, ng/tp, hn]`` (``ng`` query groups); ``attention_mask`` None means causal
    (the trainer's right-padded batches), a boolean mask is megatron's (True = masked).
    Returns ``[sq, b, np/tp * hn]`` in the input dtype."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.config.attention_dropout:
            raise ValueError("SDPAttention has no attention dropout (megatron's RNG tracker would not fork "
                             "for it); set attention_dropout=0 or model.attention=local")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes neither packed sequences nor an attention bias")
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        causal = attention_mask is None
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else ~attention_mask, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], self.hidden_size_per_partition)


def attention_layer_spec(layer_spec, backend: str):
    """``layer_spec`` (megatron's local spec) with its core attention set for ``backend``:
    ``sdpa`` -> :class:`SDPAttention`; ``local`` -> unchanged."""
    if backend == "sdpa":
        layer_spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return layer_spec


"""The old-policy pass: per-token log-prob, entropy and Lp-Reg proxy log-prob, no grad.

One forward per micro-batch and one call of the foundation op
(:func:`megatron_lpreg.ops.vocab_parallel.token_stats`) on the vocab-parallel
logits: the proxy comes out of the same pass as the log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lpreg.model.forward import MicroBatch, run_micro_batches
from megatron_lpreg.trainer.batching import Sequences


@dataclass(frozen=True)
class StatsConfig:
    temperature: float = 1.0
    proxy: str = "minp"
    proxy_threshold: float = 0.02


def sequence_stats(model, seqs: Sequences, micro: list[list[int]], head, cfg: StatsConfig):
    """Returns ``{"logprob", "entropy", "proxy_logprob"}`` fp32 and ``"in_proxy"`` bool,
    each ``[N, L]`` like ``seqs.tokens``, on the last pipeline stage (None elsewhere).
    Values outside ``seqs.mask`` are meaningless. ``head``: an
    :class:`megatron_lpreg.trainer.head.OutputHead` (logits or fused)."""
    from megatron.core import parallel_state as ps

    device = next(model.parameters()).device
    n, width = seqs.tokens.shape
    keys = ("logprob", "entropy", "proxy_logprob", "in_proxy")
    out = {k: torch.zeros(n, width, dtype=torch.bool if k == "in_proxy" else torch.float32) for k in keys}

    def on_logits(mb: MicroBatch, logits: torch.Tensor):
        st = head.stats(logits, mb.extra["targets"].to(logits.device), proxy=cfg.proxy,
                        proxy_threshold=cfg.proxy_threshold, temperature=cfg.temperature)
        rows, w = mb.extra["rows"], logits.shape[1]
        for k in keys:
            out[k][rows, :w] = getattr(st, k).cpu().to(out[k].dtype)
        return logits.new_zeros(()), {}

    mbs = []
    for idx in micro:
        sub = seqs.rows(idx)
        mbs.append(MicroBatch(sub.tokens.to(device), {"targets": sub.targets, "rows": torch.tensor(idx)}))
    run_micro_batches(model, mbs, on_logits, forward_only=True)
    return out if ps.is_pipeline_last_stage() else None

"""Token sampling from full-vocabulary logits rows (the TorchEngine's sampler)."""

from __future__ import annotations

import torch

from megatron_lpreg.rollout.engine import SamplingConfig


def filter_logits(x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``x``: ``[rows, V]`` tempered logits -> a copy with filtered entries at -inf.

    top-k keeps the k largest; top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches p (the most likely token always stays).
    """
    x = x.clone()
    if top_k > 0 and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x[x < kth] = float("-inf")
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each entry
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x[drop] = float("-inf")
    return x


def sample_rows(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator):
    """``logits``: ``[rows, V]`` fp32, full vocabulary. Returns ``(token [rows] int64,
    logprob [rows] fp32)``: the log-prob under the distribution sampled from (tempered,
    then top-k / top-p filtered and renormalised), as vLLM's ``processed_logprobs``."""
    logits = logits.float()
    if sampling.temperature == 0:
        token = logits.argmax(-1)
        logp = logits.log_softmax(-1)
    else:
        logp = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p).log_softmax(-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return token, logp.gather(-1, token.unsqueeze(1)).squeeze(1)

"""Random prompt + response rows on the trainer's grid, for update tests."""

from __future__ import annotations

import torch


def random_sequences(g: torch.Generator, n: int, *, response_tokens: tuple[int, int] = (1, 8), vocab: int = 500):
    """``n`` rows: prompts of 2-5 tokens, responses of ``response_tokens`` [low, high) tokens,
    ids in [1, vocab); packed by :func:`megatron_lpreg.trainer.batching.pack_sequences`."""
    from megatron_lpreg.trainer.batching import pack_sequences

    def row(low, high):
        return torch.randint(1, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prompts = [row(2, 6) for _ in range(n)]
    responses = [row(*response_tokens) for _ in range(n)]
    return pack_sequences(prompts, responses, 0)

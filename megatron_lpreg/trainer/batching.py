"""From sampled (prompt, response) pairs to right-padded training tensors and micro-batches.

Layout: one row per sample, ``tokens = prompt + response`` right-padded to the
longest row. Position ``t``'s logits predict ``tokens[t + 1]``, so
``targets[:, t] = tokens[:, t + 1]`` and ``mask[:, t] = 1`` exactly where that
target is a response token. Every per-token tensor of the trainer (log-probs,
advantages, losses) lives on this ``[N, L]`` grid; the prompt and the padding
are masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    """tokens, targets: ``[N, L]`` int64; mask: ``[N, L]`` fp32; lengths: ``[N]`` int64
    (prompt + response); prompt_lengths: ``[N]`` int64."""

    tokens: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor

    def rows(self, idx: Sequence[int]) -> Sequences:
        """The rows ``idx``, trimmed to their own longest row."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        width = int(self.lengths[i].max())
        return Sequences(self.tokens[i, :width], self.targets[i, :width], self.mask[i, :width],
                         self.lengths[i], self.prompt_lengths[i])


def pack_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Sequences:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    n = len(prompts)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], dtype=torch.long)
    width = int(lengths.max()) if n else 0
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return Sequences(tokens, targets, mask, lengths, torch.tensor([len(p) for p in prompts], dtype=torch.long))


def token_budget_micro_batches(lengths: torch.Tensor, budget: int) -> list[list[int]]:
    """Split rows into micro-batches whose padded size (rows x longest row) fits ``budget``.

    Rows are sorted by length first, so rows of similar length share a
    micro-batch and little is spent on padding; a row longer than the budget
    gets a micro-batch of its own. Deterministic for equal inputs.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        ln = int(lengths[i])
        if cur and max(longest, ln) * (len(cur) + 1) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, ln)
    if cur:
        out.append(cur)
    return out


def data_parallel_rows(lengths: torch.Tensor, dp: int) -> list[list[int]]:
    """Every data-parallel rank's rows of a step. The rows' tokens (prompt + response)
    are balanced over ranks with equal row counts (the largest differencing partition,
    :func:`megatron_lpreg.trainer.reference_batching.balanced_partitions`, as the
    reference's ``balance_batch``): with 8k-token responses a rank holding the long
    ones would keep every other rank waiting. Deterministic in ``lengths``; every
    ``dp``-th row when the rows do not divide over the ranks."""
    from megatron_lpreg.trainer.reference_batching import balanced_partitions

    n = len(lengths)
    if dp == 1:
        return [list(range(n))]
    if n % dp or n < dp:
        return [list(range(r, n, dp)) for r in range(dp)]
    return balanced_partitions(lengths.tolist(), dp, equal_rows=True)


def token_imbalance(lengths: torch.Tensor, parts: list[list[int]]) -> float:
    """Max over mean of the ranks' token totals (1.0: perfectly even)."""
    totals = [int(lengths[p].sum()) if p else 0 for p in parts]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean else 1.0


def mini_batch_positions(n_rows: int, n_mini: int, *, reference: bool) -> list[list[int]]:
    """Positions ``0..n_rows-1`` per optimiser step: interleaved (every ``n_mini``-th row),
    or with ``reference`` contiguous slices as the reference splits a rank's rows."""
    if reference:
        from megatron_lpreg.trainer.reference_batching import mini_batch_slices

        return mini_batch_slices(n_rows, n_mini)
    n_mini = min(n_mini, n_rows)
    return [list(range(n_rows))[k::n_mini] for k in range(n_mini)]

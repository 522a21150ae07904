"""Plain-Python aggregation of per-token losses, shared by the loss transcriptions."""

from __future__ import annotations


def aggregate_tokens(per: dict, B: int, T: int, mode: str, zero):
    """``per[(b, t)]``: scalar tensors of valid tokens; the four modes as the design states them."""
    if mode == "token-mean":
        return sum(per.values(), zero) / max(len(per), 1)
    seqs = [[per[b, t] for t in range(T) if (b, t) in per] for b in range(B)]
    if mode == "seq-mean-token-sum":
        return sum((sum(s, zero) for s in seqs), zero) / B
    if mode == "seq-mean-token-mean":
        nonempty = [s for s in seqs if s]
        return sum((sum(s, zero) / len(s) for s in nonempty), zero) / max(len(nonempty), 1)
    return sum((sum(s, zero) for s in seqs), zero) / T

"""The output layer fused with the vocab-parallel log-prob: the logits are never whole.

Input: the last hidden states ``[tokens, hidden]`` and this rank's output-layer
weight shard ``[vocab/tp, hidden]`` (megatron's vocab-parallel ``output_layer``,
or the embedding for tied models). Tokens go in chunks of ``chunk_tokens``; each
chunk's logits ``[chunk, vocab/tp]`` are computed, reduced with the foundation
op's blocked passes (:func:`megatron_lpreg.ops.vocab_parallel.logprob_forward`,
the same one MAX and one SUM all-reduce per chunk) and dropped. Only per-token
``m``, ``log S`` and ``H`` are kept.

Backward recomputes each chunk's logits, turns them into the logits gradient with
the foundation op's formula (no collective), and accumulates
``d hidden = d logits @ W`` and ``d W += d logits^T @ hidden`` chunk by chunk.
The hidden states are replicated over the TP group, so their gradient is the sum
over ranks: one all-reduce (megatron's column-parallel linear does the same).
With sequence parallelism the hidden states arrive split along the first
(sequence) dimension: they are all-gathered in forward and the gradient is
reduce-scattered back.

Memory: one chunk of logits and its gradient (plus cache-sized blocks) instead
of the ``[tokens, vocab/tp]`` logits, their fp32 copy and their gradient. Time:
one extra logits matmul per chunk (the recompute).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lpreg.ops.vocab_parallel import (
    DEFAULT_BLOCK_ELEMENTS,
    TokenStats,
    _effective_group,
    _make_shard,
    _spans,
    logprob_backward,
    logprob_forward,
    token_stats,
)

DEFAULT_CHUNK_TOKENS = 2048


def _gather_sequence(hidden: torch.Tensor, group) -> torch.Tensor:
    tp = dist.get_world_size(group)
    parts = [torch.empty_like(hidden) for _ in range(tp)]
    dist.all_gather(parts, hidden.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _check(hidden, weight, target, sequence_parallel, group):
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [..., H] and weight {tuple(weight.shape)} [V/tp, H]")
    tp = 1 if group is None else dist.get_world_size(group)
    lead = (hidden.shape[0] * (tp if sequence_parallel else 1), *hidden.shape[1:-1])
    if tuple(target.shape) != lead:
        raise ValueError(f"target {tuple(target.shape)} must be {lead} (hidden {tuple(hidden.shape)}"
                         f"{', sequence-parallel' if sequence_parallel else ''})")


class _FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, temperature, group, vocab_size, with_entropy, sequence_parallel,
                chunk_tokens, block_elements, reduce_hidden_grad):
        full = _gather_sequence(hidden, group) if sequence_parallel and group is not None else hidden
        h2d = full.reshape(-1, full.shape[-1])
        t1d = target.reshape(-1)
        n = t1d.numel()
        outs = {k: [] for k in ("lp", "h", "m", "ls")}
        shard = None
        for a, b in _spans(0, n, chunk_tokens):
            logits = h2d[a:b] @ weight.t()
            shard = _make_shard(logits, group, vocab_size, None, block_elements)
            lp, h, m, ls = logprob_forward(logits, t1d[a:b], temperature, group, shard, with_entropy)
            for k, v in zip(("lp", "h", "m", "ls"), (lp, h, m, ls), strict=True):
                if v is not None:
                    outs[k].append(v)
            del logits
        cat = {k: (torch.cat(v) if v else None) for k, v in outs.items()}
        ctx.save_for_backward(hidden, weight, t1d, cat["m"], cat["ls"], cat["h"])
        ctx.cfg = (temperature, group, vocab_size, with_entropy, sequence_parallel, chunk_tokens, block_elements,
                   reduce_hidden_grad)
        lead = target.shape
        entropy = cat["h"].reshape(lead) if with_entropy else torch.zeros(0, device=hidden.device)
        return cat["lp"].reshape(lead), entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        hidden, weight, t1d, m_all, ls_all, h_all = ctx.saved_tensors
        temperature, group, vocab_size, with_entropy, sp, chunk_tokens, block_elements, reduce_grad = ctx.cfg
        full = _gather_sequence(hidden, group) if sp and group is not None else hidden
        h2d = full.reshape(-1, full.shape[-1])
        n = t1d.numel()
        use_h = with_entropy and g_h is not None and g_h.numel() == n
        g_lp = torch.zeros(n, device=hidden.device) if g_lp is None else g_lp.reshape(-1)
        g_h = g_h.reshape(-1) if use_h else None
        grad_h = torch.empty_like(h2d)
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for a, b in _spans(0, n, chunk_tokens):
            logits = h2d[a:b] @ weight.t()
            shard = _make_shard(logits, group, vocab_size, None, block_elements)
            g = logprob_backward(logits, t1d[a:b], m_all[a:b], ls_all[a:b], h_all[a:b] if use_h else None,
                                 g_lp[a:b], g_h[a:b] if use_h else None, temperature, shard, use_h)
            del logits
            grad_h[a:b] = g @ weight
            grad_w.addmm_(g.t().to(grad_w.dtype), h2d[a:b].to(grad_w.dtype))
        grad_h = grad_h.reshape(full.shape)
        if group is not None and reduce_grad:
            if sp:
                out = torch.empty_like(hidden)
                dist.reduce_scatter_tensor(out, grad_h.contiguous(), group=group)
                grad_h = out
            else:
                dist.all_reduce(grad_h, group=group)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None, None, None, None


def fused_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    sequence_parallel: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    reduce_hidden_grad: bool = True,
):
    """Differentiable ``log pi(target)`` (and entropy) from hidden states and the weight shard.

    Args:
        hidden: ``[..., H]`` (``[s/tp, ..., H]`` with ``sequence_parallel``), fp32|bf16.
        weight: ``[V/tp, H]`` this rank's vocabulary rows, same dtype.
        target: ``[...]`` int64 global token ids (the full sequence under SP).
        temperature, tp_group, vocab_size, with_entropy: as
            :func:`megatron_lpreg.ops.vocab_parallel.vocab_parallel_logprob`.
        chunk_tokens: tokens whose logits exist at once.
        reduce_hidden_grad: sum the hidden-state gradient over the TP group (False when
            the caller's own autograd op does it, e.g. megatron's sequence-parallel gather).

    Returns:
        ``logprob [...]`` fp32, or ``(logprob, entropy)``; gradients flow to
        ``hidden`` (summed over the TP group) and ``weight``.
    """
    group = _effective_group(tp_group)
    _check(hidden, weight, target, sequence_parallel, group)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lp, h = _FusedLogProb.apply(hidden, weight, target, float(temperature), group, vocab_size, with_entropy,
                                sequence_parallel, int(chunk_tokens), block_elements, reduce_hidden_grad)
    return (lp, h) if with_entropy else lp


@torch.no_grad()
def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    sequence_parallel: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    tp_group=None,
    **kw,
) -> TokenStats:
    """:func:`megatron_lpreg.ops.vocab_parallel.token_stats` (log-prob, entropy, Lp-Reg
    proxy) from hidden states, one chunk of logits at a time. ``kw``: proxy,
    proxy_threshold, temperature, vocab_size, block_elements."""
    group = _effective_group(tp_group)
    _check(hidden, weight, target, sequence_parallel, group)
    full = _gather_sequence(hidden, group) if sequence_parallel and group is not None else hidden
    h2d = full.reshape(-1, full.shape[-1])
    t1d = target.reshape(-1)
    parts = []
    for a, b in _spans(0, t1d.numel(), chunk_tokens):
        parts.append(token_stats(h2d[a:b] @ weight.t(), t1d[a:b], tp_group=tp_group, **kw))
    lead = target.shape
    return TokenStats(*(torch.cat([getattr(p, f) for p in parts]).reshape(lead)
                        for f in ("logprob", "entropy", "proxy_logprob", "in_proxy")))

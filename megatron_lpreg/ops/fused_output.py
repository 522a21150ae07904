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

Memory: one chunk of logits, overwritten by its gradient (plus cache-sized blocks) instead
of the ``[tokens, vocab/tp]`` logits, their fp32 copy and their gradient. Time:
one extra logits matmul per chunk (the recompute).

:func:`fused_logprob_loss` removes that extra matmul when the loss is
*token-separable* (the gradient of token t's log-prob depends on that token's
log-prob and entropy only, as in PPO/GRPO and Lp-Reg with global selection): the
loss's per-token gradient is known as soon as a chunk's log-probs are, so the
chunk's logits gradient, ``d hidden`` and ``d W`` are formed in the forward
while the chunk's logits still exist, and backward only scales them by the
incoming scalar. Three logits-sized matmuls, like the unfused path, instead of
four.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_lpreg import collectives
from megatron_lpreg.ops.vocab_parallel import (
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
    return torch.cat(collectives.all_gather(hidden.contiguous(), group), dim=0)


def _check(hidden, weight, target, sequence_parallel, group, chunk_tokens):
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
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
                chunk_tokens, block_elements, reduce_hidden_grad, backend):
        full = _gather_sequence(hidden, group) if sequence_parallel and group is not None else hidden
        h2d = full.reshape(-1, full.shape[-1])
        t1d = target.reshape(-1)
        n = t1d.numel()
        outs = {k: [] for k in ("lp", "h", "m", "ls")}
        shard = None
        for a, b in _spans(0, n, chunk_tokens):
            logits = h2d[a:b] @ weight.t()
            shard = _make_shard(logits, group, vocab_size, None, block_elements, backend)
            lp, h, m, ls = logprob_forward(logits, t1d[a:b], temperature, group, shard, with_entropy)
            for k, v in zip(("lp", "h", "m", "ls"), (lp, h, m, ls), strict=True):
                if v is not None:
                    outs[k].append(v)
            del logits
        cat = {k: (torch.cat(v) if v else None) for k, v in outs.items()}
        ctx.save_for_backward(hidden, weight, t1d, cat["m"], cat["ls"], cat["h"])
        ctx.cfg = (temperature, group, vocab_size, with_entropy, sequence_parallel, chunk_tokens, block_elements,
                   reduce_hidden_grad, backend)
        lead = target.shape
        entropy = cat["h"].reshape(lead) if with_entropy else torch.zeros(0, device=hidden.device)
        return cat["lp"].reshape(lead), entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        hidden, weight, t1d, m_all, ls_all, h_all = ctx.saved_tensors
        temperature, group, vocab_size, with_entropy, sp, chunk_tokens, block_elements, reduce_grad, backend = ctx.cfg
        full = _gather_sequence(hidden, group) if sp and group is not None else hidden
        h2d = full.reshape(-1, full.shape[-1])
        n = t1d.numel()
        use_h = with_entropy and g_h is not None and g_h.numel() == n
        g_lp = torch.zeros(n, device=hidden.device) if g_lp is None else g_lp.reshape(-1)
        g_h = g_h.reshape(-1) if use_h else None
        grad_h = torch.empty_like(h2d)
        # megatron's DDP gives the weight an fp32 main_grad: accumulate there directly
        grad_w = _main_grad(weight)
        if grad_w is None:
            grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for a, b in _spans(0, n, chunk_tokens):
            logits = h2d[a:b] @ weight.t()
            shard = _make_shard(logits, group, vocab_size, None, block_elements, backend)
            g = logprob_backward(logits, t1d[a:b], m_all[a:b], ls_all[a:b], h_all[a:b] if use_h else None,
                                 g_lp[a:b], g_h[a:b] if use_h else None, temperature, shard, use_h, out=logits)
            _accumulate(g, weight, h2d[a:b], grad_h[a:b], grad_w)
        grad_h = _reduce_hidden_grad(grad_h.reshape(full.shape), hidden.shape, group, sp, reduce_grad)
        grad_w = None if _main_grad(weight) is not None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None


def _main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 gradient buffer megatron's DDP attaches to a parameter (``main_grad``), or None.

    When it exists the weight gradient is added into it and the op returns no gradient
    for the weight, as megatron's own linear layers do with gradient-accumulation fusion:
    no bf16 rounding of the whole gradient before DDP adds it to an fp32 buffer, and no
    weight-sized copy. No ``.grad`` then reaches the parameter's DDP hook, which needs
    ``overlap_grad_reduce`` off (the trainer's setting, trainer/parallelize.py). A tied
    embedding's own gradient still arrives through autograd and the hook."""
    g = getattr(weight, "main_grad", None)
    return g if isinstance(g, torch.Tensor) and g.dtype == torch.float32 else None


def _accumulate(g, weight, h_chunk, grad_h_out, grad_w) -> None:
    """``grad_h_out = g @ W`` and ``grad_w += g^T @ h_chunk`` for one chunk's logits gradient
    ``g [chunk, V/tp]``. ``grad_w`` is fp32; the products run in the weight's dtype (bf16:
    tensor cores, fp32 accumulation inside the matmul), each chunk's product rounded once
    to it (as megatron's unfused bf16 weight gradient is, once over all tokens) and summed
    over chunks in fp32. An fp32 matmul of bf16 values would run without tensor cores."""
    g = g.to(weight.dtype)
    torch.matmul(g, weight, out=grad_h_out)  # a row slice of a contiguous buffer
    if grad_w.dtype == weight.dtype:
        grad_w.addmm_(g.t(), h_chunk)
    else:
        grad_w.add_(torch.mm(g.t(), h_chunk.to(weight.dtype)))


def _reduce_hidden_grad(grad_h, local_shape, group, sp: bool, reduce_grad: bool):
    """The hidden states are replicated over TP: their gradient is the sum over ranks
    (reduce-scattered back to the sequence split under sequence parallelism)."""
    if group is None or not reduce_grad:
        return grad_h
    if sp:
        out = grad_h.new_empty(local_shape)
        return collectives.reduce_scatter(out, grad_h.contiguous(), group)
    collectives.all_reduce(grad_h, group=group)
    return grad_h


def _token_grads(loss_of, lp, ent, lead, with_entropy):
    """Run ``loss_of`` on leaf copies of ``lp``/``ent`` ``[n]``; returns ``(loss, aux,
    d loss / d lp [n], d loss / d ent [n] or None)``."""
    with torch.enable_grad():
        lp_leaf = lp.detach().reshape(lead).requires_grad_()
        ent_leaf = ent.detach().reshape(lead).requires_grad_() if with_entropy else None
        loss, aux = loss_of(lp_leaf, ent_leaf)
        if loss.dim() != 0:
            raise ValueError(f"loss_of must return a scalar loss, got shape {tuple(loss.shape)}")
        leaves = [lp_leaf] + ([ent_leaf] if with_entropy else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    g_lp = torch.zeros_like(lp) if grads[0] is None else grads[0].reshape(-1).to(lp.dtype)
    g_h = grads[1].reshape(-1).to(lp.dtype) if with_entropy and grads[1] is not None else None
    return loss.detach(), aux, g_lp, g_h


class _FusedLogProbLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss_of, placeholder_lp, placeholder_ent, box, temperature, group,
                vocab_size, with_entropy, sequence_parallel, chunk_tokens, block_elements, reduce_hidden_grad, backend):
        full = _gather_sequence(hidden, group) if sequence_parallel and group is not None else hidden
        h2d = full.reshape(-1, full.shape[-1])
        t1d = target.reshape(-1)
        lead, n = target.shape, t1d.numel()
        # not-yet-computed tokens hold placeholders: a token-separable loss's gradient
        # for the current chunk does not depend on them
        lp_all = placeholder_lp.detach().reshape(-1).to(torch.float32).clone()
        ent_all = placeholder_ent.detach().reshape(-1).to(torch.float32).clone() if with_entropy else None
        g_lp_all = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        g_h_all = torch.zeros_like(g_lp_all) if with_entropy else None
        grad_h = torch.empty_like(h2d)
        # not main_grad: these gradients wait for backward's scale (the schedule's 1/n_micro)
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for a, b in _spans(0, n, chunk_tokens):
            logits = h2d[a:b] @ weight.t()
            shard = _make_shard(logits, group, vocab_size, None, block_elements, backend)
            lp, h, m, ls = logprob_forward(logits, t1d[a:b], temperature, group, shard, with_entropy)
            lp_all[a:b] = lp
            if with_entropy:
                ent_all[a:b] = h
            _, _, g_lp, g_h = _token_grads(loss_of, lp_all, ent_all, lead, with_entropy)
            g_lp_all[a:b] = g_lp[a:b]
            use_h = g_h is not None
            if use_h:
                g_h_all[a:b] = g_h[a:b]
            g = logprob_backward(logits, t1d[a:b], m, ls, h, g_lp[a:b].to(shard.dtype),
                                 g_h[a:b].to(shard.dtype) if use_h else None, temperature, shard, use_h, out=logits)
            _accumulate(g, weight, h2d[a:b], grad_h[a:b], grad_w)
            del logits, g
        loss, aux, g_lp, g_h = _token_grads(loss_of, lp_all, ent_all, lead, with_entropy)
        _check_separable(g_lp, g_lp_all, "log-prob")
        if with_entropy:
            _check_separable(torch.zeros_like(g_h_all) if g_h is None else g_h, g_h_all, "entropy")
        box["aux"] = aux
        # plain attributes, not save_for_backward: backward hands these very buffers on
        # (scaled in place), so the weight gradient never exists twice
        ctx.grads = (grad_h.reshape(full.shape), grad_w)
        ctx.main_grad = _main_grad(weight)
        ctx.cfg = (group, sequence_parallel, reduce_hidden_grad, weight.dtype, hidden.shape)
        logprob = lp_all.reshape(lead)
        entropy = ent_all.reshape(lead) if with_entropy else torch.zeros(0, device=hidden.device)
        ctx.mark_non_differentiable(logprob, entropy)
        return loss.to(torch.float32), logprob, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_lp, _g_ent):
        grad_h, grad_w = ctx.grads
        main_grad = ctx.main_grad
        del ctx.grads, ctx.main_grad
        group, sp, reduce_grad, w_dtype, local_shape = ctx.cfg
        grad_h = _reduce_hidden_grad(grad_h.mul_(g_loss.to(grad_h.dtype)), local_shape, group, sp, reduce_grad)
        grad_w.mul_(g_loss)
        if main_grad is not None:
            main_grad.add_(grad_w)
            return (grad_h, None) + (None,) * 14
        return (grad_h, grad_w.to(w_dtype)) + (None,) * 14


def _check_separable(final: torch.Tensor, per_chunk: torch.Tensor, what: str) -> None:
    # The gradients used chunk by chunk (later tokens still placeholders) must equal the
    # gradient at the final values: then the result is exact whatever the loss. A
    # difference means the loss couples tokens, and the shortcut would be silently wrong.
    if not final.numel():
        return
    scale, err = float(final.abs().max()), float((final - per_chunk).abs().max())
    if not (math.isfinite(scale) and math.isfinite(err)):
        return  # a non-finite loss is the caller's to handle (the trainer skips the step)
    if err > 1e-5 * max(scale, 1e-30):
        raise ValueError(
            f"fused_logprob_loss: the loss is not token-separable (its {what} gradient changed by {err:.3g} "
            f"of {scale:.3g} once later tokens were filled in); use fused_logprob (recompute in backward)")


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
    block_elements: int | None = None,
    reduce_hidden_grad: bool = True,
    backend: str = "auto",
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
        backend: the op's row passes per chunk, as
            :func:`megatron_lpreg.ops.vocab_parallel.token_stats`.

    Returns:
        ``logprob [...]`` fp32, or ``(logprob, entropy)``; gradients flow to
        ``hidden`` (summed over the TP group) and ``weight``.
    """
    group = _effective_group(tp_group)
    _check(hidden, weight, target, sequence_parallel, group, chunk_tokens)
    lp, h = _FusedLogProb.apply(hidden, weight, target, float(temperature), group, vocab_size, with_entropy,
                                sequence_parallel, int(chunk_tokens), block_elements, reduce_hidden_grad, backend)
    return (lp, h) if with_entropy else lp


def fused_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_of,
    *,
    placeholder_logprob: torch.Tensor,
    placeholder_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    tp_group=None,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    sequence_parallel: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    block_elements: int | None = None,
    reduce_hidden_grad: bool = True,
    backend: str = "auto",
):
    """A token-separable loss of ``log pi(target)`` (and entropy), gradients formed in the forward.

    Args:
        hidden, weight, target, temperature, tp_group, vocab_size, with_entropy,
            sequence_parallel, chunk_tokens, block_elements, reduce_hidden_grad, backend: as
            :func:`fused_logprob`.
        loss_of: ``(logprob [...] fp32, entropy [...] fp32 | None) -> (scalar loss, aux)``.
            Called once per chunk and once at the end; it must be token-separable and
            free of collectives. Checked: the per-token gradients used chunk by chunk must
            equal those at the final values (else ValueError), so an accepted result is
            exact.
        placeholder_logprob, placeholder_entropy: ``[...]`` values the not-yet-computed
            tokens hold during the per-chunk calls (e.g. the old policy's), so the loss
            sees finite, plausible inputs.

    Returns:
        ``(loss, logprob, entropy or None, aux)``: the scalar loss (fp32) with gradients
        to ``hidden`` and ``weight``; log-probs and entropies detached; ``aux`` from
        the final call of ``loss_of``.
    """
    group = _effective_group(tp_group)
    _check(hidden, weight, target, sequence_parallel, group, chunk_tokens)
    needed = [("placeholder_logprob", placeholder_logprob)]
    if with_entropy:
        needed.append(("placeholder_entropy", placeholder_entropy))
    for name, t in needed:
        if t is None or tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{name} must have the target's shape {tuple(target.shape)}, got "
                             f"{None if t is None else tuple(t.shape)}")
    box: dict = {}
    loss, lp, ent = _FusedLogProbLoss.apply(
        hidden, weight, target, loss_of, placeholder_logprob, placeholder_entropy, box, float(temperature), group,
        vocab_size, with_entropy, sequence_parallel, int(chunk_tokens), block_elements, reduce_hidden_grad, backend)
    return loss, lp, (ent if with_entropy else None), box.get("aux")


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
    proxy_threshold, temperature, vocab_size, block_elements, backend."""
    group = _effective_group(tp_group)
    _check(hidden, weight, target, sequence_parallel, group, chunk_tokens)
    full = _gather_sequence(hidden, group) if sequence_parallel and group is not None else hidden
    h2d = full.reshape(-1, full.shape[-1])
    t1d = target.reshape(-1)
    parts = []
    for a, b in _spans(0, t1d.numel(), chunk_tokens):
        parts.append(token_stats(h2d[a:b] @ weight.t(), t1d[a:b], tp_group=tp_group, **kw))
    lead = target.shape
    return TokenStats(*(torch.cat([getattr(p, f) for p in parts]).reshape(lead)
                        for f in ("logprob", "entropy", "proxy_logprob", "in_proxy")))

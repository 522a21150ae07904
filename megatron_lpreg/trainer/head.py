"""Where the trainer's log-probs come from: the model's logits, or (``model.fused_output``)
its last hidden states and the output weight through the fused op.

Fused: the GPTModel's ``output_layer`` keeps its weight (optimiser, checkpoints
and weight sync see no difference) but its forward passes the hidden states
through, so ``model(...)`` returns ``[b, s, hidden]`` instead of ``[b, s, V/tp]``
and no logits tensor is ever built. Under sequence parallelism the pass-through
gathers the sequence with megatron's own autograd op (reduce-scatter in backward),
so the fused op then leaves the hidden gradient alone.
"""

from __future__ import annotations

import types

import torch

from megatron_lpreg.ops.fused_output import fused_logprob, fused_logprob_loss, fused_token_stats
from megatron_lpreg.ops.vocab_parallel import TokenStats, token_stats, vocab_parallel_logprob


def _pass_hidden(self, input_, weight=None, runtime_gather_output=None):
    if getattr(self, "sequence_parallel", False):
        from megatron.core import tensor_parallel

        input_ = tensor_parallel.gather_from_sequence_parallel_region(input_)
    return input_, None


class OutputHead:
    def __init__(self, gpt, *, fused: bool, vocab_size: int, tp_group, chunk_tokens: int = 2048,
                 backend: str = "auto"):
        self.gpt, self.fused, self.vocab_size, self.tp_group = gpt, fused, vocab_size, tp_group
        self.chunk_tokens, self.backend = chunk_tokens, backend
        self.sequence_parallel = bool(getattr(gpt.config, "sequence_parallel", False))
        if fused and getattr(gpt, "post_process", False):
            gpt.output_layer.forward = types.MethodType(_pass_hidden, gpt.output_layer)

    def weight(self) -> torch.Tensor:
        # megatron's shared_embedding_or_output_weight() is the embedding on a first stage,
        # tied or not: only ask it when the weights are tied
        if self.gpt.share_embeddings_and_output_weights:
            return self.gpt.shared_embedding_or_output_weight()
        return self.gpt.output_layer.weight

    def stats(self, out: torch.Tensor, target: torch.Tensor, *, proxy: str, proxy_threshold: float,
              temperature: float) -> TokenStats:
        """``out``: the model's output ``[b, s, V/tp]`` (logits) or ``[b, s, hidden]`` (fused)."""
        kw = dict(proxy=proxy, proxy_threshold=proxy_threshold, temperature=temperature, tp_group=self.tp_group,
                  vocab_size=self.vocab_size, backend=self.backend)
        if self.fused:
            return fused_token_stats(out, self.weight().detach(), target, chunk_tokens=self.chunk_tokens, **kw)
        return token_stats(out, target, **kw)

    def logprob(self, out: torch.Tensor, target: torch.Tensor, *, temperature: float, with_entropy: bool):
        kw = dict(temperature=temperature, tp_group=self.tp_group, vocab_size=self.vocab_size,
                  with_entropy=with_entropy, backend=self.backend)
        if self.fused:
            return fused_logprob(out, self.weight(), target, chunk_tokens=self.chunk_tokens,
                                 reduce_hidden_grad=not self.sequence_parallel, **kw)
        return vocab_parallel_logprob(out, target, **kw)

    def loss(self, out: torch.Tensor, target: torch.Tensor, loss_of, *, temperature: float, separable: bool,
             old_logprob: torch.Tensor | None = None, old_entropy: torch.Tensor | None = None,
             with_entropy: bool = True):
        """``loss_of(logprob, entropy) -> (scalar loss, metrics)`` on the log-probs and
        entropies (None unless ``with_entropy``) of ``target`` ``[b, s]``; returns what it returns, the loss
        differentiable. A fused head with a token-separable loss (``separable``, see
        :class:`megatron_lpreg.loss.registry.LossSpec`) forms the gradients in the
        forward, the per-chunk calls seeing the old policy's values ``[b, s]`` (zeros when
        not given) for tokens not computed yet; otherwise the log-probs are computed
        first (fused: recomputing each chunk's logits in backward)."""
        if self.fused and separable:
            if old_logprob is None:
                old_logprob = torch.zeros(target.shape, device=out.device)
            loss, _, _, metrics = fused_logprob_loss(
                out, self.weight(), target, loss_of, placeholder_logprob=old_logprob,
                placeholder_entropy=old_entropy, temperature=temperature, tp_group=self.tp_group,
                vocab_size=self.vocab_size, with_entropy=with_entropy, chunk_tokens=self.chunk_tokens,
                reduce_hidden_grad=not self.sequence_parallel, backend=self.backend)
            return loss, metrics
        if with_entropy:
            return loss_of(*self.logprob(out, target, temperature=temperature, with_entropy=True))
        return loss_of(self.logprob(out, target, temperature=temperature, with_entropy=False), None)

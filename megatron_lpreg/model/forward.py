"""Forward (and backward) passes through megatron's pipeline schedule on padded batches.

Sequences are right-padded: with causal attention a padded position never
influences a real one, so no attention mask is needed, and per-sequence lengths
only matter to the caller (which positions it reads).

Every rank of the model-parallel group calls :func:`run_micro_batches` with the
same micro-batch shapes; only the last pipeline stage sees the output logits and
runs ``on_logits``. Under pipeline parallelism micro-batches of different shapes
are allowed through ``variable_seq_lengths`` (megatron then sends shapes ahead
of activations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    """tokens: ``[b, s]`` int64, right-padded. ``extra`` carries per-batch tensors
    the logits callback needs (targets, masks, advantages...)."""

    tokens: torch.Tensor
    extra: dict

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


def run_micro_batches(
    model,
    micro_batches: list[MicroBatch],
    on_logits: Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]],
    *,
    forward_only: bool,
) -> list[dict]:
    """Run ``micro_batches`` through ``model`` (one pipeline stage of a GPTModel).

    ``on_logits(mb, logits)`` gets this TP rank's vocab shard ``[b, s, V/tp]``
    and returns ``(loss, info)``; with ``forward_only=False`` gradients of
    ``loss`` accumulate in the parameters (megatron divides each micro-batch's
    loss by the number of micro-batches: callers scale for it). Returns the
    ``info`` dicts on the last stage, an empty list elsewhere.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    it = iter(micro_batches)

    def step(data_iterator, m):
        mb = next(data_iterator)
        b, s = mb.shape
        pos = torch.arange(s, device=mb.tokens.device).unsqueeze(0).expand(b, -1)
        out = m(mb.tokens, pos, None)

        def loss_func(logits):
            return on_logits(mb, logits)

        return out, loss_func

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        cfg = unwrap(model).config
        cfg.variable_seq_lengths = True
    b0, s0 = micro_batches[0].shape
    ctx = torch.no_grad() if forward_only else torch.enable_grad()
    with ctx:
        infos = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=it,
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=s0,
            micro_batch_size=b0,
            forward_only=forward_only,
        )
    return list(infos) if ps.is_pipeline_last_stage() else []


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model

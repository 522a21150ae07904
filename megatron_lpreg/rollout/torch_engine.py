"""Sampling with the trainer's Megatron model itself: no KV cache, no copy of the weights.

Each decoding step runs the whole (right-padded) batch through the pipeline and
reads every row's logits at its own last position; the TP shards of those rows
(``[rows, V/tp]``, a few rows, not the training logits) are all-gathered to
sample, with a generator seeded identically on every rank so all ranks draw the
same tokens. The last pipeline stage broadcasts the draws to the other stages.
Slow (quadratic in length) and meant for tests, greedy evaluation of small
models and machines without vLLM.
"""

from __future__ import annotations

import time

import torch

from megatron_lpreg import collectives
from megatron_lpreg.model.forward import MicroBatch, run_micro_batches
from megatron_lpreg.rollout.engine import RolloutBatch, RolloutEngine, SamplingConfig
from megatron_lpreg.rollout.sampling import sample_rows
from megatron_lpreg.tp_layout import gather_full


class TorchEngine(RolloutEngine):
    def __init__(self, model, vocab_size: int, *, pad_token_id: int = 0, max_batch: int = 64, head=None):
        """``model``: this rank's GPTModel stage (possibly DDP-wrapped). ``head``: the
        trainer's OutputHead when the model returns hidden states (fused output)."""
        self.model = model
        self.head = head
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch

    @property
    def shares_trainer_weights(self) -> bool:
        return True

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch:
        t0 = time.perf_counter()
        rows = [(p, i) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        gen = torch.Generator().manual_seed(sampling.seed)
        responses, logprobs, reasons = [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for a in range(0, len(rows), self.max_batch):
                chunk = [p for p, _ in rows[a : a + self.max_batch]]
                r, lp, fr = self._decode(chunk, sampling, gen)
                responses += r
                logprobs += lp
                reasons += fr
        finally:
            self.model.train(was_training)
        batch = RolloutBatch(
            prompt_index=[i for _, i in rows], prompts=[prompts[i] for _, i in rows],
            responses=responses, logprobs=logprobs, finish_reasons=reasons, weights_version=-1,
        )
        batch.timing["generate_s"] = time.perf_counter() - t0
        return batch

    def _decode(self, prompts, sampling, gen):
        from megatron.core import parallel_state as ps

        n = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max()) + sampling.max_new_tokens
        tokens = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        device = _device_of(self.model)
        out_tok = torch.zeros(n, sampling.max_new_tokens, dtype=torch.long)
        out_lp = torch.zeros(n, sampling.max_new_tokens)
        done = torch.zeros(n, dtype=torch.bool)
        n_new = torch.zeros(n, dtype=torch.long)
        stops = torch.tensor(sampling.stop_token_ids or [-1])
        for step in range(sampling.max_new_tokens):
            cur = int((lengths + n_new).max())
            picked: list[torch.Tensor] = []

            last = lengths + n_new - 1

            def last_rows(mb, logits, picked=picked, last=last):
                idx = last.to(logits.device)
                rows = logits[torch.arange(n, device=logits.device), idx]  # [n, V/tp] (or [n, hidden])
                if self.head is not None and self.head.fused:
                    rows = rows @ self.head.weight().t()
                picked.append(rows.float())
                return logits.new_zeros(()), {}

            mb = MicroBatch(tokens[:, :cur].to(device), {})
            run_micro_batches(self.model, [mb], last_rows, forward_only=True)
            draw = torch.zeros(2, n)
            if ps.is_pipeline_last_stage():
                full = gather_full(picked[0], 1, 1, ps.get_tensor_model_parallel_group())
                tok, lp = sample_rows(full[:, : self.vocab_size].cpu(), sampling, gen)
                draw = torch.stack([tok.double(), lp.double()])  # float64 holds any token id exactly
            draw = _from_last_stage(draw.double(), device)
            tok, lp = draw[0].long(), draw[1].float()
            active = ~done
            pos = (lengths + n_new).clamp(max=width - 1)
            tokens[active, pos[active]] = tok[active]
            out_tok[active, step] = tok[active]
            out_lp[active, step] = lp[active]
            n_new += active.long()
            done |= active & torch.isin(tok, stops)
            if bool(done.all()):
                break
        responses = [out_tok[i, : n_new[i]].tolist() for i in range(n)]
        logprobs = [out_lp[i, : n_new[i]].tolist() for i in range(n)]
        reasons = ["stop" if done[i] else "length" for i in range(n)]
        return responses, logprobs, reasons


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _from_last_stage(t: torch.Tensor, device) -> torch.Tensor:
    """Broadcast ``t`` from the last pipeline stage to every stage (same TP rank)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    t = t.to(device)
    src = ps.get_pipeline_model_parallel_last_rank()
    collectives.broadcast(t, src=src, group=ps.get_pipeline_model_parallel_group())
    return t.cpu()

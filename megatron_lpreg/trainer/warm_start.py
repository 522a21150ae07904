"""Supervised warm-start on the dataset's reference solutions (the tiny demo's SFT).

A random tiny model scores 0 on every prompt, so every GRPO group has zero
advantage and RL cannot start. A few hundred cross-entropy steps on
``prompt -> solution<eos>`` give a policy that is sometimes right, which is
where RLVR begins for real models too (a base model that can already answer).
The loss is the same vocab-parallel log-prob op the RL update uses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lpreg.config import RunConfig
from megatron_lpreg.data.prompts import get_path
from megatron_lpreg.model.forward import MicroBatch, run_micro_batches
from megatron_lpreg.trainer.batching import pack_sequences
from megatron_lpreg.trainer.optim import make_optimizer


def warm_start(model, cfg: RunConfig, examples, tokenizer, head, groups) -> list[float]:
    """Supervised steps on the examples' reference solutions (``warm_start.*``); every rank
    calls it, ``groups`` (:class:`megatron_lpreg.job.Groups`) splitting the batch over DP."""
    ws = cfg.warm_start
    optimizer = make_optimizer(model, cfg.optim, lr=ws.lr)
    for g in optimizer.param_groups:
        g["lr"] = ws.lr
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sols = [tokenizer.encode(str(get_path(e.row, ws.solution_key)), add_special_tokens=False) + [eos]
            for e in examples]
    gen = torch.Generator().manual_seed(cfg.train.seed + 7)
    device = next(model.parameters()).device
    dp, dp_rank = groups.dp_size, groups.dp_rank
    losses = []
    for step in range(ws.steps):
        idx = torch.randint(len(examples), (ws.batch_size,), generator=gen).tolist()[dp_rank::dp]
        seqs = pack_sequences([examples[i].prompt_ids for i in idx], [sols[i] for i in idx], pad)

        def on_logits(mb, logits, seqs=seqs):
            m = seqs.mask.to(logits.device)

            def loss_of(lp, _entropy):
                loss = -(lp * m).sum() / m.sum().clamp(min=1)
                return loss, {"loss": float(loss.detach())}

            return head.loss(logits, seqs.targets.to(logits.device), loss_of, temperature=1.0, separable=True,
                             with_entropy=False)

        model.zero_grad_buffer()
        optimizer.zero_grad()
        infos = run_micro_batches(model, [MicroBatch(seqs.tokens.to(device), {})], on_logits, forward_only=False)
        optimizer.step()
        if infos:
            losses.append(infos[0]["loss"])
        if dist.get_rank() == 0 and (step + 1) % max(1, ws.steps // 10) == 0:
            shown = f"{losses[-1]:.3f}" if losses else "-"
            print(f"[warm-start] step {step + 1}/{ws.steps} loss {shown}", flush=True)
    return losses

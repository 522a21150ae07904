"""``algo.selection_scope: reference`` + ``algo.loss_agg_mode: reference-token-mean``
against a transcription of the reference (Lp-Reg-dev, a verl fork): its
``balance_batch`` over GPUs, ``batch.split`` into mini-batches,
``rearrange_micro_batches`` (dynamic batching) with Karmarkar-Karp partitions,
``compute_policy_loss_lp_reg`` per micro-batch and the ``len(micro) / mini`` weight,
FSDP's mean over ranks. The trainer's update runs at DP=2 on a tiny megatron model;
the transcription recomputes the same gradient in one process. In one mini-batch the
ranks cut different numbers of micro-batches, so the MAX all-reduce is needed."""

from __future__ import annotations

import heapq
import math
import random

import pytest
import torch

from megatron_lpreg.trainer.reference_batching import (
    balanced_partitions,
    micro_batch_count,
    mini_batch_slices,
)
from tests.distributed import Layout, run_ranks
from tests.rollout.tiny_model import CONFIG
from tests.trainer.random_batch import random_sequences

# ---------------------------------------------------------------- transcription
# verl/utils/seqlen_balancing.py (karmarkar_karp, get_seqlen_balanced_partitions), as read


class _Set:
    def __init__(self):
        self.sum, self.items = 0, []

    def add(self, idx, val):
        self.items.append((idx, val))
        self.sum += val

    def merge(self, other):
        for idx, val in other.items:
            self.add(idx, val)

    def __lt__(self, other):
        if self.sum != other.sum:
            return self.sum < other.sum
        if len(self.items) != len(other.items):
            return len(self.items) < len(other.items)
        return self.items < other.items


class _State:
    def __init__(self, items, k):
        self.k = k
        self.sets = [_Set() for _ in range(k)]
        for i, (idx, seqlen) in enumerate(items):
            self.sets[i].add(idx, seqlen)
        self.sets = sorted(self.sets, reverse=True)

    def merge(self, other):
        for i in range(self.k):
            self.sets[i].merge(other.sets[self.k - 1 - i])
        self.sets = sorted(self.sets, reverse=True)

    @property
    def spread(self):
        return self.sets[0].sum - self.sets[-1].sum

    def __lt__(self, other):
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0] > other.sets[0]


def ref_partitions(seqlens, k, equal_size):
    srt = sorted([(s, i) for i, s in enumerate(seqlens)])
    pq = []
    if equal_size:
        for off in range(0, len(srt), k):
            heapq.heappush(pq, _State([(srt[off + i][1], srt[off + i][0]) for i in range(k)], k))
    else:
        for s, i in srt:
            heapq.heappush(pq, _State([(i, s)], k))
    while len(pq) > 1:
        a, b = heapq.heappop(pq), heapq.heappop(pq)
        a.merge(b)
        heapq.heappush(pq, a)
    return [sorted(idx for idx, _ in s.items) for s in pq[0].sets]


def ref_lp_reg_loss(old_log_prob, log_prob, tgt_log_prob, advantages, response_mask, *, clip_low, clip_high,
                    pos_percent, neg_percent, kl_coef):
    """core_algos.compute_policy_loss_lp_reg with kl_type low_var_kl, token-mean, as read."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    valid = (response_mask > 0).reshape(-1).nonzero(as_tuple=True)[0]
    seq_len = advantages.shape[1]
    adv_flat, lp_flat = advantages.reshape(-1), log_prob.reshape(-1)

    def penalise(target_idx):
        b, t = target_idx // seq_len, target_idx % seq_len
        keep = log_prob[b, t].detach() < tgt_log_prob[b, t]
        b, t = b[keep], t[keep]
        if len(b) == 0:
            return
        d = tgt_log_prob[b, t] - log_prob[b, t]
        kl = (torch.exp(d) - d - 1).clamp(-10, 10)
        pg_losses[b, t] = -advantages[b, t] * ratio[b, t] + kl_coef * kl

    for idx, percent in ((valid[adv_flat[valid] > 0], pos_percent), (valid[adv_flat[valid] < 0], neg_percent)):
        if len(idx) > 0:
            k = max(1, int(len(idx) * percent))
            if k > 1:
                with torch.no_grad():
                    target = idx[lp_flat[idx].topk(k=k, largest=False).indices]
                penalise(target)
    return (pg_losses * response_mask).sum() / (response_mask.sum() + 1e-8)


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize("seed", range(6))
def test_balanced_partitions_equal_the_reference(seed):
    rng = random.Random(seed)
    n = rng.randrange(4, 40)
    lengths = [rng.randrange(1, 30) for _ in range(n)]  # repeated lengths: ties are exercised
    for k in {1, 2, 3, min(n, 7)}:
        assert balanced_partitions(lengths, k, equal_rows=False) == ref_partitions(lengths, k, False)
    for k in (2, 4):
        if n % k == 0:
            assert balanced_partitions(lengths, k, equal_rows=True) == ref_partitions(lengths, k, True)


def test_mini_batches_are_contiguous_slices_like_split():
    assert mini_batch_slices(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mini_batch_slices(3, 5) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="equal row count"):
        balanced_partitions([1, 2, 3], 2, equal_rows=True)


# ---------------------------------------------------------------- the update at DP=2

# budget 18: in the first mini-batch the ranks' own counts differ (2 and 3 micro-batches),
# so the MAX all-reduce that keeps them in step decides the cut; in the second they agree
N_ROWS, DP, N_MINI, BUDGET = 16, 2, 2, 18
ALGO = dict(loss="lp_reg", selection_scope="reference", loss_agg_mode="reference-token-mean",
            micro_token_budget=BUDGET, neg_percent=0.5, pos_percent=0.4, kl_coef=1.0, clip_low=0.2, clip_high=0.28)


def _batch():
    g = torch.Generator().manual_seed(3)
    seqs = random_sequences(g, N_ROWS, response_tokens=(2, 9))
    adv = torch.randn(N_ROWS, 1, generator=g) * seqs.mask
    old = -torch.rand(seqs.mask.shape, generator=g) * 8
    proxy = -torch.rand(seqs.mask.shape, generator=g) * 12  # some selected tokens below it, some above
    return seqs, adv, old, proxy


def _transcribed_grads(gpt, spec, seqs, adv, old, proxy):
    """Per mini-batch: the reference's gradient, every GPU simulated here, averaged."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in gpt.named_parameters()}
    seqlen = seqs.lengths.tolist()
    per_gpu = ref_partitions(seqlen, DP, True)
    mini = N_ROWS // DP // N_MINI
    out = []
    for m in range(N_MINI):
        minis = [rows[m * mini:(m + 1) * mini] for rows in per_gpu]
        n_micro = max(min(len(r), -(-sum(seqlen[i] for i in r) // BUDGET)) for r in minis)  # MAX over ranks
        total = 0.0
        for rows in minis:
            for part in ref_partitions([seqlen[i] for i in rows], n_micro, False):
                idx = [rows[j] for j in part]
                sub = seqs.rows(idx)
                w = sub.tokens.shape[1]
                pos = torch.arange(w).unsqueeze(0).expand(len(idx), -1)
                logits = torch.func.functional_call(gpt, params, (sub.tokens, pos, None))[..., : spec.vocab_size]
                lp = torch.log_softmax(logits.float(), -1).gather(-1, sub.targets.unsqueeze(-1)).squeeze(-1)
                loss = ref_lp_reg_loss(old[idx, :w], lp, proxy[idx, :w], adv[idx, :w], sub.mask,
                                       clip_low=ALGO["clip_low"], clip_high=ALGO["clip_high"],
                                       pos_percent=ALGO["pos_percent"], neg_percent=ALGO["neg_percent"],
                                       kl_coef=ALGO["kl_coef"])
                total = total + loss * (len(idx) / mini)
        grads = torch.autograd.grad(total / DP, list(params.values()))
        out.append({n: g for n, g in zip(params, grads, strict=True)})
    return out


def _rank():
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.job import Groups
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.batching import data_parallel_rows, mini_batch_positions
    from megatron_lpreg.trainer.head import OutputHead
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp
    from megatron_lpreg.trainer.update import UpdateBatch, policy_update

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(CONFIG)
    cfg = RunConfig()
    cfg.optim.lr, cfg.optim.grad_clip = 0.0, 0.0  # the weights stay: every mini-batch sees the same policy
    # the replicated optimiser: megatron's DistributedOptimizer reduce-scatters the gradients,
    # so a rank's main_grad holds the reduced gradient only in its own shard
    cfg.optim.use_distributed_optimizer = False
    for k, v in ALGO.items():
        setattr(cfg.algo, k, v)
    gpt = build_gpt(spec)
    seqs, adv, old, proxy = _batch()
    want = _transcribed_grads(gpt, spec, seqs, adv, old, proxy)

    head = OutputHead(gpt, fused=False, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group())
    model = wrap_ddp(gpt, cfg)
    opt = make_optimizer(model, cfg.optim)
    mine = data_parallel_rows(seqs.lengths, DP)[ps.get_data_parallel_rank()]
    batch = UpdateBatch(seqs.rows(mine), adv[mine], old[mine], torch.zeros_like(old[mine]), proxy[mine], old[mine])
    worst, records = 0.0, []
    for m, pos in enumerate(mini_batch_positions(len(mine), N_MINI, reference=True)):
        records.append(policy_update(model, opt, batch, pos, cfg.algo, head=head, groups=Groups.from_parallel_state(),
                                      temperature=1.0))
        for name, p in gpt.named_parameters():
            scale = want[m][name].abs().max().item() + 1e-12
            worst = max(worst, (p.main_grad - want[m][name]).abs().max().item() / scale)
    return {"mine": mine, "worst_rel_err": worst, "regularised": sum(r["lp_reg/regularised_tokens"] for r in records),
            "selected": sum(r["lp_reg/selected_tokens"] for r in records)}


def test_reference_scope_and_weighting_equal_the_transcription_at_dp2():
    res = run_ranks(_rank, Layout(tp=1, dp=DP), timeout=300)
    seqs = _batch()[0]
    assert [r["mine"] for r in res] == ref_partitions(seqs.lengths.tolist(), DP, True)
    lengths, mini = seqs.lengths.tolist(), N_ROWS // DP // N_MINI
    own_counts = [[micro_batch_count([lengths[i] for i in r["mine"][m * mini:(m + 1) * mini]], BUDGET) for r in res]
                  for m in range(N_MINI)]
    assert own_counts == [[2, 3], [2, 2]], own_counts  # the case covers both: differing and equal counts
    for r in res:
        # the case exercises what it claims: tokens selected and regularised on every rank
        assert r["selected"] > 0 and 0 < r["regularised"] < r["selected"], r
        assert r["worst_rel_err"] < 1e-4, r
    assert math.isfinite(res[0]["worst_rel_err"])

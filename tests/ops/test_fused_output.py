"""The fused output layer equals output layer + foundation op: values and gradients for
hidden states and weight at TP=1/2/4 on gloo (fp32 to 1e-5; bf16 within 2e-2), with
sequence parallelism, and the no-grad statistics (proxy included)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks

T, H, V, VOCAB = 36, 24, 64, 61  # 36 = 4 chunks of 8 + a ragged one; splits over TP=2 for SP; padded vocab


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g) * 2
    weight = torch.randn(V, H, generator=g) / H**0.5
    target = torch.randint(0, VOCAB, (T,), generator=g)
    c_lp, c_h = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return hidden.to(dtype), weight.to(dtype), target, c_lp, c_h


def _rank(dtype, sequence_parallel):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lpreg.ops.fused_output import fused_logprob, fused_token_stats
    from megatron_lpreg.ops.vocab_parallel import token_stats, vocab_parallel_logprob

    group = ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    hidden, weight, target, c_lp, c_h = _inputs(dtype)
    w_shard = weight.chunk(tp)[rank].clone()

    # reference: the whole logits shard, then the foundation op
    h_ref = hidden.clone().requires_grad_()
    w_ref = w_shard.clone().requires_grad_()
    lp, ent = vocab_parallel_logprob(h_ref @ w_ref.t(), target, tp_group=group, vocab_size=VOCAB,
                                     temperature=0.7, with_entropy=True)
    ((lp * c_lp).sum() + (ent * c_h).sum()).backward()
    h_grad_ref = h_ref.grad.clone()
    dist.all_reduce(h_grad_ref, group=group)  # hidden is replicated: its gradient sums over ranks

    if sequence_parallel:
        h_in = hidden.chunk(tp)[rank].clone().requires_grad_()  # sequence-split
    else:
        h_in = hidden.clone().requires_grad_()
    w_in = w_shard.clone().requires_grad_()
    lp2, ent2 = fused_logprob(h_in, w_in, target, tp_group=group, vocab_size=VOCAB, temperature=0.7,
                              with_entropy=True, sequence_parallel=sequence_parallel, chunk_tokens=8)
    ((lp2 * c_lp).sum() + (ent2 * c_h).sum()).backward()
    h_grad_ref = h_grad_ref.chunk(tp)[rank] if sequence_parallel else h_grad_ref

    st_ref = token_stats(hidden @ w_shard.t(), target, tp_group=group, vocab_size=VOCAB, proxy="minp",
                         proxy_threshold=0.1)
    st = fused_token_stats(h_in.detach(), w_shard, target, tp_group=group, vocab_size=VOCAB, proxy="minp",
                           proxy_threshold=0.1, sequence_parallel=sequence_parallel, chunk_tokens=8)
    return {
        "lp": (lp2.detach(), lp.detach()), "ent": (ent2.detach(), ent.detach()),
        "h_grad": (h_in.grad, h_grad_ref), "w_grad": (w_in.grad, w_ref.grad),
        **{f"st_{f}": (getattr(st, f), getattr(st_ref, f)) for f in ("logprob", "entropy", "proxy_logprob",
                                                                     "in_proxy")},
    }


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (4, False), (2, True)], ids=["tp1", "tp2", "tp4", "tp2-sp"])
def test_fused_equals_unfused_fp32(tp, sp):
    for r in run_ranks(_rank, tp, torch.float32, sp):
        for key, (got, ref) in r.items():
            if ref.dtype == torch.bool:
                assert torch.equal(got, ref), key
            else:
                torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5, msg=key)


def test_fused_bf16_within_tolerance():
    for r in run_ranks(_rank, 2, torch.bfloat16, False):
        for key in ("lp", "ent", "h_grad", "w_grad"):
            got, ref = r[key]
            torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=key)


def test_leading_dimensions_are_kept():
    """[b, s, H] hidden states (the trainer's layout) give the flattened [T, H] result,
    gradients included."""
    from megatron_lpreg.ops.fused_output import fused_logprob

    hidden, weight, target, c_lp, c_h = _inputs(torch.float32)
    grads = []
    for shape in ((T, H), (4, T // 4, H)):
        h = hidden.reshape(shape).clone().requires_grad_()
        w = weight.clone().requires_grad_()
        lp, ent = fused_logprob(h, w, target.reshape(shape[:-1]), vocab_size=VOCAB, with_entropy=True,
                                chunk_tokens=8)
        assert lp.shape == ent.shape == shape[:-1]
        ((lp.reshape(-1) * c_lp).sum() + (ent.reshape(-1) * c_h).sum()).backward()
        grads.append((lp.detach().reshape(-1), h.grad.reshape(T, H), w.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_shape_errors():
    from megatron_lpreg.ops.fused_output import fused_logprob

    with pytest.raises(ValueError, match="must be"):
        fused_logprob(torch.randn(4, 8), torch.randn(16, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        fused_logprob(torch.randn(4, 8), torch.randn(16, 8), torch.zeros(5, dtype=torch.long))


# --- fused_logprob_loss: the loss's gradient formed in the forward ---------------------

B, S = 3, 12  # B * S = T tokens as a [batch, response_len] grid; S splits over TP=2 for SP


def _loss_inputs():
    """Old-policy log-probs near the current ones (some ratios clipped), proxy log-probs
    above some of the lowest log-probs (Lp-Reg regularises those), mixed advantages."""
    hidden, weight, target, _, _ = _inputs(torch.float32)
    from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob

    lp = vocab_parallel_logprob(hidden @ weight.t(), target, vocab_size=VOCAB, temperature=0.7).reshape(B, S)
    g = torch.Generator().manual_seed(1)
    old = lp + 0.3 * torch.randn(B, S, generator=g)
    proxy = lp + torch.randn(B, S, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, S).clone()
    mask = (torch.rand(B, S, generator=g) > 0.15).float()
    thr = float(lp[(adv < 0) & (mask > 0)].kthvalue(3).values)
    return old, proxy, adv, mask, thr


def _lp_reg_loss_of(old, proxy, adv, mask, thr):
    from megatron_lpreg.loss.entropy_control import entropy_bonus
    from megatron_lpreg.loss.lp_reg import lp_reg_loss

    def loss_of(lp, ent):
        loss, metrics = lp_reg_loss(lp, old, proxy, adv, mask, thresholds=(thr, None), entropy=ent)
        return entropy_bonus(loss, ent, mask, coef=0.05, loss_agg_mode="token-mean"), metrics

    return loss_of


def _loss_rank(sequence_parallel):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_lpreg.ops.fused_output import fused_logprob_loss
    from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob

    group = ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    hidden, weight, target, _, _ = _inputs(torch.float32)
    hidden, target = hidden.reshape(B, S, H), target.reshape(B, S)
    w_shard = weight.chunk(tp)[rank].clone()
    old, proxy, adv, mask, thr = _loss_inputs()
    loss_of = _lp_reg_loss_of(old, proxy, adv, mask, thr)

    h_ref, w_ref = hidden.clone().requires_grad_(), w_shard.clone().requires_grad_()
    lp, ent = vocab_parallel_logprob(h_ref @ w_ref.t(), target, tp_group=group, vocab_size=VOCAB, temperature=0.7,
                                     with_entropy=True)
    loss_ref, metrics_ref = loss_of(lp, ent)
    (3.0 * loss_ref).backward()  # a non-unit upstream gradient, as the trainer's loss scaling gives
    h_grad_ref = h_ref.grad.clone()
    dist.all_reduce(h_grad_ref, group=group)

    # sequence parallelism splits the first (sequence) dimension: [S, B, H] as megatron lays it out
    if sequence_parallel:
        h_full, tgt, ph_lp, ph_ent = (hidden.transpose(0, 1), target.t(), old.t(), torch.zeros(S, B))
        h_in = h_full.chunk(tp)[rank].clone().requires_grad_()
        t_loss = lambda lp_, ent_: loss_of(lp_.t(), ent_.t())  # noqa: E731
        h_grad_ref = h_grad_ref.transpose(0, 1).chunk(tp)[rank]
    else:
        h_in, tgt, ph_lp, ph_ent, t_loss = hidden.clone().requires_grad_(), target, old, torch.zeros(B, S), loss_of
    w_in = w_shard.clone().requires_grad_()
    loss, lp2, ent2, metrics = fused_logprob_loss(
        h_in, w_in, tgt, t_loss, placeholder_logprob=ph_lp, placeholder_entropy=ph_ent, tp_group=group,
        vocab_size=VOCAB, temperature=0.7, with_entropy=True, sequence_parallel=sequence_parallel, chunk_tokens=8)
    (3.0 * loss).backward()
    if sequence_parallel:
        lp2, ent2 = lp2.t(), ent2.t()
    return {
        "loss": (loss.detach(), loss_ref.detach()), "lp": (lp2, lp.detach()), "ent": (ent2, ent.detach()),
        "h_grad": (h_in.grad, h_grad_ref), "w_grad": (w_in.grad, w_ref.grad),
        "regularised": (torch.tensor(metrics["lp_reg/regularised_tokens"]),
                        torch.tensor(metrics_ref["lp_reg/regularised_tokens"])),
    }


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (4, False), (2, True)], ids=["tp1", "tp2", "tp4", "tp2-sp"])
def test_fused_loss_equals_unfused(tp, sp):
    for r in run_ranks(_loss_rank, tp, sp):
        assert int(r["regularised"][1]) > 0  # the Lp-Reg branch is exercised, not only PPO
        for key, (got, ref) in r.items():
            torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5, msg=key)


def test_fused_loss_refuses_a_loss_that_couples_tokens():
    from megatron_lpreg.loss.lp_reg import lp_reg_loss
    from megatron_lpreg.ops.fused_output import fused_logprob_loss

    hidden, weight, target, _, _ = _inputs(torch.float32)
    hidden, target = hidden.reshape(B, S, H), target.reshape(B, S)
    old, proxy, adv, mask, _ = _loss_inputs()
    h = hidden.clone().requires_grad_()

    def coupled(lp, ent):  # the reference's micro-batch selection: the lowest log-probs *of this batch*
        return lp_reg_loss(lp, old, lp.detach() + 1, adv, mask, neg_percent=0.2)  # every selected one regularised

    def softmax_over_tokens(lp, ent):
        return torch.logsumexp(lp.flatten(), 0), {}

    # placeholders below every real log-prob: while later tokens are unknown the coupled
    # selection picks placeholders, at the end it picks real tokens, so the gradients differ
    for loss_of in (coupled, softmax_over_tokens):
        with pytest.raises(ValueError, match="not token-separable"):
            fused_logprob_loss(h, weight, target, loss_of, placeholder_logprob=old - 100, vocab_size=VOCAB,
                               chunk_tokens=8)
    with pytest.raises(ValueError, match="placeholder_logprob"):
        fused_logprob_loss(h, weight, target, softmax_over_tokens, placeholder_logprob=old[:2], vocab_size=VOCAB)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
def test_losses_called_token_separable_are(agg):
    """Every loss the registry calls token-separable passes the exactness check even with
    placeholders far below the real log-probs (the check would catch any coupling the
    values expose), and its loss equals the unfused one."""
    from megatron_lpreg.config import AlgoConfig
    from megatron_lpreg.loss.entropy_control import entropy_bonus
    from megatron_lpreg.loss.registry import LOSSES
    from megatron_lpreg.ops.fused_output import fused_logprob_loss
    from megatron_lpreg.ops.vocab_parallel import vocab_parallel_logprob

    hidden, weight, target, _, _ = _inputs(torch.float32)
    hidden, target = hidden.reshape(B, S, H), target.reshape(B, S)
    old, proxy, adv, mask, thr = _loss_inputs()
    lp, ent = vocab_parallel_logprob(hidden @ weight.t(), target, vocab_size=VOCAB, with_entropy=True)
    checked = 0
    global_scope = AlgoConfig(selection_scope="global")
    for name, spec in LOSSES.items():
        if not spec.separable(global_scope):
            continue
        extra = dict(proxy_log_prob=lp.detach() + 1, thresholds=(thr, None)) if name == "lp_reg" else {}

        def loss_of(lp_, ent_, name=name, extra=extra):
            loss, _ = LOSSES[name].fn(lp_, old, advantages=adv, response_mask=mask, loss_agg_mode=agg,
                                      entropy=ent_, **extra)
            return entropy_bonus(loss, ent_, mask, coef=0.05, loss_agg_mode=agg), {}

        loss, *_ = fused_logprob_loss(hidden, weight, target, loss_of, placeholder_logprob=old - 100,
                                      placeholder_entropy=torch.zeros(B, S), vocab_size=VOCAB, with_entropy=True,
                                      chunk_tokens=8)
        torch.testing.assert_close(loss, loss_of(lp, ent)[0].detach(), rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 3  # grpo, ppo, lp_reg
    for scope in ("micro_batch", "reference"):
        assert not LOSSES["lp_reg"].separable(AlgoConfig(selection_scope=scope))
    assert not any(LOSSES[n].separable(global_scope) for n in ("gspo", "kl_cov", "clip_cov"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_form", [False, True], ids=["recompute", "loss"])
def test_weight_gradient_goes_into_main_grad(dtype, loss_form):
    """Under megatron's DDP a parameter carries an fp32 ``main_grad``: the fused op adds its
    weight gradient there (no bf16 rounding of the whole gradient, no ``.grad``), on top of
    what it holds, and it equals the gradient the op returns without one."""
    from megatron_lpreg.ops.fused_output import fused_logprob, fused_logprob_loss

    hidden, weight, target, c_lp, _ = _inputs(dtype)

    def run(w):
        h = hidden.clone().requires_grad_()
        if loss_form:
            loss, *_ = fused_logprob_loss(h, w, target, lambda lp, e: ((lp * c_lp).sum(), None),
                                          placeholder_logprob=torch.zeros(T), vocab_size=VOCAB, chunk_tokens=8)
        else:
            loss = (fused_logprob(h, w, target, vocab_size=VOCAB, chunk_tokens=8) * c_lp).sum()
        (loss * 0.5).backward()  # a scale like the schedule's 1 / micro-batches

    plain = weight.clone().requires_grad_()
    run(plain)
    ddp = weight.clone().requires_grad_()
    earlier = torch.randn(V, H, generator=torch.Generator().manual_seed(9))  # an earlier micro-batch's
    ddp.main_grad = earlier.clone()
    run(ddp)
    assert ddp.grad is None
    got = ddp.main_grad - earlier
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, plain.grad.float(), **tol)
    if dtype == torch.bfloat16:  # the sum of per-chunk products stays fp32: closer to fp64 than one rounding
        exact = _dense_weight_grad(hidden, weight, target, c_lp)
        assert (got - exact).abs().max() <= (plain.grad.float() - exact).abs().max() + 1e-6


def _dense_weight_grad(hidden, weight, target, c_lp):
    w = weight.double().requires_grad_()
    logits = (hidden.double() @ w.t())[:, :VOCAB]  # the padded rows get no gradient
    lp = torch.log_softmax(logits, -1).gather(1, target.unsqueeze(1)).squeeze(1)
    ((lp * c_lp.double()).sum() * 0.5).backward()
    return w.grad.float()

"""The policy update on two gloo ranks (TP=2): micro-batch packing does not change
the gradient, and a NaN loss skips the step without touching weights or optimiser."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.rollout.tiny_model import CONFIG
from tests.trainer.random_batch import random_sequences


def _batch(n=12, seed=0):
    from megatron_lpreg.trainer.update import UpdateBatch

    g = torch.Generator().manual_seed(seed)
    seqs = random_sequences(g, n)
    adv = torch.randn(n, 1, generator=g) * seqs.mask
    old = -torch.rand(seqs.mask.shape, generator=g) * 3
    return UpdateBatch(seqs, adv, old, torch.rand(seqs.mask.shape, generator=g), old + 0.5, old)


def _rank(overrides=None, fused=False, tied=False, loss="lp_reg"):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.job import Groups
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.head import OutputHead
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp
    from megatron_lpreg.trainer.update import policy_update

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(dict(CONFIG, tie_word_embeddings=tied))
    cfg = RunConfig()
    cfg.optim.lr = 1e-3
    cfg.algo.loss = loss
    gpt = build_gpt(spec, **(overrides or {}))
    head = OutputHead(gpt, fused=fused, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group(),
                      chunk_tokens=7)
    model = wrap_ddp(gpt, cfg)
    opt = make_optimizer(model, cfg.optim)
    batch = _batch()
    rows = list(range(12))
    groups = Groups.from_parallel_state()
    out = {}
    for name, budget in (("one_micro", 10_000), ("many_micro", 16)):
        cfg.algo.micro_token_budget = budget
        snapshot = [p.detach().clone() for p in model.parameters()]
        rec = policy_update(model, opt, batch, rows, cfg.algo, head=head, groups=groups, temperature=1.0)
        out[name] = rec.get("grad_norm")
        with torch.no_grad():  # undo, so both packings see the same weights
            for p, s in zip(model.parameters(), snapshot, strict=True):
                p.copy_(s)
    before = [p.detach().clone() for p in model.parameters()]
    bad = _batch()
    bad.advantages[0, :] = float("nan")
    rec = policy_update(model, opt, bad, rows, cfg.algo, head=head, groups=groups, temperature=1.0)
    out["nan_skipped"] = rec["skipped"]
    out["nan_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    rec = policy_update(model, opt, _batch(seed=1), rows, cfg.algo, head=head, groups=groups, temperature=1.0)
    out["after_skipped"] = rec["skipped"]
    out["after_changed"] = not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    return out


def _first_with_loss(res):
    return res[0] if res[0].get("one_micro") is not None else res[1]


def test_full_recompute_gives_the_same_gradient():
    from megatron_lpreg.config import ParallelConfig
    from megatron_lpreg.model.attention import te_available
    from megatron_lpreg.trainer.parallelize import model_overrides

    plain = _first_with_loss(run_ranks(_rank, Layout(tp=2), timeout=300))
    if not te_available():
        with pytest.raises(ValueError, match="Transformer Engine"):
            model_overrides(ParallelConfig(tp=2, sequence_parallel=True))
    kw = model_overrides(ParallelConfig(tp=2, sequence_parallel=te_available(), recompute="full"))
    sp = _first_with_loss(run_ranks(_rank, Layout(tp=2), kw, timeout=300))
    assert math.isclose(plain["one_micro"], sp["one_micro"], rel_tol=1e-5), (plain, sp)


# lp_reg (global selection) is token-separable: the fused head forms its gradients in the
# forward; gspo is not: the fused head recomputes the logits in backward
@pytest.mark.parametrize("tied,loss", [(False, "lp_reg"), (True, "lp_reg"), (False, "gspo")],
                         ids=["untied", "tied", "untied-gspo"])
def test_fused_output_gives_the_same_gradient(tied, loss):
    plain = _first_with_loss(run_ranks(_rank, Layout(tp=2), None, False, tied, loss, timeout=300))
    fused = _first_with_loss(run_ranks(_rank, Layout(tp=2), None, True, tied, loss, timeout=300))
    for key in ("one_micro", "many_micro"):
        assert math.isclose(plain[key], fused[key], rel_tol=1e-5), (key, plain[key], fused[key])
    assert fused["nan_skipped"] == 1 and fused["nan_unchanged"]


def test_update_packing_and_nan_skip():
    res = run_ranks(_rank, Layout(tp=2), timeout=300)
    r = res[0] if "one_micro" in res[0] and res[0]["one_micro"] is not None else res[1]
    assert math.isfinite(r["one_micro"]) and r["one_micro"] > 0
    # micro-batch packing (1 vs several micro-batches) leaves the gradient unchanged
    assert math.isclose(r["one_micro"], r["many_micro"], rel_tol=1e-5), (r["one_micro"], r["many_micro"])
    assert r["nan_skipped"] == 1 and r["nan_unchanged"]
    assert r["after_skipped"] == 0 and r["after_changed"]


def _grads_under_controls(fused):
    """TP=1: the flattened gradient of one update under each loss setting (lr 0, no clipping)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.job import Groups
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.head import OutputHead
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp
    from megatron_lpreg.trainer.update import policy_update

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(CONFIG)
    cfg = RunConfig()
    cfg.optim.lr, cfg.optim.grad_clip = 0.0, 0.0
    gpt = build_gpt(spec)
    head = OutputHead(gpt, fused=fused, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group(),
                      chunk_tokens=7)
    model = wrap_ddp(gpt, cfg)
    opt = make_optimizer(model, cfg.optim)
    groups = Groups.from_parallel_state()
    rows = list(range(12))

    def grad(batch, alpha=0.0, **algo):
        for k, v in {**dict(loss="grpo", entropy_control="none", entropy_coef=0.0, tis_cap=None), **algo}.items():
            setattr(cfg.algo, k, v)
        policy_update(model, opt, batch, rows, cfg.algo, head=head, groups=groups, temperature=1.0, aer_alpha=alpha)
        return torch.cat([p.main_grad.flatten().clone() for p in gpt.parameters()])

    on_policy = _batch()                      # rollout log-probs = old
    off = _batch()
    off.rollout_logprob = off.old_logprob - 0.7  # exp(0.7) = 2.01 > cap: every weight is the cap
    uniform, skewed = _batch(), _batch()
    uniform.row_weights = torch.ones(12)
    skewed.row_weights = torch.linspace(0.0, 2.0, 12)
    return {
        "grpo": grad(on_policy), "tis_on_policy": grad(on_policy, tis_cap=1.5), "grpo_off": grad(off),
        "tis_off": grad(off, tis_cap=1.5),
        "aer_zero": grad(uniform, 0.0, entropy_control="aer"),
        "aer_uniform": grad(uniform, 0.05, entropy_control="aer"),
        "bonus": grad(uniform, entropy_control="bonus", entropy_coef=0.05),
        "aer_skewed": grad(skewed, 0.05, entropy_control="aer"),
        "kl_cov": grad(on_policy, loss="kl_cov"), "clip_cov": grad(on_policy, loss="clip_cov"),
    }


def test_tis_and_aer_change_the_gradient_as_their_formulas_say():
    g = run_ranks(_grads_under_controls, Layout(tp=1), False, timeout=300)[0]
    def close(a, b):  # to 1e-5 of the gradient's scale (its entries near zero carry rounding only)
        return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())

    assert close(g["tis_on_policy"], g["grpo"])            # rollout = old: every weight is 1
    assert close(g["tis_off"], 1.5 * g["grpo_off"])       # every weight capped at 1.5
    assert not close(g["tis_off"], g["grpo_off"])
    assert close(g["aer_zero"], g["grpo"])                 # alpha 0: no term
    assert close(g["aer_uniform"], g["bonus"])             # uniform weights: the entropy bonus at coef alpha
    assert not close(g["aer_skewed"], g["aer_uniform"]) and not close(g["aer_uniform"], g["grpo"])
    for name in ("kl_cov", "clip_cov"):  # reachable through the trainer's update, and not plain GRPO
        assert bool(torch.isfinite(g[name]).all()) and g[name].abs().max() > 0 and not close(g[name], g["grpo"])


def test_aer_through_the_fused_head_matches_unfused():
    plain = run_ranks(_grads_under_controls, Layout(tp=1), False, timeout=300)[0]
    fused = run_ranks(_grads_under_controls, Layout(tp=1), True, timeout=300)[0]
    for key in ("aer_skewed", "tis_off"):
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-4, atol=1e-7)

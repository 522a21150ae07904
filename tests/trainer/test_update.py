"""The policy update on gloo ranks, every gradient compared in full (each parameter's
``main_grad``, not only the norm): micro-batch packing, full recompute and the fused
output layer (TP=2) leave it unchanged; ``token-mean`` and the sequence means at DP=2
and DP=4 with unequal token counts per rank give the whole mini-batch's gradient on
one rank; TIS, AER (its per-response weights by the formula, after the micro-batch
reordering) and 80/20 change it as their formulas say (TP=1); a NaN loss skips the
step without touching weights or optimiser. The Lp-Reg cases select and regularise
tokens (rho 0.3 / 0.2 of a few dozen tokens; asserted), so they test Lp-Reg, not PPO."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.rollout.tiny_model import CONFIG
from tests.trainer.random_batch import random_sequences

# rho large enough that int(n * rho) > 1 for both signs of the batch's ~34 / 13 tokens
LP_REG = dict(neg_percent=0.3, pos_percent=0.2)


def _batch(n=12, seed=0):
    """Rows with per-row advantages; the proxy is above the current policy's log-probs for
    ~3/4 of the tokens (Lp-Reg regularises those when selected) and outside it (the op's
    sentinel) for the rest."""
    from megatron_lpreg.trainer.update import UpdateBatch

    g = torch.Generator().manual_seed(seed)
    seqs = random_sequences(g, n)
    adv = torch.randn(n, 1, generator=g) * seqs.mask
    old = -torch.rand(seqs.mask.shape, generator=g) * 3
    entropy = torch.rand(seqs.mask.shape, generator=g)
    proxy = torch.where(torch.rand(seqs.mask.shape, generator=g) < 0.75, old + 0.5, torch.full_like(old, -1e4))
    return UpdateBatch(seqs, adv, old, entropy, proxy, old)


def flat_grads(model) -> torch.Tensor:
    """Every parameter's gradient (megatron's ``main_grad``), flattened in parameter order."""
    return torch.cat([p.main_grad.detach().flatten().clone() for p in model.parameters()])


def assert_grads_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, what: str = ""):
    """Every entry to ``rel`` of the gradient's largest entry (entries near zero carry rounding only)."""
    assert got.shape == want.shape, what
    scale = float(want.abs().max())
    assert scale > 0, f"{what}: a zero gradient compares nothing"
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"{what}: max |diff| {err:.3e} > {rel} x {scale:.3e}"


def lp_reg_counts(rec: dict) -> tuple[float, float] | None:
    """(selected, regularised) tokens of an update record (None: not an Lp-Reg loss)."""
    if "lp_reg/selected_tokens" not in rec:
        return None
    return float(rec["lp_reg/selected_tokens"]), float(rec["lp_reg/regularised_tokens"])


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
    for k, v in LP_REG.items():
        setattr(cfg.algo, k, v)
    gpt = build_gpt(spec, **(overrides or {}))
    head = OutputHead(gpt, fused=fused, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group(),
                      chunk_tokens=7)
    model = wrap_ddp(gpt, cfg)
    opt = make_optimizer(model, cfg.optim)
    batch = _batch()
    rows = list(range(12))
    groups = Groups.from_parallel_state()
    out = {"grads": {}}
    for name, budget in (("one_micro", 10_000), ("many_micro", 16)):
        cfg.algo.micro_token_budget = budget
        snapshot = [p.detach().clone() for p in model.parameters()]
        rec = policy_update(model, opt, batch, rows, cfg.algo, head=head, groups=groups, temperature=1.0)
        out[name] = rec.get("grad_norm")
        out["grads"][name] = flat_grads(gpt)  # this rank's shard, as the step saw it
        out[f"{name}_lp_reg"] = lp_reg_counts(rec)
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


_RUNS: dict = {}


def _tp2(overrides=None, fused=False, tied=False, loss="lp_reg"):
    """``_rank`` on two TP ranks, each distinct setting spawned once per module (the plain
    run is shared by the packing, recompute and fused tests)."""
    key = (repr(overrides), fused, tied, loss)
    if key not in _RUNS:
        _RUNS[key] = run_ranks(_rank, Layout(tp=2), overrides, fused, tied, loss, timeout=300)
    return _RUNS[key]


def _first_with_loss(res):
    return res[0] if res[0].get("one_micro") is not None else res[1]


def _assert_same_gradients(a, b, keys=("one_micro", "many_micro"), rel=1e-5):
    for ra, rb in zip(a, b, strict=True):  # per TP rank: its shard of every parameter
        for key in keys:
            assert_grads_close(ra["grads"][key], rb["grads"][key], rel, key)


def test_full_recompute_gives_the_same_gradient():
    from megatron_lpreg.config import ParallelConfig
    from megatron_lpreg.model.attention import te_available
    from megatron_lpreg.trainer.parallelize import model_overrides

    plain = _tp2()
    if not te_available():
        with pytest.raises(ValueError, match="Transformer Engine"):
            model_overrides(ParallelConfig(tp=2, sequence_parallel=True))
    kw = model_overrides(ParallelConfig(tp=2, sequence_parallel=te_available(), recompute="full"))
    _assert_same_gradients(plain, _tp2(kw))


# lp_reg (global selection) is token-separable: the fused head forms its gradients in the
# forward; gspo is not: the fused head recomputes the logits in backward
@pytest.mark.parametrize("tied,loss", [(False, "lp_reg"), (True, "lp_reg"), (False, "gspo")],
                         ids=["untied", "tied", "untied-gspo"])
def test_fused_output_gives_the_same_gradient(tied, loss):
    plain, fused = _tp2(None, False, tied, loss), _tp2(None, True, tied, loss)
    _assert_same_gradients(plain, fused)
    r = _first_with_loss(fused)
    if loss == "lp_reg":
        assert r["one_micro_lp_reg"] == _first_with_loss(plain)["one_micro_lp_reg"]
    assert r["nan_skipped"] == 1 and r["nan_unchanged"]


def test_update_packing_and_nan_skip():
    res = _tp2()
    r = _first_with_loss(res)
    assert r["one_micro"] > 0
    # Lp-Reg is exercised: tokens selected (int(n * rho) > 1) and some of them regularised
    selected, regularised = r["one_micro_lp_reg"]
    assert 0 < regularised < selected, (selected, regularised)
    # micro-batch packing (1 vs several micro-batches) leaves the selection and the gradient unchanged
    assert r["many_micro_lp_reg"] == r["one_micro_lp_reg"]
    for rank in res:
        assert_grads_close(rank["grads"]["many_micro"], rank["grads"]["one_micro"], 1e-5, "packing")
    assert r["nan_skipped"] == 1 and r["nan_unchanged"]
    assert r["after_skipped"] == 0 and r["after_changed"]


def _tiny_gpt_tp1_setup(fused=False):
    """The tiny model, its head and a DDP-wrapped optimiser with lr 0 and no clipping (the
    weights stay, so every update sees the same policy)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.model.builder import build_gpt
    from megatron_lpreg.model.hf_config import spec_from_hf_config
    from megatron_lpreg.trainer.head import OutputHead
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp

    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    spec = spec_from_hf_config(CONFIG)
    cfg = RunConfig()
    cfg.optim.lr, cfg.optim.grad_clip = 0.0, 0.0
    # the replicated optimiser: megatron's DistributedOptimizer reduce-scatters the gradients,
    # so at DP > 1 a rank's main_grad holds the reduced gradient only in its own shard
    cfg.optim.use_distributed_optimizer = False
    gpt = build_gpt(spec)
    head = OutputHead(gpt, fused=fused, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group(),
                      chunk_tokens=7)
    model = wrap_ddp(gpt, cfg)
    return spec, cfg, gpt, head, model, make_optimizer(model, cfg.optim)


# the settings every gradient below starts from; each case overrides some
BASE = dict(loss="grpo", entropy_control="none", entropy_coef=0.0, tis_cap=None, loss_agg_mode="token-mean",
            micro_token_budget=4096, high_entropy_fraction=0.2, **LP_REG)
DP_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
TOP_FRACTION = 0.25  # of the batch's 47 tokens: 11.75, which the quantile cut makes 12
# AER: four groups of three rows, 0..3 of each group's samples correct
GROUP_ACCURACY = torch.arange(4.0).repeat_interleave(3) / 3


def _entropy_term_grad(spec, gpt, batch, weights, alpha):
    """By hand, on the whole batch at once: the gradient of AER's term
    ``-alpha * sum_i w_i sum_t H_it / N_tokens`` (the module docstring of loss/aer.py),
    entropies from the plain model's logits; flattened in parameter order."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in gpt.named_parameters()}
    tokens = batch.seqs.tokens
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    logits = torch.func.functional_call(gpt, params, (tokens, pos, None))[..., : spec.vocab_size].float()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = batch.seqs.mask
    term = -alpha * (weights[:, None] * entropy * mask).sum() / mask.sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(term, list(params.values()))])


def _grads_under_controls(fused):
    """TP=1: the flattened gradient of one update under each loss setting, and what the
    formulas say some of them must be."""
    from megatron_lpreg.job import Groups
    from megatron_lpreg.loss.aer import AERController
    from megatron_lpreg.trainer.update import policy_update

    spec, cfg, gpt, head, model, opt = _tiny_gpt_tp1_setup(fused)
    groups = Groups.from_parallel_state()
    rows = list(range(12))
    records = {}

    def grad(batch, alpha=0.0, name=None, **algo):
        for k, v in {**BASE, **algo}.items():
            setattr(cfg.algo, k, v)
        rec = policy_update(model, opt, batch, rows, cfg.algo, head=head, groups=groups, temperature=1.0,
                            aer_alpha=alpha)
        if name:
            records[name] = rec
        return flat_grads(gpt)

    on_policy = _batch()                      # rollout log-probs = old
    off = _batch()
    off.rollout_logprob = off.old_logprob - 0.7  # exp(0.7) = 2.01 > cap: every weight is the cap
    uniform, skewed = _batch(), _batch()
    uniform.row_weights = torch.ones(12)
    skewed.row_weights = torch.linspace(0.0, 2.0, 12)
    out = {
        "grpo": grad(on_policy), "tis_on_policy": grad(on_policy, tis_cap=1.5), "grpo_off": grad(off),
        "tis_off": grad(off, tis_cap=1.5),
        "aer_zero": grad(uniform, 0.0, entropy_control="aer"),
        "aer_uniform": grad(uniform, 0.05, entropy_control="aer"),
        "bonus": grad(uniform, entropy_control="bonus", entropy_coef=0.05),
        "aer_skewed": grad(skewed, 0.05, entropy_control="aer"),
        "aer_no_weights": grad(on_policy, 0.05, entropy_control="aer"),  # none given: every response 1
        "kl_cov": grad(on_policy, loss="kl_cov"), "clip_cov": grad(on_policy, loss="clip_cov"),
    }

    # AER's difficulty weights as the trainer forms them (the controller, from group accuracy),
    # through several micro-batches that reorder the rows by length; and by hand: (1 - acc) / mean
    by_difficulty = _batch()
    by_difficulty.row_weights = AERController(allocation="difficulty").weights(GROUP_ACCURACY)
    hand = (1 - GROUP_ACCURACY) / (1 - GROUP_ACCURACY).mean()
    out["aer_difficulty"] = grad(by_difficulty, 0.5, entropy_control="aer", micro_token_budget=16)
    if not fused:  # the fused model's forward ends at the hidden states, not the logits
        out["aer_difficulty_want"] = out["grpo"] + _entropy_term_grad(spec, gpt, by_difficulty, hand, 0.5)

    # 80/20: the gradient of GRPO over the top-entropy tokens alone (old-policy entropy,
    # picked here by sorting), their token-mean: GRPO with zero advantage elsewhere, scaled
    valid = on_policy.seqs.mask > 0
    n = int(valid.sum())
    k = round(TOP_FRACTION * n)
    top_idx = on_policy.old_entropy[valid].topk(k).indices
    top = torch.zeros(n, dtype=torch.bool)
    top[top_idx] = True
    only_top = _batch()
    keep = torch.zeros_like(valid)
    keep[valid] = top
    only_top.advantages = torch.where(keep, only_top.advantages, torch.zeros_like(only_top.advantages))
    out["80_20"] = grad(on_policy, entropy_control="80_20", high_entropy_fraction=TOP_FRACTION)
    out["80_20_want"] = grad(only_top) * (n / k)

    # the whole mini-batch on one rank: the reference for the DP runs (Lp-Reg, global selection)
    for mode in DP_MODES:
        out[f"dp_ref/{mode}"] = grad(on_policy, loss="lp_reg", loss_agg_mode=mode, name=mode)
    out["dp_ref_lp_reg"] = {m: lp_reg_counts(records[m]) for m in DP_MODES}
    return out


@pytest.fixture(scope="module")
def controls():
    return run_ranks(_grads_under_controls, Layout(tp=1), False, timeout=300)[0]


def _close(a, b):  # to 1e-5 of the gradient's scale (its entries near zero carry rounding only)
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_tis_and_aer_change_the_gradient_as_their_formulas_say(controls):
    g = controls
    assert _close(g["tis_on_policy"], g["grpo"])            # rollout = old: every weight is 1
    assert _close(g["tis_off"], 1.5 * g["grpo_off"])       # every weight capped at 1.5
    assert not _close(g["tis_off"], g["grpo_off"])
    assert _close(g["aer_zero"], g["grpo"])                 # alpha 0: no term
    assert _close(g["aer_uniform"], g["bonus"])             # uniform weights: the entropy bonus at coef alpha
    assert _close(g["aer_no_weights"], g["aer_uniform"])
    assert not _close(g["aer_skewed"], g["aer_uniform"]) and not _close(g["aer_uniform"], g["grpo"])
    for name in ("kl_cov", "clip_cov"):  # reachable through the trainer's update, and not plain GRPO
        assert bool(torch.isfinite(g[name]).all()) and g[name].abs().max() > 0 and not _close(g[name], g["grpo"])


def test_aer_difficulty_weights_follow_their_rows_through_the_micro_batches(controls):
    """Each response's entropy term is weighted by its own group's (1 - acc) / mean(1 - acc),
    also after the update has reordered the rows into micro-batches by length."""
    g = controls
    term = g["aer_difficulty_want"] - g["grpo"]
    assert float(term.abs().max()) > 1e-3 * float(g["grpo"].abs().max())  # the term is visible
    assert_grads_close(g["aer_difficulty"], g["aer_difficulty_want"], 1e-5, "aer by difficulty")


def test_80_20_passes_gradient_only_through_the_top_entropy_tokens(controls):
    g = controls
    assert not _close(g["80_20"], g["grpo"])
    assert_grads_close(g["80_20"], g["80_20_want"], 1e-5, "80/20")


def test_aer_through_the_fused_head_matches_unfused(controls):
    fused = run_ranks(_grads_under_controls, Layout(tp=1), True, timeout=300)[0]
    for key in ("aer_skewed", "tis_off", "aer_difficulty", "80_20"):
        torch.testing.assert_close(fused[key], controls[key], rtol=1e-4, atol=1e-7)


def _dp_grads():
    """DP ranks: this rank's every-D-th rows of the batch (unequal token counts), several
    micro-batches each (their count differs between ranks too); Lp-Reg with global selection
    under each aggregation mode. Returns the gradient after DDP's reduction."""
    from megatron.core import parallel_state as ps

    from megatron_lpreg.job import Groups
    from megatron_lpreg.trainer.update import policy_update

    _, cfg, gpt, head, model, opt = _tiny_gpt_tp1_setup()
    groups = Groups.from_parallel_state()
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = _batch()
    mine = list(range(rank, 12, dp))
    out = {"tokens": int(batch.seqs.mask[mine].sum())}
    for mode in DP_MODES:
        for k, v in {**BASE, "loss": "lp_reg", "loss_agg_mode": mode, "micro_token_budget": 16}.items():
            setattr(cfg.algo, k, v)
        rec = policy_update(model, opt, batch, mine, cfg.algo, head=head, groups=groups, temperature=1.0)
        out[mode] = flat_grads(gpt)
        out[f"{mode}/lp_reg"] = lp_reg_counts(rec)
    return out


@pytest.mark.parametrize("dp", [2, 4])
def test_loss_normalisation_does_not_depend_on_the_dp_size(controls, dp):
    """The default token-mean (and the sequence means): the mean over the whole mini-batch,
    whatever the number of data-parallel ranks and however unequal their token counts."""
    res = run_ranks(_dp_grads, Layout(tp=1, dp=dp), timeout=300)
    assert len({r["tokens"] for r in res}) > 1, "the ranks must hold unequal token counts"
    for mode in DP_MODES:
        # the selection is the whole mini-batch's, counted over the ranks
        assert all(r[f"{mode}/lp_reg"] == controls["dp_ref_lp_reg"][mode] for r in res), mode
        for r in res:
            assert_grads_close(r[mode], controls[f"dp_ref/{mode}"], 1e-5, f"dp={dp} {mode}")
    selected, regularised = controls["dp_ref_lp_reg"]["token-mean"]
    assert 0 < regularised < selected

"""The trainer's passes under pipeline parallelism: micro-batches of different shapes
through megatron's schedule at PP=2 (and TP=2 x PP=2) give the old-policy statistics
and the update's gradient of the single-stage model."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed import Layout, run_ranks
from tests.model.test_parity import _hf_configs, _hf_model, _megatron_from_hf
from tests.trainer.test_update import _batch


def _rank(cfg_dict, state):
    from megatron.core import parallel_state as ps

    from megatron_lpreg.config import RunConfig
    from megatron_lpreg.job import Groups
    from megatron_lpreg.trainer.batching import token_budget_micro_batches
    from megatron_lpreg.trainer.head import OutputHead
    from megatron_lpreg.trainer.logprobs import StatsConfig, sequence_stats
    from megatron_lpreg.trainer.optim import make_optimizer
    from megatron_lpreg.trainer.parallelize import wrap_ddp
    from megatron_lpreg.trainer.update import policy_update

    spec, gpt = _megatron_from_hf(cfg_dict, state)
    head = OutputHead(gpt, fused=False, vocab_size=spec.vocab_size, tp_group=ps.get_tensor_model_parallel_group())
    cfg = RunConfig()
    cfg.algo.micro_token_budget = 24  # several micro-batches of different shapes
    model = wrap_ddp(gpt, cfg)
    opt = make_optimizer(model, cfg.optim)
    batch = _batch(n=10)
    micro = token_budget_micro_batches(batch.seqs.lengths, cfg.algo.micro_token_budget)
    assert len({(len(m), int(batch.seqs.lengths[m].max())) for m in micro}) > 1
    st = sequence_stats(model, batch.seqs, micro, head, StatsConfig(proxy_threshold=0.1))
    rec = policy_update(model, opt, batch, list(range(10)), cfg.algo, head=head, groups=Groups.from_parallel_state(),
                        temperature=1.0)
    if st is None:
        return None
    mask = batch.seqs.mask > 0
    return {"logprob": st["logprob"][mask], "proxy": st["proxy_logprob"][mask], "grad_norm": rec["grad_norm"]}


@pytest.fixture(scope="module")
def case():
    cfg = dict(_hf_configs()["qwen3"], vocab_size=500)
    model = _hf_model(cfg)
    return model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}


def _last_stage(results):
    return next(r for r in reversed(results) if r is not None)


@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(tp=2, pp=2)], ids=["pp2", "tp2pp2"])
def test_pipeline_matches_single_stage(case, layout):
    ref = _last_stage(run_ranks(_rank, 1, *case))
    got = _last_stage(run_ranks(_rank, layout, *case))
    torch.testing.assert_close(got["logprob"], ref["logprob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["proxy"], ref["proxy"], rtol=1e-5, atol=1e-5)
    assert math.isclose(got["grad_norm"], ref["grad_norm"], rel_tol=1e-4), (got["grad_norm"], ref["grad_norm"])

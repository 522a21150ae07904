"""The losses the fused output layer calls once per chunk (the token-separable ones) make
no host sync (their metrics stay 0-dim tensors), and the trainer reads a micro-batch's
metrics with one. GSPO has no selection either and is checked too; the covariance losses
rank over the batch, which needs the count on the host."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.loss.registry import LOSSES, loss_spec
from megatron_lpreg.trainer.update import host_values
from tests.host_syncs import HostSyncs


def _batch():
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 9, generator=g) * 4).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(4, 9, generator=g)
    adv = torch.randn(4, 9, generator=g)
    mask = torch.ones(4, 9)
    mask[0, 6:] = 0
    proxy = lp.detach() + 0.5
    return lp, old, adv, mask, proxy


@pytest.mark.parametrize("name", ["lp_reg", "grpo", "ppo", "gspo"])
def test_token_separable_losses_make_no_host_sync(name):
    from megatron_lpreg.config import AlgoConfig

    spec = loss_spec(name)
    algo = AlgoConfig(loss=name)
    lp, old, adv, mask, proxy = _batch()
    extra = {"proxy_log_prob": proxy, "thresholds": (-1.0, None)} if spec.needs_proxy else {}
    with HostSyncs() as syncs:
        loss, metrics = spec.fn(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask,
                                rollout_log_prob=None, entropy=torch.rand(4, 9), **spec.options(algo), **extra)
        loss.backward()
    assert syncs.count == 0
    assert metrics and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    with HostSyncs() as syncs:
        host = host_values(metrics)
    assert syncs.count == 1
    assert set(host) == set(metrics)
    for k, v in host.items():
        assert v == pytest.approx(float(metrics[k]))
        assert isinstance(v, int) == (not metrics[k].is_floating_point()), k  # counts stay integers
    if name == "lp_reg":
        assert host["lp_reg/regularised_tokens"] > 0  # the regularised branch ran


def test_every_token_separable_loss_is_covered():
    from megatron_lpreg.config import AlgoConfig

    separable = {n for n, spec in LOSSES.items() if spec.separable(AlgoConfig(loss=n))}
    assert separable == {"lp_reg", "grpo", "ppo"}

"""AER's three components, each against its stated formula."""

from __future__ import annotations

import pytest
import torch

from megatron_lpreg.loss.aer import AERController, aer_entropy_term, difficulty_weights


def test_difficulty_weights():
    w = difficulty_weights(torch.tensor([1.0, 0.5, 0.0, 0.5]))
    assert w.tolist() == pytest.approx([0.0, 0.5 / 0.5, 1.0 / 0.5, 0.5 / 0.5])
    assert w.mean().item() == pytest.approx(1.0)
    assert difficulty_weights(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]


def test_controller_anchors_on_the_first_entropy_and_tracks_the_target():
    c = AERController(target_ratio=0.5, lr=0.1, alpha_max=1.0)
    assert c.update(2.0) == 0.0  # H0 = 2 -> target 1; entropy above target: stays at 0
    assert c.target == 1.0
    assert c.update(0.5) == pytest.approx(0.05)  # below target: + 0.1 * 0.5
    assert c.update(0.0) == pytest.approx(0.15)
    assert c.update(3.0) == 0.0  # far above: clipped at 0
    restored = AERController(target_ratio=0.5, lr=0.1, alpha_max=1.0)
    restored.load_state_dict(c.state_dict())
    assert restored.target == 1.0 and restored.alpha == 0.0
    with pytest.raises(ValueError, match="target_ratio"):
        AERController(target_ratio=0.0)


def test_entropy_term_value_and_gradient():
    ent = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = torch.tensor([2.0, 0.5])
    out = aer_entropy_term(ent, mask, w, alpha=0.1)
    assert out.item() == pytest.approx(-0.1 * (2.0 * 3.0 + 0.5 * 12.0) / 5)
    out.backward()
    torch.testing.assert_close(ent.grad, -0.1 * w[:, None] * mask / 5)


def test_controller_refuses_settings_outside_their_ranges():
    AERController(alpha=0.05, alpha_max=0.05)  # both ends of [0, alpha_max] are allowed
    AERController(alpha=0.0, lr=0.0, alpha_max=0.0, target_ratio=1.0)
    for bad in (-0.01, 0.06):
        with pytest.raises(ValueError, match="initial alpha"):
            AERController(alpha=bad, alpha_max=0.05)
    with pytest.raises(ValueError, match="lr and alpha_max"):
        AERController(lr=-0.1)
    with pytest.raises(ValueError, match="aer_allocation='random'"):
        AERController(allocation="random")

"""Advantages and DAPO shaping against plain-Python transcriptions."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_lpreg.algo.advantages import grpo_advantages
from megatron_lpreg.algo.shaping import overlong_penalty


def _transcribe(scores, groups, norm_by_std, eps=1e-6):
    by_group = {}
    for s, g in zip(scores, groups, strict=True):
        by_group.setdefault(g, []).append(s)
    out = []
    for s, g in zip(scores, groups, strict=True):
        members = by_group[g]
        if len(members) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = statistics.fmean(members), statistics.stdev(members)
        out.append((s - mean) / (std + eps) if norm_by_std else s - mean)
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_transcription(norm_by_std):
    g = torch.Generator().manual_seed(0)
    groups = [3, 3, 3, 7, 7, 1, 9, 9, 9, 9]  # includes a group of one, unsorted ids
    scores = torch.rand(len(groups), generator=g).round(decimals=1)
    scores[6:] = 1.0  # an all-equal group: advantage 0
    mask = (torch.rand(len(groups), 5, generator=g) < 0.7).float()
    adv = grpo_advantages(scores, torch.tensor(groups), mask, norm_by_std=norm_by_std)
    want = _transcribe(scores.tolist(), groups, norm_by_std)
    for i, w in enumerate(want):
        assert adv[i][mask[i] > 0].tolist() == pytest.approx([w] * int(mask[i].sum()), rel=1e-6, abs=1e-6)
        assert (adv[i][mask[i] == 0] == 0).all()
    assert (adv[6:] == 0).all()


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="must agree"):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.ones(3, 4))


def test_informative_groups_drop_all_equal_groups():
    from megatron_lpreg.algo.dynamic_sampling import Group

    groups = [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5]]  # scores of each group's responses
    assert [Group(g).informative for g in groups] == [False, True, False, False]


def test_overlong_penalty_is_linear_in_the_buffer():
    lengths = torch.tensor([10, 96, 100, 112, 128])
    got = overlong_penalty(lengths, max_response_length=128, buffer_length=32, penalty_factor=1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -4 / 32, -16 / 32, -1.0])
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_response_length=128, buffer_length=0)

"""avg@k and unbiased pass@k against hand-computed values."""

import math

import pytest

from megatron_lpreg.eval.estimators import avg_at_k, mean_pass_at_k, pass_at_k


def test_pass_at_k_hand_values():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2
    assert math.isclose(pass_at_k(4, 1, 1), 0.25)
    assert math.isclose(pass_at_k(4, 1, 2), 0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert math.isclose(pass_at_k(5, 2, 3), 0.9)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k
    # n=16, c=3, k=4: 1 - C(13,4)/C(16,4) = 1 - 715/1820
    assert math.isclose(pass_at_k(16, 3, 4), 1 - 715 / 1820)


def test_pass_at_k_rejects_bad_input():
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_avg_and_mean_pass():
    correct = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert math.isclose(avg_at_k(correct), (0.25 + 0.5 + 0.0) / 3)
    # pass@2: 1/2, 1 - C(2,2)/C(4,2) = 5/6, 0
    assert math.isclose(mean_pass_at_k(correct, 2), (0.5 + 5 / 6 + 0.0) / 3)

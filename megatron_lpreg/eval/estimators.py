"""avg@k and the unbiased pass@k estimator (Chen et al., 2021).

For one problem with ``n`` samples of which ``c`` are correct:

* avg@n = c / n
* pass@k = 1 - C(n - c, k) / C(n, k)   (k <= n), computed as a product to stay exact
  for large n.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def avg_at_k(correct: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean score of each problem's samples."""
    if not correct:
        raise ValueError("no problems")
    return sum(sum(c) / len(c) for c in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[float]], k: int) -> float:
    return sum(pass_at_k(len(c), int(sum(1 for x in c if x > 0.5)), k) for c in correct) / len(correct)

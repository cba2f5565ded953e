"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1).

With n samples per problem of which c pass, the chance that at least one of k samples drawn
without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form avoids the huge binomials (n = 1000, k = 100 overflows floats otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem with `n` samples of which `c` are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n} c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n} k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(outcomes: Iterable[Sequence[bool]], k: int) -> float:
    """Mean pass@k over problems; `outcomes` holds one list of per-sample pass flags per problem."""
    values = [pass_at_k(len(flags), sum(bool(f) for f in flags), k) for flags in outcomes]
    if not values:
        raise ValueError("no problems to aggregate")
    return sum(values) / len(values)


def pass_at_k_table(outcomes: Mapping[str, Sequence[bool]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean over problems} for every k that every problem has enough samples for.

    A k larger than the smallest sample count is left out rather than estimated from fewer samples.
    """
    smallest = min((len(flags) for flags in outcomes.values()), default=0)
    return {f"pass@{k}": mean_pass_at_k(outcomes.values(), k) for k in sorted(set(ks)) if 1 <= k <= smallest}

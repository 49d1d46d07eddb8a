"""Exact tests for the audit's dataset-level statistics, Holm's correction, and the smallest leak each test could
have detected.

The null hypothesis of every dataset-level test: the synthetic set S carries no trace of which real tiles
conditioned it. Then S and the held-out set H are exchangeable as queries against T, and which real tiles are
T and which are H is exchangeable as seen from S. Under exchangeability the labels of any selection made without
looking at the labels (the top of a pooled ranking, the tiles carrying a flag computed the same way for everyone)
are a uniformly random subset, so the count of one group in the selection is hypergeometric: exactly, whatever the
correlation between neighbouring tiles, with no estimated percentile treated as exact and no normal law on a
bounded similarity. Where the statistic is a weighted count (DCR), its null is drawn by relabelling the real tiles,
up to :data:`PERMUTATIONS` times, with a fixed seed (:data:`PERMUTATION_SEED`), so no outcome depends on a seed
that an operator could change.

Power: each test also says how many leaked tiles it would catch with probability :data:`POWER` at its level (a
leaked tile is its source plus noise; it lands in the test's selection when the leak is at least as strong as the
selection's cut), from the same hypergeometric laws. That is what INCONCLUSIVE reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERMUTATIONS = 9_999
"""Relabellings drawn for a permutation null: p-values resolve down to 1e-4, below any Holm-adjusted FAIL level."""
SEQUENTIAL_HITS = 20
"""Relabellings reaching the observed value after which the permutation null stops (Besag and Clifford 1991)."""
PERMUTATION_SEED = 20_240_620
"""Fixed seed of the permutation draws: deterministic, and deliberately not ``audit.seed``."""
POWER = 0.9
"""Probability of detection at which the smallest detectable leak is stated."""


def hypergeom_sf(x: int, total: int, group: int, drawn: int) -> float:
    """P(X >= x) for X ~ Hypergeometric(total items, group of them marked, drawn without replacement)."""
    from scipy.stats import hypergeom

    if x <= 0:
        return 1.0
    return float(hypergeom.sf(x - 1, total, group, drawn))


@dataclass(frozen=True)
class CountTest:
    """How many members of one group are in a selection, against the hypergeometric null."""

    p_value: float
    observed: int
    selected: int
    expected: float
    cut: float | None = None  # the value at which the selection was cut, where there is one

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "p_value": self.p_value,
            "observed": self.observed,
            "selected": self.selected,
            "expected": self.expected,
            "cut": self.cut,
        }


def count_test(selected_group: int, selected: int, group: int, total: int, cut: float | None = None) -> CountTest:
    """Exact one-sided test that a label-blind selection holds more of the group than chance."""
    expected = selected * group / total if total else 0.0
    return CountTest(
        hypergeom_sf(selected_group, total, group, selected), int(selected_group), int(selected), expected, cut
    )


def cut_size(share: float, total: int) -> int:
    """Items in the top ``share`` of a pooled ranking of ``total`` items (at least one)."""
    return max(1, int(math.ceil(share * total - 1e-9)))


def pooled_cuts(group_values: np.ndarray, other_values: np.ndarray, shares: Sequence[float]) -> list[CountTest]:
    """For each share q: the top q of the pooled values (ties at the cut included), and how many are the group's."""
    group_values, other_values = np.asarray(group_values, np.float64), np.asarray(other_values, np.float64)
    pooled = np.concatenate([group_values, other_values])
    total, group = len(pooled), len(group_values)
    if group == 0 or len(other_values) == 0:
        return [CountTest(1.0, 0, 0, 0.0) for _ in shares]
    ranked = np.sort(pooled)[::-1]
    out = []
    for share in shares:
        cut = float(ranked[cut_size(share, total) - 1])
        out.append(count_test(int((group_values >= cut).sum()), int((pooled >= cut).sum()), group, total, cut))
    return out


def top_run(group_values: np.ndarray, other_values: np.ndarray) -> CountTest:
    """How many group values lie above every other value; P(K >= k) = C(m, k) / C(m + n, k), exactly."""
    group_values, other_values = np.asarray(group_values), np.asarray(other_values)
    if group_values.size == 0 or other_values.size == 0:
        return CountTest(1.0, 0, 0, 0.0)
    top = float(other_values.max())
    k = int((group_values > top).sum())
    total = group_values.size + other_values.size
    # E[K] = m / (n + 1): each group value lies above all n others with probability 1 / (n + 1)
    return CountTest(
        hypergeom_sf(k, total, group_values.size, k), k, k, group_values.size / (other_values.size + 1), top
    )


def flag_count(group_flags: np.ndarray, other_flags: np.ndarray) -> CountTest:
    """Fisher's exact one-sided test: does the group carry a flag (computed alike for all) more often?"""
    group_flags, other_flags = np.asarray(group_flags, bool), np.asarray(other_flags, bool)
    total = group_flags.size + other_flags.size
    if group_flags.size == 0 or other_flags.size == 0:
        return CountTest(1.0, 0, 0, 0.0)
    return count_test(int(group_flags.sum()), int(group_flags.sum() + other_flags.sum()), group_flags.size, total)


@dataclass(frozen=True)
class PermutationTest:
    """A weighted count against its relabelling null."""

    p_value: float
    observed: float
    null_mean: float
    null_sd: float


def label_permutation(weights: np.ndarray, in_group: np.ndarray) -> PermutationTest:
    """Is sum(weights[group]) larger than when the group labels are dealt at random (same group size)?

    Sequential Monte Carlo p-value (Besag and Clifford 1991): relabellings are drawn, with the fixed seed, until
    :data:`SEQUENTIAL_HITS` of them reach the observed sum (p = hits / draws) or :data:`PERMUTATIONS` are drawn
    (p = (1 + hits) / (1 + PERMUTATIONS)). Both are valid p-values; a clearly null result stops early.
    """
    weights, in_group = np.asarray(weights, np.float64), np.asarray(in_group, bool)
    n, k = len(weights), int(in_group.sum())
    observed = float(weights[in_group].sum())
    mean = k * weights.mean() if n else 0.0
    if k == 0 or k == n or not weights.any():
        return PermutationTest(1.0, observed, mean, 0.0)
    sd = math.sqrt(k * (n - k) / (n * max(n - 1, 1)) * float(((weights - weights.mean()) ** 2).sum()))
    rng = np.random.default_rng(PERMUTATION_SEED)
    hits, drawn, block = 0, 0, max(16, min(1024, 2_000_000 // n))
    while drawn < PERMUTATIONS:
        rows = min(block, PERMUTATIONS - drawn)
        labels = rng.random((rows, n)).argpartition(k - 1, axis=1)[:, :k]
        reached = np.flatnonzero(weights[labels].sum(axis=1) >= observed - 1e-9)
        if hits + len(reached) >= SEQUENTIAL_HITS:
            stop = drawn + int(reached[SEQUENTIAL_HITS - hits - 1]) + 1
            return PermutationTest(SEQUENTIAL_HITS / stop, observed, mean, sd)
        hits, drawn = hits + len(reached), drawn + rows
    return PermutationTest((1 + hits) / (1 + PERMUTATIONS), observed, mean, sd)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: rejecting those below alpha keeps the family-wise error at alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# -- power: the smallest leak each test detects with probability POWER at level alpha ------------------------------


def _critical(total: int, group: int, drawn: int, alpha: float) -> int | None:
    """Smallest count x with P(X >= x) <= alpha under the hypergeometric null; None when even x = drawn is not."""
    from scipy.stats import hypergeom

    top = min(group, drawn)
    x = int(hypergeom.isf(alpha, total, group, drawn)) + 1  # isf: smallest x with P(X > x) <= alpha
    while x > 0 and hypergeom_sf(x - 1, total, group, drawn) <= alpha:  # guard against rounding in isf
        x -= 1
    while x <= top and hypergeom_sf(x, total, group, drawn) > alpha:
        x += 1
    return x if x <= top else None


def detectable_in_selection(total: int, group: int, drawn: int, alpha: float) -> int | None:
    """Smallest number L of leaked group items, all inside a rank cut of ``drawn`` items, that the count test
    detects with probability POWER (the other drawn - L places are filled at random)."""
    from scipy.stats import hypergeom

    crit = _critical(total, group, drawn, alpha)
    if crit is None:
        return None
    leaked = np.arange(1, min(group, drawn) + 1)
    power = hypergeom.sf(crit - leaked - 1, total - leaked, group - leaked, drawn - leaked)
    ok = np.flatnonzero(power >= POWER)
    return int(leaked[ok[0]]) if ok.size else None


def detectable_pooled_cuts(group: int, other: int, shares: Sequence[float], alpha: float) -> int | None:
    """Smallest leak detected by the best of the pooled cuts, each at level alpha / len(shares) (Bonferroni)."""
    return best_pooled_cut(group, other, shares, alpha)[0]


def best_pooled_cut(group: int, other: int, shares: Sequence[float], alpha: float) -> tuple[int | None, int | None]:
    """(smallest detectable leak, index of the cut that detects it) over the pooled cuts; (None, None) if none."""
    total = group + other
    found = [
        (detectable_in_selection(total, group, cut_size(q, total), alpha / len(shares)), i)
        for i, q in enumerate(shares)
    ]
    found = [f for f in found if f[0] is not None]
    return min(found) if found else (None, None)


def detectable_top_run(group: int, other: int, alpha: float) -> int | None:
    """Smallest number of leaked group items above every other value that :func:`top_run` detects."""
    total = group + other
    crit = next((k for k in range(1, group + 1) if hypergeom_sf(k, total, group, k) <= alpha), None)
    if crit is None:
        return None
    for leaked in range(1, crit + 1):
        # the clean group items still needed above every other value: P(K' >= crit - leaked)
        need = crit - leaked
        if hypergeom_sf(need, total - leaked, group - leaked, need) >= POWER:
            return leaked
    return crit


def detectable_flags(group: int, other: int, rate: float, alpha: float) -> int | None:
    """Smallest number of leaked (hence flagged) group items that Fisher's test detects, when clean items carry
    the flag at ``rate`` (estimated from the held-out set, which no leak touches)."""
    from scipy.stats import binom

    total = group + other

    def detected(leaked: int) -> bool:
        crit = _critical(total, group, leaked + int(round(rate * (total - leaked))), alpha)
        return crit is not None and float(binom.sf(crit - leaked - 1, group - leaked, rate)) >= POWER

    if not detected(group):
        return None
    lo, hi = 0, group  # more leaked tiles are never harder to detect: bisect
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if detected(mid) else (mid, hi)
    return hi


def detectable_shift(null_sd: float, shift_per_leak: float, alpha: float) -> int | None:
    """Smallest number of leaks that moves a weighted count by (z_alpha + z_power) null standard deviations."""
    from scipy.stats import norm

    if shift_per_leak <= 0:
        return None
    return max(1, int(math.ceil((norm.isf(alpha) + norm.isf(1 - POWER)) * null_sd / shift_per_leak)))

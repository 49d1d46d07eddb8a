"""The audit's statistics, as pure functions of similarities (cosine, higher = closer) or distances.

Each is computed for S against T and, as the null that calibrates it, for H against T. Origins:

- nearest-neighbour similarity percentiles: Somepalli et al. 2023;
- nearest / second-nearest distance ratio: Gu, Yoon et al.;
- authenticity: Alaa et al. 2022 (ICML), "How faithful is your synthetic data?";
- membership inference AUC and TPR at low FPR: distance-based black-box attack on the released set.

The exact tests that turn them into p-values are in :mod:`pixcell_fed.audit.exact`.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 95, 99, 100)


def percentiles(values: np.ndarray, qs: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


def nn_distance_ratio(top_sims: np.ndarray) -> np.ndarray:
    """(1 - sim1) / (1 - sim2) per row of descending top-k similarities (cosine distance ratio); 1 when k < 2."""
    top_sims = np.asarray(top_sims, dtype=np.float64)
    if top_sims.shape[1] < 2:
        return np.ones(len(top_sims))
    d1 = np.clip(1.0 - top_sims[:, 0], 0.0, None)
    d2 = np.clip(1.0 - top_sims[:, 1], 0.0, None)
    return np.where(d2 > 1e-12, d1 / np.maximum(d2, 1e-12), 1.0)


def authentic_mask(d_to_nearest_real: np.ndarray, nearest_real: np.ndarray, real_nn_distance: np.ndarray) -> np.ndarray:
    """Alaa et al. (2022) authenticity: sample j is inauthentic when it is closer to its nearest real tile t* than
    t* is to its own nearest other real tile. ``real_nn_distance[i]`` is real tile i's distance to its nearest other
    real tile; it is indexed by the nearest real tile of each sample (synthcity indexes it by the sample instead,
    which is the bug audit.md warns of)."""
    d = np.asarray(d_to_nearest_real)
    own = np.asarray(real_nn_distance)[np.asarray(nearest_real)]
    return d >= own


def _midranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of ``scores`` with ties given their average rank, and the sizes of the tie groups."""
    order = scores.argsort(kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)
    return ranks, counts


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties counted half)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks, _ = _midranks(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


#: Largest number of label assignments enumerated for an exact Mann-Whitney p-value (above it: the normal law)
EXACT_MANN_WHITNEY_LIMIT = 20_000


def auc_p_value(pos: np.ndarray, neg: np.ndarray) -> float:
    """One-sided p-value that the AUC of ``pos`` over ``neg`` is above 0.5 (Mann-Whitney U test, ties averaged).

    Exact, by enumerating every assignment of the pooled scores to the two groups, while there are at most
    :data:`EXACT_MANN_WHITNEY_LIMIT` of them (so 2 vs 2 tiles give p = 1/6 for a perfect AUC, never a certainty);
    otherwise the normal approximation with tie and continuity corrections.
    """
    import itertools
    import math

    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    n1, n2 = pos.size, neg.size
    if n1 == 0 or n2 == 0:
        return 1.0
    ranks, ties = _midranks(np.concatenate([pos, neg]))
    observed = ranks[:n1].sum()
    n = n1 + n2
    if math.comb(n, n1) <= EXACT_MANN_WHITNEY_LIMIT:
        sums = np.fromiter((ranks[list(c)].sum() for c in itertools.combinations(range(n), n1)), np.float64)
        return float(np.mean(sums >= observed - 1e-9))
    mean = n1 * (n + 1) / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - float((ties**3 - ties).sum()) / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (observed - mean - 0.5) / math.sqrt(var)
    return float(0.5 * math.erfc(z / math.sqrt(2.0)))


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every threshold, from (0, 0) to (1, 1)."""
    pos, neg = np.sort(np.asarray(pos, np.float64)), np.sort(np.asarray(neg, np.float64))
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]

    def share_at_or_above(values: np.ndarray) -> np.ndarray:
        if values.size == 0:
            return np.zeros(len(thresholds))
        return (values.size - np.searchsorted(values, thresholds, side="left")) / values.size

    return np.concatenate([[0.0], share_at_or_above(neg)]), np.concatenate([[0.0], share_at_or_above(pos)])


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, max_fpr: float = 0.01) -> float:
    """Highest true positive rate at a threshold whose false positive rate is at most ``max_fpr``."""
    fpr, tpr = roc_curve(pos, neg)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def histogram(values: np.ndarray, bins: np.ndarray) -> list[int]:
    counts, _ = np.histogram(np.clip(np.asarray(values, np.float64), bins[0], bins[-1]), bins=bins)
    return [int(c) for c in counts]

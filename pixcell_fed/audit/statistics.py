"""The audit's statistics, as pure functions of similarities (cosine, higher = closer) or distances.

Each is computed for S against T and, as the null that calibrates it, for H against T. Origins:

- nearest-neighbour similarity percentiles and share above a threshold: Somepalli et al. 2023;
- nearest / second-nearest distance ratio: Gu, Yoon et al.;
- z-score against the holdout null: audit.md ("calibrated per-sample score");
- distance to closest record, train vs holdout: SDMetrics DCROverfittingProtection;
- authenticity: Alaa et al. 2022 (ICML), "How faithful is your synthetic data?";
- membership inference AUC and TPR at low FPR: distance-based black-box attack on the released set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99, 100)


def percentiles(values: np.ndarray, qs: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


def share_above(values: np.ndarray, threshold: float) -> float:
    values = np.asarray(values)
    return float(np.mean(values >= threshold)) if values.size else 0.0


def nn_distance_ratio(top_sims: np.ndarray) -> np.ndarray:
    """(1 - sim1) / (1 - sim2) per row of descending top-k similarities (cosine distance ratio); 1 when k < 2."""
    top_sims = np.asarray(top_sims, dtype=np.float64)
    if top_sims.shape[1] < 2:
        return np.ones(len(top_sims))
    d1 = np.clip(1.0 - top_sims[:, 0], 0.0, None)
    d2 = np.clip(1.0 - top_sims[:, 1], 0.0, None)
    return np.where(d2 > 1e-12, d1 / np.maximum(d2, 1e-12), 1.0)


@dataclass(frozen=True)
class NullModel:
    """Mean and standard deviation of the holdout null (H -> T nearest-neighbour similarities)."""

    mean: float
    std: float

    @classmethod
    def fit(cls, null_sims: np.ndarray) -> "NullModel":
        null_sims = np.asarray(null_sims, dtype=np.float64)
        return cls(float(null_sims.mean()), float(max(null_sims.std(ddof=1) if null_sims.size > 1 else 0.0, 1e-6)))

    def z(self, sims: np.ndarray) -> np.ndarray:
        return (np.asarray(sims, dtype=np.float64) - self.mean) / self.std


def dcr_share_closer_to_train(d_train: np.ndarray, d_holdout: np.ndarray) -> float:
    """Share of synthetic samples closer to the train set than to an equally large holdout set (ties count half)."""
    d_train, d_holdout = np.asarray(d_train), np.asarray(d_holdout)
    if d_train.size == 0:
        return float("nan")
    return float(np.mean((d_train < d_holdout) + 0.5 * (d_train == d_holdout)))


def dcr_protection_score(share_closer_to_train: float) -> float:
    """SDMetrics' DCROverfittingProtection: min(2 (1 - p), 1); 1 is best, 0 means every sample is closer to T."""
    return float(min(2.0 * (1.0 - share_closer_to_train), 1.0))


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
    var = n1 * n2 / 12.0 * ((n + 1) - float((ties ** 3 - ties).sum()) / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (observed - mean - 0.5) / math.sqrt(var)
    return float(0.5 * math.erfc(z / math.sqrt(2.0)))


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every threshold, from (0, 0) to (1, 1)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    fpr = [0.0] + [float(np.mean(neg >= t)) for t in thresholds]
    tpr = [0.0] + [float(np.mean(pos >= t)) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, max_fpr: float = 0.01) -> float:
    """Highest true positive rate at a threshold whose false positive rate is at most ``max_fpr``."""
    fpr, tpr = roc_curve(pos, neg)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass(frozen=True)
class MembershipResult:
    auc: float
    p_value: float   # one-sided Mann-Whitney: is the AUC above 0.5?
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray
    tpr: np.ndarray


def membership_inference(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> MembershipResult:
    """Distance attack: a real tile is called a member when its similarity to the released set is high.

    ``member_scores``: nearest-synthetic similarity of tiles of T; ``nonmember_scores``: of held-out tiles.
    """
    auc = roc_auc(member_scores, nonmember_scores)
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    return MembershipResult(auc, auc_p_value(member_scores, nonmember_scores),
                            tpr_at_fpr(member_scores, nonmember_scores, 0.01), len(member_scores),
                            len(nonmember_scores), fpr, tpr)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sum)."""
    import math

    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k, n + 1)]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs)))


def exceedance_test(sims: np.ndarray, null_sims: np.ndarray, q: float = 95.0) -> tuple[float, float]:
    """Share of ``sims`` above the null's q-th percentile and the one-sided binomial p-value of that share
    against the (100 - q) % expected when ``sims`` come from the null's distribution."""
    sims = np.asarray(sims)
    if sims.size == 0 or np.asarray(null_sims).size == 0:
        return float("nan"), 1.0
    cut = float(np.percentile(null_sims, q))
    k = int((sims > cut).sum())
    return k / sims.size, binomial_tail(k, int(sims.size), 1.0 - q / 100.0)


def histogram(values: np.ndarray, bins: np.ndarray) -> list[int]:
    counts, _ = np.histogram(np.clip(np.asarray(values, np.float64), bins[0], bins[-1]), bins=bins)
    return [int(c) for c in counts]

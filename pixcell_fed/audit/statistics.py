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


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties counted half)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC."""
    if n_pos == 0 or n_neg == 0 or not np.isfinite(auc):
        return float("nan")
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


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
    auc_se: float
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray
    tpr: np.ndarray

    @property
    def auc_lower95(self) -> float:
        return float(self.auc - 1.96 * self.auc_se) if np.isfinite(self.auc_se) else float("nan")


def membership_inference(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> MembershipResult:
    """Distance attack: a real tile is called a member when its similarity to the released set is high.

    ``member_scores``: nearest-synthetic similarity of tiles of T; ``nonmember_scores``: of held-out tiles.
    """
    auc = roc_auc(member_scores, nonmember_scores)
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    return MembershipResult(auc, auc_standard_error(auc, len(member_scores), len(nonmember_scores)),
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

"""Fidelity of a synthetic set the way PixCell measures it: Fréchet distance, precision/recall, density/coverage.

Pure functions on embeddings (rows are tiles, columns an encoder's features); no files, no audit plumbing. The
audit calls :func:`fidelity_figures` once per encoder space with the embeddings of S (synthetic), T (the real
tiles that conditioned S) and H (real held-out tiles of slides never used for conditioning) and stores the
JSON-able dict it returns.

* **Fréchet distance** (Heusel et al. 2017, the "FID" formula in any encoder's space):
  ``FD = |mu1 - mu2|^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2``. The trace term is computed without a
  general matrix square root: for any factors ``C1 = F1 F1^T`` and ``C2 = F2 F2^T`` it equals the nuclear norm
  (sum of singular values) of ``F1^T F2``. A set with no more tiles than dimensions (the normal case at a small
  site: 100 tiles, 1,536 features) has a rank-deficient covariance; its centred rows ``X^T / sqrt(n - 1)`` are an
  exact factor, so nothing is inverted, regularised or made complex. A set with more tiles than dimensions uses
  its covariance's Cholesky factor (an eigen-factor when the covariance is singular).
* **The floor** FD(H, T): how far new real tissue of the same site is from T, on as many tiles as S is compared
  with (FD grows as sets shrink, so S and H are compared at the same size). FD(S, T) / FD(H, T) near 1 means the
  synthetic set is as close to T as new real tissue is; far above 1, it is not.
* **Precision and recall** (Kynkäänniemi et al. 2019) and **density and coverage** (Naeem et al. 2020), with
  k = 5: each tile's neighbourhood is the ball reaching its k-th nearest neighbour of its own set (Euclidean
  distance, balls closed). Precision: share of S inside some ball of T; recall: share of T inside some ball of
  S; density: balls of T containing each tile of S, divided by k, averaged; coverage: share of T's balls
  containing at least one tile of S. The same figures for H show what new real tissue gives.
* **Confidence intervals** (seeded bootstrap): FD resamples every set with replacement (S, H and T together, so
  that the ratio's interval is paired) and reports the estimate times ``exp(-+ z sd)`` of the log replicates
  (:func:`log_normal_interval`: resampling inflates FD, so its percentiles would be off-centre); precision,
  recall, density and coverage are means over tiles, resampled with the neighbourhood balls held fixed
  (percentile intervals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

K_NEIGHBOURS = 5
#: bootstrap replicates: each FD replicate builds three covariances and two trace terms (``python -m
#: benchmarks.fidelity`` times them at a site's sizes); a count replicate is one resampled mean
FD_BOOTSTRAP = 100
COUNT_BOOTSTRAP = 1000
CONFIDENCE = 0.95
SEED = 0
_EXTRA_CANDIDATES = 4  # neighbours beyond k rescored in float64 (guards float32 near-ties)
_BLOCK_BYTES = 64 * 2**20  # float64 working block of the ball counts


# ------------------------------------------------------------------------------------------------ Fréchet distance


@dataclass(frozen=True)
class Moments:
    """Mean and a covariance factor ``factor`` (d x r, ``factor @ factor.T`` = the sample covariance) of a set."""

    mean: np.ndarray
    factor: np.ndarray

    @property
    def trace(self) -> float:
        return float(np.sum(self.factor * self.factor))


def covariance_factor(cov: np.ndarray) -> np.ndarray:
    """A factor ``F`` with ``F @ F.T == cov`` for a symmetric positive semi-definite ``cov``: Cholesky when the
    matrix is positive definite, else ``V sqrt(max(w, 0))`` from its symmetric eigendecomposition."""
    cov = np.asarray(cov, dtype=np.float64)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh((cov + cov.T) / 2)
        return v * np.sqrt(np.clip(w, 0.0, None))


def moments(x: np.ndarray, counts: np.ndarray | None = None) -> Moments:
    """Mean and covariance factor of the rows of ``x`` (float64; sample covariance with n - 1), each row taken
    ``counts[i]`` times when given (a bootstrap resample without copying rows).

    With no more distinct rows than dimensions, the centred rows (scaled by the square roots of their counts)
    are an exact factor: no d x d matrix is formed or decomposed.
    """
    x = np.asarray(x, dtype=np.float64)
    weights = np.ones(len(x)) if counts is None else np.asarray(counts, dtype=np.float64)
    keep = weights > 0
    x, weights = x[keep], weights[keep]
    n, d = float(weights.sum()), x.shape[1]
    if n < 2:
        raise ValueError(f"a covariance needs at least two tiles, got {n:g}")
    mean = weights @ x / n
    centred = x - mean
    if len(x) <= d:
        return Moments(mean, (centred * np.sqrt(weights)[:, None]).T / math.sqrt(n - 1))
    return Moments(mean, covariance_factor((centred * weights[:, None]).T @ centred / (n - 1)))


def _nuclear_norm(m: np.ndarray) -> float:
    """Sum of the singular values of ``m``."""
    return float(np.linalg.svd(m, compute_uv=False).sum())


def frechet_from_moments(a: Moments, b: Moments) -> float:
    """Fréchet distance between two Gaussians given by their moments (clipped at 0 against rounding)."""
    diff = a.mean - b.mean
    value = float(diff @ diff) + a.trace + b.trace - 2.0 * _nuclear_norm(a.factor.T @ b.factor)
    return max(value, 0.0)


def gaussian_frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (covariances symmetric positive semi-definite)."""
    return frechet_from_moments(
        Moments(np.asarray(mu1, np.float64), covariance_factor(cov1)),
        Moments(np.asarray(mu2, np.float64), covariance_factor(cov2)),
    )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to the rows of ``a`` and of ``b``."""
    return frechet_from_moments(moments(a), moments(b))


# ------------------------------------------------------------------------------------- neighbourhoods and balls


def _euclidean_search(queries: np.ndarray, keys: np.ndarray, k: int, *, exclude_self: bool = False) -> np.ndarray:
    """Indices (N, k') of each query's k' = min(k, available) nearest keys by Euclidean distance, from the exact
    search of :mod:`pixcell_fed.audit.search`: ``[q, 1] . [x, -|x|^2 / 2] = (|q|^2 - |q - x|^2) / 2``, so the
    largest inner products are the nearest keys."""
    from pixcell_fed.audit.search import topk_cosine

    q = np.hstack([queries, np.ones((len(queries), 1))]).astype(np.float32)
    kx = np.hstack([keys, -0.5 * np.sum(np.asarray(keys, np.float64) ** 2, axis=1, keepdims=True)]).astype(np.float32)
    return topk_cosine(q, kx, k, normalize=False, exclude_self=exclude_self).idx


def kth_neighbour_radii(x: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (float64; candidates from the exact search,
    distances recomputed in float64)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) <= k:
        raise ValueError(f"the k-th neighbour (k = {k}) needs more than {k} tiles, got {len(x)}")
    idx = _euclidean_search(x, x, k + _EXTRA_CANDIDATES, exclude_self=True)
    radii = np.empty(len(x))
    rows = max(1, _BLOCK_BYTES // (8 * idx.shape[1] * x.shape[1]))
    for start in range(0, len(x), rows):
        block = x[start : start + rows]
        dist = np.sqrt(np.sum((block[:, None, :] - x[idx[start : start + rows]]) ** 2, axis=2))
        radii[start : start + rows] = np.sort(dist, axis=1)[:, k - 1]
    return radii


def ball_counts(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For closed balls ``B(centres[i], radii[i])``: how many balls contain each point, and how many points each
    ball contains. Squared distances come from a float32 matrix product; pairs within its rounding bound of a
    ball's edge are decided again in float64, so the counts are exact."""
    p64, c64 = np.asarray(points, np.float64), np.asarray(centres, np.float64)
    r2 = np.asarray(radii, np.float64) ** 2
    n, m = len(p64), len(c64)
    per_point, per_centre = np.zeros(n, np.int64), np.zeros(m, np.int64)
    if n == 0 or m == 0:
        return per_point, per_centre
    dim = p64.shape[1]
    p32, c32 = p64.astype(np.float32), c64.astype(np.float32)
    pn, cn = np.sum(p64**2, axis=1), np.sum(c64**2, axis=1)
    slack = (dim + 4) * 2.0**-23  # float32 inner products (and input rounding) err by at most this x (|p|^2 + |c|^2)
    rows = max(1, min(n, _BLOCK_BYTES // (8 * m)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scale = pn[start:stop, None] + cn[None, :]
        d2 = scale - 2.0 * (p32[start:stop] @ c32.T).astype(np.float64)
        inside = d2 <= r2[None, :]
        unsure = np.abs(d2 - r2[None, :]) <= slack * scale + 1e-300
        if unsure.any():
            i, j = np.nonzero(unsure)
            exact = np.sum((p64[start + i] - c64[j]) ** 2, axis=1)
            inside[i, j] = exact <= r2[j]
        per_point[start:stop] = inside.sum(axis=1)
        per_centre += inside.sum(axis=0)
    return per_point, per_centre


@dataclass(frozen=True)
class Manifold:
    """A reference set and its k-NN balls."""

    points: np.ndarray
    radii: np.ndarray
    k: int

    @classmethod
    def of(cls, x: np.ndarray, k: int = K_NEIGHBOURS) -> Manifold:
        x = np.asarray(x, np.float64)
        return cls(x, kth_neighbour_radii(x, k), k)


@dataclass(frozen=True)
class ManifoldCounts:
    """Per-tile indicators behind precision/recall/density/coverage of ``fake`` against ``real``."""

    in_real: np.ndarray  # per fake tile: real balls containing it (precision: > 0; density: / k)
    real_covered: np.ndarray  # per real tile: does its ball contain a fake tile (coverage)
    real_in_fake: np.ndarray  # per real tile: is it inside some fake ball (recall)
    k: int

    @property
    def precision(self) -> float:
        return float(np.mean(self.in_real > 0))

    @property
    def density(self) -> float:
        return float(np.mean(self.in_real) / self.k)

    @property
    def coverage(self) -> float:
        return float(np.mean(self.real_covered))

    @property
    def recall(self) -> float:
        return float(np.mean(self.real_in_fake))


def manifold_counts(real: Manifold, fake: np.ndarray) -> ManifoldCounts:
    """Precision, recall, density and coverage indicators of ``fake`` tiles against the ``real`` manifold."""
    fake_manifold = Manifold.of(fake, real.k)
    in_real, covered = ball_counts(fake_manifold.points, real.points, real.radii)
    real_in_fake, _ = ball_counts(real.points, fake_manifold.points, fake_manifold.radii)
    return ManifoldCounts(in_real=in_real, real_covered=covered > 0, real_in_fake=real_in_fake > 0, k=real.k)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``."""
    counts = manifold_counts(Manifold.of(real, k), fake)
    return counts.precision, counts.recall


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) of ``fake`` against ``real``."""
    counts = manifold_counts(Manifold.of(real, k), fake)
    return counts.density, counts.coverage


# --------------------------------------------------------------------------------------------- intervals


def interval(value: float | None, replicates: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{"value", "low", "high"}``: the estimate and the bootstrap percentile interval (None where undefined)."""
    reps = np.asarray(replicates, np.float64)
    reps = reps[np.isfinite(reps)]
    if value is None or not math.isfinite(value) or reps.size == 0:
        return {"value": value if value is not None and math.isfinite(value) else None, "low": None, "high": None}
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return {"value": float(value), "low": float(low), "high": float(high)}


def log_normal_interval(value: float | None, replicates: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{"value", "low", "high"}`` for a positive, size-biased estimate (a Fréchet distance or a ratio of two):
    ``value * exp(-+ z sd)``, with ``sd`` the standard deviation of the log bootstrap replicates.

    A resample with replacement holds only about 63 % distinct tiles and FD grows as sets shrink, so FD
    replicates sit above the estimate (and a ratio of two can sit on either side): their percentiles would
    describe the resamples, not the data. Their spread still measures the estimate's sampling variability, so
    the interval is that spread, on the log scale, around the estimate.
    """
    from statistics import NormalDist

    reps = np.asarray(replicates, np.float64)
    reps = reps[np.isfinite(reps) & (reps > 0)]
    if value is None or not math.isfinite(value) or value <= 0 or reps.size < 2:
        return interval(value, np.zeros(0), confidence)
    spread = NormalDist().inv_cdf(0.5 + confidence / 2) * float(np.std(np.log(reps), ddof=1))
    return {"value": float(value), "low": float(value * math.exp(-spread)), "high": float(value * math.exp(spread))}


def _mean_interval(
    values: np.ndarray, rng: np.random.Generator, bootstrap: int, confidence: float, scale: float = 1.0
) -> dict[str, Any]:
    values = np.asarray(values, np.float64) / scale
    n = len(values)
    per_block = max(1, min(bootstrap, (16 * 2**20) // (8 * n)))  # replicates drawn at once
    means = np.concatenate(
        [
            values[rng.integers(0, n, size=(min(per_block, bootstrap - b), n))].mean(axis=1)
            for b in range(0, bootstrap, per_block)
        ]
    )
    return interval(float(values.mean()), means, confidence)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _frechet_block(
    s: np.ndarray, t: np.ndarray, h: np.ndarray, rng: np.random.Generator, bootstrap: int, confidence: float
) -> dict[str, Any]:
    """FD(S, T), FD(H, T) and their ratio, each with a paired bootstrap interval."""
    mt = moments(t)
    fd_s, fd_h = frechet_from_moments(moments(s), mt), frechet_from_moments(moments(h), mt)
    reps = np.full((bootstrap, 3), np.nan)
    for b in range(bootstrap):  # a resample with replacement is a count per tile
        counts = [rng.multinomial(len(x), np.full(len(x), 1.0 / len(x))) for x in (s, t, h)]
        mt_b = moments(t, counts[1])
        reps[b, 0] = frechet_from_moments(moments(s, counts[0]), mt_b)
        reps[b, 1] = frechet_from_moments(moments(h, counts[2]), mt_b)
        reps[b, 2] = _ratio(reps[b, 0], reps[b, 1])
    return {
        "S->T": log_normal_interval(fd_s, reps[:, 0], confidence),
        "H->T": log_normal_interval(fd_h, reps[:, 1], confidence),
        "ratio": log_normal_interval(_ratio(fd_s, fd_h), reps[:, 2], confidence),
    }


def _manifold_block(
    s: np.ndarray, t: np.ndarray, h: np.ndarray, k: int, rng: np.random.Generator, bootstrap: int, confidence: float
) -> dict[str, dict[str, Any]]:
    real = Manifold.of(t, k)
    out: dict[str, dict[str, Any]] = {"precision": {}, "recall": {}, "density": {}, "coverage": {}}
    for role, fake in (("S", s), ("H", h)):
        c = manifold_counts(real, fake)
        out["precision"][role] = _mean_interval(c.in_real > 0, rng, bootstrap, confidence)
        out["density"][role] = _mean_interval(c.in_real, rng, bootstrap, confidence, scale=k)
        out["recall"][role] = _mean_interval(c.real_in_fake, rng, bootstrap, confidence)
        out["coverage"][role] = _mean_interval(c.real_covered, rng, bootstrap, confidence)
    return out


def fidelity_figures(
    s: np.ndarray,
    t: np.ndarray,
    h: np.ndarray,
    *,
    k: int = K_NEIGHBOURS,
    fd_bootstrap: int = FD_BOOTSTRAP,
    count_bootstrap: int = COUNT_BOOTSTRAP,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> dict[str, Any]:
    """Every fidelity figure of S against T in one encoder space, with H against T as the floor (JSON-able).

    S and H are compared at the same size (the smaller of the two; the larger is subsampled, seeded); T is used
    whole. Figures that the sizes do not allow (FD needs two tiles per set, the k-NN balls more than ``k``) are
    None, with the reason under ``"not_computed"``.
    """
    if fd_bootstrap < 1 or count_bootstrap < 1 or not 0 < confidence < 1 or k < 1:
        raise ValueError("need bootstrap replicates >= 1, 0 < confidence < 1 and k >= 1")
    s, t, h = (np.asarray(x, np.float64) for x in (s, t, h))
    dims = {x.shape[1] for x in (s, t, h) if x.ndim == 2 and x.size}
    if len(dims) > 1 or any(x.ndim != 2 for x in (s, t, h)):
        raise ValueError(f"S, T and H must be (n, d) embeddings of one space, got {[x.shape for x in (s, t, h)]}")
    rng = np.random.default_rng(seed)
    m = min(len(s), len(h))
    s_m = s[np.sort(rng.choice(len(s), m, replace=False))] if len(s) > m else s
    h_m = h[np.sort(rng.choice(len(h), m, replace=False))] if len(h) > m else h
    out: dict[str, Any] = {
        "dim": int(dims.pop()) if dims else 0,
        "sizes": {"S": len(s), "T": len(t), "H": len(h), "compared": m},
        "k": k,
        "bootstrap": {"fd": fd_bootstrap, "counts": count_bootstrap},
        "confidence": confidence,
        "bootstrap_seed": seed,
        "fd": None,
        "precision": None,
        "recall": None,
        "density": None,
        "coverage": None,
        "not_computed": [],
    }
    if m >= 2 and len(t) >= 2:
        out["fd"] = _frechet_block(s_m, t, h_m, rng, fd_bootstrap, confidence)
    else:
        out["not_computed"].append("Fréchet distance: needs at least two tiles in S, H and T")
    if m > k and len(t) > k:
        out.update(_manifold_block(s_m, t, h_m, k, rng, count_bootstrap, confidence))
    else:
        out["not_computed"].append(f"precision, recall, density, coverage: need more than k = {k} tiles in S, H and T")
    return out


def fd_ratio_status(figures: dict[str, Any], warn_ratio: float | None) -> str:
    """ "WARN" when the FD ratio is significantly above ``warn_ratio`` (the lower end of its interval is), "PASS"
    when it is not, "N/A" when no ratio could be computed or no threshold is set."""
    ratio = (figures.get("fd") or {}).get("ratio") or {}
    if warn_ratio is None or ratio.get("value") is None:
        return "N/A"
    low = ratio.get("low")
    return "WARN" if (low if low is not None else ratio["value"]) > warn_ratio else "PASS"

"""Simulated audits in a descriptor-like space: the harness behind tests/test_audit_calibration.py.

Tiles are unit vectors in 143 dimensions (the copy descriptor's size) drawn from a Gaussian whose variances decay
as 1 / (i + 1) ** DECAY, around a small common mean, then normalised. The spread is tuned to the real CMU-1
slide's descriptor: pairwise cosines from -0.4 to 0.5 (5th to 95th percentile, median 0.03) and a median
nearest-neighbour similarity of held-out to 87 conditioning tiles of about 0.6. S, T and H are drawn alike; a
leaked synthetic tile is a conditioning tile plus noise (another draw, made orthogonal), at a given cosine to it.
Sizes are those of issue 20's review: small site |S|, |T|, |H| = 50, 50, 25; large site 2000, 2000, 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIM, DECAY, MEAN_NORM = 143, 0.72, 0.17
SMALL, LARGE = (50, 50, 25), (2000, 2000, 1000)


def _population() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    scales = 1.0 / (1 + np.arange(DIM)) ** DECAY
    basis = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    mean = rng.normal(size=DIM)
    return scales, basis, mean * MEAN_NORM / np.linalg.norm(mean)


POPULATION = _population()


def draw(n: int, rng: np.random.Generator) -> np.ndarray:
    scales, basis, mean = POPULATION
    x = (rng.normal(size=(n, DIM)) * scales) @ basis.T
    x = x / np.linalg.norm(x, axis=1, keepdims=True) + mean
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Draw:
    s: np.ndarray
    t: np.ndarray
    h: np.ndarray
    leaked: int
    source_of: dict[int, int]


def simulate(sizes: tuple[int, int, int], share: float = 0.0, cosine: float = 0.96, *, seed: int) -> Draw:
    """One dataset: ``share`` of S leaked from distinct tiles of T at ``cosine`` to them, the rest drawn like H;
    ``source_of`` maps every synthetic tile to a conditioning tile (its own source for leaked tiles)."""
    rng = np.random.default_rng(seed)
    n_s, n_t, n_h = sizes
    t, h, s = draw(n_t, rng), draw(n_h, rng), draw(n_s, rng)
    leaked = int(round(share * n_s))
    sources = rng.permutation(n_t)[: n_s] if n_s <= n_t else rng.integers(0, n_t, n_s)
    if leaked:
        src = t[sources[:leaked]]
        noise = draw(leaked, rng)
        noise -= (noise * src).sum(1, keepdims=True) * src
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        s[:leaked] = cosine * src + np.sqrt(1 - cosine ** 2) * noise
    return Draw(s, t, h, leaked, {i: int(sources[i]) for i in range(n_s)})


def audit(d: Draw, cfg=None, mapping: bool = False):
    """The audit's rounds on a simulated draw (copy detector off: there are no pixels); returns RoundsOutcome."""
    from pixcell_fed.audit.context import context_from_features
    from pixcell_fed.audit.rounds import run_rounds
    from pixcell_fed.config.schema import AuditConfig

    ctx = context_from_features(d.s, d.t, d.h, cfg or AuditConfig(), source_of=d.source_of if mapping else None)
    return run_rounds(ctx)

"""Region-level copy detection: is any region of a synthetic tile a copy of a region of a real tile?

The whole-tile detector (:mod:`pixcell_fed.audit.copy_features`) sees a tile copied whole, up to right-angle
rotations, flips and small crops. A diffusion model may instead reproduce part of a real tile: half of it, a
quarter inside a mosaic, rotated by any angle, rescaled, blurred or restained. This module finds those, in three
steps per synthetic tile, each with a well-kept implementation:

1. **Candidates.** Every real tile, and its mirror image, is one VLAD vector of its local SIFT descriptors
   (:mod:`pixcell_fed.audit.keypoints`). The exact top-k cosine search (:func:`pixcell_fed.audit.search.topk_cosine`)
   gives each synthetic tile its ``candidates`` nearest real tiles: a tile that shares a region with a real tile
   shares that region's descriptors, whatever the rotation, scale or position.
2. **Geometry.** RootSIFT descriptors of the two tiles are matched (nearest neighbour, Lowe's ratio test) and a
   similarity transform (rotation, uniform scale, translation) is fitted robustly: ``cv2.estimateAffinePartial2D``
   with RANSAC. The pair goes on only with at least ``min_inliers`` consistent matches and a scale in
   :data:`SCALE_RANGE`; a mirrored candidate gives a reflection.
3. **Pixels.** The real tile is warped onto the synthetic one and compared by local normalised correlation of
   band-passed images (:func:`pixcell_fed.audit.pixel_confirm.aligned_region`); the copied region is the convex
   hull of the largest area that agrees, measured as a share of the synthetic tile.

The cost per synthetic tile is one keypoint detection on an 80 px image, one row of a small exact search and
``candidates`` pair verifications, independent of how many real tiles there are (but for the search row).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixcell_fed.audit import keypoints as kp
from pixcell_fed.audit.pixel_confirm import aligned_region

RATIO = 0.85
"""Lowe's ratio test: a match is kept when its descriptor distance is below this share of the second nearest's."""
RANSAC_THRESHOLD = 1.25 / 80
"""RANSAC reprojection threshold as a share of the working image's side (1.25 px at 80 px)."""
SCALE_RANGE = (0.6, 1.7)
"""Similarity scales accepted between a synthetic region and its real source (copies are sought at 0.7-1.4)."""
MEASURED_SHARE = 0.8
"""A tile is flagged when its measured copied region reaches this share of ``audit.region_copy_min_fraction``. The
measured region falls short of the true one along its border, where the correlation window straddles copied and
new tissue; calibrated on pairs of overlapping real tiles (docs/audit.md, "Region copies"): overlaps of 25 % of the
tile measure at least 0.219 in 95 % of pairs, overlaps of 18.75 % at most 0.19, so 0.8 x 0.25 = 0.2 flags the
quarter-tile copies and no smaller overlap."""
CHUNK = 512
"""Synthetic tiles processed at once (keypoints, search, verification): memory stays bounded for any set size."""
FLAGGED_SHOWN = 200
"""Copy-flagged tiles shown (worst first) in the on-site report's grid, beyond the configured closest pairs."""


@dataclass(frozen=True)
class RegionMatch:
    """The best region match of one synthetic tile: real tile ``real`` (index into the real set), mirrored or not,
    RANSAC inliers, the copied ``fraction`` of the synthetic tile, the median local correlation inside it, the
    similarity transform's rotation (degrees) and scale (real pixels per synthetic pixel), and the region's
    outline on both tiles in unit coordinates (x, y in [0, 1] of the tile's width and height)."""

    real: int
    mirrored: bool
    inliers: int
    fraction: float
    correlation: float
    angle: float
    scale: float
    outline_synthetic: np.ndarray
    outline_real: np.ndarray
    transform: np.ndarray  # (2, 3): synthetic unit coordinates -> real unit coordinates

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready evidence for the on-site report (the real tile is named by the caller)."""
        return {
            "fraction": round(self.fraction, 4),
            "inliers": self.inliers,
            "mirrored": self.mirrored,
            "correlation": round(self.correlation, 4),
            "angle": round(self.angle, 1),
            "scale": round(self.scale, 3),
            "outline_synthetic": np.round(self.outline_synthetic, 4).tolist(),
            "outline_real": np.round(self.outline_real, 4).tolist(),
            "transform": np.round(self.transform, 6).tolist(),
        }


@dataclass(frozen=True)
class RegionCopies:
    """Per synthetic tile: the largest copied fraction found (0 when none) and its :class:`RegionMatch`."""

    fraction: np.ndarray
    matches: list[RegionMatch | None]

    def flagged(self, min_fraction: float) -> np.ndarray:
        """Tiles with a copied region of at least ``min_fraction`` of their area (see :func:`flag_threshold`)."""
        return self.fraction >= flag_threshold(min_fraction)

    @classmethod
    def empty(cls, n: int) -> RegionCopies:
        return cls(np.zeros(n, np.float32), [None] * n)


@dataclass(frozen=True)
class RealIndex:
    """The real tiles as the detector needs them: working images, keypoints, the fitted VLAD vocabulary and the
    search keys (rows 0..N-1: each real tile's VLAD vector; rows N..2N-1: its mirror image's)."""

    works: np.ndarray
    keypoints: list[kp.Keypoints]
    vocabulary: kp.Vocabulary | None
    keys: np.ndarray

    @classmethod
    def build(cls, works: np.ndarray, *, seed: int = 0, workers: int = 2) -> RealIndex:
        """Keypoints of the real working images (N, side, side) and the vocabulary fitted on them; ``seed`` fixes
        the k-means and PCA sampling, so the same real tiles give the same index."""
        points = kp.detect_all(works, workers=workers, desc="finding keypoints of real tiles")
        vocabulary = kp.Vocabulary.fit(points, seed=seed)
        if vocabulary is None:
            keys = np.zeros((0, 1), np.float32)
        else:
            keys = np.concatenate([vocabulary.vlad(points), vocabulary.vlad([kp.mirrored(p) for p in points])])
        return cls(works, points, vocabulary, keys)

    def __len__(self) -> int:
        return len(self.works)


def flag_threshold(min_fraction: float) -> float:
    """The measured copied share that flags a tile, for a configured smallest copied region ``min_fraction``."""
    return MEASURED_SHARE * min_fraction


_local = threading.local()


def _matcher():
    import cv2

    if not hasattr(_local, "matcher"):
        _local.matcher = cv2.BFMatcher(cv2.NORM_L2)
    return _local.matcher


def match_pair(
    synthetic: np.ndarray,
    synthetic_kp: kp.Keypoints,
    real: np.ndarray,
    real_kp: kp.Keypoints,
    *,
    mirrored: bool,
    min_inliers: int,
    correlation: float,
    real_index: int = -1,
) -> RegionMatch | None:
    """Verify one (synthetic, real) pair of working images geometrically and in pixels; None when no region of
    the synthetic tile aligns with the real tile (``mirrored``: with the real tile's mirror image)."""
    import cv2

    side = synthetic.shape[0]
    target = kp.mirrored(real_kp, real.shape[1]) if mirrored else real_kp
    if len(synthetic_kp) < min_inliers or len(target) < min_inliers:
        return None
    pairs = _matcher().knnMatch(kp.root_sift(synthetic_kp.desc), kp.root_sift(target.desc), k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < min_inliers:
        return None
    src = synthetic_kp.xy[[m.queryIdx for m in good]]
    dst = target.xy[[m.trainIdx for m in good]]
    transform, inliers = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_THRESHOLD * side, maxIters=2000, confidence=0.995
    )
    if transform is None or int(inliers.sum()) < min_inliers:
        return None
    scale = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        return None
    angle = float(np.degrees(np.arctan2(transform[1, 0], transform[0, 0])))
    if mirrored:  # the fit maps onto the mirror image (x -> w - x); compose with the mirror to reach the real tile
        flip = np.array([[-1.0, 0.0, real.shape[1]], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        transform = (flip @ np.vstack([transform, [0.0, 0.0, 1.0]]))[:2]
    region = aligned_region(synthetic, real, transform, threshold=correlation)
    if region.fraction <= 0.0:
        return None
    outline = region.outline
    on_real = cv2.transform(outline.reshape(-1, 1, 2).astype(np.float64), transform).reshape(-1, 2)
    real_side = float(real.shape[1])
    unit_transform = (
        np.diag([1 / real_side, 1 / real_side, 1.0]) @ np.vstack([transform, [0, 0, 1]]) @ np.diag([side, side, 1.0])
    )[:2]
    return RegionMatch(
        real_index,
        mirrored,
        int(inliers.sum()),
        region.fraction,
        region.correlation,
        angle,
        scale,
        (outline / side).astype(np.float32),
        (on_real / real_side).astype(np.float32),
        unit_transform.astype(np.float32),
    )


def find_region_copies(
    works: np.ndarray,
    index: RealIndex,
    *,
    candidates: int,
    min_inliers: int,
    correlation: float,
    device: str = "cpu",
    workers: int = 2,
    desc: str = "region copies",
) -> RegionCopies:
    """The best region match of each synthetic working image (N, side, side) among its ``candidates`` nearest
    real tiles (and mirror images) in :class:`RealIndex`."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from pixcell_fed.audit.search import TopK, topk_cosine
    from pixcell_fed.progress import progress

    n = len(works)
    if n == 0 or index.vocabulary is None or len(index) == 0:
        return RegionCopies.empty(n)
    fraction = np.zeros(n, np.float32)
    matches: list[RegionMatch | None] = [None] * n
    n_real = len(index)
    k = min(candidates, len(index.keys))

    def verify(start: int, points: list[kp.Keypoints], top: TopK, r: int) -> tuple[int, RegionMatch | None]:
        """The best match of synthetic tile ``start + r`` (row ``r`` of the chunk at ``start``)."""
        best = None
        for key, sim in zip(top.idx[r], top.sims[r]):
            if sim <= 0.0:  # a synthetic tile without keypoints has a zero vector
                continue
            j = int(key) % n_real
            found = match_pair(
                works[start + r],
                points[r],
                index.works[j],
                index.keypoints[j],
                mirrored=int(key) >= n_real,
                min_inliers=min_inliers,
                correlation=correlation,
                real_index=j,
            )
            if found is not None and (best is None or found.fraction > best.fraction):
                best = found
        return start + r, best

    bar = progress(total=n, desc=desc, unit="tile")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, n, CHUNK):
            rows = range(start, min(n, start + CHUNK))
            points = list(pool.map(kp.detect, (works[i] for i in rows)))
            top = topk_cosine(index.vocabulary.vlad(points), index.keys, k, normalize=False, device=device)
            for i, best in pool.map(partial(verify, start, points, top), range(len(rows))):
                if best is not None:
                    fraction[i], matches[i] = best.fraction, best
            bar.update(len(rows))
    bar.close()
    return RegionCopies(fraction, matches)


def evidence(copies: RegionCopies | None, i: int, real_names: Sequence[Any]) -> dict[str, Any] | None:
    """The region match of synthetic tile ``i`` as JSON-ready evidence naming its real tile (on-site only)."""
    match = None if copies is None else copies.matches[i]
    if match is None:
        return None
    return {"real": str(real_names[match.real]), **match.to_dict()}


def draw_region_pair(
    synthetic: np.ndarray, real: np.ndarray, region: dict[str, Any], side: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the on-site report: the synthetic tile and the real tile (uint8 RGB, any size) at ``side`` px with the
    matched region (``region``, as :func:`evidence` gives it) outlined on both, and the real tile aligned onto the
    synthetic one (same outline): where the region is a copy, the first and third show the same tissue."""
    import cv2

    syn = cv2.resize(np.ascontiguousarray(synthetic), (side, side), interpolation=cv2.INTER_AREA)
    rea = cv2.resize(np.ascontiguousarray(real), (side, side), interpolation=cv2.INTER_AREA)
    to_px = np.diag([side, side, 1.0])
    from_px = np.diag([1.0 / side, 1.0 / side, 1.0])
    unit = np.vstack([np.asarray(region["transform"], dtype=np.float64), [0.0, 0.0, 1.0]])
    aligned = cv2.warpAffine(
        rea,
        (to_px @ unit @ from_px)[:2],
        (side, side),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
    )
    colour = (255, 0, 255)

    def outlined(img: np.ndarray, outline: list) -> np.ndarray:
        pts = np.round(np.asarray(outline, dtype=np.float64).reshape(-1, 2) * side).astype(np.int32)
        out = img.copy()
        if len(pts) >= 2:
            cv2.polylines(out, [pts.reshape(-1, 1, 2)], isClosed=True, color=colour, thickness=2)
        return out

    return (
        outlined(syn, region["outline_synthetic"]),
        outlined(rea, region["outline_real"]),
        outlined(aligned, region["outline_synthetic"]),
    )

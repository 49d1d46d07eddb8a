"""Local keypoints of tiles for region-level copy detection, and their aggregation into one vector per tile.

Every tile is reduced to a small grayscale *working image* (``WORK_SIDE`` pixels square, area-averaged), whatever
its size, so that a region is the same share of the working image for 256 px and 1024 px tiles. OpenCV's SIFT
finds keypoints on it (blobs such as nuclei and their clusters, each with a position, scale and orientation, so
invariant to rotation at any angle and to scale) and describes each by a 128-bin gradient histogram, used as
RootSIFT (Arandjelovic & Zisserman 2012: the square root of the L1-normalised histogram, compared by L2).

A flip is not a rotation: SIFT descriptors of a mirrored tile differ from the original's. The descriptor of a
mirrored keypoint is the original descriptor with its 4 x 4 spatial cells mirrored across the keypoint's
orientation axis and its 8 orientation bins negated, an exact permutation of the 128 bins
(:data:`MIRROR_PERMUTATION`), so mirrored tiles cost no second detection (:func:`mirrored`).

For the candidate search, each tile's descriptors are aggregated into one VLAD vector (Jegou et al. 2010: the sum
of residuals to the nearest of ``VOCABULARY_SIZE`` k-means centroids, intra-normalised and square-rooted), projected
to ``VLAD_DIM`` principal components; tiles sharing a region share the descriptors of that region, so their VLAD
vectors correlate and the exact top-k search ranks the real tile among the first few candidates.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORK_SIDE = 80
"""Side of the grayscale working image every tile is reduced to before keypoint detection: 80 px keeps a quarter
tile (40 x 40 px) rich enough in keypoints for a robust fit (planted quarter copies give >= 10 inliers) at two
thirds of the cost of 96 px."""
MAX_KEYPOINTS = 256
"""Keypoints kept per tile (the strongest), which bounds the cost of one pair's verification."""
VOCABULARY_SIZE = 64
"""k-means centroids of the VLAD aggregation, fitted on the real tiles' descriptors."""
VLAD_DIM = 256
"""Principal components kept of the VLAD vectors (fitted on the real tiles)."""
KEYPOINTS_NAME = f"gray{WORK_SIDE}-sift{MAX_KEYPOINTS}-rootsift-vlad{VOCABULARY_SIZE}-pca{VLAD_DIM}"

_SIFT_BINS = (4, 4, 8)  # spatial rows, spatial columns, orientation bins of a SIFT descriptor (row-major)


def _mirror_permutation() -> np.ndarray:
    """Index array p with desc_mirrored = desc[p]: spatial rows reversed, orientation bin k -> -k mod 8."""
    rows, cols, bins = _SIFT_BINS
    idx = np.arange(rows * cols * bins).reshape(rows, cols, bins)
    return np.ascontiguousarray(idx[::-1][:, :, (-np.arange(bins)) % bins].reshape(-1))


MIRROR_PERMUTATION = _mirror_permutation()


@dataclass(frozen=True)
class Keypoints:
    """The keypoints of one tile: positions (n, 2) in working-image pixels and SIFT descriptors (n, 128) uint8."""

    xy: np.ndarray
    desc: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)


def work_image(image: np.ndarray, side: int = WORK_SIDE) -> np.ndarray:
    """A uint8 RGB (H, W, 3) or gray (H, W) tile as a uint8 (side, side) grayscale working image."""
    from pixcell_fed.audit.copy_features import to_gray_uint8

    return to_gray_uint8(image, side)


_local = threading.local()


def _sift():
    """One SIFT detector per thread (OpenCV's detectors keep per-call state)."""
    import cv2

    if not hasattr(_local, "sift"):
        _local.sift = cv2.SIFT.create(nfeatures=MAX_KEYPOINTS)
    return _local.sift


def detect(work: np.ndarray) -> Keypoints:
    """SIFT keypoints and descriptors of one working image (uint8, square)."""
    kps, desc = _sift().detectAndCompute(np.ascontiguousarray(work), None)
    if desc is None or not kps:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    xy = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    # OpenCV returns SIFT histograms as float32 holding integers 0..255: uint8 is lossless and four times smaller
    return Keypoints(xy, np.clip(np.rint(desc), 0, 255).astype(np.uint8))


def mirrored(kp: Keypoints, side: int = WORK_SIDE) -> Keypoints:
    """The keypoints of the tile mirrored left-right (x -> side - x), without a second detection."""
    xy = kp.xy.copy()
    xy[:, 0] = side - xy[:, 0]
    return Keypoints(xy, np.ascontiguousarray(kp.desc[:, MIRROR_PERMUTATION]))


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (n, 128) float32, unit L2 norm: the square root of the L1-normalised SIFT histogram."""
    d = np.asarray(desc, dtype=np.float32)
    l1 = d.sum(axis=1, keepdims=True)
    return np.sqrt(np.divide(d, l1, out=np.zeros_like(d), where=l1 > 0))


def detect_all(works: np.ndarray, *, workers: int = 2, desc: str = "finding keypoints") -> list[Keypoints]:
    """Keypoints of a stack of working images (N, side, side), in a small thread pool (cv2 releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from pixcell_fed.progress import progress

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(progress(pool.map(detect, works), total=len(works), desc=desc, unit="tile"))


@dataclass(frozen=True)
class Vocabulary:
    """VLAD aggregation fitted on real tiles: k-means centroids of RootSIFT descriptors and a PCA projection."""

    centroids: np.ndarray  # (K, 128) float32
    mean: np.ndarray  # (K * 128,) float32, mean VLAD vector of the fitting tiles
    components: np.ndarray  # (d, K * 128) float32, principal axes

    @classmethod
    def fit(
        cls,
        tiles: Sequence[Keypoints],
        *,
        seed: int,
        size: int = VOCABULARY_SIZE,
        dim: int = VLAD_DIM,
        sample: int = 40_000,
        pca_tiles: int = 2048,
    ) -> Vocabulary | None:
        """Fit on the keypoints of real tiles: k-means on up to ``sample`` descriptors, PCA on the VLAD vectors of up
        to ``pca_tiles`` tiles and their mirror images. None when the tiles have too few keypoints."""
        import cv2
        import torch

        rng = np.random.default_rng(seed)
        desc = np.concatenate([root_sift(k.desc) for k in tiles]) if tiles else np.zeros((0, 128), np.float32)
        size = min(size, len(desc) // 8)
        if size < 2:
            return None
        if len(desc) > sample:
            desc = desc[np.sort(rng.choice(len(desc), sample, replace=False))]
        cv2.setRNGSeed(seed)  # k-means++ seeding draws from OpenCV's global generator: fixed for a fixed seed
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1e-4)
        labels = np.zeros((len(desc), 1), np.int32)  # an output only: KMEANS_PP_CENTERS does not read it
        _, _, centroids = cv2.kmeans(desc, size, labels, criteria, 1, cv2.KMEANS_PP_CENTERS)
        raw = cls(centroids.astype(np.float32), np.zeros(0, np.float32), np.zeros((0, 0), np.float32))
        some = [tiles[i] for i in np.sort(rng.choice(len(tiles), min(len(tiles), pca_tiles), replace=False))]
        vectors = raw.vlad_raw([*some, *(mirrored(k) for k in some)])
        mean = vectors.mean(axis=0)
        q = max(1, min(dim, len(vectors) - 1, vectors.shape[1]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(torch.from_numpy(vectors - mean), q=q, niter=3)
        return cls(raw.centroids, mean.astype(np.float32), np.ascontiguousarray(v.T.numpy(), dtype=np.float32))

    def vlad_raw(self, tiles: Sequence[Keypoints]) -> np.ndarray:
        """Intra-normalised, square-rooted, L2-normalised VLAD vectors (N, K * 128) of tiles."""
        k, dim = self.centroids.shape
        counts = np.array([len(t) for t in tiles], dtype=np.int64)
        if not counts.sum():
            return np.zeros((len(tiles), k * dim), np.float32)
        d = root_sift(np.concatenate([t.desc for t in tiles if len(t)]))
        words = np.argmax(d @ self.centroids.T - 0.5 * (self.centroids**2).sum(axis=1), axis=1)
        cell = np.repeat(np.arange(len(tiles)), counts) * k + words  # (tile, word) of every descriptor
        order = np.argsort(cell, kind="stable")
        cells, starts = np.unique(cell[order], return_index=True)
        v = np.zeros((len(tiles) * k, dim), np.float32)
        v[cells] = np.add.reduceat(d[order] - self.centroids[words[order]], starts, axis=0)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0).reshape(len(tiles), k * dim)
        v = np.sign(v) * np.sqrt(np.abs(v))
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)

    def vlad(self, tiles: Sequence[Keypoints]) -> np.ndarray:
        """Projected, L2-normalised VLAD vectors (N, d) of tiles; a tile without keypoints gets a zero vector."""
        from pixcell_fed.audit.search import l2_normalize

        out = np.zeros((len(tiles), len(self.components)), np.float32)
        for start in range(0, len(tiles), 1024):  # raw vectors are large (K * 128 floats): a chunk at a time
            raw = self.vlad_raw(tiles[start : start + 1024])
            part = l2_normalize((raw - self.mean) @ self.components.T)
            part[~raw.any(axis=1)] = 0.0
            out[start : start + len(raw)] = part
        return out

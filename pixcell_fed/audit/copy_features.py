"""A copy-detection descriptor that needs no downloaded weights.

A tile is reduced to a small grayscale image (``GRAY_SIZE`` pixels square, area-averaged), then to its lowest
``DCT_K`` x ``DCT_K`` 2-D DCT coefficients without the DC term, L2-normalised. Dropping DC and normalising make
the descriptor blind to brightness and contrast (colour jitter, stain intensity); keeping only low frequencies
makes it blind to JPEG artefacts, Gaussian noise and the small misalignment of a 90 % crop resized back. The
cosine of two descriptors is the correlation of the two low-passed images.

The 8 rotations and flips of a tile act on DCT coefficients exactly: a flip along an axis multiplies the
coefficients of odd frequency along that axis by -1, a transpose swaps the two frequency axes. So the 8
dihedral variants of a descriptor cost a sign change and a transpose, and the search takes the maximum over the
group (:func:`dihedral_variants`). A crop resized back is a zoom: the real tiles are also described at five 90 %
crops resized back (a 3 x 3 grid of positions, :func:`crop_variants`), and the search takes the maximum over those.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

GRAY_SIZE = 64
"""Side of the grayscale thumbnail every tile is reduced to (kept for pixel confirmation)."""
DCT_K = 12
"""Low-frequency DCT coefficients kept per axis; the descriptor has DCT_K**2 - 1 dimensions."""
DESCRIPTOR_NAME = f"gray{GRAY_SIZE}-dct{DCT_K}-dihedral"


def to_gray(image: np.ndarray) -> np.ndarray:
    """A uint8 RGB (H, W, 3), RGBA or gray (H, W) tile as a 2-D grayscale array."""
    import cv2

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2:
        raise ValueError(f"expected an image of shape (H, W, 3) or (H, W), got {np.asarray(image).shape}")
    return arr


def to_gray_thumb(image: np.ndarray, size: int = GRAY_SIZE) -> np.ndarray:
    """A uint8 RGB (H, W, 3) or gray (H, W) tile as a float32 (size, size) grayscale thumbnail in [0, 1]."""
    import cv2

    thumb = cv2.resize(to_gray(image).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return thumb / 255.0


def to_gray_uint8(image: np.ndarray, side: int) -> np.ndarray:
    """A uint8 RGB (H, W, 3) or gray (H, W) tile as a uint8 (side, side) grayscale image, area-averaged (the
    working image of region-level copy detection, :func:`pixcell_fed.audit.keypoints.work_image`)."""
    import cv2

    arr = to_gray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return cv2.resize(arr, (side, side), interpolation=cv2.INTER_AREA)


def descriptor_from_thumb(thumbs: np.ndarray) -> np.ndarray:
    """Descriptors (N, DCT_K**2 - 1) float32, L2-normalised, from grayscale thumbnails (N, S, S)."""
    import cv2

    thumbs = np.asarray(thumbs, dtype=np.float32)
    if thumbs.ndim == 2:
        thumbs = thumbs[None]
    out = np.empty((len(thumbs), DCT_K * DCT_K - 1), dtype=np.float32)
    for i, thumb in enumerate(thumbs):
        coeffs = cv2.dct(np.ascontiguousarray(thumb))[:DCT_K, :DCT_K].reshape(-1)
        out[i] = coeffs[1:]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    # A flat tile (no structure at all) has no defined direction; a zero vector matches nothing.
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 1e-8)


def _dihedral_index_and_signs() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 8 group elements, the permutation and signs that map a descriptor to its variant."""
    u, v = np.meshgrid(np.arange(DCT_K), np.arange(DCT_K), indexing="ij")
    flat = (u * DCT_K + v).reshape(-1)
    perms, signs = [], []
    for transpose in (False, True):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                # variant[u, v] = sign * original[source(u, v)]
                src_u, src_v = (v, u) if transpose else (u, v)
                sign = np.ones_like(u, dtype=np.float32)
                if flip_rows:
                    sign *= np.where(src_u % 2 == 1, -1.0, 1.0)
                if flip_cols:
                    sign *= np.where(src_v % 2 == 1, -1.0, 1.0)
                idx = (src_u * DCT_K + src_v).reshape(-1)
                perms.append(idx[1:] - 1)
                signs.append(sign.reshape(-1)[1:])
    del flat
    return np.stack(perms), np.stack(signs).astype(np.float32)


_PERMS, _SIGNS = _dihedral_index_and_signs()


def dihedral_variants(desc: np.ndarray) -> np.ndarray:
    """The 8 dihedral variants of each descriptor: (N, D) -> (8, N, D), variant 0 is the identity."""
    desc = np.asarray(desc, dtype=np.float32)
    return np.stack([desc[:, perm] * sign for perm, sign in zip(_PERMS, _SIGNS)])


CROP_FRACTION = 0.9


def crop_variants(thumbs: np.ndarray, fraction: float = CROP_FRACTION) -> np.ndarray:
    """Descriptors (10, N, D) of each thumbnail and of its crops of ``fraction`` at a 3 x 3 grid of positions,
    resized back."""
    import cv2

    thumbs = np.asarray(thumbs, dtype=np.float32)
    out = [descriptor_from_thumb(thumbs)]
    if len(thumbs) == 0:
        return np.repeat(np.asarray(out), 10, axis=0)
    s = thumbs.shape[1]
    c = int(round(s * fraction))
    steps = (0, (s - c) // 2, s - c)
    for y, x in ((y, x) for y in steps for x in steps):
        crops = np.stack([cv2.resize(t[y : y + c, x : x + c], (s, s), interpolation=cv2.INTER_LINEAR) for t in thumbs])
        out.append(descriptor_from_thumb(crops))
    return np.stack(out)


def describe_images(images: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails (N, S, S) float32, descriptors (N, D) float32) of an iterable of RGB tiles."""
    thumbs = np.stack([to_gray_thumb(img) for img in images]) if images is not None else np.zeros((0,))
    if thumbs.size == 0:
        return np.zeros((0, GRAY_SIZE, GRAY_SIZE), np.float32), np.zeros((0, DCT_K * DCT_K - 1), np.float32)
    return thumbs, descriptor_from_thumb(thumbs)


def read_tile(path: str | Path) -> np.ndarray:
    """A PNG or JPEG tile as uint8 RGB (H, W, 3). Raises AuditError for unreadable files."""
    import cv2

    from pixcell_fed.errors import AuditError

    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise AuditError(f"cannot read image {path}", hint="the audit reads PNG or JPEG tiles; remove or fix this file")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def describe_files(
    paths: Sequence[Path], *, desc: str = "describing tiles", workers: int = 2, work_side: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Thumbnails, descriptors and (with ``work_side``) the uint8 grayscale working images of region-level copy
    detection (:func:`pixcell_fed.audit.keypoints.work_image`) of tile files, each file read once, in a small
    thread pool (cv2 releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from pixcell_fed.progress import progress

    thumbs = np.empty((len(paths), GRAY_SIZE, GRAY_SIZE), dtype=np.float32)
    works = None if work_side is None else np.empty((len(paths), work_side, work_side), dtype=np.uint8)

    def one(i: int) -> None:
        tile = read_tile(paths[i])
        thumbs[i] = to_gray_thumb(tile)
        if works is not None and work_side is not None:  # both set or neither
            works[i] = to_gray_uint8(tile, work_side)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in progress(pool.map(one, range(len(paths))), total=len(paths), desc=desc, unit="tile"):
            pass
    return thumbs, descriptor_from_thumb(thumbs), works

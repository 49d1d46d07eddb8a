"""Real H&E tiles cut from the real test slide, and the copy transforms the audit must see through.

Used by the audit's tests and benchmark: regions of the slide stand in for the data roles (conditioning tiles T,
held-out tiles H, genuinely new "synthetic" tiles). :data:`COPY_TRANSFORMS` make planted whole-tile copies,
:data:`REGION_COPY_TRANSFORMS` planted copies of part of a real tile (halves, mosaics of quarters, rotations by any
angle, crops and shrinks, blur, stain changes), and :func:`overlapping_tiles` real tiles that overlap partly, for
the region detector's calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=2)
def slide_pixels() -> np.ndarray:
    """The whole real slide (CMU-1-Small-Region, 2220 x 2967 px at 20x) as uint8 RGB (H, W, 3)."""
    import openslide

    from pixcell_fed.testing.real_slide import real_slide_path

    slide = openslide.OpenSlide(str(real_slide_path()))
    try:
        arr = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    finally:
        slide.close()
    arr.setflags(write=False)
    return arr


def tissue_mask(pixels: np.ndarray, saturation: int = 20) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2HSV)[..., 1] > saturation


def region_tiles(
    y0: int, y1: int, *, size: int = 256, stride: int = 128, min_tissue: float = 0.5, x0: int = 0, x1: int | None = None
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles (N, size, size, 3) lying wholly inside rows [y0, y1) and columns [x0, x1) with enough tissue,
    and their (x, y) corners."""
    pixels = slide_pixels()
    mask = tissue_mask(pixels)
    x1 = pixels.shape[1] if x1 is None else x1
    tiles, corners = [], []
    for y in range(y0, y1 - size + 1, stride):
        for x in range(x0, x1 - size + 1, stride):
            if mask[y : y + size, x : x + size].mean() >= min_tissue:
                tiles.append(np.array(pixels[y : y + size, x : x + size]))
                corners.append((x, y))
    if not tiles:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.stack(tiles), corners


def random_region_tiles(n: int, y0: int, y1: int, *, seed: int, size: int = 256, min_tissue: float = 0.5) -> np.ndarray:
    """``n`` tiles at random positions wholly inside rows [y0, y1) with enough tissue (overlap allowed)."""
    pixels = slide_pixels()
    mask = tissue_mask(pixels)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    got = 0
    while got < n:
        ys = rng.integers(y0, y1 - size + 1, 4 * n)
        xs = rng.integers(0, pixels.shape[1] - size + 1, 4 * n)
        area = integral[ys + size, xs + size] - integral[ys, xs + size] - integral[ys + size, xs] + integral[ys, xs]
        for y, x in zip(ys[area >= min_tissue * size * size], xs[area >= min_tissue * size * size]):
            if got == n:
                break
            out[got] = pixels[y : y + size, x : x + size]
            got += 1
    return out


def _jpeg(img: np.ndarray, rng: np.random.Generator, quality: int = 70) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if not ok or decoded is None:
        raise ValueError("OpenCV could not round-trip a tile through JPEG")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _colour_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation x U(0.8, 1.2), hue shift U(-0.05, 0.05) of a turn (torchvision-like)."""
    import cv2

    x = img.astype(np.float32)
    x = x * rng.uniform(0.8, 1.2)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.8, 1.2) + mean
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * rng.uniform(0.8, 1.2) + gray
    hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(round(rng.uniform(-0.05, 0.05) * 180))) % 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _crop_resize(img: np.ndarray, rng: np.random.Generator, fraction: float = 0.9) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    ch, cw = int(round(h * fraction)), int(round(w * fraction))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return cv2.resize(img[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def _noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 10.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


COPY_TRANSFORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "identity": lambda img, rng: img.copy(),
    "rot90": lambda img, rng: np.ascontiguousarray(np.rot90(img, int(rng.integers(1, 4)))),
    "flip": lambda img, rng: np.ascontiguousarray(img[:, ::-1] if rng.random() < 0.5 else img[::-1]),
    "jpeg70": _jpeg,
    "colour_jitter": _colour_jitter,
    "crop90_resize": _crop_resize,
    "gaussian_noise": _noise,
}
"""The copies the audit must catch: name -> f(tile, rng) -> transformed tile."""


@dataclass(frozen=True)
class Plant:
    """The tiles one planted region copy is made of: ``real`` (the real tile copied), ``others`` (three more real
    tiles, for mosaics) and ``filler`` (a new tile that fills whatever is not copied)."""

    real: np.ndarray
    others: tuple[np.ndarray, ...]
    filler: np.ndarray


def tissue_share(img: np.ndarray) -> float:
    return float(tissue_mask(img).mean())


def _tissue_window(
    img: np.ndarray, h: int, w: int, rng: np.random.Generator, min_tissue: float = 0.5, step: int = 16
) -> tuple[int, int]:
    """A random (y, x) corner of an h x w window of ``img`` with at least ``min_tissue`` tissue (the most tissue
    if none has enough): a copied region of glass would disclose nothing."""
    mask = tissue_mask(img).astype(np.float64)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = np.arange(0, img.shape[0] - h + 1, step)
    xs = np.arange(0, img.shape[1] - w + 1, step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    share = (integral[yy + h, xx + w] - integral[yy, xx + w] - integral[yy + h, xx] + integral[yy, xx]) / (h * w)
    ok = np.flatnonzero(share.reshape(-1) >= min_tissue)
    pick = int(rng.choice(ok)) if len(ok) else int(np.argmax(share))
    return int(yy.reshape(-1)[pick]), int(xx.reshape(-1)[pick])


def _rotate(img: np.ndarray, rng: np.random.Generator, degrees: float) -> np.ndarray:
    """Rotation by +-``degrees`` about the centre; the corners are filled by reflection, so the tile stays full."""
    import cv2

    h, w = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees * rng.choice([-1.0, 1.0]), 1.0)
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _half(p: Plant, rng: np.random.Generator) -> np.ndarray:
    """Half of the real tile (left, right, top or bottom, with tissue) beside the other half of a new tile."""
    out = p.filler.copy()
    h, w = p.real.shape[:2]
    halves = [
        (slice(None), slice(0, w // 2)),
        (slice(None), slice(w // 2, w)),
        (slice(0, h // 2), slice(None)),
        (slice(h // 2, h), slice(None)),
    ]
    rich = [s for s in halves if tissue_share(p.real[s]) >= 0.5] or halves
    s = rich[int(rng.integers(len(rich)))]
    out[s] = p.real[s]
    return out


def _quadrant_mosaic(p: Plant, rng: np.random.Generator) -> np.ndarray:
    """Four quarters, each a quarter-tile region (with tissue) of a different real tile: ``real`` and ``others``."""
    out = np.empty_like(p.real)
    h, w = p.real.shape[0] // 2, p.real.shape[1] // 2
    for q, src in enumerate((p.real, *p.others[:3])):
        y, x = _tissue_window(src, h, w, rng)
        qy, qx = divmod(q, 2)
        out[qy * h : (qy + 1) * h, qx * w : (qx + 1) * w] = src[y : y + h, x : x + w]
    return out


def _shrink(p: Plant, rng: np.random.Generator, fraction: float = 0.8) -> np.ndarray:
    """The whole real tile shrunk to ``fraction`` of its side, pasted at a random place in a new tile."""
    import cv2

    h, w = p.real.shape[:2]
    ch, cw = int(round(h * fraction)), int(round(w * fraction))
    out = p.filler.copy()
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out[y : y + ch, x : x + cw] = cv2.resize(p.real, (cw, ch), interpolation=cv2.INTER_AREA)
    return out


def _blur(img: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), sigma)


_RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # H, E, DAB optical densities


def _stain_change(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A strong stain change: hematoxylin and eosin amounts each scaled by 0.5-0.7 or 1.4-1.7 and the stain colours
    perturbed, by colour deconvolution (Ruifrok & Johnston 2001) and back."""
    stains = _RUIFROK / np.linalg.norm(_RUIFROK, axis=1, keepdims=True)
    density = -np.log((img.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    amounts = density @ np.linalg.inv(stains)
    scale = [rng.uniform(0.5, 0.7) if rng.random() < 0.5 else rng.uniform(1.4, 1.7) for _ in range(2)] + [1.0]
    changed = stains + rng.normal(0.0, 0.08, stains.shape)
    changed /= np.linalg.norm(changed, axis=1, keepdims=True)
    out = 256.0 * np.exp(-(amounts * np.array(scale)) @ changed) - 1.0
    return np.clip(out, 0, 255).reshape(img.shape).astype(np.uint8)


REGION_COPY_TRANSFORMS: dict[str, Callable[[Plant, np.random.Generator], np.ndarray]] = {
    "half_tile": _half,
    "quadrant_mosaic": _quadrant_mosaic,
    "rotate15": lambda p, rng: _rotate(p.real, rng, 15.0),
    "rotate30": lambda p, rng: _rotate(p.real, rng, 30.0),
    "rotate45": lambda p, rng: _rotate(p.real, rng, 45.0),
    "crop70_resize": lambda p, rng: _crop_resize(p.real, rng, 0.7),
    "crop80_resize": lambda p, rng: _crop_resize(p.real, rng, 0.8),
    "shrink80": _shrink,
    "gaussian_blur": lambda p, rng: _blur(p.real),
    "stain_change": lambda p, rng: _stain_change(p.real, rng),
}
"""Copies of part of a real tile the audit must catch (issue 17): name -> f(plant, rng) -> synthetic tile."""


def plant_region_copies(
    kind: str, reals: np.ndarray, fillers: np.ndarray, rng: np.random.Generator, n: int | None = None
) -> np.ndarray:
    """``n`` (default: one per real tile) planted copies of ``kind``: copy i is made from real tile i (mosaics also
    from the next three real tiles) and new tile i (cycled) as filler."""
    make = REGION_COPY_TRANSFORMS[kind]
    count = len(reals) if n is None else n
    out = []
    for i in range(count):
        others = tuple(reals[(i + d) % len(reals)] for d in (1, 2, 3))
        out.append(make(Plant(reals[i % len(reals)], others, fillers[i % len(fillers)]), rng))
    return np.stack(out) if out else np.zeros((0, *reals.shape[1:]), np.uint8)


def overlapping_tiles(
    n: int, *, seed: int, overlap_range: tuple[float, float] = (0.03, 0.6), size: int = 256, min_tissue: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real tiles and query tiles that overlap them partly, cut from the slide, for calibrating region copies.

    Each of the ``n`` queries is a real tile shifted sideways, downwards or diagonally so that the two share a
    random ``overlap_range`` share of a tile's area. Returns (real tiles (n, size, size, 3), query tiles, and each
    query's true overlap: the largest share of its area it shares with any of the real tiles).
    """
    pixels = slide_pixels()
    mask = tissue_mask(pixels)
    rng = np.random.default_rng(seed)
    reals: list[np.ndarray] = []
    queries: list[np.ndarray] = []
    real_at: list[tuple[int, int]] = []
    query_at: list[tuple[int, int]] = []
    while len(queries) < n:
        share = rng.uniform(*overlap_range)
        if rng.random() < 2 / 3:  # a band: shifted along one axis
            shift = int(round(size * (1.0 - share)))
            dy, dx = (shift, 0) if rng.random() < 0.5 else (0, shift)
        else:  # a corner: shifted along both axes
            shift = int(round(size * (1.0 - np.sqrt(share))))
            dy, dx = shift, shift
        dy, dx = dy * int(rng.choice([-1, 1])), dx * int(rng.choice([-1, 1]))
        y = int(rng.integers(max(0, -dy), pixels.shape[0] - size - max(0, dy) + 1))
        x = int(rng.integers(max(0, -dx), pixels.shape[1] - size - max(0, dx) + 1))
        a = (slice(y, y + size), slice(x, x + size))
        b = (slice(y + dy, y + dy + size), slice(x + dx, x + dx + size))
        shared = (slice(max(y, y + dy), min(y, y + dy) + size), slice(max(x, x + dx), min(x, x + dx) + size))
        if min(mask[a].mean(), mask[b].mean(), mask[shared].mean()) < min_tissue:
            continue
        reals.append(np.array(pixels[a]))
        queries.append(np.array(pixels[b]))
        real_at.append((y, x))
        query_at.append((y + dy, x + dx))
    r, q = np.array(real_at), np.array(query_at)
    inter = np.clip(size - np.abs(q[:, None, 0] - r[None, :, 0]), 0, None) * np.clip(
        size - np.abs(q[:, None, 1] - r[None, :, 1]), 0, None
    )
    return np.stack(reals), np.stack(queries), inter.max(axis=1) / float(size * size)


def random_augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation/flip and colour jitter: a benign variation for generating many distinct test tiles."""
    out = COPY_TRANSFORMS["rot90"](img, rng) if rng.random() < 0.5 else img
    return _colour_jitter(out, rng)


def stripe_tiles(
    role: int, n_roles: int = 3, *, stripe: int = 384, size: int = 256, stride: int = 64, min_tissue: float = 0.5
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles of one role when the slide is cut into horizontal stripes dealt round-robin to ``n_roles`` roles.

    Every tile lies wholly inside one stripe, so tiles of different roles never overlap, while each role samples
    the whole slide (the same tissue mix). Tiles of one role may overlap each other (``stride`` < ``size``).
    """
    height = slide_pixels().shape[0]
    tiles, corners = [], []
    for k, y0 in enumerate(range(0, height, stripe)):
        if k % n_roles != role:
            continue
        t, c = region_tiles(y0, min(height, y0 + stripe), size=size, stride=stride, min_tissue=min_tissue)
        if len(t):
            tiles.append(t)
            corners += c
    return (np.concatenate(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)), corners


def write_tiles(folder, tiles, prefix: str, suffix: str = ".png") -> list:
    """Write uint8 RGB tiles as ``folder/<prefix><i:04d><suffix>`` and return their paths."""
    from pathlib import Path

    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, tile in enumerate(tiles):
        path = folder / f"{prefix}{i:04d}{suffix}"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths

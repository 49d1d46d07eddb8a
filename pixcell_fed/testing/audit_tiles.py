"""Real H&E tiles cut from the real test slide, and the copy transforms the audit must see through.

Used by the audit's tests and benchmark: regions of the slide stand in for the data roles (conditioning tiles T,
held-out tiles H, genuinely new "synthetic" tiles), and :data:`COPY_TRANSFORMS` make planted copies.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

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


def region_tiles(y0: int, y1: int, *, size: int = 256, stride: int = 128, min_tissue: float = 0.5,
                 x0: int = 0, x1: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles (N, size, size, 3) lying wholly inside rows [y0, y1) and columns [x0, x1) with enough tissue,
    and their (x, y) corners."""
    pixels = slide_pixels()
    mask = tissue_mask(pixels)
    x1 = pixels.shape[1] if x1 is None else x1
    tiles, corners = [], []
    for y in range(y0, y1 - size + 1, stride):
        for x in range(x0, x1 - size + 1, stride):
            if mask[y:y + size, x:x + size].mean() >= min_tissue:
                tiles.append(np.array(pixels[y:y + size, x:x + size]))
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
        area = (integral[ys + size, xs + size] - integral[ys, xs + size] - integral[ys + size, xs] + integral[ys, xs])
        for y, x in zip(ys[area >= min_tissue * size * size], xs[area >= min_tissue * size * size]):
            if got == n:
                break
            out[got] = pixels[y:y + size, x:x + size]
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
    return cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


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


def random_augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation/flip and colour jitter: a benign variation for generating many distinct test tiles."""
    out = COPY_TRANSFORMS["rot90"](img, rng) if rng.random() < 0.5 else img
    return _colour_jitter(out, rng)


def stripe_tiles(role: int, n_roles: int = 3, *, stripe: int = 384, size: int = 256, stride: int = 64,
                 min_tissue: float = 0.5) -> tuple[np.ndarray, list[tuple[int, int]]]:
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

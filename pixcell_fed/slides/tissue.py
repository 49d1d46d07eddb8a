"""Tissue detection on a low-resolution image of the slide: HSV saturation, median blur, small specks removed.

The thumbnail is built from the pyramid level just finer than needed, read in bounded chunks and area-reduced by
a whole factor, so that a single-level slide far too large to decode at once is thumbnailed in bounded memory
(``OpenSlide.get_thumbnail`` would read the whole level into one image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pixcell_fed.slides.reader import SlideReader

CHUNK = 4096  # level pixels per side of one thumbnail read: at most 64 MiB of RGBA in memory


@dataclass(frozen=True)
class Thumbnail:
    """An RGB image of the whole slide and how many level-0 pixels one of its pixels covers."""

    rgb: np.ndarray
    downsample: float


def read_thumbnail(reader: SlideReader, max_side: int, *, max_downsample: float | None = None) -> Thumbnail:
    """An RGB thumbnail whose longer side is between ``max_side / 4`` and ``max_side``, read chunk by chunk.

    ``max_downsample`` caps the level-0 pixels per thumbnail pixel (the tiler passes a quarter of a tile's
    level-0 size, so that every tile covers at least 4x4 mask pixels).
    """
    import cv2

    # The coarsest level whose longer side is still at least a quarter of what is wanted: pyramid levels are
    # usually 4x apart, and reading a finer level and reducing it costs up to 16x the pixels for no better
    # tissue decisions.
    wanted = min(max_side, max(reader.dimensions))
    cap = max_downsample if max_downsample is not None else float("inf")
    level = 0
    for i, (w, h) in enumerate(reader.level_dimensions):
        d_i = reader.level_downsamples[i]
        if max(w, h) >= wanted / 4 and d_i <= cap and d_i >= reader.level_downsamples[level]:
            level = i
    d = reader.level_downsamples[level]
    width, height = reader.level_dimensions[level]
    factor = max(1, math.ceil(max(width, height) / max_side))
    out_w, out_h = max(1, width // factor), max(1, height // factor)
    thumb = np.empty((out_h, out_w, 3), dtype=np.uint8)
    step = max(1, CHUNK // factor) * factor
    for y in range(0, out_h * factor, step):
        for x in range(0, out_w * factor, step):
            w = min(step, out_w * factor - x)
            h = min(step, out_h * factor - y)
            block = reader.read_rgb((round(x * d), round(y * d)), level, (w, h))
            if factor > 1:
                block = cv2.resize(block, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
            thumb[y // factor : (y + h) // factor, x // factor : (x + w) // factor] = block
    return Thumbnail(rgb=thumb, downsample=d * factor)


def tissue_mask(
    rgb: np.ndarray, *, saturation_threshold: int = 8, median_blur: int = 7, min_component_fraction: float = 0.0005
) -> np.ndarray:
    """A uint8 mask (1 = tissue) of an RGB thumbnail: saturation above a threshold after a median blur.

    Glass, white background and transparent (composited white) areas have near-zero saturation; stained tissue
    does not. Connected components smaller than ``min_component_fraction`` of the image (dust, specks) are dropped.
    """
    import cv2

    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    if median_blur > 1:
        saturation = cv2.medianBlur(saturation, median_blur)
    mask = (saturation > saturation_threshold).astype(np.uint8)
    min_area = min_component_fraction * mask.size
    if min_area >= 1 and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(count, dtype=np.uint8)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        mask = keep[labels]
    return mask


def tissue_fractions(mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """The share of tissue in each level-0 square (``xs[i]``, ``ys[i]``, ``size``) from a mask at ``downsample``."""
    import cv2

    integral = cv2.integral(mask, sdepth=cv2.CV_64F)
    h, w = mask.shape
    x0 = np.clip(np.rint(xs / downsample).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.rint(ys / downsample).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(x0 + 1, np.rint((xs + size) / downsample).astype(np.int64)), 1, w)
    y1 = np.clip(np.maximum(y0 + 1, np.rint((ys + size) / downsample).astype(np.int64)), 1, h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / ((x1 - x0) * (y1 - y0))

"""Pixel-space confirmation of copy candidates.

For a pair (synthetic s, real t), the score is the highest normalised cross-correlation (Pearson correlation of
pixel values) between band-passed grayscale thumbnails of s and t, over the 8 rotations and flips of s, over
shifts of up to ``MARGIN`` of the side, and over zooms of t (``ZOOMS``) that undo a crop resized back.
Correlation is blind to brightness and contrast; the band-pass (difference of Gaussians, sigma 0.8 and 6 thumbnail
pixels) removes pixel noise and JPEG artefacts below and the slow tissue-density gradient above the scale of
nuclei, so that unrelated tissue correlates weakly even at its best alignment. On the real CMU-1 slide, planted
copies (JPEG q70, colour jitter, 90 % crops, noise, rotations) score >= 0.91 and unrelated tiles <= 0.46.

This is the image-copy analogue of Carlini et al. (2023)'s pixel check on top candidates; :func:`tiled_l2` gives
their tiled L2 distance too, reported beside it.

Region copies (:func:`aligned_region`): once a similarity transform aligns a synthetic tile with a real one (found
from keypoints, :mod:`pixcell_fed.audit.region_copy`), the same band-passed images are compared by *local*
normalised correlation in a Gaussian window, and the copied region is the convex hull of the largest connected
area where they agree, grown by the 2 px the correlation window loses at a region's border. Local correlation is
blind to a stain change that varies slowly across the tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ZOOMS = (1.0, 1 / 0.95, 1 / 0.9, 1 / 0.85)
"""Zooms of the real tile tried: 1/0.9 undoes a 90 % crop resized back."""
MARGIN = 0.125
"""Share of the thumbnail's side trimmed from each edge of s before matching: the shift search range."""


def dihedral_images(img: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and flips of a 2-D array, in the order of
    :func:`pixcell_fed.audit.copy_features.dihedral_variants` (row flip, then column flip, then transpose)."""
    out = []
    for transpose in (False, True):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                x = img[::-1] if flip_rows else img
                x = x[:, ::-1] if flip_cols else x
                out.append(np.ascontiguousarray(x.T if transpose else x))
    return out


def band_pass(thumb: np.ndarray, low: float = 0.8, high: float = 6.0) -> np.ndarray:
    """Difference of Gaussians (sigma ``low`` and ``high`` pixels) of a grayscale thumbnail."""
    import cv2

    thumb = np.asarray(thumb, dtype=np.float32)
    return cv2.GaussianBlur(thumb, (0, 0), low) - cv2.GaussianBlur(thumb, (0, 0), high)


def prepare_synthetic(thumb: np.ndarray) -> list[np.ndarray]:
    """The 8 rotated/flipped, band-passed templates of a synthetic thumbnail (shift margin trimmed)."""
    size = thumb.shape[0]
    m = int(round(size * MARGIN))
    return [v[m : size - m, m : size - m] for v in dihedral_images(band_pass(thumb))]


def prepare_real(thumb: np.ndarray) -> list[np.ndarray]:
    """The band-passed real thumbnail at each zoom of ``ZOOMS``."""
    import cv2

    real = band_pass(thumb)
    size = real.shape[0]
    out = []
    for zoom in ZOOMS:
        side = int(round(size * zoom))
        out.append(real if side == size else cv2.resize(real, (side, side), interpolation=cv2.INTER_LINEAR))
    return out


def score_prepared(
    templates: Sequence[np.ndarray], zooms: Sequence[np.ndarray], variants: Sequence[int] | None = None
) -> float:
    """Max normalised correlation of prepared templates (all 8, or the indices ``variants``) over zooms and shifts."""
    import cv2

    best = -1.0
    for g in range(len(templates)) if variants is None else variants:
        template = templates[g]
        if float(template.std()) < 1e-6:
            continue
        for zoomed in zooms:
            res = cv2.matchTemplate(zoomed, template, cv2.TM_CCOEFF_NORMED)
            best = max(best, float(np.nanmax(res)))
    return best


def confirm_score(synthetic: np.ndarray, real: np.ndarray, *, variants: Sequence[int] | None = None) -> float:
    """Max normalised correlation of two band-passed grayscale thumbnails over rotations and flips (all 8, or the
    indices ``variants`` into :func:`dihedral_images`), shifts and zooms."""
    return score_prepared(prepare_synthetic(synthetic), prepare_real(real), variants)


def tiled_l2(a: np.ndarray, b: np.ndarray, grid: int = 4) -> float:
    """Carlini et al. (2023)'s tiled L2: split both images into grid x grid tiles, return the largest per-tile
    RMS difference (of mean/std-normalised images, so that colour jitter alone does not count)."""
    a = (a - a.mean()) / (a.std() + 1e-6)
    b = (b - b.mean()) / (b.std() + 1e-6)
    h, w = a.shape[:2]
    worst = 0.0
    for r in range(grid):
        for c in range(grid):
            sl = (slice(r * h // grid, (r + 1) * h // grid), slice(c * w // grid, (c + 1) * w // grid))
            worst = max(worst, float(np.sqrt(np.mean((a[sl] - b[sl]) ** 2))))
    return worst


def best_aligned_variant(synthetic: np.ndarray, real: np.ndarray) -> int:
    """Index (into :func:`dihedral_images`) of the variant of ``synthetic`` that best matches ``real`` unshifted."""
    scores = []
    r = (real - real.mean()) / (real.std() + 1e-6)
    for variant in dihedral_images(synthetic):
        v = (variant - variant.mean()) / (variant.std() + 1e-6)
        scores.append(float(np.mean(v * r)))
    return int(np.argmax(scores))


REGION_BAND = (0.5 / 80, 3.75 / 80)
"""Band-pass sigmas of :func:`aligned_region` as shares of the working image's side (0.5 and 3.75 px at 80 px)."""
REGION_WINDOW = 4.0 / 80
"""Sigma of the Gaussian window of the local correlation, as a share of the side (4 px at 80 px: 13 px of a 256 px
tile, the scale of a few nuclei)."""
REGION_BORDER = 2.0 / 80
"""The agreeing area ends a little inside a copied region's border, where the correlation window straddles copied
and new tissue; the hull is grown by this share of the side (2 px at 80 px) to make up for it. Where the region
ends at the edge of the real tile's footprint (overlapping tiles) the measure is clipped to the footprint."""
TEXTURE_FLOOR = 0.05
"""Windows whose band-passed variance is below this share of the tile's median carry no structure (glass, flat
stain) and can confirm nothing."""


@dataclass(frozen=True)
class AlignedRegion:
    """Where an aligned pair agrees: ``fraction`` of the synthetic tile's area inside ``outline`` (the convex hull,
    (k, 2) synthetic working-image pixels), and the median local correlation inside the matching area."""

    fraction: float
    outline: np.ndarray
    correlation: float


def aligned_region(
    synthetic: np.ndarray, real: np.ndarray, transform: np.ndarray, *, threshold: float
) -> AlignedRegion:
    """The region of ``synthetic`` that matches ``real`` once aligned by ``transform`` (2 x 3, synthetic pixels ->
    real pixels; both square grayscale working images): the convex hull of the largest connected area whose local
    normalised correlation of band-passed images reaches ``threshold``, clipped to where the real tile lies."""
    import cv2

    side = synthetic.shape[0]
    low, high = REGION_BAND[0] * side, REGION_BAND[1] * side
    a = band_pass(synthetic, low, high)
    b_real = band_pass(real, low, high)
    inverse = cv2.invertAffineTransform(np.asarray(transform, dtype=np.float64))
    size = (synthetic.shape[1], synthetic.shape[0])
    b = cv2.warpAffine(b_real, inverse, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = cv2.warpAffine(np.ones(real.shape[:2], np.float32), inverse, size, flags=cv2.INTER_NEAREST) > 0.5

    sigma = REGION_WINDOW * side

    def local_mean(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (0, 0), sigma)

    ma, mb = local_mean(a), local_mean(b)
    va, vb = local_mean(a * a) - ma * ma, local_mean(b * b) - mb * mb
    cov = local_mean(a * b) - ma * mb
    textured = (
        (va > TEXTURE_FLOOR * float(np.median(local_mean(a * a))))
        & (vb > TEXTURE_FLOOR * float(np.median(local_mean(b_real * b_real))))
        & inside
    )
    ncc = np.where(textured, cov / np.sqrt(np.maximum(va * vb, 1e-12)), 0.0)
    agree = cv2.morphologyEx((ncc >= threshold).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(agree, connectivity=8)
    if count <= 1:
        return AlignedRegion(0.0, np.zeros((0, 2), np.float32), 0.0)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = labels == largest
    hull = cv2.convexHull(cv2.findNonZero(component.astype(np.uint8)))
    filled = np.zeros(agree.shape, np.uint8)
    cv2.fillConvexPoly(filled, hull, 1)
    grow = max(1, int(round(REGION_BORDER * side)))
    grown = cv2.dilate(filled, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    fraction = float((grown.astype(bool) & inside).mean())
    return AlignedRegion(fraction, hull.reshape(-1, 2).astype(np.float32), float(np.median(ncc[component])))

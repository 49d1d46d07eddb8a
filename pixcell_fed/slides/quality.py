"""Per-tile quality control, computed on the tile just cut (no second read): pen ink, blur, folds and
over-staining, glare and washed-out areas.

Each check measures one number on the tile and compares it with a threshold of :class:`TileQCConfig`
(``tiling.qc`` in site.yaml); :data:`QC_PROVENANCE` says where each default comes from. A tile that fails is
dropped (no PNG, never conditions PixCell) and recorded with its reason in ``tiles.parquet`` (column ``qc``); when
several checks fail, :func:`_reason` picks one. Colours are measured at half the tile's resolution (1 um/px for 20x
tiles), sharpness at full resolution; thresholds were calibrated on the real test slide CMU-1-Small-Region
(docs/tiling.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pixcell_fed.config.schema import TileQCConfig

PASS = "pass"
#: Drop reasons.
REASONS = ("pen", "fold", "glare", "blur")

#: Ink colours as OpenCV HSV boxes (H in [0, 180), S and V in [0, 255]), one or more per colour. Facts behind them:
#: histolab's published pen filters (RGB ranges from deep-histopath) put blue ink at R < G < B with B >= 130-230
#: (hue 200-240 deg), green ink at G, B > R (hue 70-200 deg), red ink at R high with G, B low (hue 345-15 deg);
#: black ink is dark (V <= 50) without haematoxylin's strong saturation. The boxes leave H&E's own hues
#: (haematoxylin 250-340 deg, eosin 320-345 deg) out.
INK_BOXES: dict[str, tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]] = {
    "blue": (((105, 150, 60), (124, 255, 255)),),
    "green": (((40, 100, 20), (100, 255, 255)),),
    "red": (((172, 180, 60), (179, 255, 255)), ((0, 180, 60), (8, 255, 255))),
    "black": (((0, 0, 0), (179, 170, 50)),),
}
#: Glass-like pixel (bright, unsaturated): what glare, a bubble or a washed-out area leaves inside tissue.
BLANK_BOX = ((0, 0, 210), (179, 20, 255))
#: Folds and over-staining are judged on 4x4 um blocks (1/8 of a 20x tile's side): nuclei average out, a fold does not.
FOLD_BLOCK = 8
#: A block is "dark and highly saturated" at saturation >= 200/255 with grey < 130, or at summed RGB optical density
#: >= 7 with saturation >= 150 (darker than 99.9 % of the real test slide's 4 um tissue blocks), and only in H&E's
#: own hues (OpenCV hue 125-171: purple to pink), so that ink strokes count as ink, not as folds.
FOLD_SATURATION, FOLD_MAX_GREY, FOLD_OPTICAL_DENSITY, FOLD_DENSE_SATURATION = 200, 130, 7.0, 150
FOLD_HUES = (125, 172)

QC_PROVENANCE = {
    "pen_fraction": "share of the tile in one ink colour (blue, green, red or black; boxes from histolab's published "
    "pen ranges); on the real test slide CMU-1-Small-Region (own stain and two restains) 1 tissue "
    "tile in 200 reaches 5 % (teal margin dye: ink too), the same tiles under an anti-aliased stroke "
    "24-48 um wide at least 8 %",
    "blur_laplacian_var": "variance of the Laplacian of the grey tile at 20x; tissue tiles of the real test slide "
    ">= 430 (>= 490 in its own stain), the same tiles blurred by a Gaussian of sigma 1.5 px "
    "(0.75 um) <= 128",
    "fold_fraction": "share of the tile's 4 um blocks that are dark and highly saturated in H&E's hues; tissue tiles "
    "of the real test slide (own stain and two restains) <= 1.6 %, the same tiles with a fold over "
    "half the tile (three layers of tissue) >= 4.9 % for 95 % of them",
    "glare_fraction": "share of the tile's tissue (by the tissue mask) that is bright (V >= 210) and unsaturated "
    "(S <= 20); tissue tiles of the real test slide <= 0.28 (loose stroma), the same tiles "
    "washed out to a fifth of their contrast >= 0.70",
}

_OD_LUT = (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)


@dataclass(frozen=True)
class TileQC:
    """What the checks measured on one tile, and the verdict (``pass`` or the reason it was dropped)."""

    qc: str = PASS
    qc_ink: float = math.nan
    qc_fold: float = math.nan
    qc_glare: float = math.nan
    qc_sharpness: float = math.nan

    @property
    def kept(self) -> bool:
        return self.qc == PASS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Columns :class:`TileQC` adds to ``tiles.parquet``.
QC_COLUMNS = tuple(TileQC.__dataclass_fields__)


def _share(hsv: np.ndarray, boxes) -> float:
    import cv2

    hits = cv2.inRange(hsv, *boxes[0])
    for box in boxes[1:]:
        hits = cv2.bitwise_or(hits, cv2.inRange(hsv, *box))
    return cv2.countNonZero(hits) / hits.size


def ink_fraction(hsv: np.ndarray) -> float:
    """The largest share of the tile covered by one ink colour."""
    return max(_share(hsv, boxes) for boxes in INK_BOXES.values())


def fold_fraction(rgb: np.ndarray, block: int = FOLD_BLOCK) -> float:
    """Share of the tile's 4 um blocks (``block`` pixels of ``rgb`` a side) that are dark and highly saturated (a
    fold or over-staining)."""
    import cv2

    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, w // block), max(1, h // block)), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    hue, saturation = hsv[..., 0], hsv[..., 1]
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    density = cv2.LUT(small, _OD_LUT).sum(axis=2)
    stained = (hue >= FOLD_HUES[0]) & (hue < FOLD_HUES[1])  # H&E's own colours, not an ink's
    dark = ((saturation >= FOLD_SATURATION) & (grey < FOLD_MAX_GREY)) | (
        (density >= FOLD_OPTICAL_DENSITY) & (saturation >= FOLD_DENSE_SATURATION)
    )
    return float((dark & stained).mean())


def glare_fraction(hsv: np.ndarray, tissue_fraction: float) -> float:
    """Share of the tile's tissue that is bright and unsaturated: glass-like pixels beyond the share of the tile
    that the tissue mask calls background (``1 - tissue_fraction``), over the tissue share."""
    blank = _share(hsv, (BLANK_BOX,))
    tissue = min(1.0, max(tissue_fraction, 1e-6))
    return max(0.0, blank - (1.0 - tissue)) / tissue


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey tile (low = out of focus)."""
    import cv2

    lap = cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_16S)
    _, std = cv2.meanStdDev(lap)
    return float(std[0, 0]) ** 2


def assess_tile(rgb: np.ndarray, tissue_fraction: float, cfg: TileQCConfig) -> TileQC:
    """Run every check on one uint8 RGB tile; ``tissue_fraction`` is the tissue mask's share of it.

    Colours are judged at half resolution (1 um/px: ink strokes, folds and glare are far wider, and it costs a
    quarter), sharpness at full resolution.
    """
    import cv2

    if not cfg.enabled:
        return TileQC()
    h, w = rgb.shape[:2]
    half = cv2.resize(rgb, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(half, cv2.COLOR_RGB2HSV)
    measured = {
        "pen": ink_fraction(hsv),
        "fold": fold_fraction(half, FOLD_BLOCK // 2),
        "glare": glare_fraction(hsv, tissue_fraction),
        "blur": sharpness(rgb),
    }
    return TileQC(
        qc=_reason(measured, cfg),
        qc_ink=round(measured["pen"], 5),
        qc_fold=round(measured["fold"], 5),
        qc_glare=round(measured["glare"], 5),
        qc_sharpness=round(measured["blur"], 2),
    )


def _reason(measured: dict[str, float], cfg: TileQCConfig) -> str:
    """Ink and folds both darken and saturate tissue: between them the check failed by the wider margin (measure
    over threshold) names the reason. Then glare, then blur (a washed-out tile is also a blurred one)."""
    margins = {"pen": measured["pen"] / cfg.pen_fraction, "fold": measured["fold"] / cfg.fold_fraction}
    darkened = [r for r, m in margins.items() if m >= 1.0]
    if darkened:
        return max(darkened, key=lambda r: margins[r])
    if measured["glare"] >= cfg.glare_fraction:
        return "glare"
    if measured["blur"] < cfg.blur_laplacian_var:
        return "blur"
    return PASS

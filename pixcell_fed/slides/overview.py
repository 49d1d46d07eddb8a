"""Per-slide overview image for the site's admin: thumbnail, tissue mask tinted green, kept tiles outlined.

Site-internal (it shows the whole slide); never shipped. Label and macro images are never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pixcell_fed.slides.records import TileRecord
    from pixcell_fed.slides.tissue import Thumbnail

TISSUE_TINT = np.array([40, 200, 60], dtype=np.float32)   # RGB green over tissue
TILE_COLOUR = (30, 60, 220)                                # RGB blue tile outlines


def render_overview(thumb: "Thumbnail", mask: np.ndarray, records: Sequence["TileRecord"]) -> np.ndarray:
    """The overview as uint8 RGB at thumbnail size."""
    import cv2

    img = thumb.rgb.astype(np.float32)
    tissue = mask.astype(bool)
    img[tissue] = 0.7 * img[tissue] + 0.3 * TISSUE_TINT
    out = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    d = thumb.downsample
    for rec in records:
        x0, y0 = int(rec.x / d), int(rec.y / d)
        x1, y1 = int((rec.x + rec.read_size) / d) - 1, int((rec.y + rec.read_size) / d) - 1
        cv2.rectangle(out, (x0, y0), (max(x0, x1), max(y0, y1)), TILE_COLOUR, 1)
    return out


def write_overview(path: str | Path, thumb: "Thumbnail", mask: np.ndarray, records: Sequence["TileRecord"]) -> Path:
    """Render the overview and write it as PNG atomically."""
    import cv2

    from pixcell_fed.atomic import write_bytes_atomic

    ok, buf = cv2.imencode(".png", render_overview(thumb, mask, records)[..., ::-1])
    if not ok:
        raise OSError(f"could not encode the overview {path}")
    return write_bytes_atomic(path, buf.tobytes())

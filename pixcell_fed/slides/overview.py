"""Per-slide overview image for the site's admin: thumbnail, tissue mask tinted green, the tiles kept outlined in
blue and the tiles quality control dropped filled in one colour per reason, with a legend that counts them.

Site-internal (it shows the whole slide); never shipped. Label and macro images are never used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pixcell_fed.slides.records import TileRecord
    from pixcell_fed.slides.tissue import Thumbnail

TISSUE_TINT = np.array([40, 200, 60], dtype=np.float32)  # RGB green over tissue
TILE_COLOUR = (30, 60, 220)  # RGB blue outlines of the kept tiles
#: RGB fill of the tiles quality control dropped, by reason
REASON_COLOURS = {"pen": (230, 0, 230), "fold": (120, 40, 0), "glare": (0, 200, 230), "blur": (255, 150, 0)}
_LEGEND_HEIGHT = 22


def _legend(width: int, counts: Counter) -> np.ndarray:
    import cv2

    strip = np.full((_LEGEND_HEIGHT, max(width, 1), 3), 255, dtype=np.uint8)
    x = 4
    for label, colour in [("kept", TILE_COLOUR)] + list(REASON_COLOURS.items()):
        cv2.rectangle(strip, (x, 5), (x + 11, 16), colour, -1 if label != "kept" else 2)
        text = f"{label} {counts.get('pass' if label == 'kept' else label, 0)}"
        cv2.putText(strip, text, (x + 15, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x += 22 + 8 * len(text)
    return strip


def render_overview(
    thumb: Thumbnail, mask: np.ndarray, records: Sequence[TileRecord], verdicts: Sequence[str] | None = None
) -> np.ndarray:
    """The overview as uint8 RGB: thumbnail size, plus a legend strip below when ``verdicts`` (one quality-control
    verdict per record, ``pass`` or a reason) are given."""
    import cv2

    img = thumb.rgb.astype(np.float32)
    tissue = mask.astype(bool)
    img[tissue] = 0.7 * img[tissue] + 0.3 * TISSUE_TINT
    out = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
    d = thumb.downsample
    judged = verdicts is not None
    verdicts = list(verdicts) if verdicts is not None else ["pass"] * len(records)
    for rec, verdict in zip(records, verdicts):
        x0, y0 = int(rec.x / d), int(rec.y / d)
        x1, y1 = max(x0, int((rec.x + rec.read_size) / d) - 1), max(y0, int((rec.y + rec.read_size) / d) - 1)
        if verdict == "pass":
            cv2.rectangle(out, (x0, y0), (x1, y1), TILE_COLOUR, 1)
        else:
            cv2.rectangle(out, (x0, y0), (x1, y1), REASON_COLOURS.get(verdict, (0, 0, 0)), -1)
    if judged:
        out = np.concatenate([out, _legend(out.shape[1], Counter(verdicts))])
    return out


def write_overview(
    path: str | Path,
    thumb: Thumbnail,
    mask: np.ndarray,
    records: Sequence[TileRecord],
    verdicts: Sequence[str] | None = None,
) -> Path:
    """Render the overview and write it as PNG atomically."""
    import cv2

    from pixcell_fed.atomic import write_bytes_atomic

    ok, buf = cv2.imencode(".png", render_overview(thumb, mask, records, verdicts)[..., ::-1])
    if not ok:
        raise OSError(f"could not encode the overview {path}")
    return write_bytes_atomic(path, buf.tobytes())

"""What each site shared, at a glance: a small montage of randomly chosen pooled synthetic tiles per site.

Built from the pool only: the rows of ``pool.parquet`` and the verified bundle files under ``<pool>/bundles/``.
A row whose path leaves that folder, is a link, or whose bytes are not the sha256 the site signed (and the pool
recorded) is skipped, so the montage can only ever show tiles a site's officer approved for sharing: never a real
tile, never a file of the coordinator's machine that a tampered pool table points at. Each site's audit verdict and
test lines come from its pooled bundle's signed ``audit.json`` (the shareable summary), never from anything else.

Abuse considered: a tampered or stale pool table (paths outside the pool, swapped files) -> skipped rows; a huge
or hostile PNG -> only canonical tiles of a known size decode (:func:`~pixcell_fed.bundle.png.check_canonical_tile`);
text in the summary -> the report escapes it and shows only allow-listed fields.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.bundle import layout as L
from pixcell_fed.errors import BundleError
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)

#: tiles per site in the montage, their side in the montage (px), and tiles per montage row
MONTAGE_TILES = 8
THUMB_PX = 96
PER_ROW = 4


def _pooled_tile(pool_dir: Path, row: Any) -> np.ndarray | None:
    """The pixels of one pooled tile, or None when the row does not point at a verified pooled tile."""
    from pixcell_fed.bundle.png import MAX_TILE_SIZE, check_canonical_tile, read_png_header
    from pixcell_fed.federation.staging import BUNDLES

    root = (pool_dir / BUNDLES).resolve()
    path = pool_dir / str(row.path)
    try:
        if path.is_symlink() or not path.resolve().is_relative_to(root) or not path.is_file():
            raise BundleError(f"{row.path} is not a pooled bundle tile")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != str(row.sha256):
            raise BundleError(f"{row.path} differs from the tile the site signed")
        side = read_png_header(data, name=str(row.file_name)).width
        if side > MAX_TILE_SIZE:
            raise BundleError(f"{row.path}: {side} px")
        return check_canonical_tile(data, tile_size=side, name=str(row.file_name))
    except (OSError, BundleError) as exc:
        log.warning("montage: skipping a pool row (%s)", getattr(exc, "message", exc))
        return None


def _thumb(pixels: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR), dtype=np.uint8)


def montage_png(tiles: list[np.ndarray]) -> bytes:
    """One PNG of the tiles' thumbnails, ``PER_ROW`` per row on a white background with 2 px gaps."""
    from pixcell_fed.bundle.png import clean_png_bytes

    rows = -(-len(tiles) // PER_ROW)
    cols = min(len(tiles), PER_ROW)
    gap = 2
    canvas = np.full((rows * (THUMB_PX + gap) - gap, cols * (THUMB_PX + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = divmod(i, PER_ROW)
        canvas[
            y * (THUMB_PX + gap) : y * (THUMB_PX + gap) + THUMB_PX,
            x * (THUMB_PX + gap) : x * (THUMB_PX + gap) + THUMB_PX,
        ] = _thumb(tile)
    return clean_png_bytes(canvas)


def shareable_audit_facts(pool_dir: Path, site: str) -> dict[str, Any] | None:
    """The verdict and each test's status and sentence from ``site``'s pooled bundle's signed audit.json."""
    from pixcell_fed.federation.staging import pooled_bundle

    bundle = pooled_bundle(pool_dir, site)
    if bundle is None:
        return None
    try:
        audit = json.loads((bundle / L.AUDIT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(audit, dict):
        return None
    tests = [
        {
            "title": str(t.get("title", t.get("name", ""))),
            "status": str(t.get("status", "")),
            "sentence": str(t.get("sentence", "")),
        }
        for t in audit.get("tests", [])
        if isinstance(t, dict)
    ]
    return {"verdict": str(audit.get("verdict")), "tests": tests}


def site_montages(pool_dir: str | Path, *, per_site: int = MONTAGE_TILES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per pooled site: a montage of up to ``per_site`` randomly chosen pooled tiles (PNG, base64), the labels of
    the tiles shown, the site's label counts in the pool, and its shareable audit facts."""
    import pandas as pd

    from pixcell_fed.federation.pooling import POOL_TABLE

    pool_dir = Path(pool_dir)
    table = pool_dir / POOL_TABLE
    if not table.is_file():
        return {}
    frame = pd.read_parquet(table)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for site, rows in sorted(frame.groupby("site"), key=lambda kv: str(kv[0])):
        labels = Counter("unlabelled" if v is None or v != v else str(v) for v in rows["label"])
        order = rng.permutation(len(rows))
        shown: list[np.ndarray] = []
        shown_labels: list[str] = []
        for i in order:
            if len(shown) == per_site:
                break
            row = rows.iloc[int(i)]
            pixels = _pooled_tile(pool_dir, row)
            if pixels is not None:
                shown.append(pixels)
                shown_labels.append("unlabelled" if row.label is None or row.label != row.label else str(row.label))
        entry: dict[str, Any] = {
            "label_counts": dict(sorted(labels.items())),
            "n_tiles": int(len(rows)),
            "shown": len(shown),
            "shown_labels": shown_labels,
            "audit": shareable_audit_facts(pool_dir, str(site)),
        }
        if shown:
            entry["png_base64"] = base64.b64encode(montage_png(shown)).decode("ascii")
        out[str(site)] = entry
    return out

"""What the tiler knows about a slide and its tiles, as plain picklable records: one tissue tile (:class:`TileRecord`),
one slide's plan (:class:`SlidePlan`) and one slide that could not be tiled (:class:`SlideFailure`).

Tile identities are deterministic, ``f"{slide_key}-r{row:05d}-c{col:05d}"`` with ``slide_key`` a short hash of the
slide's file name and row/col counted in 256 px cells of the target-resolution grid, so later stages can resume by
tile id.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcell_fed.slides.grid import TileGrid
from pixcell_fed.slides.mpp import MppResolution
from pixcell_fed.slides.quality import QC_COLUMNS

if TYPE_CHECKING:
    from pixcell_fed.slides.tissue import Thumbnail

#: Columns of ``tiles.parquet``, in order: one row per tissue tile; ``qc`` is ``pass`` for the tiles written and
#: used, or why quality control dropped it (then ``tile_file`` is empty: no PNG is written).
COLUMNS = (
    "tile_id",
    "slide_file",
    "slide_key",
    "row",
    "col",
    "x",
    "y",
    "read_size",
    "mpp",
    "tissue_fraction",
    "tile_file",
    "tile_size",
    "level",
) + QC_COLUMNS


def slide_key(file_name: str) -> str:
    """A short deterministic key of a slide's file name (12 hex digits of its sha256)."""
    return hashlib.sha256(file_name.encode("utf-8")).hexdigest()[:12]


def tile_id(key: str, row: int, col: int) -> str:
    return f"{key}-r{row:05d}-c{col:05d}"


@dataclass(frozen=True)
class TileRecord:
    """One tissue tile (quality control judges it when it is read). ``x``/``y``/``read_size`` are level-0 pixels;
    ``row``/``col`` count 256 px cells; ``mpp`` is the slide's level-0 resolution; ``tile_file`` is where the folder
    job writes it (relative to its output folder) if it passes quality control."""

    tile_id: str
    slide_file: str
    slide_key: str
    row: int
    col: int
    x: int
    y: int
    read_size: int
    mpp: float
    tissue_fraction: float
    tile_file: str
    tile_size: int
    level: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SlidePlan:
    """Everything needed to read one slide's tiles; picklable (no handle). ``thumbnail`` and ``mask`` (the tissue
    mask) are kept when an overview is wanted, to draw it once quality control has judged the tiles."""

    path: str
    slide_file: str
    slide_key: str
    resolution: MppResolution
    grid: TileGrid
    records: tuple[TileRecord, ...]
    n_grid_tiles: int
    thumbnail: Thumbnail | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class SlideFailure:
    """Why one slide was not tiled (``why``) and what to do (``hint``)."""

    slide_file: str
    why: str
    hint: str
    error: str

    @property
    def line(self) -> str:
        return f"{self.slide_file}: {self.why}" + (f" -> {self.hint}" if self.hint else "")

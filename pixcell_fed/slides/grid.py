"""The tile grid at a target resolution, and which pyramid level each tile is read from.

One grid cell is ``base = round(256 * target_mpp / mpp)`` level-0 pixels, anchored at the slide's origin
(the exact mpp, not a bucketed magnification: a 0.2527 um/px scan reads 507 px, not 512). A 256 px tile is one
cell; a 1024 px tile is an aligned 4x4 block of the same cells (rows and columns multiples of 4), so that
PixCell-1024 tiles contain exactly sixteen PixCell-256 tiles. Tiles are read from the coarsest level that is
still at least as fine as the output, then reduced with an area filter (``cv2.INTER_AREA``). Slides coarser
than the target by more than :data:`MAX_UPSAMPLE` are refused by the tiler rather than upsampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CELL = 256
MAX_UPSAMPLE = 1.05  # a 0.52 um/px scan still gives 0.5 um/px tiles; a 10x scan does not


@dataclass(frozen=True)
class TileGrid:
    """Geometry of one slide's tiles; rows and columns count 256 px cells in every tile size."""

    mpp: float
    target_mpp: float
    tile_size: int
    base: int  # level-0 pixels per 256 px cell
    read_size: int  # level-0 pixels per output tile (base * tile_size / 256)
    level: int  # pyramid level read
    level_downsample: float
    level_read: int  # pixels read at ``level`` per tile (area-resized to tile_size when different)
    rows: int  # whole cells that fit in the slide
    cols: int

    @property
    def step(self) -> int:
        """Cells per tile side: 1 for 256 px tiles, 4 for 1024 px tiles."""
        return self.tile_size // CELL

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Row and column (in cells) of every whole tile, row-major."""
        rows = np.arange(0, self.rows - self.step + 1, self.step)
        cols = np.arange(0, self.cols - self.step + 1, self.step)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        return rr.ravel(), cc.ravel()


def choose_level(level_downsamples: Sequence[float], scale: float) -> int:
    """The coarsest level whose downsample does not exceed ``scale`` (level-0 px per output px)."""
    level = 0
    for i, d in enumerate(level_downsamples):
        if d <= scale * (1 + 1e-6):
            level = i if d >= level_downsamples[level] else level
    return level


def make_grid(
    dimensions: tuple[int, int],
    level_downsamples: Sequence[float],
    *,
    mpp: float,
    target_mpp: float = 0.5,
    tile_size: int = 256,
) -> TileGrid:
    """The grid of ``tile_size`` tiles at ``target_mpp`` on a slide whose level 0 is ``mpp`` um/px."""
    if tile_size % CELL:
        raise ValueError(f"tile_size must be a multiple of {CELL} (got {tile_size})")
    base = max(1, round(CELL * target_mpp / mpp))
    read_size = base * (tile_size // CELL)
    level = choose_level(level_downsamples, read_size / tile_size)
    d = float(level_downsamples[level])
    level_read = max(1, round(read_size / d))
    width, height = dimensions
    return TileGrid(
        mpp=mpp,
        target_mpp=target_mpp,
        tile_size=tile_size,
        base=base,
        read_size=read_size,
        level=level,
        level_downsample=d,
        level_read=level_read,
        rows=height // base,
        cols=width // base,
    )

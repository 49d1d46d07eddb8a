"""Plan one slide (resolution, tissue mask, grid, tissue tiles), read one tile from it and judge it (quality control).

Used in the calling process (``workers=1``) and inside the reader processes alike; nothing here holds state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pixcell_fed.config.schema import TileQCConfig, TilingConfig
from pixcell_fed.errors import NoTissueError, SlideError
from pixcell_fed.slides.grid import MAX_UPSAMPLE, TileGrid, make_grid
from pixcell_fed.slides.mpp import resolve_mpp
from pixcell_fed.slides.quality import TileQC, assess_tile
from pixcell_fed.slides.reader import SlideReader
from pixcell_fed.slides.records import SlidePlan, TileRecord, slide_key, tile_id


def plan_slide(reader: SlideReader, cfg: TilingConfig, *, overview_path: str | Path | None = None) -> SlidePlan:
    """Resolve the mpp, detect tissue and lay out the grid of one open slide; keep tiles by tissue fraction.

    Writes the overview PNG to ``overview_path`` when given (also when no tissue is found: the admin can look) and
    keeps the thumbnail and mask in the plan, so that the folder job can draw it again with quality control's
    verdicts. Raises :class:`SlideError` subclasses for slides that cannot be tiled.
    """
    from pixcell_fed.slides.tissue import read_thumbnail, tissue_fractions, tissue_mask

    name = reader.name
    resolution = resolve_mpp(reader.properties, slide_file=name, overrides=cfg.mpp_overrides)
    if resolution.mpp > cfg.target_mpp * MAX_UPSAMPLE:
        raise SlideError(
            f"{name}: scanned at {resolution.mpp:.4f} um/px ({resolution.source}), coarser than the "
            f"{cfg.target_mpp} um/px tiles need",
            hint="use slides scanned at 20x or 40x, or a larger "
            "tiling.target_mpp; if the metadata is wrong, set tiling.mpp_overrides for this file",
        )
    grid = make_grid(
        reader.dimensions,
        reader.level_downsamples,
        mpp=resolution.mpp,
        target_mpp=cfg.target_mpp,
        tile_size=cfg.tile_size,
    )
    if grid.rows < grid.step or grid.cols < grid.step:
        raise SlideError(
            f"{name}: {reader.dimensions[0]}x{reader.dimensions[1]} px is smaller than one "
            f"{cfg.tile_size} px tile at {cfg.target_mpp} um/px",
            hint="remove it from the slides folder",
        )
    thumb = read_thumbnail(reader, cfg.thumbnail_max_side, max_downsample=grid.read_size / 4)
    mask = tissue_mask(
        thumb.rgb,
        saturation_threshold=cfg.saturation_threshold,
        median_blur=cfg.median_blur,
        min_component_fraction=cfg.min_component_fraction,
    )
    rows, cols = grid.positions()
    xs, ys = cols * grid.base, rows * grid.base
    fractions = tissue_fractions(mask, thumb.downsample, xs, ys, grid.read_size)
    keep = np.flatnonzero((fractions >= cfg.tissue_fraction) & (fractions > 0))
    key = slide_key(name)
    records = tuple(
        TileRecord(
            tile_id=tile_id(key, int(rows[i]), int(cols[i])),
            slide_file=name,
            slide_key=key,
            row=int(rows[i]),
            col=int(cols[i]),
            x=int(xs[i]),
            y=int(ys[i]),
            read_size=grid.read_size,
            mpp=resolution.mpp,
            tissue_fraction=round(float(fractions[i]), 4),
            tile_file=f"tiles/{key}/{tile_id(key, int(rows[i]), int(cols[i]))}.png",
            tile_size=grid.tile_size,
            level=grid.level,
        )
        for i in keep
    )
    if overview_path is not None:
        from pixcell_fed.slides.overview import write_overview

        write_overview(overview_path, thumb, mask, records)
    if not mask.any():
        raise NoTissueError(
            f"{name}: no tissue found (the slide looks empty at low resolution)",
            hint="check the overview image; for very pale stains lower tiling.saturation_threshold",
        )
    if not records:
        raise NoTissueError(
            f"{name}: tissue found, but no {cfg.tile_size} px tile has at least {cfg.tissue_fraction:.0%} tissue",
            hint="check the overview image; lower tiling.tissue_fraction to keep tiles at the tissue's edges",
        )
    keep_images = overview_path is not None
    return SlidePlan(
        path=str(reader.path),
        slide_file=name,
        slide_key=key,
        resolution=resolution,
        grid=grid,
        records=records,
        n_grid_tiles=len(xs),
        thumbnail=thumb if keep_images else None,
        mask=mask if keep_images else None,
    )


def plan_slide_file(slide_path: str | Path, tiling_cfg: TilingConfig) -> SlidePlan:
    """Open ``slide_path``, plan it (see :func:`plan_slide`) and close it."""
    with SlideReader(slide_path) as reader:
        return plan_slide(reader, tiling_cfg)


def read_tile(reader: SlideReader, grid: TileGrid, x: int, y: int) -> np.ndarray:
    """The tile at level-0 (``x``, ``y``) as uint8 RGB ``tile_size`` squared: read at ``grid.level``, area-resized."""
    import cv2

    img = reader.read_rgb((x, y), grid.level, (grid.level_read, grid.level_read))
    if grid.level_read != grid.tile_size:
        interp = cv2.INTER_AREA if grid.level_read > grid.tile_size else cv2.INTER_LINEAR
        img = cv2.resize(img, (grid.tile_size, grid.tile_size), interpolation=interp)
    return img


def read_and_judge(
    reader: SlideReader, grid: TileGrid, record: TileRecord, qc: TileQCConfig
) -> tuple[np.ndarray, TileQC]:
    """Read the tile of ``record`` and run quality control on it (the pixels just read: no second read)."""
    img = read_tile(reader, grid, record.x, record.y)
    return img, assess_tile(img, record.tissue_fraction, qc)

"""Slides to 20x tiles as an in-process stream: :func:`iter_slide_tiles` yields ``(TileRecord, uint8 RGB)``.

Each slide is planned once (:mod:`~pixcell_fed.slides.planning`), then its tiles are read in this process
(``workers=1``) or by the shared pool of reader processes (:mod:`~pixcell_fed.slides.workers`), at most a few
chunks ahead of the consumer. The resumable folder job that writes PNGs and ``tiles.parquet`` is
:mod:`~pixcell_fed.slides.folder_job`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from pixcell_fed.config.schema import TilingConfig
from pixcell_fed.errors import SlideError
from pixcell_fed.slides import workers as pool
from pixcell_fed.slides.planning import plan_slide, read_and_judge
from pixcell_fed.slides.reader import SlideReader
from pixcell_fed.slides.records import TileRecord


def iter_slide_tiles(
    slide_path: str | Path, tiling_cfg: TilingConfig, *, workers: int | None = None, qc_dropped: Counter | None = None
) -> Iterator[tuple[TileRecord, np.ndarray]]:
    """Stream the tiles of one slide that pass quality control as ``(TileRecord, uint8 HxWx3 RGB)``, in row-major
    grid order; ``qc_dropped`` (when given) counts the others by reason.

    No PNG round trip: the embedding stage consumes this directly. ``workers`` (default ``tiling_cfg.workers``)
    = 1 reads in this process with one handle; more reads in that many worker processes, each with its own
    handle, at most a few chunks ahead of the consumer. Raises :class:`SlideError` (possibly after some tiles
    were yielded, if the slide is damaged mid-way).
    """
    workers = tiling_cfg.workers if workers is None else workers
    dropped = qc_dropped if qc_dropped is not None else Counter()
    reader = SlideReader(slide_path)
    try:
        plan = plan_slide(reader, tiling_cfg)
        if workers <= 1:
            for rec in plan.records:
                img, verdict = read_and_judge(reader, plan.grid, rec, tiling_cfg.qc)
                if verdict.kept:
                    yield rec, img
                else:
                    dropped[verdict.qc] += 1
            return
    finally:
        reader.close()
    size = pool.chunk_size(tiling_cfg.tile_size)
    tasks = ((plan.path, plan.grid, recs, None, tiling_cfg.qc) for recs in pool.chunks(plan.records, size))
    record_chunks = pool.chunks(plan.records, size)
    executor = pool.shared_executor(workers)
    try:
        for result in pool.ordered_results(executor, pool.task_read, tasks, ahead=3 * workers):
            if result[0] != "ok":
                pool.raise_task_error(result)
            for rec, (img, verdict) in zip(next(record_chunks), result[1]):
                if verdict.kept:
                    yield rec, img
                else:
                    dropped[verdict.qc] += 1
    except BrokenProcessPool as exc:
        pool.discard_executor(workers, executor)
        raise SlideError(
            f"{plan.slide_file}: a reader process crashed on this file (OpenSlide aborted); the file is "
            "probably corrupt",
            hint="copy it again from the scanner or the archive",
        ) from exc

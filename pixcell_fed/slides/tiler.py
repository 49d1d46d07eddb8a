"""Slides to 20x tiles: an in-process tile stream (:func:`iter_slide_tiles`) and a resumable folder job
(:func:`tile_folder`) that writes PNG tiles, ``tiles.parquet``, overviews and a run log.

Each slide is planned once (resolution, tissue mask, grid, kept tiles), then its tiles are read by worker
processes that each hold ONE OpenSlide handle, opened inside the worker (handles do not pickle). Tile identities
are deterministic, ``f"{slide_key}-r{row:05d}-c{col:05d}"`` with ``slide_key`` a short hash of the slide's file
name and row/col counted in 256 px cells of the target-resolution grid, so later stages can resume by tile id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from pixcell_fed.config.schema import TilingConfig
from pixcell_fed.errors import NoTissueError, PixcellFedError, SlideError, UsageError
from pixcell_fed.runlog import get_logger
from pixcell_fed.slides.grid import MAX_UPSAMPLE, TileGrid, make_grid
from pixcell_fed.slides.mpp import MppResolution, resolve_mpp
from pixcell_fed.slides.reader import SlideReader, list_slide_files

log = get_logger("slides.tiler")

TILER_VERSION = 1  # bump when tile pixels or identities change, so that resumed outputs are redone
COLUMNS = ("tile_id", "slide_file", "slide_key", "row", "col", "x", "y", "read_size", "mpp", "tissue_fraction",
           "tile_file", "tile_size", "level")


def slide_key(file_name: str) -> str:
    """A short deterministic key of a slide's file name (12 hex digits of its sha256)."""
    return hashlib.sha256(file_name.encode("utf-8")).hexdigest()[:12]


def tile_id(key: str, row: int, col: int) -> str:
    return f"{key}-r{row:05d}-c{col:05d}"


@dataclass(frozen=True)
class TileRecord:
    """One kept tile. ``x``/``y``/``read_size`` are level-0 pixels; ``row``/``col`` count 256 px cells;
    ``mpp`` is the slide's level-0 resolution; ``tile_file`` is where :func:`tile_folder` writes it (relative
    to its output folder)."""

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
    """Everything needed to read one slide's tiles; picklable (no handle, no images)."""

    path: str
    slide_file: str
    slide_key: str
    resolution: MppResolution
    grid: TileGrid
    records: tuple[TileRecord, ...]
    n_grid_tiles: int


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


@dataclass
class TilingSummary:
    """Outcome of :func:`tile_folder`. ``failed`` holds ``(slide file, reason)`` with reason = why -> what to do."""

    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    n_tiles: int = 0
    tiles_per_slide: dict[str, int] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    failures: list[SlideFailure] = field(default_factory=list)
    out_dir: Path | None = None
    table_path: Path | None = None
    log_path: Path | None = None


# ---------------------------------------------------------------------------------------------------- planning


def plan_slide(reader: SlideReader, cfg: TilingConfig, *, overview_path: str | Path | None = None) -> SlidePlan:
    """Resolve the mpp, detect tissue and lay out the grid of one open slide; keep tiles by tissue fraction.

    Writes the overview PNG to ``overview_path`` when given (also when no tissue is found: the admin can look).
    Raises :class:`SlideError` subclasses for slides that cannot be tiled.
    """
    from pixcell_fed.slides.tissue import read_thumbnail, tissue_fractions, tissue_mask

    name = reader.name
    resolution = resolve_mpp(reader.properties, slide_file=name, overrides=cfg.mpp_overrides)
    if resolution.mpp > cfg.target_mpp * MAX_UPSAMPLE:
        raise SlideError(
            f"{name}: scanned at {resolution.mpp:.4f} um/px ({resolution.source}), coarser than the "
            f"{cfg.target_mpp} um/px tiles need", hint="use slides scanned at 20x or 40x, or a larger "
            "tiling.target_mpp; if the metadata is wrong, set tiling.mpp_overrides for this file")
    grid = make_grid(reader.dimensions, reader.level_downsamples, mpp=resolution.mpp, target_mpp=cfg.target_mpp,
                     tile_size=cfg.tile_size)
    if grid.rows < grid.step or grid.cols < grid.step:
        raise SlideError(f"{name}: {reader.dimensions[0]}x{reader.dimensions[1]} px is smaller than one "
                         f"{cfg.tile_size} px tile at {cfg.target_mpp} um/px", hint="remove it from the slides folder")
    thumb = read_thumbnail(reader, cfg.thumbnail_max_side, max_downsample=grid.read_size / 4)
    mask = tissue_mask(thumb.rgb, saturation_threshold=cfg.saturation_threshold, median_blur=cfg.median_blur,
                       min_component_fraction=cfg.min_component_fraction)
    rows, cols = grid.positions()
    xs, ys = cols * grid.base, rows * grid.base
    fractions = tissue_fractions(mask, thumb.downsample, xs, ys, grid.read_size)
    keep = np.flatnonzero((fractions >= cfg.tissue_fraction) & (fractions > 0))
    key = slide_key(name)
    records = tuple(
        TileRecord(tile_id=tile_id(key, int(rows[i]), int(cols[i])), slide_file=name, slide_key=key,
                   row=int(rows[i]), col=int(cols[i]), x=int(xs[i]), y=int(ys[i]), read_size=grid.read_size,
                   mpp=resolution.mpp, tissue_fraction=round(float(fractions[i]), 4),
                   tile_file=f"tiles/{key}/{tile_id(key, int(rows[i]), int(cols[i]))}.png",
                   tile_size=grid.tile_size, level=grid.level)
        for i in keep
    )
    if overview_path is not None:
        from pixcell_fed.slides.overview import write_overview

        write_overview(overview_path, thumb, mask, records)
    if not mask.any():
        raise NoTissueError(f"{name}: no tissue found (the slide looks empty at low resolution)",
                            hint="check the overview image; for very pale stains lower tiling.saturation_threshold")
    if not records:
        raise NoTissueError(f"{name}: tissue found, but no {cfg.tile_size} px tile has at least "
                            f"{cfg.tissue_fraction:.0%} tissue", hint="check the overview image; lower "
                            "tiling.tissue_fraction to keep tiles at the tissue's edges")
    return SlidePlan(path=str(reader.path), slide_file=name, slide_key=key, resolution=resolution, grid=grid,
                     records=records, n_grid_tiles=len(xs))


def read_tile(reader: SlideReader, grid: TileGrid, x: int, y: int) -> np.ndarray:
    """The tile at level-0 (``x``, ``y``) as uint8 RGB ``tile_size`` squared: read at ``grid.level``, area-resized."""
    import cv2

    img = reader.read_rgb((x, y), grid.level, (grid.level_read, grid.level_read))
    if grid.level_read != grid.tile_size:
        interp = cv2.INTER_AREA if grid.level_read > grid.tile_size else cv2.INTER_LINEAR
        img = cv2.resize(img, (grid.tile_size, grid.tile_size), interpolation=interp)
    return img


# ----------------------------------------------------------------------------------- worker processes


_WORKER: dict[str, Any] = {}


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per worker; the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent


def _worker_reader(path: str) -> SlideReader:
    """This worker's one handle, reopened only when the slide (path, size, modification time) changes."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SlideError(f"{Path(path).name}: cannot read the file ({exc.strerror})",
                         hint="restore the file, or remove it from the slides folder") from exc
    stamp = (path, st.st_size, st.st_mtime_ns)
    if _WORKER.get("stamp") == stamp and _WORKER.get("reader") is not None:
        return _WORKER["reader"]
    _drop_worker_reader()
    reader = SlideReader(path)
    _WORKER.update(stamp=stamp, reader=reader)
    return reader


def _drop_worker_reader() -> None:
    reader = _WORKER.pop("reader", None)
    _WORKER.pop("stamp", None)
    if reader is not None:
        reader.close()


def _check_exists(path: str) -> None:
    from pixcell_fed.slides.reader import check_readable

    check_readable(Path(path))


def _error_tuple(exc: PixcellFedError) -> tuple:
    return ("error", exc.message, exc.hint or "", type(exc).__name__)


def _task_plan(path: str, cfg: TilingConfig, overview_path: str | None) -> tuple:
    try:
        _check_exists(path)
        return ("ok", plan_slide(_worker_reader(path), cfg, overview_path=overview_path))
    except PixcellFedError as exc:
        _drop_worker_reader()
        return _error_tuple(exc)


def _task_read(path: str, grid: TileGrid, positions: Sequence[tuple[int, int]], dest: Sequence[str] | None) -> tuple:
    """Read tiles; return them, or write them as PNG to ``dest`` (one path each) and return None for each."""
    try:
        _check_exists(path)
        reader = _worker_reader(path)
        out: list[np.ndarray | None] = []
        for i, (x, y) in enumerate(positions):
            img = read_tile(reader, grid, x, y)
            if dest is None:
                out.append(img)
            else:
                _write_png(dest[i], img)
                out.append(None)
        return ("ok", out)
    except PixcellFedError as exc:
        _drop_worker_reader()
        return _error_tuple(exc)


def _write_png(path: str, rgb: np.ndarray) -> None:
    import cv2

    # zlib level 1 with run-length matching: about twice as fast as the default strategy on H&E, and smaller
    ok, buf = cv2.imencode(".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                                    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    with open(path, "wb") as fh:
        fh.write(buf.tobytes())


def _executor(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    # Not "fork": OpenSlide and GLib keep threads and locks in a process that has read a slide, and a child
    # forked from it can deadlock. The fork server is a fresh process that has only imported this module;
    # workers fork from it quickly and open their own slide handles.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)


_SHARED: dict[int, ProcessPoolExecutor] = {}


def shared_executor(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` reader processes kept for the life of this process, so that streaming many slides
    (one :func:`iter_slide_tiles` call each) starts the workers once. Each worker keeps one slide handle."""
    pool = _SHARED.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        if pool is None and not _SHARED:
            import atexit

            atexit.register(shutdown_shared_executors)
        pool = _SHARED[workers] = _executor(workers)
    return pool


def shutdown_shared_executors() -> None:
    """Stop the pools started by :func:`shared_executor` (done at exit; call it to free the processes sooner)."""
    while _SHARED:
        _SHARED.popitem()[1].shutdown(wait=True, cancel_futures=True)


def _ordered(executor: ProcessPoolExecutor, fn: Callable, tasks: Iterable[tuple], ahead: int) -> Iterator[Any]:
    """Results of ``fn(*task)`` in task order, with at most ``ahead`` tasks in flight (bounded memory)."""
    pending: deque[Future] = deque()
    try:
        for task in tasks:
            pending.append(executor.submit(fn, *task))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # on an error or an early stop: cancel what has not started, wait for what has (it may be writing)
        for fut in pending:
            fut.cancel()
        wait(pending)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _chunk_size(tile_size: int) -> int:
    return 16 if tile_size <= 256 else 2


def _raise_error(result: tuple) -> None:
    from pixcell_fed import errors

    _, message, hint, kind = result
    cls = getattr(errors, kind, SlideError)
    if not (isinstance(cls, type) and issubclass(cls, SlideError)):
        cls = SlideError
    raise cls(message, hint=hint or None)


# ------------------------------------------------------------------------------------------ the tile stream


def plan_slide_file(slide_path: str | Path, tiling_cfg: TilingConfig) -> SlidePlan:
    """Open ``slide_path``, plan it (see :func:`plan_slide`) and close it."""
    with SlideReader(slide_path) as reader:
        return plan_slide(reader, tiling_cfg)


def iter_slide_tiles(slide_path: str | Path, tiling_cfg: TilingConfig, *,
                     workers: int | None = None) -> Iterator[tuple[TileRecord, np.ndarray]]:
    """Stream the kept tiles of one slide as ``(TileRecord, uint8 HxWx3 RGB)`` in row-major grid order.

    No PNG round trip: the embedding stage consumes this directly. ``workers`` (default ``tiling_cfg.workers``)
    = 1 reads in this process with one handle; more reads in that many worker processes, each with its own
    handle, at most a few chunks ahead of the consumer. Raises :class:`SlideError` (possibly after some tiles
    were yielded, if the slide is damaged mid-way).
    """
    workers = tiling_cfg.workers if workers is None else workers
    reader = SlideReader(slide_path)
    try:
        plan = plan_slide(reader, tiling_cfg)
        if workers <= 1:
            for rec in plan.records:
                yield rec, read_tile(reader, plan.grid, rec.x, rec.y)
            return
    finally:
        reader.close()
    chunk = _chunk_size(tiling_cfg.tile_size)
    tasks = ((plan.path, plan.grid, [(r.x, r.y) for r in recs], None) for recs in _chunks(plan.records, chunk))
    record_chunks = _chunks(plan.records, chunk)
    executor = shared_executor(workers)
    try:
        for result in _ordered(executor, _task_read, tasks, ahead=3 * workers):
            if result[0] != "ok":
                _raise_error(result)
            yield from zip(next(record_chunks), result[1])
    except BrokenProcessPool as exc:
        _SHARED.pop(workers, None)
        raise SlideError(f"{plan.slide_file}: a reader process crashed on this file (OpenSlide aborted); the file is "
                         "probably corrupt", hint="copy it again from the scanner or the archive") from exc


# ------------------------------------------------------------------------------------------- the folder job


def _fingerprint(path: Path, cfg: TilingConfig) -> str:
    st = path.stat()
    data = {"version": TILER_VERSION, "file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "target_mpp": cfg.target_mpp, "tile_size": cfg.tile_size, "tissue_fraction": cfg.tissue_fraction,
            "thumbnail_max_side": cfg.thumbnail_max_side, "saturation_threshold": cfg.saturation_threshold,
            "median_blur": cfg.median_blur, "min_component_fraction": cfg.min_component_fraction,
            "mpp_override": cfg.mpp_overrides.get(path.name)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _FolderJob:
    """State of one :func:`tile_folder` run (kept in one place so that a crashed pool can be replaced)."""

    def __init__(self, out_dir: Path, cfg: TilingConfig, workers: int) -> None:
        self.out = out_dir
        self.cfg = dataclasses.replace(cfg, mpp_overrides=dict(cfg.mpp_overrides))  # picklable for the workers
        self.workers = workers
        self.state_dir = out_dir / ".tiling"
        self.executor = shared_executor(workers)

    def discard_pool(self) -> None:
        if _SHARED.get(self.workers) is self.executor:
            del _SHARED[self.workers]
        self.executor.shutdown(wait=False, cancel_futures=True)

    def restart_pool(self) -> None:
        self.discard_pool()
        self.executor = shared_executor(self.workers)

    def paths(self, key: str) -> dict[str, Path]:
        return {"marker": self.state_dir / f"{key}.json", "part": self.state_dir / f"{key}.parquet",
                "tiles": self.out / "tiles" / key, "partial": self.out / "tiles" / f".{key}.partial",
                "overview": self.out / "overviews" / f"{key}.png"}

    def resumable(self, path: Path, fingerprint: str) -> int | None:
        p = self.paths(slide_key(path.name))
        try:
            marker = json.loads(p["marker"].read_text())
        except (OSError, ValueError):
            return None
        if marker.get("fingerprint") == fingerprint and p["part"].is_file() and p["tiles"].is_dir():
            return int(marker.get("n_tiles", 0))
        return None

    def forget(self, key: str) -> None:
        p = self.paths(key)
        for name in ("marker", "part"):
            p[name].unlink(missing_ok=True)
        for name in ("tiles", "partial"):
            shutil.rmtree(p[name], ignore_errors=True)

    def tile_one(self, path: Path, fingerprint: str) -> int:
        """Plan and tile one slide into a partial folder, then move it into place; return its tile count."""
        import pandas as pd

        from pixcell_fed.atomic import write_json_atomic, write_parquet_atomic
        from pixcell_fed.progress import progress

        key = slide_key(path.name)
        p = self.paths(key)
        self.forget(key)
        overview = str(p["overview"]) if self.cfg.write_overviews else None
        if overview:
            p["overview"].parent.mkdir(parents=True, exist_ok=True)
        result = self.executor.submit(_task_plan, str(path), self.cfg, overview).result()
        if result[0] != "ok":
            _raise_error(result)
        plan: SlidePlan = result[1]
        g = plan.grid
        log.info("%s: mpp %.4f (%s); %d of %d grid tiles kept; reading level %d (downsample %.3g) %d px -> %d px",
                 path.name, plan.resolution.mpp, plan.resolution.source, len(plan.records), plan.n_grid_tiles,
                 g.level, g.level_downsample, g.level_read, g.tile_size)
        p["partial"].mkdir(parents=True)
        chunk = _chunk_size(self.cfg.tile_size)
        tasks = ((plan.path, g, [(r.x, r.y) for r in recs], [str(p["partial"] / Path(r.tile_file).name) for r in recs])
                 for recs in _chunks(plan.records, chunk))
        bar = progress(None, total=len(plan.records), desc=path.name[:30], unit="tile")
        try:
            for result in _ordered(self.executor, _task_read, tasks, ahead=3 * self.workers):
                if result[0] != "ok":
                    _raise_error(result)
                bar.update(len(result[1]))
        finally:
            bar.close()
        os.replace(p["partial"], p["tiles"])
        frame = pd.DataFrame([r.as_dict() for r in plan.records], columns=list(COLUMNS))
        write_parquet_atomic(p["part"], frame)
        write_json_atomic(p["marker"], {"fingerprint": fingerprint, "n_tiles": len(plan.records),
                                        "slide_file": path.name, "mpp": plan.resolution.mpp,
                                        "mpp_source": plan.resolution.source})
        return len(plan.records)


def tile_folder(slides_dir: str | Path, out_dir: str | Path, tiling_cfg: TilingConfig, *,
                workers: int | None = None) -> TilingSummary:
    """Tile every slide file directly in ``slides_dir`` into ``out_dir``; bad slides are recorded, not fatal.

    Writes ``out_dir/tiles/<slide_key>/<tile_id>.png``, ``out_dir/tiles.parquet`` (one row per tile, columns
    :data:`COLUMNS`), ``out_dir/overviews/<slide_key>.png``, ``out_dir/tiles.log`` and ``out_dir/tiling.json``
    (resolved config and outcome). Resumable: a slide whose outputs are complete for the same file and settings
    is not read again. Raises :class:`UsageError` for a missing or empty folder.
    """
    import pandas as pd

    from pixcell_fed import __version__
    from pixcell_fed.atomic import folder_lock, write_json_atomic, write_parquet_atomic
    from pixcell_fed.config.loader import to_plain
    from pixcell_fed.progress import progress
    from pixcell_fed.runlog import run_log

    slides_dir, out = Path(slides_dir), Path(out_dir)
    if not slides_dir.is_dir():
        raise UsageError(f"slides folder not found: {slides_dir}",
                         hint="pass --slides with the folder that holds the whole-slide images")
    files = list_slide_files(slides_dir)
    if not files:
        raise UsageError(f"the slides folder {slides_dir} has no files",
                         hint="copy the whole-slide images into it (any format OpenSlide reads), or pass another --slides")
    workers = max(1, tiling_cfg.workers if workers is None else workers)
    summary = TilingSummary(out_dir=out, table_path=out / "tiles.parquet", log_path=out / "tiles.log")
    with folder_lock(out, what="tiling"), run_log(out / "tiles.log"):
        log.info("tiling %d files from %s into %s (%d workers, %d px tiles at %s um/px)", len(files), slides_dir,
                 out, workers, tiling_cfg.tile_size, tiling_cfg.target_mpp)
        job = _FolderJob(out, tiling_cfg, workers)
        try:
            for path in progress(files, desc="slides", unit="slide"):
                failure: PixcellFedError | None = None
                try:
                    fingerprint = _fingerprint(path, tiling_cfg)
                except OSError:
                    fingerprint = ""
                done = job.resumable(path, fingerprint) if fingerprint else None
                if done is not None:
                    summary.resumed.append(path.name)
                    n = done
                    log.info("ok %s: %d tiles (already complete, skipped)", path.name, n)
                else:
                    try:
                        n = job.tile_one(path, fingerprint)
                        log.info("ok %s: %d tiles", path.name, n)
                    except SlideError as exc:
                        failure = exc
                    except BrokenProcessPool:
                        job.restart_pool()
                        failure = SlideError(f"{path.name}: the reader process crashed on this file (OpenSlide "
                                             "aborted); the file is probably corrupt",
                                             hint="copy it again from the scanner or the archive")
                if failure is not None:
                    job.forget(slide_key(path.name))
                    why = failure.message.removeprefix(f"{path.name}: ")
                    record = SlideFailure(path.name, why, failure.hint or "", type(failure).__name__)
                    summary.failures.append(record)
                    summary.failed.append((path.name, f"{why} -> {failure.hint}" if failure.hint else why))
                    log.error("FAILED %s", record.line)
                    continue
                summary.ok.append(path.name)
                summary.tiles_per_slide[path.name] = n
                summary.n_tiles += n
        except BaseException:  # Ctrl-C or a bug: do not leave reads running behind the caller's back
            job.discard_pool()
            raise
        parts = [pd.read_parquet(job.paths(slide_key(name))["part"]) for name in summary.ok]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(COLUMNS))
        write_parquet_atomic(out / "tiles.parquet", table[list(COLUMNS)])
        write_json_atomic(out / "tiling.json", {
            "pixcell_fed_version": __version__, "tiler_version": TILER_VERSION, "tiling": to_plain(tiling_cfg),
            "workers": workers, "slides_dir": str(slides_dir), "ok": summary.tiles_per_slide,
            "resumed": summary.resumed, "failed": [asdict(f) for f in summary.failures], "n_tiles": summary.n_tiles,
        })
        log.info("done: %d slides ok, %d failed, %d tiles", len(summary.ok), len(summary.failed), summary.n_tiles)
    return summary

"""The pool of reader processes and its module-level state.

Each worker holds ONE OpenSlide handle, opened inside the worker (handles do not pickle) and reopened only when
the slide changes. Workers are started by a fork server, never forked from a process that has read a slide.
Pools are kept for the life of the process (:func:`shared_executor`), so streaming many slides starts them once.
Tasks return ``("ok", value)`` or ``("error", message, hint, error class name)``: a known slide error crosses the
process boundary as data and is raised again in the caller (:func:`raise_task_error`).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.config.schema import TileQCConfig, TilingConfig
from pixcell_fed.errors import PixcellFedError, SlideError
from pixcell_fed.slides import planning
from pixcell_fed.slides.grid import TileGrid
from pixcell_fed.slides.reader import SlideReader
from pixcell_fed.slides.records import TileRecord

#: This worker process's one slide handle and the (path, size, mtime) it was opened for.
_WORKER: dict[str, Any] = {}
#: Pools kept for the life of this process, by number of workers.
_SHARED: dict[int, ProcessPoolExecutor] = {}


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per worker; the pool is the parallelism
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent


def _worker_reader(path: str) -> SlideReader:
    """This worker's one handle, reopened only when the slide (path, size, modification time) changes."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SlideError(
            f"{Path(path).name}: cannot read the file ({exc.strerror})",
            hint="restore the file, or remove it from the slides folder",
        ) from exc
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


def _open(path: str) -> SlideReader:
    from pixcell_fed.slides.reader import check_readable

    check_readable(Path(path))
    return _worker_reader(path)


def _error_tuple(exc: PixcellFedError) -> tuple:
    return ("error", exc.message, exc.hint or "", type(exc).__name__)


def task_plan(path: str, cfg: TilingConfig, overview_path: str | None) -> tuple:
    """Plan one slide in a worker (see :func:`~pixcell_fed.slides.planning.plan_slide`)."""
    try:
        return ("ok", planning.plan_slide(_open(path), cfg, overview_path=overview_path))
    except PixcellFedError as exc:
        _drop_worker_reader()
        return _error_tuple(exc)


def task_read(
    path: str, grid: TileGrid, records: Sequence[TileRecord], dest: Sequence[str] | None, qc: TileQCConfig
) -> tuple:
    """Read and judge tiles: ``(image or None, TileQC)`` each. The image comes back only for a tile that passed and
    no ``dest`` was given; with ``dest`` (one path each) the tiles that pass are written there as PNG."""
    try:
        reader = _open(path)
        out: list[tuple[np.ndarray | None, Any]] = []
        for i, record in enumerate(records):
            img, verdict = planning.read_and_judge(reader, grid, record, qc)
            if dest is not None and verdict.kept:
                write_png(dest[i], img)
            out.append((img if dest is None and verdict.kept else None, verdict))
        return ("ok", out)
    except PixcellFedError as exc:
        _drop_worker_reader()
        return _error_tuple(exc)


def write_png(path: str, rgb: np.ndarray) -> None:
    """A tile as a site-internal PNG (fast zlib settings; never shipped)."""
    import cv2

    # zlib level 1 with run-length matching: about twice as fast as the default strategy on H&E, and smaller
    ok, buf = cv2.imencode(
        ".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    )
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


def shared_executor(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` reader processes kept for the life of this process, so that streaming many slides
    (one ``iter_slide_tiles`` call each) starts the workers once. Each worker keeps one slide handle."""
    pool = _SHARED.get(workers)
    if pool is None or getattr(pool, "_broken", False):
        if pool is None and not _SHARED:
            import atexit

            atexit.register(shutdown_shared_executors)
        pool = _SHARED[workers] = _executor(workers)
    return pool


def discard_executor(workers: int, pool: ProcessPoolExecutor | None = None) -> None:
    """Forget the shared pool of ``workers`` (only if it is ``pool``, when given) and stop it without waiting:
    after a crashed worker or an interrupt, the next :func:`shared_executor` call starts a fresh one."""
    current = _SHARED.get(workers)
    if current is not None and (pool is None or current is pool):
        del _SHARED[workers]
    target = pool if pool is not None else current
    if target is not None:
        target.shutdown(wait=False, cancel_futures=True)


def shutdown_shared_executors() -> None:
    """Stop the pools started by :func:`shared_executor` (done at exit; call it to free the processes sooner)."""
    while _SHARED:
        _SHARED.popitem()[1].shutdown(wait=True, cancel_futures=True)


def pool_pids(workers: int) -> list[int]:
    """Process ids of the shared pool of ``workers`` (empty before it has started any)."""
    pool = _SHARED.get(workers)
    return list(getattr(pool, "_processes", None) or {})


def ordered_results(executor: ProcessPoolExecutor, fn: Callable, tasks: Iterable[tuple], ahead: int) -> Iterator[Any]:
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


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def chunk_size(tile_size: int) -> int:
    """Tiles per task: enough to amortise the task's overhead, few enough to keep memory bounded."""
    return 16 if tile_size <= 256 else 2


def raise_task_error(result: tuple) -> None:
    """Raise the :class:`SlideError` (subclass) a task returned as data."""
    from pixcell_fed import errors

    _, message, hint, kind = result
    cls = getattr(errors, kind, SlideError)
    if not (isinstance(cls, type) and issubclass(cls, SlideError)):
        cls = SlideError
    raise cls(message, hint=hint or None)

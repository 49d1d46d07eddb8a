"""``site-agent tiles``: tile every slide of a folder into PNGs, ``tiles.parquet``, overviews and a run log.

Every tissue tile is judged by quality control as it is read (:mod:`~pixcell_fed.slides.quality`): the tiles that
pass are written; those dropped are listed in ``tiles.parquet`` with their reason and counted in the summary.

Resumable: a slide whose outputs are complete for the same file and settings is not read again. A slide is
written to a hidden partial folder and moved into place only when all its tiles are written. Bad slides are
recorded with why and what to do, never fatal; a reader process that crashes costs its slide, not the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pixcell_fed.config.schema import TilingConfig
from pixcell_fed.errors import NoTissueError, PixcellFedError, SlideError, UsageError
from pixcell_fed.runlog import get_logger
from pixcell_fed.slides import workers as pool
from pixcell_fed.slides.quality import QC_PROVENANCE
from pixcell_fed.slides.reader import list_slide_files
from pixcell_fed.slides.records import COLUMNS, SlideFailure, SlidePlan, slide_key

log = get_logger("slides.tiler")

TILER_VERSION = 2  # bump when tile pixels, identities or verdicts change, so that resumed outputs are redone


@dataclass
class TilingSummary:
    """Outcome of :func:`tile_folder`. ``failed`` holds ``(slide file, reason)`` with reason = why -> what to do;
    ``n_tiles`` and ``tiles_per_slide`` count the tiles written, ``qc_dropped`` those quality control dropped, by
    reason (``qc_dropped_per_slide``: the same per slide)."""

    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    n_tiles: int = 0
    tiles_per_slide: dict[str, int] = field(default_factory=dict)
    qc_dropped: dict[str, int] = field(default_factory=dict)
    qc_dropped_per_slide: dict[str, dict[str, int]] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    failures: list[SlideFailure] = field(default_factory=list)
    out_dir: Path | None = None
    table_path: Path | None = None
    log_path: Path | None = None


def _fingerprint(path: Path, cfg: TilingConfig) -> str:
    st = path.stat()
    data = {
        "version": TILER_VERSION,
        "file": path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "target_mpp": cfg.target_mpp,
        "tile_size": cfg.tile_size,
        "tissue_fraction": cfg.tissue_fraction,
        "thumbnail_max_side": cfg.thumbnail_max_side,
        "saturation_threshold": cfg.saturation_threshold,
        "median_blur": cfg.median_blur,
        "min_component_fraction": cfg.min_component_fraction,
        "mpp_override": cfg.mpp_overrides.get(path.name),
        "qc": asdict(cfg.qc),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _FolderJob:
    """State of one :func:`tile_folder` run (kept in one place so that a crashed pool can be replaced)."""

    def __init__(self, out_dir: Path, cfg: TilingConfig, workers: int) -> None:
        self.out = out_dir
        self.cfg = dataclasses.replace(cfg, mpp_overrides=dict(cfg.mpp_overrides))  # picklable for the workers
        self.workers = workers
        self.state_dir = out_dir / ".tiling"
        self.executor = pool.shared_executor(workers)

    def discard_pool(self) -> None:
        pool.discard_executor(self.workers, self.executor)

    def restart_pool(self) -> None:
        self.discard_pool()
        self.executor = pool.shared_executor(self.workers)

    def paths(self, key: str) -> dict[str, Path]:
        return {
            "marker": self.state_dir / f"{key}.json",
            "part": self.state_dir / f"{key}.parquet",
            "tiles": self.out / "tiles" / key,
            "partial": self.out / "tiles" / f".{key}.partial",
            "overview": self.out / "overviews" / f"{key}.png",
        }

    def resumable(self, path: Path, fingerprint: str) -> tuple[int, dict[str, int]] | None:
        """(tiles written, dropped by reason) of a slide already complete for this file and these settings."""
        p = self.paths(slide_key(path.name))
        try:
            marker = json.loads(p["marker"].read_text())
        except (OSError, ValueError):
            return None
        if marker.get("fingerprint") == fingerprint and p["part"].is_file() and p["tiles"].is_dir():
            return int(marker.get("n_tiles", 0)), dict(marker.get("qc_dropped", {}))
        return None

    def forget(self, key: str) -> None:
        p = self.paths(key)
        for name in ("marker", "part"):
            p[name].unlink(missing_ok=True)
        for name in ("tiles", "partial"):
            shutil.rmtree(p[name], ignore_errors=True)

    def plan(self, path: Path) -> SlidePlan:
        p = self.paths(slide_key(path.name))
        overview = str(p["overview"]) if self.cfg.write_overviews else None
        if overview:
            p["overview"].parent.mkdir(parents=True, exist_ok=True)
        result = self.executor.submit(pool.task_plan, str(path), self.cfg, overview).result()
        if result[0] != "ok":
            pool.raise_task_error(result)
        plan: SlidePlan = result[1]
        g = plan.grid
        log.info(
            "%s: mpp %.4f (%s); %d of %d grid tiles kept; reading level %d (downsample %.3g) %d px -> %d px",
            path.name,
            plan.resolution.mpp,
            plan.resolution.source,
            len(plan.records),
            plan.n_grid_tiles,
            g.level,
            g.level_downsample,
            g.level_read,
            g.tile_size,
        )
        return plan

    def read_all(self, path: Path, plan: SlidePlan, partial: Path) -> list:
        """Read and judge every tissue tile of ``plan`` in the pool; the tiles that pass are written to ``partial``."""
        from pixcell_fed.progress import progress

        size = pool.chunk_size(self.cfg.tile_size)
        tasks = (
            (plan.path, plan.grid, recs, [str(partial / Path(r.tile_file).name) for r in recs], self.cfg.qc)
            for recs in pool.chunks(plan.records, size)
        )
        verdicts: list = []
        bar = progress(None, total=len(plan.records), desc=path.name[:30], unit="tile")
        try:
            for result in pool.ordered_results(self.executor, pool.task_read, tasks, ahead=3 * self.workers):
                if result[0] != "ok":
                    pool.raise_task_error(result)
                verdicts.extend(verdict for _, verdict in result[1])
                bar.update(len(result[1]))
        finally:
            bar.close()
        return verdicts

    def tile_one(self, path: Path, fingerprint: str) -> tuple[int, dict[str, int]]:
        """Plan, read and judge one slide into a partial folder, then move it into place; return the number of tiles
        written and those quality control dropped, by reason."""
        import pandas as pd

        from pixcell_fed.atomic import write_json_atomic, write_parquet_atomic
        from pixcell_fed.slides.overview import write_overview

        p = self.paths(slide_key(path.name))
        self.forget(slide_key(path.name))
        plan = self.plan(path)
        p["partial"].mkdir(parents=True)
        verdicts = self.read_all(path, plan, p["partial"])
        dropped = dict(sorted(Counter(v.qc for v in verdicts if not v.kept).items()))
        kept = len(verdicts) - sum(dropped.values())
        if plan.thumbnail is not None and plan.mask is not None:
            write_overview(p["overview"], plan.thumbnail, plan.mask, plan.records, [v.qc for v in verdicts])
        if dropped:
            log.info("%s: quality control dropped %s", path.name, ", ".join(f"{n} {r}" for r, n in dropped.items()))
        if not kept:
            raise NoTissueError(
                f"{path.name}: quality control dropped all {len(verdicts)} tissue tiles ("
                + ", ".join(f"{n} {r}" for r, n in dropped.items())
                + ")",
                hint="check the overview image (each reason in its own colour); if the tiles are "
                "good, relax the thresholds under tiling.qc (docs/tiling.md)",
            )
        os.replace(p["partial"], p["tiles"])
        rows = [
            {**rec.as_dict(), **v.as_dict(), "tile_file": rec.tile_file if v.kept else ""}
            for rec, v in zip(plan.records, verdicts)
        ]
        write_parquet_atomic(p["part"], pd.DataFrame(rows, columns=list(COLUMNS)))
        write_json_atomic(
            p["marker"],
            {
                "fingerprint": fingerprint,
                "n_tiles": kept,
                "qc_dropped": dropped,
                "slide_file": path.name,
                "mpp": plan.resolution.mpp,
                "mpp_source": plan.resolution.source,
            },
        )
        return kept, dropped

    def run_one(self, path: Path, summary: TilingSummary) -> None:
        """Tile (or resume) one slide and record its outcome in ``summary``; slide errors are recorded, not raised."""
        try:
            fingerprint = _fingerprint(path, self.cfg)
        except OSError:
            fingerprint = ""
        done = self.resumable(path, fingerprint) if fingerprint else None
        failure: PixcellFedError | None = None
        if done is not None:
            summary.resumed.append(path.name)
            log.info("ok %s: %d tiles (already complete, skipped)", path.name, done[0])
        else:
            try:
                done = self.tile_one(path, fingerprint)
                log.info("ok %s: %d tiles", path.name, done[0])
            except SlideError as exc:
                failure = exc
            except BrokenProcessPool:
                self.restart_pool()
                failure = SlideError(
                    f"{path.name}: the reader process crashed on this file (OpenSlide aborted); "
                    "the file is probably corrupt",
                    hint="copy it again from the scanner or the archive",
                )
        if failure is not None:
            self.forget(slide_key(path.name))
            why = failure.message.removeprefix(f"{path.name}: ")
            record = SlideFailure(path.name, why, failure.hint or "", type(failure).__name__)
            summary.failures.append(record)
            summary.failed.append((path.name, f"{why} -> {failure.hint}" if failure.hint else why))
            log.error("FAILED %s", record.line)
            return
        assert done is not None  # every path above either tiled the slide or recorded its failure
        summary.ok.append(path.name)
        summary.tiles_per_slide[path.name], summary.qc_dropped_per_slide[path.name] = done
        summary.n_tiles += done[0]
        for reason, n in done[1].items():
            summary.qc_dropped[reason] = summary.qc_dropped.get(reason, 0) + n


def _check_slides_folder(slides_dir: Path) -> list[Path]:
    if not slides_dir.is_dir():
        raise UsageError(
            f"slides folder not found: {slides_dir}",
            hint="pass --slides with the folder that holds the whole-slide images",
        )
    files = list_slide_files(slides_dir)
    if not files:
        raise UsageError(
            f"the slides folder {slides_dir} has no files",
            hint="copy the whole-slide images into it (any format OpenSlide reads), or pass another --slides",
        )
    return files


def tile_folder(
    slides_dir: str | Path, out_dir: str | Path, tiling_cfg: TilingConfig, *, workers: int | None = None
) -> TilingSummary:
    """Tile every slide file directly in ``slides_dir`` into ``out_dir``; bad slides are recorded, not fatal.

    Writes ``out_dir/tiles/<slide_key>/<tile_id>.png`` (tiles that pass quality control), ``out_dir/tiles.parquet``
    (one row per tissue tile, columns :data:`~pixcell_fed.slides.records.COLUMNS`; ``qc`` is ``pass`` or the drop
    reason), ``out_dir/overviews/<slide_key>.png``, ``out_dir/tiles.log`` and ``out_dir/tiling.json`` (resolved
    config, quality-control provenance and outcome). Resumable: a slide whose outputs are complete for the
    same file and settings is not read again. Raises :class:`UsageError` for a missing or empty folder.
    """
    import pandas as pd

    from pixcell_fed import __version__
    from pixcell_fed.atomic import folder_lock, write_json_atomic, write_parquet_atomic
    from pixcell_fed.config.loader import to_plain
    from pixcell_fed.progress import progress
    from pixcell_fed.runlog import run_log

    slides_dir, out = Path(slides_dir), Path(out_dir)
    files = _check_slides_folder(slides_dir)
    workers = max(1, tiling_cfg.workers if workers is None else workers)
    summary = TilingSummary(out_dir=out, table_path=out / "tiles.parquet", log_path=out / "tiles.log")
    with folder_lock(out, what="tiling"), run_log(out / "tiles.log"):
        log.info(
            "tiling %d files from %s into %s (%d workers, %d px tiles at %s um/px)",
            len(files),
            slides_dir,
            out,
            workers,
            tiling_cfg.tile_size,
            tiling_cfg.target_mpp,
        )
        job = _FolderJob(out, tiling_cfg, workers)
        try:
            for path in progress(files, desc="slides", unit="slide"):
                job.run_one(path, summary)
        except BaseException:  # Ctrl-C or a bug: do not leave reads running behind the caller's back
            job.discard_pool()
            raise
        parts = [pd.read_parquet(job.paths(slide_key(name))["part"]) for name in summary.ok]
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(COLUMNS))
        write_parquet_atomic(out / "tiles.parquet", table[list(COLUMNS)])
        write_json_atomic(
            out / "tiling.json",
            {
                "pixcell_fed_version": __version__,
                "tiler_version": TILER_VERSION,
                "tiling": to_plain(tiling_cfg),
                "workers": workers,
                "slides_dir": str(slides_dir),
                "ok": summary.tiles_per_slide,
                "resumed": summary.resumed,
                "failed": [asdict(f) for f in summary.failures],
                "n_tiles": summary.n_tiles,
                "qc_dropped": summary.qc_dropped,
                "qc_dropped_per_slide": summary.qc_dropped_per_slide,
                "qc_provenance": QC_PROVENANCE,
            },
        )
        log.info(
            "done: %d slides ok, %d failed, %d tiles (quality control dropped %d)",
            len(summary.ok),
            len(summary.failed),
            summary.n_tiles,
            sum(summary.qc_dropped.values()),
        )
    return summary

"""Tiler throughput against a plain OpenSlide ``read_region`` + ``cv2.INTER_AREA`` loop over the same tiles.

Run from the repository root: ``python -m benchmarks.tiling`` (``--size 16384x12288``, ``--repeats 5``).

A generated Aperio-like 40x slide (0.25 um/px, JPEG, real H&E pixels over the whole glass) is tiled to 256 px
at 0.5 um/px, i.e. 512 px level-0 reads reduced by 2. The baseline is the practical limit: one OpenSlide handle
reading exactly the tiles the tiler keeps, in the same order, in this process. The tiler's figures are end to
end: they include planning (resolution, thumbnail, tissue mask, grid) and, for 2 workers, starting the pool.
Each figure is the best of ``--repeats`` runs (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_loop(path: Path, positions: list[tuple[int, int]], read: int, out: int) -> int:
    import cv2
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        for x, y in positions:
            rgba = np.asarray(slide.read_region((x, y), 0, (read, read)))
            cv2.resize(np.ascontiguousarray(rgba[..., :3]), (out, out), interpolation=cv2.INTER_AREA)
    return len(positions)


def timed(fn) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process, and fn's count."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, count


def main(argv: list[str] | None = None) -> None:
    from benchmarks.record import record
    from pixcell_fed.config import TilingConfig
    from pixcell_fed.progress import set_progress_enabled
    from pixcell_fed.slides.tiler import iter_slide_tiles, plan_slide_file, shutdown_shared_executors, tile_folder
    from pixcell_fed.testing.slide_writer import write_aperio_like

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16384x12288", help="level-0 size WxH of the generated 40x slide")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    set_progress_enabled(False)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="pixcell-bench-tiling-") as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        path = write_aperio_like(slides / "bench40x.svs", size=(width, height), full=True, downsamples=(4, 16))
        cfg = TilingConfig(workers=1)
        plan = plan_slide_file(path, cfg)
        positions = [(r.x, r.y) for r in plan.records]
        n = len(positions)
        print(f"slide {width}x{height} at 0.25 um/px, {path.stat().st_size / 1e6:.1f} MB; {n} tissue tiles of "
              f"{plan.n_grid_tiles}; read {plan.grid.level_read} px at level {plan.grid.level} -> 256 px")
        plain_loop(path, positions[:20], plan.grid.level_read, 256)  # warm the page cache for everyone

        wall: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for _ in range(args.repeats):  # interleave the contenders so that load spikes hit each of them alike
            for name, fn in (
                ("plain", lambda: plain_loop(path, positions, plan.grid.level_read, 256)),
                ("tiler_1w", lambda: sum(1 for _ in iter_slide_tiles(path, cfg, workers=1))),
                ("tiler_2w", lambda: sum(1 for _ in iter_slide_tiles(path, cfg, workers=2))),
            ):
                seconds, cpu_seconds, count = timed(fn)
                if count != n:
                    raise SystemExit(f"{name} produced {count} tiles, expected {n}")
                wall[name] = min(wall.get(name, float("inf")), seconds)
                cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds)
        out = Path(tmp) / "out"
        folder_s, _, _ = timed(lambda: tile_folder(slides, out, TilingConfig(workers=2)).n_tiles)
        shutdown_shared_executors()

    rate = {k: n / v for k, v in wall.items()}
    cpu_ratio = cpu["plain"] / cpu["tiler_1w"]
    figures = {
        "tiles": n, "slide": f"{width}x{height} @ 0.25 um/px (Aperio-like, JPEG)", "repeats": args.repeats,
        "plain_read_region_tiles_per_s": round(rate["plain"], 1),
        "tiler_1_worker_tiles_per_s": round(rate["tiler_1w"], 1),
        "tiler_2_workers_tiles_per_s": round(rate["tiler_2w"], 1),
        "ratio_1_worker_vs_plain": round(rate["tiler_1w"] / rate["plain"], 3),
        "ratio_2_workers_vs_plain": round(rate["tiler_2w"] / rate["plain"], 3),
        "cpu_ms_per_tile_plain": round(1e3 * cpu["plain"] / n, 2),
        "cpu_ms_per_tile_tiler_1_worker": round(1e3 * cpu["tiler_1w"] / n, 2),
        "cpu_ratio_1_worker_vs_plain": round(cpu_ratio, 3),
        "folder_job_2_workers_with_png_tiles_per_s": round(n / folder_s, 1),
        "cpu_count": os.cpu_count(), "load_average_at_start": round(load_before, 2),
    }
    table = "\n".join([
        "| what | tiles/s | vs plain loop |", "|---|---:|---:|",
        f"| plain OpenSlide read_region + cv2.INTER_AREA (1 process) | {rate['plain']:.1f} | 1.00x |",
        f"| iter_slide_tiles, 1 worker (in process, incl. planning) | {rate['tiler_1w']:.1f} | "
        f"{figures['ratio_1_worker_vs_plain']:.2f}x |",
        f"| iter_slide_tiles, 2 workers (incl. planning, pool start) | {rate['tiler_2w']:.1f} | "
        f"{figures['ratio_2_workers_vs_plain']:.2f}x |",
        f"| tile_folder, 2 workers, writing PNGs + parquet + overview | {n / folder_s:.1f} | "
        f"{n / folder_s / rate['plain']:.2f}x |",
        "", f"CPU time per tile (this process; insensitive to other jobs): plain {1e3 * cpu['plain'] / n:.2f} ms, "
        f"tiler on 1 worker {1e3 * cpu['tiler_1w'] / n:.2f} ms ({cpu_ratio:.2f}x the plain loop's speed).",
        "", f"{n} tiles of 256 px at 0.5 um/px from 512 px level-0 reads. Target: >= 0.9x on 1 worker, more on 2. "
        f"Load average when it started: {load_before:.2f} on {os.cpu_count()} cores (other jobs share them).",
    ])
    for line in table.splitlines()[2:8]:
        print(line)
    record("tiling", "Tiling throughput (tiles/s)", "python -m benchmarks.tiling", figures, table)


if __name__ == "__main__":
    main()

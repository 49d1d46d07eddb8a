"""Tiler throughput against a plain OpenSlide ``read_region`` + ``cv2.INTER_AREA`` loop over the same tiles.

Run from the repository root: ``python -m benchmarks.tiling`` (``--size 16384x12288``, ``--repeats 5``;
``--quick`` for a smoke-sized run that is printed, not recorded).

A generated Aperio-like 40x slide (0.25 um/px, JPEG, real H&E pixels over the whole glass) is tiled to 256 px
at 0.5 um/px, i.e. 512 px level-0 reads reduced by 2. The baseline is the practical limit: one OpenSlide handle
reading exactly the tiles the tiler keeps, in the same order, in this process, dropping alpha with
``cv2.cvtColor`` as the tiler does (the common ``np.asarray(img)[..., :3]`` copy costs ~1.7 ms more per tile and
would flatter the tiler). The tiler's figures are end to end: they include planning (resolution, thumbnail,
tissue mask, grid) and tile quality control on every tile read (pen ink, folds, glare, blur; the plain loop does
none); the 2-worker pool is started once per process and kept, as in a site run streaming many slides. Rates
count tiles read (those quality control drops included). Each figure is the best of ``--repeats`` runs (these
machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np


def plain_loop(path: Path, positions: list[tuple[int, int]], read: int, out: int) -> int:
    import cv2
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        for x, y in positions:
            rgba = np.asarray(slide.read_region((x, y), 0, (read, read)))
            rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
            cv2.resize(rgb, (out, out), interpolation=cv2.INTER_AREA)
    return len(positions)


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of other processes (the worker pool), from /proc (Linux)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed(fn) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process, and fn's count."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, count


def contest(path: Path, plan, cfg, repeats: int) -> tuple[dict[str, float], dict[str, float], Counter]:
    """Best wall and CPU seconds of the plain loop and the tiler on 1 and 2 workers over the same tiles, and the
    tiles quality control dropped. Raises SystemExit when a contender reads another number of tiles."""
    from pixcell_fed.slides.tiler import iter_slide_tiles
    from pixcell_fed.slides.workers import pool_pids

    positions = [(r.x, r.y) for r in plan.records]
    n = len(positions)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    dropped: Counter = Counter()

    def tiler(workers: int) -> int:
        """Tiles read: those yielded plus those quality control dropped."""
        counts: Counter = Counter()
        kept = sum(1 for _ in iter_slide_tiles(path, cfg, workers=workers, qc_dropped=counts))
        dropped.clear()
        dropped.update(counts)
        return kept + sum(counts.values())

    for _ in range(repeats):  # interleave the contenders so that load spikes hit each of them alike
        for name, fn in (
            ("plain", lambda: plain_loop(path, positions, plan.grid.level_read, 256)),
            ("tiler_1w", lambda: tiler(1)),
            ("tiler_2w", lambda: tiler(2)),
        ):
            pids = pool_pids(2)
            pool_cpu = process_cpu_seconds(pids)
            seconds, cpu_seconds, count = timed(fn)
            if name == "tiler_2w" and pids:  # the pool existed before this call: count its CPU too
                cpu["tiler_2w_total"] = min(cpu.get("tiler_2w_total", float("inf")),
                                            cpu_seconds + process_cpu_seconds(pids) - pool_cpu)
            if count != n:
                raise SystemExit(f"{name} produced {count} tiles, expected {n}")
            wall[name] = min(wall.get(name, float("inf")), seconds)
            cpu[name] = min(cpu.get(name, float("inf")), cpu_seconds)
    return wall, cpu, dropped


def main(argv: list[str] | None = None) -> None:
    from benchmarks.record import record
    from pixcell_fed.config import TilingConfig
    from pixcell_fed.progress import set_progress_enabled
    from pixcell_fed.slides.folder_job import tile_folder
    from pixcell_fed.slides.planning import plan_slide_file
    from pixcell_fed.slides.workers import shutdown_shared_executors
    from pixcell_fed.simulation.slide_writer import he_canvas, write_aperio_like

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16384x12288", help="level-0 size WxH of the generated 40x slide")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (8192x6144 slide, 1 repeat), not recorded")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats = "8192x6144", 1
    width, height = (int(v) for v in args.size.lower().split("x"))
    set_progress_enabled(False)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="pixcell-bench-tiling-") as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        path = write_aperio_like(slides / "bench40x.svs", pixels=he_canvas((width, height), 0.25, full=True))
        cfg = TilingConfig(workers=1)
        plan = plan_slide_file(path, cfg)
        positions = [(r.x, r.y) for r in plan.records]
        n = len(positions)
        print(f"slide {width}x{height} at 0.25 um/px, {path.stat().st_size / 1e6:.1f} MB; {n} tissue tiles of "
              f"{plan.n_grid_tiles}; read {plan.grid.level_read} px at level {plan.grid.level} -> 256 px")
        plain_loop(path, positions[:20], plan.grid.level_read, 256)  # warm the page cache for everyone

        wall, cpu, dropped = contest(path, plan, cfg, args.repeats)
        out = Path(tmp) / "out"
        folder_s, _, _ = timed(lambda: tile_folder(slides, out, TilingConfig(workers=2)).n_tiles)
        shutdown_shared_executors()

    rate = {k: n / v for k, v in wall.items()}
    cpu_ratio = cpu["plain"] / cpu["tiler_1w"]
    figures = {
        "tiles": n, "slide": f"{width}x{height} @ 0.25 um/px (Aperio-like, JPEG)", "repeats": args.repeats,
        "quick": args.quick, "qc_dropped": dict(dropped),
        "plain_read_region_tiles_per_s": round(rate["plain"], 1),
        "tiler_1_worker_tiles_per_s": round(rate["tiler_1w"], 1),
        "tiler_2_workers_tiles_per_s": round(rate["tiler_2w"], 1),
        "ratio_1_worker_vs_plain": round(rate["tiler_1w"] / rate["plain"], 3),
        "ratio_2_workers_vs_plain": round(rate["tiler_2w"] / rate["plain"], 3),
        "cpu_ms_per_tile_plain": round(1e3 * cpu["plain"] / n, 2),
        "cpu_ms_per_tile_tiler_1_worker": round(1e3 * cpu["tiler_1w"] / n, 2),
        "cpu_ratio_1_worker_vs_plain": round(cpu_ratio, 3),
        "cpu_ms_per_tile_tiler_2_workers_total": round(1e3 * cpu.get("tiler_2w_total", float("nan")) / n, 2),
        "folder_job_2_workers_with_png_tiles_per_s": round(n / folder_s, 1),
        "cpu_count": os.cpu_count(), "load_average_at_start": round(load_before, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    table = "\n".join([
        "| what | tiles/s | vs plain loop |", "|---|---:|---:|",
        f"| plain OpenSlide read_region + cv2.INTER_AREA (1 process) | {rate['plain']:.1f} | 1.00x |",
        f"| iter_slide_tiles, 1 worker (in process, incl. planning and quality control) | {rate['tiler_1w']:.1f} | "
        f"{figures['ratio_1_worker_vs_plain']:.2f}x |",
        f"| iter_slide_tiles, 2 worker processes (incl. planning and quality control; pool kept between calls) | {rate['tiler_2w']:.1f} | "
        f"{figures['ratio_2_workers_vs_plain']:.2f}x |",
        f"| tile_folder, 2 workers, writing PNGs + parquet + overview | {n / folder_s:.1f} | "
        f"{n / folder_s / rate['plain']:.2f}x |",
        "", f"CPU time per tile (this process; insensitive to other jobs): plain {1e3 * cpu['plain'] / n:.2f} ms, "
        f"tiler on 1 worker {1e3 * cpu['tiler_1w'] / n:.2f} ms ({cpu_ratio:.2f}x the plain loop's speed); "
        f"2 workers, all processes together, {1e3 * cpu.get('tiler_2w_total', float('nan')) / n:.2f} ms "
        "(the extra is moving tiles between processes): on two free cores they would run about "
        f"{2 * cpu['plain'] / cpu.get('tiler_2w_total', float('nan')):.2f}x the plain loop.",
        "", f"{n} tiles of 256 px at 0.5 um/px from 512 px level-0 reads (quality control dropped {sum(dropped.values())}). "
        "Target: >= 0.9x on 1 worker, more on 2. "
        f"Load average when it started: {load_before:.2f} on {os.cpu_count()} cores (other jobs share them).",
    ] + ([
        "", "**Noisy run:** the load exceeded the core count, so the wall-clock ratios swing from run to run and two "
        "workers cannot beat one when no core is free; the CPU-time ratio above is the stable figure for one worker.",
    ] if load_before > (os.cpu_count() or 1) else []))
    for line in table.splitlines()[2:8]:
        print(line)
    headline = (f"tiler {figures['ratio_1_worker_vs_plain']}x the plain read_region loop on 1 worker, "
                f"{figures['ratio_2_workers_vs_plain']}x on 2 (target >= 0.9x, more on 2)")
    record("tiling", "Tiling throughput (tiles/s)", "python -m benchmarks.tiling" + (" --quick" if args.quick else ""),
           figures, table, headline=headline)


if __name__ == "__main__":
    main()

"""``site-agent tiles --slides DIR --out OUT [--config FILE] [--workers N]``: slides to 20x tiles."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tiles",
        help="cut tissue tiles at 20x (0.5 um/px) from every slide in a folder",
        description="Tile every whole-slide image in --slides into --out: tiles/<slide_key>/<tile_id>.png, "
        "tiles.parquet (site-internal: never shipped), overviews/<slide_key>.png, tiles.log. "
        "Bad slides are listed with the reason and what to do; the others are tiled completely. "
        "Rerunning skips slides already tiled with the same settings. "
        "Exit 0: all slides tiled; 4: some slides failed; 1: all failed; 2: missing or empty folder.",
    )
    p.add_argument(
        "--slides", type=Path, metavar="DIR", help="folder of whole-slide images (default: site.slides_dir of --config)"
    )
    p.add_argument("--out", type=Path, metavar="OUT", help="output folder (default: <site.work_dir>/tiles of --config)")
    p.add_argument("--config", type=Path, metavar="FILE", help="site.yaml; its 'tiling' section is used")
    p.add_argument("--workers", type=int, metavar="N", help="reader processes (default: tiling.workers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from pixcell_fed.config import TilingConfig, load_site_config
    from pixcell_fed.errors import ExitCode, UsageError
    from pixcell_fed.slides.folder_job import tile_folder

    site = load_site_config(args.config) if args.config else None
    tiling = site.tiling if site else TilingConfig()
    slides = args.slides or (site.site.slides_dir if site else None)
    out = args.out or (site.site.work_dir / "tiles" if site else None)
    if slides is None or out is None:
        raise UsageError(
            "tell site-agent where the slides are and where the tiles go",
            hint="pass --slides DIR and --out OUT, or --config site.yaml",
        )
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError(f"--workers must be at least 1 (got {args.workers})", hint="pass --workers 1 or more")
        tiling = dataclasses.replace(tiling, workers=args.workers)

    summary = tile_folder(slides, out, tiling)
    print(
        f"tiled {len(summary.ok)} of {len(summary.ok) + len(summary.failed)} slides: {summary.n_tiles} tiles "
        f"-> {summary.table_path}"
    )
    for name in summary.ok:
        again = " (already done)" if name in summary.resumed else ""
        dropped = ", ".join(f"{n} {reason}" for reason, n in summary.qc_dropped_per_slide.get(name, {}).items())
        print(
            f"  ok      {name}: {summary.tiles_per_slide[name]} tiles{again}"
            + (f"; quality control dropped {dropped}" if dropped else "")
        )
    for failure in summary.failures:
        print(f"  FAILED  {failure.line}")
    if summary.qc_dropped:
        print(
            "quality control dropped "
            + ", ".join(f"{n} {reason}" for reason, n in summary.qc_dropped.items())
            + " tiles (see the overviews; thresholds under tiling.qc)"
        )
    print(f"overviews: {out / 'overviews'}   log: {summary.log_path}")
    if not summary.failed:
        return int(ExitCode.OK)
    return int(ExitCode.PARTIAL if summary.ok else ExitCode.FAILURE)

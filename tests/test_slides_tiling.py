"""The tiler on real pixels: exact 20x from 40x, 256/1024 grid alignment, level choice, thumbnails, streams."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from pixcell_fed.config import TilingConfig
from pixcell_fed.errors import NoTissueError, SlideError
from pixcell_fed.slides import tissue
from pixcell_fed.slides.grid import make_grid
from pixcell_fed.slides.reader import SlideReader
from pixcell_fed.slides.folder_job import tile_folder
from pixcell_fed.slides.planning import plan_slide_file, read_tile
from pixcell_fed.slides.records import slide_key
from pixcell_fed.slides.tiler import iter_slide_tiles
from pixcell_fed.testing import slide_writer
from pixcell_fed.testing.real_slide import real_slide_path

CFG = TilingConfig(workers=1)


@pytest.fixture(scope="module")
def slide40x(tmp_path_factory):
    """Aperio-like 40x (0.25 um/px) with label and macro, lossless tiles so that pixels can be compared exactly."""
    path = tmp_path_factory.mktemp("s40") / "aperio40x.svs"
    return slide_writer.write_aperio_like(path, size=(4096, 3072), pyramid=slide_writer.Pyramid((4, 16), "zlib"))


def block_mean(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k, img.shape[1] // k
    return img[: h * k, : w * k].reshape(h, k, w, k, -1).astype(np.float64).mean(axis=(1, 3))


def test_20x_tile_from_40x_equals_area_downsampled_level0(slide40x):
    level0 = tifffile.imread(slide40x, key=0)  # level 0 decoded by tifffile, independently of OpenSlide
    tiles = list(iter_slide_tiles(slide40x, CFG))
    assert len(tiles) >= 10
    rec0 = tiles[0][0]
    assert (rec0.read_size, rec0.level, rec0.mpp, rec0.tile_size) == (512, 0, 0.25, 256)
    with openslide.OpenSlide(str(slide40x)) as s:
        for rec, tile in tiles[:: max(1, len(tiles) // 6)]:
            assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
            region = level0[rec.y:rec.y + 512, rec.x:rec.x + 512]
            # An area filter reducing by exactly 2 is the mean of each 2x2 block. cv2's INTER_AREA rounds in fixed
            # point and the float mean here rounds half-up, so values may differ by 1 where a mean ends in .5.
            reference = np.floor(block_mean(region, 2) + 0.5)
            diff = np.abs(tile.astype(np.int16) - reference.astype(np.int16))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.3
            # ... and it is bit-identical to OpenSlide's level-0 read resized with cv2.INTER_AREA
            plain = np.asarray(s.read_region((rec.x, rec.y), 0, (512, 512)))[..., :3]
            assert np.array_equal(tile, cv2.resize(plain, (256, 256), interpolation=cv2.INTER_AREA))


def test_1024_tiles_are_aligned_4x4_blocks_of_the_256_grid(slide40x):
    cfg1024 = dataclasses.replace(CFG, tile_size=1024, tissue_fraction=0.3)
    plan256, plan1024 = plan_slide_file(slide40x, CFG), plan_slide_file(slide40x, cfg1024)
    assert plan1024.grid.base == plan256.grid.base == 512 and plan1024.grid.read_size == 2048
    assert plan1024.records, "the test slide should have 1024 px tissue tiles"
    ids256 = {r.tile_id for r in plan256.records}
    with SlideReader(slide40x) as reader:
        for rec in plan1024.records[:2]:
            assert rec.row % 4 == 0 and rec.col % 4 == 0
            assert (rec.x, rec.y) == (rec.col * 512, rec.row * 512)
            big = read_tile(reader, plan1024.grid, rec.x, rec.y)
            assert big.shape == (1024, 1024, 3)
            mosaic = np.zeros_like(big)
            for i in range(4):
                for j in range(4):
                    x, y = (rec.col + j) * 512, (rec.row + i) * 512
                    mosaic[256 * i:256 * (i + 1), 256 * j:256 * (j + 1)] = read_tile(reader, plan256.grid, x, y)
            # both are 2x2 block means of the same level-0 pixels: the 1024 tile is the 16 tiles side by side
            assert np.abs(big.astype(np.int16) - mosaic).max() <= 1
        # a 1024 tile with tissue shares its identity scheme with the 256 tiles inside it
        rec = plan1024.records[0]
        inner = {f"{rec.slide_key}-r{rec.row + i:05d}-c{rec.col + j:05d}" for i in range(4) for j in range(4)}
        assert inner & ids256


def test_reads_from_the_coarsest_level_that_is_fine_enough(tmp_path):
    path = slide_writer.write_generic_tiff(tmp_path / "g40.tif", size=(2048, 2048), mpp=0.25,
                                           pyramid=slide_writer.Pyramid((2, 4), "zlib"))
    plan = plan_slide_file(path, CFG)
    assert (plan.grid.level, plan.grid.level_read, plan.grid.read_size) == (1, 256, 512)
    level1 = tifffile.imread(path, key=1)
    rec, tile = next(iter_slide_tiles(path, CFG))
    assert np.array_equal(tile, level1[rec.y // 2:rec.y // 2 + 256, rec.x // 2:rec.x // 2 + 256])


def test_grid_uses_the_exact_mpp_not_a_bucketed_magnification():
    g = make_grid((50000, 40000), (1.0, 4.0, 16.0), mpp=0.2527, target_mpp=0.5)
    assert g.base == round(256 * 0.5 / 0.2527) == 507 and g.level == 0 and g.cols == 50000 // 507
    g = make_grid((50000, 40000), (1.0, 2.0, 8.0), mpp=0.2527, target_mpp=0.5)
    assert g.level == 0  # 2x would be coarser than 507/256 = 1.98: never read a level that must be upsampled
    g = make_grid((50000, 40000), (1.0, 2.0, 8.0), mpp=0.25, target_mpp=0.5, tile_size=1024)
    assert (g.level, g.level_read, g.read_size, g.step) == (1, 1024, 2048, 4)


def test_real_cmu_slide_gives_20x_tiles(tmp_path):
    path = real_slide_path()
    tiles = list(iter_slide_tiles(path, CFG))
    assert len(tiles) >= 20
    rec, tile = tiles[len(tiles) // 2]
    assert rec.mpp == pytest.approx(0.499) and rec.read_size == 257 and rec.level == 0
    assert rec.tile_id == f"{slide_key(path.name)}-r{rec.row:05d}-c{rec.col:05d}"
    with openslide.OpenSlide(str(path)) as s:
        plain = np.asarray(s.read_region((rec.x, rec.y), 0, (257, 257)))[..., :3]
    assert np.array_equal(tile, cv2.resize(plain, (256, 256), interpolation=cv2.INTER_AREA))
    sat = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[..., 1]
    assert rec.tissue_fraction >= 0.5 and np.median(sat) > 20  # stained tissue, not glass
    # deterministic: the same slide gives the same identities
    assert [r.tile_id for r, _ in tiles] == [r.tile_id for r in plan_slide_file(path, CFG).records]


def test_two_workers_stream_the_same_tiles_as_one(slide40x):
    one = list(iter_slide_tiles(slide40x, CFG, workers=1))
    two = list(iter_slide_tiles(slide40x, CFG, workers=2))
    assert [r for r, _ in one] == [r for r, _ in two]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(one, two))


def test_chunked_thumbnail_of_a_single_level_slide(tmp_path, monkeypatch):
    path = slide_writer.write_generic_tiff(tmp_path / "flat.tif", size=(3000, 2000), mpp=0.5,
                                           pyramid=slide_writer.Pyramid((), "zlib"))
    monkeypatch.setattr(tissue, "CHUNK", 500)  # force many chunks; a huge single-level slide gets 4096
    with SlideReader(path) as reader:
        thumb = tissue.read_thumbnail(reader, 256)
    full = tifffile.imread(path)
    assert thumb.downsample == 12 and thumb.rgb.shape == (2000 // 12, 3000 // 12, 3)
    expected = cv2.resize(full[: 166 * 12, : 250 * 12], (250, 166), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb.rgb.astype(np.int16) - expected).max() <= 1


def test_tissue_mask_and_blank_slide(tmp_path):
    with SlideReader(real_slide_path()) as reader:
        thumb = tissue.read_thumbnail(reader, 1024)
    mask = tissue.tissue_mask(thumb.rgb)
    assert 0.1 < mask.mean() < 0.9
    blank = slide_writer.write_blank_slide(tmp_path / "blank.tif")
    with pytest.raises(NoTissueError, match="no tissue"):
        plan_slide_file(blank, CFG)


def test_folder_job_resumes_and_redoes_on_changed_settings(tmp_path, slide40x):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").symlink_to(slide40x)
    first = tile_folder(slides, tmp_path / "out", CFG)
    assert first.ok == ["a.svs"] and first.resumed == [] and first.n_tiles > 0
    again = tile_folder(slides, tmp_path / "out", CFG)
    assert again.resumed == ["a.svs"] and again.n_tiles == first.n_tiles
    changed = tile_folder(slides, tmp_path / "out", dataclasses.replace(CFG, tissue_fraction=0.9))
    assert changed.resumed == [] and changed.n_tiles < first.n_tiles
    key = slide_key("a.svs")
    assert len(list((tmp_path / "out" / "tiles" / key).glob("*.png"))) == changed.n_tiles


def test_slides_coarser_than_the_target_are_refused_not_upsampled(tmp_path):
    path = slide_writer.write_generic_tiff(tmp_path / "10x.tif", size=(1024, 1024), mpp=1.0,
                                           pyramid=slide_writer.Pyramid(()))
    with pytest.raises(SlideError, match="coarser than the 0.5 um/px"):
        plan_slide_file(path, CFG)


def test_transparent_pixels_are_composited_on_white(slide40x):
    from pixcell_fed.slides.reader import composite_on_white

    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    assert composite_on_white(rgba).tolist() == [[[200, 100, 50], [255, 255, 255], [127, 127, 127]]]
    with SlideReader(slide40x) as reader:  # outside the scanned area OpenSlide returns transparent pixels
        w, h = reader.dimensions
        outside = reader.read_rgb((w - 8, h - 8), 0, (16, 16))
    assert outside.shape == (16, 16, 3) and (outside[8:, :] == 255).all() and (outside[:, 8:] == 255).all()


def test_a_consumer_may_stop_the_stream_early(slide40x):
    stream = iter_slide_tiles(slide40x, CFG, workers=2)
    first = [next(stream) for _ in range(3)]
    stream.close()  # pending reads are cancelled; the shared pool stays usable
    again = next(iter_slide_tiles(slide40x, CFG, workers=2))
    assert again[0] == first[0][0] and np.array_equal(again[1], first[0][1])


_CRASH_HOOK = '''
import os

import pixcell_fed.slides.planning as planning

_read_tile = planning.read_tile


def read_tile(reader, grid, x, y):
    if "crash" in reader.name:
        os._exit(70)  # what a reader process does when OpenSlide aborts on a corrupt file
    return _read_tile(reader, grid, x, y)


planning.read_tile = read_tile
'''

_TILE_FOLDER = '''
import json, sys
from pixcell_fed.config import TilingConfig
from pixcell_fed.slides.folder_job import tile_folder
s = tile_folder(sys.argv[1], sys.argv[2], TilingConfig(workers=2, write_overviews=False))
print(json.dumps({"ok": s.ok, "resumed": s.resumed, "failed": s.failed, "tiles": s.tiles_per_slide}))
'''


def test_a_reader_process_crash_costs_one_slide_not_the_run(tmp_path, slide40x):
    """A worker that dies mid-slide (OpenSlide aborting) fails that slide only: the pool is replaced, the other
    slides are tiled, nothing half-written is kept, and the next run tiles the slide once it reads."""
    import json
    import os
    import subprocess
    import sys

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.svs", "b-crash.svs", "c.svs"):
        (slides / name).symlink_to(slide40x)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CRASH_HOOK)  # runs in the fork server, so in every reader process
    out = tmp_path / "out"

    def run(env_extra):
        env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1", **env_extra}
        proc = subprocess.run([sys.executable, "-c", _TILE_FOLDER, str(slides), str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    crashed = run({"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))})
    assert crashed["ok"] == ["a.svs", "c.svs"]
    assert [name for name, _ in crashed["failed"]] == ["b-crash.svs"] and "crashed" in crashed["failed"][0][1]
    key = slide_key("b-crash.svs")
    assert not (out / "tiles" / key).exists() and not (out / "tiles" / f".{key}.partial").exists()
    import pandas as pd

    assert set(pd.read_parquet(out / "tiles.parquet")["slide_key"]) == {slide_key("a.svs"), slide_key("c.svs")}
    healed = run({})
    assert healed["resumed"] == ["a.svs", "c.svs"] and healed["ok"] == ["a.svs", "b-crash.svs", "c.svs"]
    assert healed["tiles"]["b-crash.svs"] == healed["tiles"]["a.svs"] > 0


def test_quality_control_drops_inked_tiles_records_why_and_colours_the_overview(tmp_path):
    """A slide with a blue pen line drawn across real tissue: the inked tiles are read once, judged, listed in
    tiles.parquet with qc = pen and no PNG, counted in the summary and tiling.json, and filled in the overview."""
    import json
    from collections import Counter

    import pandas as pd

    from pixcell_fed.simulation.slide_writer import he_canvas
    from pixcell_fed.slides.overview import REASON_COLOURS

    pixels = he_canvas((2048, 1536), 0.5, seed=3, full=True)
    ink = np.zeros(pixels.shape[:2], np.float32)
    cv2.line(ink, (0, 700), (2047, 820), 1.0, 160, cv2.LINE_AA)  # an 80 um felt-tip line across the slide
    pixels = np.rint(pixels * (1 - ink[..., None] * (1 - np.array([45, 95, 175]) / 255))).astype(np.uint8)
    slides = tmp_path / "slides"
    slides.mkdir()
    slide_writer.write_generic_tiff(slides / "inked.tif", mpp=0.5, pixels=pixels, pyramid=slide_writer.Pyramid((4,)))

    summary = tile_folder(slides, tmp_path / "out", dataclasses.replace(CFG, workers=2))
    table = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    pen = table[table["qc"] == "pen"]
    assert len(pen) >= 8 and set(table["qc"]) <= {"pass", "pen"}
    assert summary.qc_dropped == {"pen": len(pen)} and summary.n_tiles == (table["qc"] == "pass").sum()
    assert (pen["tile_file"] == "").all() and (pen["qc_ink"] >= 0.05).all()
    written = {p.stem for p in (tmp_path / "out" / "tiles").rglob("*.png")}
    assert written == set(table.loc[table["qc"] == "pass", "tile_id"])
    assert all(540 <= y + 256 and y <= 980 for y in pen["y"])  # only tiles the line crosses
    report = json.loads((tmp_path / "out" / "tiling.json").read_text())
    assert report["qc_dropped"] == {"pen": len(pen)} and "pen_fraction" in report["qc_provenance"]
    assert report["tiling"]["qc"]["pen_fraction"] == 0.05
    overview = cv2.imread(str(tmp_path / "out" / "overviews" / f"{slide_key('inked.tif')}.png"))[..., ::-1]
    assert (np.abs(overview.astype(int) - REASON_COLOURS["pen"]).sum(axis=2) == 0).sum() >= 8

    for workers in (1, 2):  # the stream drops the same tiles, in this process or in the pool
        dropped: Counter = Counter()
        kept = [rec.tile_id for rec, _ in iter_slide_tiles(slides / "inked.tif", CFG, workers=workers, qc_dropped=dropped)]
        assert kept == list(table.loc[table["qc"] == "pass", "tile_id"]) and dropped == {"pen": len(pen)}

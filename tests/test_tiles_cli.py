"""``site-agent tiles`` on a folder of good and bad slides: good ones tiled completely, one clear line per bad one."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest

from pixcell_fed.config import TilingConfig
from pixcell_fed.slides.records import COLUMNS, slide_key
from pixcell_fed.slides.tiler import iter_slide_tiles
from pixcell_fed.testing import slide_writer
from pixcell_fed.testing.real_slide import real_slide_path
from site_agent.cli import main

# bad file -> words its line must contain (why) and words of the fix (what to do)
BAD = {
    "notes.svs": ("not a whole-slide image", "remove it"),
    "truncated.svs": ("truncated", "copy it again"),
    "corrupt.svs": ("truncated or corrupt", "copy it again"),
    "no_mpp.tif": ("no resolution", "mpp_overrides"),
    "blank.tif": ("no tissue", "saturation_threshold"),
    "missing.svs": ("cannot read the file", "restore the file"),
    "untiled_huge.tif": ("untiled 12000x9000", "tiled pyramidal TIFF"),
}
GOOD = ("aperio40x.svs", "cmu.svs")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    good = slide_writer.write_aperio_like(folder / "aperio40x.svs",
                                          pixels=slide_writer.he_canvas((4096, 3072), 0.25, seed=1))
    shutil.copy(real_slide_path(), folder / "cmu.svs")
    slide_writer.write_not_a_slide(folder / "notes.svs")
    slide_writer.write_truncated(good, folder / "truncated.svs", keep=0.5)
    slide_writer.write_corrupted(good, folder / "corrupt.svs")
    slide_writer.write_generic_tiff(folder / "no_mpp.tif", size=(2048, 1536), mpp=None, pyramid=slide_writer.Pyramid((4,)))
    slide_writer.write_blank_slide(folder / "blank.tif")
    os.symlink(folder / "gone" / "scan.svs", folder / "missing.svs")  # unreadable: a link whose target is gone
    slide_writer.write_untiled_tiff(folder / "untiled_huge.tif", size=(12000, 9000))
    (folder / ".DS_Store").write_bytes(b"\0\0")  # hidden files are not slides and not reported
    return folder


def run_tiles(capsys, *args):
    code = main(["--no-progress", "tiles", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_inputs_in_one_folder(slides, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_tiles(capsys, "--slides", slides, "--out", out_dir, "--workers", "2")
    assert code == 4, out + err
    lines = out.splitlines()
    for name, words in BAD.items():
        mine = [line for line in lines if f"FAILED  {name}:" in line]
        assert len(mine) == 1, f"{name}: {lines}"
        assert all(w in mine[0] for w in words), mine[0]
        assert "->" in mine[0]  # why -> what to do
    log = (out_dir / "tiles.log").read_text()
    assert all(f"FAILED {name}:" in log for name in BAD)
    assert ".DS_Store" not in out
    # each good slide is tiled completely: every tile the stream gives is in the table and on disk
    table = pd.read_parquet(out_dir / "tiles.parquet")
    assert tuple(table.columns) == COLUMNS
    assert set(table.slide_file) == set(GOOD)
    for name in GOOD:
        expected = [r.tile_id for r, _ in iter_slide_tiles(slides / name, TilingConfig(workers=1))]
        assert f"ok      {name}: {len(expected)} tiles" in out
        assert list(table[table.slide_file == name].tile_id) == expected
        assert (out_dir / "overviews" / f"{slide_key(name)}.png").is_file()
    assert all((out_dir / f).is_file() for f in table.tile_file)
    assert not list((out_dir / "tiles").glob(".*partial"))  # failed slides leave nothing half-written
    # the blank slide still has an overview for the admin to look at
    assert (out_dir / "overviews" / f"{slide_key('blank.tif')}.png").is_file()


def test_override_in_config_rescues_a_slide_without_mpp(slides, tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(slides / "no_mpp.tif", folder / "no_mpp.tif")
    config = tmp_path / "site.yaml"
    config.write_text("tiling:\n  workers: 1\n  tissue_fraction: 0.3\n  mpp_overrides: {no_mpp.tif: 0.5}\n")
    code, out, _ = run_tiles(capsys, "--slides", folder, "--out", tmp_path / "out", "--config", config)
    assert code == 0 and "ok      no_mpp.tif" in out
    table = pd.read_parquet(tmp_path / "out" / "tiles.parquet")
    assert len(table) > 0 and set(table.mpp) == {0.5}


def test_all_slides_bad_is_a_failure(slides, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(slides / "notes.svs", folder / "notes.svs")
    code, out, _ = run_tiles(capsys, "--slides", folder, "--out", tmp_path / "out")
    assert code == 1 and "FAILED  notes.svs" in out


def test_empty_or_missing_folder_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_tiles(capsys, "--slides", tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 2 and "has no files" in err and "hint:" in err
    code, _, err = run_tiles(capsys, "--slides", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert code == 2 and "not found" in err

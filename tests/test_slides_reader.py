"""Opening slides: what is refused, and that each refusal says which file, why and what to do."""

from __future__ import annotations

import errno

import pytest

from pixcell_fed.errors import SlideError
from pixcell_fed.slides import reader as reader_mod
from pixcell_fed.slides.reader import SlideReader, list_slide_files
from pixcell_fed.testing import slide_writer
from pixcell_fed.testing.real_slide import real_slide_path


def test_permission_denied_names_the_file_and_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "locked.svs"
    path.write_bytes(b"II*\0")

    def denied(*args, **kwargs):  # tests run as root, where chmod 000 does not stop reads
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(reader_mod, "open", denied, raising=False)
    with pytest.raises(SlideError) as info:
        SlideReader(path)
    assert "locked.svs: cannot read the file (Permission denied)" in str(info.value)
    assert "read access" in info.value.hint


def test_empty_and_non_slide_files(tmp_path):
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideError, match="empty.svs: the file is empty"):
        SlideReader(tmp_path / "empty.svs")
    with pytest.raises(SlideError, match="notes.ndpi: not a whole-slide image"):
        SlideReader(slide_writer.write_not_a_slide(tmp_path / "notes.ndpi"))


def test_untiled_tiff_is_refused_before_decoding(tmp_path):
    path = slide_writer.write_untiled_tiff(tmp_path / "flat.tif", size=(3000, 2000))
    with pytest.raises(SlideError) as info:
        SlideReader(path)
    assert "single-level untiled 3000x2000 px TIFF" in str(info.value) and "--tile --pyramid" in info.value.hint


def test_real_slide_opens_with_levels_and_properties():
    with SlideReader(real_slide_path()) as slide:
        assert slide.vendor == "aperio" and slide.dimensions == (2220, 2967)
        assert slide.read_rgb((0, 0), 0, (8, 8)).shape == (8, 8, 3)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(SlideReader(real_slide_path()))


def test_folder_scan_skips_hidden_files_and_folders(tmp_path):
    for name in ("b.svs", "a.tif", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "mirax_data").mkdir()
    assert [p.name for p in list_slide_files(tmp_path)] == ["a.tif", "b.svs"]

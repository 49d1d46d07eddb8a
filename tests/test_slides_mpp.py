"""Every step of the microns-per-pixel chain, on property dicts and on real files."""

from __future__ import annotations

import openslide
import pytest

from pixcell_fed.errors import ExitCode, MppUnavailableError
from pixcell_fed.slides.mpp import resolve_mpp
from pixcell_fed.testing import slide_writer
from pixcell_fed.testing.real_slide import real_slide_path


def mpp_of(props, overrides=None, name="s.svs"):
    return resolve_mpp(props, slide_file=name, overrides=overrides)


def test_openslide_mpp_comes_first():
    r = mpp_of({"openslide.mpp-x": "0.2520", "openslide.mpp-y": "0.2522", "aperio.MPP": "0.3",
                "openslide.objective-power": "20"})
    assert r.source == "openslide.mpp-x/y" and r.mpp == pytest.approx(0.2521)


@pytest.mark.parametrize("key", ["aperio.MPP", "openslide.mirax.MPP"])
def test_vendor_mpp_keys(key):
    r = mpp_of({key: "0.2461", "openslide.objective-power": "20"})
    assert r.source == key and r.mpp == pytest.approx(0.2461)


def test_hamamatsu_xresolution_as_mpp_or_pixels_per_cm():
    assert mpp_of({"hamamatsu.XResolution": "0.226"}).mpp == pytest.approx(0.226)
    assert mpp_of({"hamamatsu.XResolution": "44250"}).mpp == pytest.approx(1e4 / 44250)


@pytest.mark.parametrize("unit,value,expected", [("centimeter", "40000", 0.25), ("inch", "50800", 0.5)])
def test_tiff_resolution_with_units(unit, value, expected):
    r = mpp_of({"tiff.XResolution": value, "tiff.YResolution": value, "tiff.ResolutionUnit": unit})
    assert r.mpp == pytest.approx(expected) and r.source == f"tiff.XResolution ({unit})"


def test_tiff_resolution_without_unit_is_not_a_resolution():
    props = {"tiff.XResolution": "40000", "tiff.YResolution": "40000", "tiff.ResolutionUnit": "none"}
    with pytest.raises(MppUnavailableError):
        mpp_of(props)
    # ... but the objective power behind it still counts, as an estimate
    r = mpp_of({**props, "openslide.objective-power": "40"})
    assert r.mpp == pytest.approx(0.25) and "estimated" in r.source


def test_objective_power_estimate_when_nothing_else():
    assert mpp_of({"aperio.AppMag": "20"}).mpp == pytest.approx(0.5)


def test_implausible_values_fall_through_the_chain():
    r = mpp_of({"openslide.mpp-x": "0", "aperio.MPP": "nan", "tiff.XResolution": "1", "tiff.ResolutionUnit": "inch",
                "openslide.objective-power": "40"})
    assert "objective-power" in r.source


def test_override_for_this_file_wins_and_others_are_untouched():
    props = {"openslide.objective-power": "40"}
    assert mpp_of(props, {"s.svs": 0.2627}).mpp == pytest.approx(0.2627)
    assert mpp_of(props, {"s.svs": 0.2627}).source == "config tiling.mpp_overrides"
    assert mpp_of(props, {"other.svs": 0.9}).mpp == pytest.approx(0.25)


def test_refusal_names_the_file_and_the_fix():
    with pytest.raises(MppUnavailableError) as info:
        mpp_of({"tiff.ResolutionUnit": "inch"}, name="scan_0042.tif")
    assert "scan_0042.tif" in str(info.value)
    assert "mpp_overrides" in info.value.hint and "scan_0042.tif" in info.value.hint
    assert info.value.exit_code == ExitCode.FAILURE


def test_real_files(tmp_path):
    with openslide.OpenSlide(str(real_slide_path())) as s:  # real Aperio: openslide.mpp-x from aperio.MPP
        props = dict(s.properties)
    assert mpp_of(props).mpp == pytest.approx(0.499)
    del props["openslide.mpp-x"], props["openslide.mpp-y"]
    assert mpp_of(props).source == "aperio.MPP" and mpp_of(props).mpp == pytest.approx(0.499)
    for unit in ("CENTIMETER", "INCH"):
        path = slide_writer.write_generic_tiff(tmp_path / f"{unit}.tif", size=(512, 512), mpp=0.25,
                                               resolution_unit=unit, pyramid=slide_writer.Pyramid(()))
        with openslide.OpenSlide(str(path)) as s:
            props = dict(s.properties)
        assert mpp_of(props).mpp == pytest.approx(0.25)
        # without OpenSlide's own key the chain reads the TIFF tags itself
        del props["openslide.mpp-x"], props["openslide.mpp-y"]
        assert mpp_of(props).mpp == pytest.approx(0.25, rel=1e-4)
    path = slide_writer.write_generic_tiff(tmp_path / "none.tif", size=(512, 512), mpp=0.25, resolution_unit="NONE",
                                           pyramid=slide_writer.Pyramid(()))
    with openslide.OpenSlide(str(path)) as s:
        with pytest.raises(MppUnavailableError):
            mpp_of(dict(s.properties))
    path = slide_writer.write_aperio_like(tmp_path / "nompp.svs", size=(1024, 768), include_mpp=False,
                                          pyramid=slide_writer.Pyramid((4,)))
    with openslide.OpenSlide(str(path)) as s:
        assert "estimated" in mpp_of(dict(s.properties)).source

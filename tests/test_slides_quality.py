"""Tile quality control on real pixels: pen strokes in four inks, blurred tiles, folds and washed-out tissue are
dropped, clean tissue is kept (tiles of the real test slide, in its own stain and two restains)."""

from __future__ import annotations

import numpy as np
import pytest

from pixcell_fed.config.schema import TileQCConfig, TilingConfig
from pixcell_fed.simulation.slide_writer import StainVariation, perturb_stain
from pixcell_fed.slides.quality import PASS, assess_tile
from pixcell_fed.testing.real_slide import real_slide_path

QC = TileQCConfig()
#: Transmitted colour of each ink over white glass (histolab's pen ranges hold them).
INKS = {"blue": (45, 95, 175), "green": (45, 140, 115), "red": (185, 40, 60), "black": (35, 35, 45)}
RESTAINS = (StainVariation(1.25, 0.8), StainVariation(0.85, 1.3, bias=0.03))


@pytest.fixture(scope="module")
def real_tiles() -> list[tuple[np.ndarray, float]]:
    """Every 256 px window (stride 128) of the real 20x slide with >= 50 % tissue by the tiler's own mask, and that
    share: the tiles the tiler would keep before quality control, on a denser grid."""
    from pixcell_fed.slides.reader import SlideReader
    from pixcell_fed.slides.tissue import read_thumbnail, tissue_fractions, tissue_mask

    cfg = TilingConfig()
    with SlideReader(real_slide_path()) as reader:
        thumb = read_thumbnail(reader, cfg.thumbnail_max_side, max_downsample=64)
        mask = tissue_mask(thumb.rgb, saturation_threshold=cfg.saturation_threshold, median_blur=cfg.median_blur,
                           min_component_fraction=cfg.min_component_fraction)
        width, height = reader.dimensions
        ys, xs = np.mgrid[0:height - 256:128, 0:width - 256:128]
        fractions = tissue_fractions(mask, thumb.downsample, xs.ravel(), ys.ravel(), 256)
        level0 = reader.read_rgb((0, 0), 0, (width, height))
    return [(np.ascontiguousarray(level0[y:y + 256, x:x + 256]), float(f))
            for x, y, f in zip(xs.ravel(), ys.ravel(), fractions) if f >= cfg.tissue_fraction]


def verdicts(tiles) -> list[str]:
    return [assess_tile(t, f, QC).qc for t, f in tiles]


def check_dropped(found: list[str], reason: str, *, named: float) -> None:
    """At least 95 % dropped, and at least ``named`` of them under this reason (ink and folds both darken tissue:
    the wider margin past its threshold names the reason)."""
    dropped = sum(v != PASS for v in found)
    assert dropped >= 0.95 * len(found), f"{reason}: {dropped} of {len(found)} dropped"
    assert found.count(reason) >= named * len(found), f"{reason}: {found.count(reason)} of {len(found)} named {reason}"


def pen_stroke(tile: np.ndarray, ink, rng: np.random.Generator) -> np.ndarray:
    """An anti-aliased felt-tip stroke 24-48 um wide (48-96 px at 20x; real pen lines are wider) across the tile,
    the ink filtering the light through the tissue beneath it."""
    import cv2

    alpha = np.zeros(tile.shape[:2], np.float32)
    points = np.array([(rng.integers(0, 256), 0), (rng.integers(40, 216), 128), (rng.integers(0, 256), 255)], np.int32)
    cv2.polylines(alpha, [points], False, 1.0, int(rng.integers(48, 97)), cv2.LINE_AA)
    filtered = tile.astype(np.float32) * (1 - alpha[..., None] * (1 - np.asarray(ink, np.float32) / 255))
    return np.clip(np.rint(filtered), 0, 255).astype(np.uint8)


def fold(tile: np.ndarray, share: float = 0.5, layers: float = 3.0) -> np.ndarray:
    """A fold across the middle ``share`` of the tile: the section folded twice over, three layers of tissue (their
    optical densities add; the gaps of one layer are covered by the others)."""
    od = -np.log((tile.astype(np.float32) + 1) / 256)
    tissue = od.sum(axis=2) > 0.3
    mean = od[tissue].mean(axis=0)
    top = int(256 * (1 - share) / 2)
    band = slice(top, top + int(256 * share))
    od[band] = layers * np.where(tissue[band][..., None], od[band], mean)
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def washed_out(tile: np.ndarray, keep: float = 0.2) -> np.ndarray:
    """Tissue bleached by glare or faint staining: only ``keep`` of its contrast with white is left."""
    return np.rint(255 - keep * (255 - tile.astype(np.float32))).astype(np.uint8)


def test_clean_tissue_is_kept(real_tiles):
    clean = real_tiles + [(perturb_stain(t, s), f) for s in RESTAINS for t, f in real_tiles]
    assert len(real_tiles) >= 140
    dropped = [v for v in verdicts(clean) if v != PASS]
    assert len(dropped) <= 0.02 * len(clean), f"{len(dropped)} of {len(clean)} clean tiles dropped: {dropped}"


@pytest.mark.parametrize("ink", sorted(INKS))
def test_pen_strokes_are_dropped_in_every_ink(real_tiles, ink):
    rng = np.random.default_rng(sorted(INKS).index(ink))
    marked = [(pen_stroke(t, INKS[ink], rng), f) for t, f in real_tiles]
    check_dropped(verdicts(marked), "pen", named=0.95)


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_blurred_tiles_are_dropped(real_tiles, sigma):
    import cv2

    blurred = [(cv2.GaussianBlur(t, (0, 0), sigma), f) for t, f in real_tiles]
    check_dropped(verdicts(blurred), "blur", named=0.95)


def test_folds_are_dropped(real_tiles):
    check_dropped(verdicts([(fold(t), f) for t, f in real_tiles]), "fold", named=0.8)


def test_washed_out_tissue_is_dropped(real_tiles):
    check_dropped(verdicts([(washed_out(t), f) for t, f in real_tiles]), "glare", named=0.95)


def test_each_check_follows_its_threshold(real_tiles):
    tile, fraction = real_tiles[0]
    measured = assess_tile(tile, fraction, QC)
    assert measured.kept and measured.qc_sharpness > QC.blur_laplacian_var
    stricter = TileQCConfig(blur_laplacian_var=measured.qc_sharpness + 1)
    assert assess_tile(tile, fraction, stricter).qc == "blur"
    assert assess_tile(washed_out(tile), fraction, TileQCConfig(enabled=False)).qc == PASS

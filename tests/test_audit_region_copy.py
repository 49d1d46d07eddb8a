"""Region-level copy detection (issue 17) on real H&E tiles: geometry, mirror images, tile sizes, determinism, the
pixel check, and the audit with the detector switched off (the old detector, which misses these copies)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixcell_fed.audit import keypoints as kp
from pixcell_fed.audit import region_copy as rc
from pixcell_fed.audit.pixel_confirm import aligned_region
from pixcell_fed.audit.run import run_audit
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.testing.audit_tiles import (REGION_COPY_TRANSFORMS, Plant, plant_region_copies, slide_pixels,
                                             stripe_tiles, write_tiles)

CFG = AuditConfig()


@pytest.fixture(scope="module")
def tiles():
    reals, _ = stripe_tiles(2)
    news, _ = stripe_tiles(0)
    return reals, news


def _best(synthetic: np.ndarray, real: np.ndarray) -> rc.RegionMatch | None:
    """The better of the direct and the mirrored verification of one pair of RGB tiles."""
    s, r = kp.work_image(synthetic), kp.work_image(real)
    found = [rc.match_pair(s, kp.detect(s), r, kp.detect(r), mirrored=m, min_inliers=CFG.region_copy_min_inliers,
                           correlation=CFG.region_copy_correlation) for m in (False, True)]
    found = [f for f in found if f is not None]
    return max(found, key=lambda f: f.fraction) if found else None


def test_mirrored_descriptors_are_a_permutation_of_the_originals(tiles):
    work = kp.work_image(tiles[0][3])
    direct, flipped = kp.detect(work), kp.detect(np.ascontiguousarray(work[:, ::-1]))
    predicted = kp.mirrored(direct)
    pairs = []
    for i, (x, y) in enumerate(predicted.xy):   # the same blob found on the mirrored image, half a pixel apart at most
        d = np.hypot(flipped.xy[:, 0] - (x - 0.5), flipped.xy[:, 1] - y)
        j = int(np.argmin(d))
        if d[j] < 0.3:
            pairs.append((i, j))
    assert len(pairs) >= 0.8 * len(direct)
    err_perm = np.mean([np.abs(predicted.desc[i].astype(int) - flipped.desc[j]).mean() for i, j in pairs])
    err_none = np.mean([np.abs(direct.desc[i].astype(int) - flipped.desc[j]).mean() for i, j in pairs])
    assert err_perm < 0.35 * err_none, (err_perm, err_none)


def test_a_rotated_mirrored_half_copy_is_found_with_its_geometry(tiles):
    import cv2

    reals, news = tiles
    rng = np.random.default_rng(0)
    half = REGION_COPY_TRANSFORMS["half_tile"](Plant(reals[10], (), news[5]), rng)
    matrix = cv2.getRotationMatrix2D((128, 128), 30, 1.0)
    copy = cv2.warpAffine(half, matrix, (256, 256), borderMode=cv2.BORDER_REFLECT_101)[:, ::-1]
    found = _best(copy, reals[10])
    assert found is not None and found.mirrored
    assert abs(abs(found.angle) - 30) < 3 and abs(found.scale - 1.0) < 0.05
    assert 0.3 <= found.fraction <= 0.56   # half of the tile, less what the rotation turned out of it
    assert found.fraction >= rc.flag_threshold(CFG.region_copy_min_fraction)


@pytest.mark.parametrize("kind, scale, fraction",
                         [("shrink80", 1.25, (0.45, 0.65)), ("crop70_resize", 0.7, (0.7, 1.0))])
def test_the_scale_of_a_rescaled_copy_is_recovered(tiles, kind, scale, fraction):
    reals, news = tiles
    copy = plant_region_copies(kind, reals[20:21], news[7:8], np.random.default_rng(1))[0]
    found = _best(copy, reals[20])
    assert found is not None and not found.mirrored
    assert abs(found.scale - scale) < 0.05 and fraction[0] <= found.fraction <= fraction[1]


def test_blank_tiles_have_no_keypoints_and_no_match(tiles):
    blank = np.full((3, kp.WORK_SIDE, kp.WORK_SIDE), 236, np.uint8)
    assert all(len(kp.detect(w)) == 0 for w in blank)
    index = rc.RealIndex.build(np.stack([kp.work_image(t) for t in tiles[0][:12]]), seed=0)
    found = rc.find_region_copies(blank, index, candidates=5, min_inliers=6, correlation=0.6)
    assert not found.fraction.any() and found.matches == [None] * 3
    empty_index = rc.RealIndex.build(blank, seed=0)   # real tiles without any structure: nothing to match
    assert empty_index.vocabulary is None
    assert not rc.find_region_copies(np.stack([kp.work_image(t) for t in tiles[0][:3]]), empty_index, candidates=5,
                                     min_inliers=6, correlation=0.6).fraction.any()


def test_1024_px_tiles_are_judged_at_the_same_share_of_their_area():
    pixels = slide_pixels()
    real = np.array(pixels[1920:2944, 704:1728])   # the slide's two most tissue-rich disjoint 1024 px tiles
    other = np.array(pixels[896:1920, 832:1856])
    mosaic = other.copy()
    mosaic[512:, :512] = real[128:640, 384:896]    # a quarter of the tile, from elsewhere in the real tile
    found = _best(mosaic, real)
    assert found is not None and 0.2 <= found.fraction <= 0.26
    assert abs(found.scale - 1.0) < 0.03 and abs(found.angle) < 2
    assert found.fraction >= rc.flag_threshold(CFG.region_copy_min_fraction)
    assert _best(other, real) is None


def test_detection_is_deterministic(tiles):
    reals, news = tiles
    queries = plant_region_copies("quadrant_mosaic", reals[:30], news, np.random.default_rng(3), n=12)
    works = np.stack([kp.work_image(t) for t in queries])
    runs = []
    for _ in range(2):
        index = rc.RealIndex.build(np.stack([kp.work_image(t) for t in reals[:30]]), seed=5)
        runs.append(rc.find_region_copies(works, index, candidates=5, min_inliers=6, correlation=0.6))
    assert np.array_equal(runs[0].fraction, runs[1].fraction)
    assert [m and m.real for m in runs[0].matches] == [m and m.real for m in runs[1].matches]
    assert (runs[0].fraction >= rc.flag_threshold(0.25)).all()


def test_unrelated_tissue_leaves_no_region_even_when_forced_into_alignment(tiles):
    reals, news = tiles
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    scores = [aligned_region(kp.work_image(n), kp.work_image(r), identity, threshold=CFG.region_copy_correlation)
              for n, r in zip(news[:40], reals[:40])]
    assert max(s.fraction for s in scores) < 0.05
    same = aligned_region(kp.work_image(reals[0]), kp.work_image(reals[0]), identity, threshold=0.6)
    assert same.fraction > 0.7 and same.correlation > 0.95


def test_region_pair_drawing_outlines_the_region_on_both_tiles(tiles):
    reals, news = tiles
    copy = plant_region_copies("half_tile", reals[4:5], news[2:3], np.random.default_rng(2))[0]
    found = _best(copy, reals[4])
    assert found is not None
    evidence = {"real": "x", **found.to_dict()}
    a, b, c = rc.draw_region_pair(copy, reals[4], evidence, side=128)
    for img in (a, b, c):
        assert img.shape == (128, 128, 3)
        assert ((img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 255)).sum() > 50   # magenta outline
    # The aligned real tile shows the copied half where the synthetic tile has it.
    inside = np.zeros((128, 128), np.uint8)
    import cv2

    cv2.fillConvexPoly(inside, np.round(np.asarray(found.outline_synthetic) * 128).astype(np.int32), 1)
    inner = cv2.erode(inside, np.ones((9, 9), np.uint8)).astype(bool)
    syn = cv2.resize(copy, (128, 128), interpolation=cv2.INTER_AREA).astype(float)
    diff = np.abs(syn - c.astype(float)).mean(axis=2)
    assert diff[inner].mean() < 12


def test_the_old_detector_misses_region_copies_that_the_region_detector_flags(tmp_path, tiles):
    reals, news = tiles
    rng = np.random.default_rng(11)
    t_paths = write_tiles(tmp_path / "T", reals[:40], "ref")
    h_paths = write_tiles(tmp_path / "H", stripe_tiles(1)[0][:40], "hold")
    kinds = ("half_tile", "rotate30", "quadrant_mosaic", "crop70_resize")
    copies = np.concatenate([plant_region_copies(k, reals[:40], news, rng, n=5) for k in kinds])
    s_paths = write_tiles(tmp_path / "S", news[40:60], "new") + write_tiles(tmp_path / "S", copies, "copy")
    flagged = {}
    for on in (False, True):
        result = run_audit(s_paths, t_paths, h_paths, audit_cfg=AuditConfig(region_copy=on, drop_flagged=False),
                           out_dir=tmp_path / f"out-{on}")
        tiles_ = {t["file"]: t for t in result.report["tiles"]}
        flagged[on] = [("copy" in tiles_[str(p)]["reasons"]) for p in s_paths]
    assert sum(flagged[True][20:]) == len(copies) and not any(flagged[True][:20])
    assert sum(flagged[False][20:]) <= len(copies) // 4   # the whole-tile detector sees few of them
    copy_test = next(t for t in result.tests if t.name == "copy_detection")
    assert copy_test.statistic["region_copies"] >= len(copies) - sum(flagged[False][20:])
    assert f"{copy_test.statistic['region_copies']} of them because a region" in copy_test.sentence
    _region_evidence_stays_on_site(result)


def _region_evidence_stays_on_site(result) -> None:
    """The on-site report has the evidence of every region copy; neither shareable file has any of it."""
    on_site = [t["region_copy"] for t in result.report["tiles"] if t["region_copy"]]
    assert on_site and all({"real", "outline_synthetic", "transform"} <= set(r) for r in on_site)
    assert any(p["region"] for p in result.report["closest_pairs"])
    summary = json.loads(result.summary_path.read_text())
    assert all(set(t) == {"sha256", "kept", "flagged", "reasons", "nearest_similarity"} for t in summary["tiles"])
    assert "closest_pairs" not in summary
    for text in (result.summary_path.read_text(), result.summary_page_path.read_text()):
        for evidence in ("outline_", '"transform"', '"mirrored"', "ref00", "copy00"):
            assert evidence not in text, evidence


@pytest.mark.parametrize("key, value", [("region_copy_min_fraction", 0.0), ("region_copy_min_fraction", 1.5),
                                        ("region_copy_candidates", 0), ("region_copy_min_inliers", 2),
                                        ("region_copy_correlation", 1.0)])
def test_bad_region_copy_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"audit.{key}"):
        AuditConfig(**{key: value})

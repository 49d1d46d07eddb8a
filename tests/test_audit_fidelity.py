"""Fidelity figures (pixcell_fed.audit.fidelity_metrics): Fréchet distance against closed forms, precision/recall and
density/coverage against hand-computed cases and a brute-force reference, and the figures on real H&E tiles."""

from __future__ import annotations

import numpy as np
import pytest

from pixcell_fed.audit import fidelity_metrics as F


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --------------------------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))  # 7.25 + 4 + 1 + 0
    assert F.gaussian_frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(12.25)


def test_frechet_distance_of_general_gaussians_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(3)
    for d in (2, 5, 12):
        c1, c2 = _random_spd(d, rng), _random_spd(d, rng)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        root = sqrtm(c1)
        reference = float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
                          - 2 * np.trace(sqrtm(root @ c2 @ root)).real)
        assert F.gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(reference, rel=1e-9)
        assert F.gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(
            F.gaussian_frechet_distance(mu2, c2, mu1, c1), rel=1e-9)


def test_frechet_distance_of_samples_converges_to_the_closed_form_of_their_gaussians():
    rng = np.random.default_rng(0)
    d = 4
    c1, c2 = _random_spd(d, rng), _random_spd(d, rng)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    truth = F.gaussian_frechet_distance(mu1, c1, mu2, c2)
    a = rng.multivariate_normal(mu1, c1, size=100_000)
    b = rng.multivariate_normal(mu2, c2, size=100_000)
    assert truth > 0.5
    assert F.frechet_distance(a, b) == pytest.approx(truth, rel=0.02)
    assert F.frechet_distance(a[:50_000], a[50_000:]) < 0.01 * truth  # two samples of one Gaussian: near 0


def test_rank_deficient_covariances_more_dimensions_than_tiles():
    """20 tiles in 64 dimensions: the covariances have rank 19. FD(X, X) is exactly 0, FD is symmetric, and the
    factor from the centred rows gives the same distance as the d x d eigen-factor of the singular covariance."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 64)) * rng.uniform(0.1, 3.0, size=64)
    y = rng.normal(loc=0.3, size=(25, 64))
    mx = F.moments(x)
    assert mx.factor.shape == (64, 20)  # no 64 x 64 matrix was formed
    assert F.frechet_from_moments(mx, mx) <= 1e-9 * mx.trace
    assert F.frechet_distance(x, y) == pytest.approx(F.frechet_distance(y, x), rel=1e-8)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert np.linalg.matrix_rank(cov_x) == 19
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(cov_x)  # the d x d route must fall back to the eigendecomposition
    full = F.frechet_from_moments(F.Moments(x.mean(0), F.covariance_factor(cov_x)),
                                  F.Moments(y.mean(0), F.covariance_factor(cov_y)))
    assert F.frechet_distance(x, y) == pytest.approx(full, rel=1e-8)


def test_counted_moments_equal_the_moments_of_the_materialised_resample():
    rng = np.random.default_rng(2)
    for n, d in ((30, 8), (12, 40)):
        x = rng.normal(size=(n, d))
        counts = rng.multinomial(n, np.full(n, 1 / n))
        resample = np.repeat(x, counts, axis=0)
        a, b = F.moments(x, counts), F.moments(resample)
        assert np.allclose(a.mean, b.mean)
        assert np.allclose(a.factor @ a.factor.T, b.factor @ b.factor.T)
        y = rng.normal(size=(n, d))
        assert F.frechet_from_moments(a, F.moments(y)) == pytest.approx(F.frechet_distance(resample, y), rel=1e-9)


# ------------------------------------------------------------------------------- precision, recall, density, coverage

T_LINE = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 30.0, 31.0])[:, None]
S_LINE = np.array([0.5, 2.5, 4.0, 11.0, 12.0])[:, None]


def test_manifold_figures_of_a_hand_computed_case():
    """k = 1 on a line. Radii (nearest other tile) of T: 1, 1, 1, 1, 7, 1, 1; of S: 2, 1.5, 1.5, 1, 1.
    Precision: every s lies in a T ball (4 on the edge of 3's ball, 12 in 10's) = 1. Density: balls per s
    2 (0, 1), 2 (2, 3), 2 (3, 10), 1 (10), 1 (10) = 8 / 5. Coverage: balls of 0, 1, 2, 3, 10 hold an s; those of
    30 and 31 do not = 5 / 7. Recall: 0, 1, 2, 3 and 10 (on the edge of 11's ball) lie in S balls, 30 and 31 do
    not = 5 / 7."""
    assert np.allclose(F.kth_neighbour_radii(T_LINE, 1), [1, 1, 1, 1, 7, 1, 1])
    assert np.allclose(F.kth_neighbour_radii(S_LINE, 1), [2, 1.5, 1.5, 1, 1])
    assert F.precision_recall(T_LINE, S_LINE, k=1) == pytest.approx((1.0, 5 / 7))
    assert F.density_coverage(T_LINE, S_LINE, k=1) == pytest.approx((8 / 5, 5 / 7))


def test_manifold_figures_with_k2_and_an_outlier():
    """k = 2. T = 0, 1, 2, 3, 10: radii 2, 1, 1, 2, 8. S = 0.5, 1.5, 50: radii 1, 48.5, 49.
    Precision: 0.5 and 1.5 lie in T balls, 50 in none = 2/3. Density: 0.5 in the balls of 0, 1, 2 (1.5 > 1: no),
    3 (2.5 > 2: no) -> 0, 1 = 2; 1.5 in 0, 1, 2, 3 (1.5 <= 2) = 4; 50: 0 -> 6 / (2 x 3) = 1. Coverage: balls of
    0, 1, 2, 3 hold an s, 10's (8) does not = 4/5. Recall: the outlier's ball (radius 49) holds all of T = 1."""
    t = np.array([0.0, 1.0, 2.0, 3.0, 10.0])[:, None]
    s = np.array([0.5, 1.5, 50.0])[:, None]
    assert np.allclose(F.kth_neighbour_radii(t, 2), [2, 1, 1, 2, 8])
    assert F.precision_recall(t, s, k=2) == pytest.approx((2 / 3, 1.0))
    assert F.density_coverage(t, s, k=2) == pytest.approx((1.0, 0.8))


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float, float]:
    """The four figures straight from their definitions on full distance matrices (independent of the library)."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    rr, ff, rf = dist(real, real), dist(fake, fake), dist(real, fake)
    r_real = np.sort(rr, axis=1)[:, k]  # column 0 is the tile itself
    r_fake = np.sort(ff, axis=1)[:, k]
    inside = rf <= r_real[:, None]                       # [real ball i, fake j]
    precision = inside.any(axis=0).mean()
    recall = (rf <= r_fake[None, :]).any(axis=1).mean()  # real i inside some fake ball j
    density = inside.sum() / (k * len(fake))
    coverage = inside.any(axis=1).mean()
    return precision, recall, density, coverage


@pytest.mark.parametrize("n_real,n_fake,d", [(40, 30, 2), (300, 250, 16), (90, 60, 700)])
def test_manifold_figures_match_a_brute_force_reference(n_real, n_fake, d):
    rng = np.random.default_rng(n_real + d)
    real = rng.normal(size=(n_real, d)).astype(np.float32)
    fake = (rng.normal(size=(n_fake, d)) * (1.3 if d < 100 else 1.02) + 0.2 / np.sqrt(d)).astype(np.float32)
    expected = _brute_force(real.astype(np.float64), fake.astype(np.float64), 5)
    assert F.precision_recall(real, fake) + F.density_coverage(real, fake) == pytest.approx(
        (expected[0], expected[1], expected[2], expected[3]), abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[3] < 1  # a case where neither figure is trivially 0 or 1


def test_ball_counts_decide_ties_on_the_edge_exactly():
    """Points exactly on a ball's edge count (closed balls), even where float32 products would round across it."""
    centre = np.array([[1e3, 1e3, 1e3]])
    on_edge = centre + np.array([[0.1, 0.2, 0.2]])       # distance exactly 0.3 in float64 arithmetic below
    radius = np.sqrt(np.sum((on_edge - centre) ** 2, axis=1))
    per_point, per_centre = F.ball_counts(on_edge, centre, radius)
    assert per_point.tolist() == [1] and per_centre.tolist() == [1]
    per_point, _ = F.ball_counts(on_edge, centre, np.nextafter(radius, 0))
    assert per_point.tolist() == [0]


# ----------------------------------------------------------------------------------------------- the whole block

def test_fidelity_figures_are_json_seeded_and_handle_small_sets():
    import json

    rng = np.random.default_rng(4)
    t, h, s = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)), rng.normal(loc=2.0, size=(50, 6))
    a = F.fidelity_figures(s, t, h, fd_bootstrap=20, count_bootstrap=50)
    assert a == F.fidelity_figures(s, t, h, fd_bootstrap=20, count_bootstrap=50)  # seeded: identical
    json.dumps(a, allow_nan=False)
    assert a["sizes"] == {"S": 50, "T": 40, "H": 30, "compared": 30} and a["not_computed"] == []
    ratio = a["fd"]["ratio"]
    assert ratio["value"] > 3 and ratio["low"] <= ratio["value"] <= ratio["high"]
    assert a["coverage"]["S"]["value"] < a["coverage"]["H"]["value"]
    tiny = F.fidelity_figures(s[:4], t, h[:4], fd_bootstrap=5, count_bootstrap=5)
    assert tiny["fd"] is not None and tiny["precision"] is None and len(tiny["not_computed"]) == 1
    assert F.fidelity_figures(s[:1], t, h, fd_bootstrap=5, count_bootstrap=5)["fd"] is None


def test_fd_ratio_warns_only_when_significantly_above_the_threshold():
    figures = {"fd": {"ratio": {"value": 2.0, "low": 1.6, "high": 2.5}}}
    assert F.fd_ratio_status(figures, None) == "N/A"
    assert F.fd_ratio_status(figures, 1.5) == "WARN"
    assert F.fd_ratio_status(figures, 1.8) == "PASS"  # above in value, but its interval reaches below
    assert F.fd_ratio_status({"fd": None}, 1.5) == "N/A"


# -------------------------------------------------------------------------------------------------- real tiles

@pytest.fixture(scope="module")
def real_space(tmp_path_factory):
    """Non-overlapping 64 px tissue tiles of the real CMU slide in the space of a ``timm:resnet18`` encoder (random
    weights, loaded by the encoder registry from a folder), split by region: the left half stands for the
    conditioning slides (T), the right half for slides never used for conditioning (H)."""
    import json

    import openslide
    import timm
    import torch
    from safetensors.torch import save_file

    from pixcell_fed.encoders import load_encoder
    from pixcell_fed.testing.real_slide import real_slide_path

    folder = tmp_path_factory.mktemp("resnet18")
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": {"input_size": [3, 64, 64]}}))
    encoder = load_encoder("timm:resnet18", folder)
    with openslide.OpenSlide(str(real_slide_path())) as slide:
        width, height = slide.dimensions
        region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    tiles, left = [], []
    for y in range(0, height - 64, 64):
        for x in range(0, width - 64, 64):
            tile = region[y:y + 64, x:x + 64]
            if (tile.mean(axis=2) < 220).mean() >= 0.5:
                tiles.append(tile)
                left.append(x < width / 2)
    return encoder, encoder.embed(np.stack(tiles)), np.array(left)


def test_real_tiles_standing_in_for_synthetic_give_a_ratio_near_one(real_space):
    """S is real tissue of H's region, H's slides "resampled as if they were S": over random splits of that region
    into S and H, FD(S, T) / FD(H, T) centres on 1, its interval holds 1 in most splits (the splits are not
    independent samples: a partition makes S far where H is near), and precision and coverage are H's."""
    _, emb, left = real_space
    t, region = emb[left], emb[~left]
    ratios, holds_one = [], 0
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(len(region))
        h, s = region[order[0::2]], region[order[1::2]]
        figures = F.fidelity_figures(s, t, h, fd_bootstrap=50, count_bootstrap=200)
        ratio = figures["fd"]["ratio"]
        assert figures["fd"]["H->T"]["value"] > 0.2  # a floor well above rounding: the two regions differ
        assert 0.4 < ratio["value"] < 2.5, ratio
        ratios.append(ratio["value"])
        holds_one += ratio["low"] < 1.0 < ratio["high"]
        for name in ("precision", "coverage", "density", "recall"):
            assert abs(figures[name]["S"]["value"] - figures[name]["H"]["value"]) < 0.2, (name, figures[name])
    assert 0.8 < float(np.median(ratios)) < 1.25, ratios
    assert holds_one >= 4, ratios


def test_noise_tiles_give_a_ratio_far_above_one(real_space):
    encoder, emb, left = real_space
    noise = np.random.default_rng(1).integers(0, 256, size=(int((~left).sum()) // 2, 64, 64, 3), dtype=np.uint8)
    figures = F.fidelity_figures(encoder.embed(noise), emb[left], emb[~left][0::2], fd_bootstrap=50)
    assert figures["fd"]["ratio"]["low"] > 3, figures["fd"]
    assert figures["precision"]["S"]["value"] == 0.0 and figures["coverage"]["S"]["value"] == 0.0
    assert figures["coverage"]["H"]["value"] > 0.5 and figures["precision"]["H"]["value"] > 0.5
    assert F.fd_ratio_status(figures, 1.5) == "WARN"

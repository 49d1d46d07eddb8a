"""The dp-conditioning benchmark's local fidelity helper: Frechet distance and k-NN precision/recall."""

import numpy as np
import pytest

from benchmarks.dp_conditioning import frechet_distance, precision_recall


def test_frechet_distance_matches_the_closed_form_between_two_gaussians():
    # N(0, I) against N(m, 4 I) in d dimensions: |m|^2 + tr(I + 4I - 2 (4I)^1/2) = |m|^2 + d
    rng = np.random.default_rng(0)
    d, n = 8, 200_000
    m = np.full(d, 0.5)
    x = rng.standard_normal((n, d))
    y = m + 2.0 * rng.standard_normal((n, d))
    assert frechet_distance(x, y) == pytest.approx(d * 0.25 + d, rel=0.01)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_is_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 3.0
    fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 64 * 9 * 0.9  # dominated by the mean shift |m|^2 = 576
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-4)  # rounding only (traces are about 64)


def test_precision_and_recall_on_hand_made_sets():
    real = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert precision_recall(real, real, k=1) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far, k=1) == (0.0, 0.0)
    # one fake sample inside the real manifold, one far away; the fake manifold's radii are huge, covering all
    fake = np.array([[0.5, 0.5], [50.0, 50.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)

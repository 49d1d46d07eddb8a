"""Conditioning privacy modes: clipping, secure noise, mixing within one slide and label, and the signed claim."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from pixcell_fed.bundle.shareable import check_shareable_value
from pixcell_fed.privacy import gaussian_mechanism as gm
from pixcell_fed.privacy.conditioning import (ClaimError, ConditioningClaim, clip_tiles, dp_claim, exact_claim,
                                              mix_within_groups, mixed_claim, privatize, secure_standard_normal)


def claim(**overrides) -> ConditioningClaim:
    settings = {"epsilon": 8.0, "delta": 1e-5, "clip_norm": 2.0, "vectors_per_tile": 1, "slide_tiles": 9,
                "slide_tiles_capped": True, **overrides}
    return dp_claim(**settings)


def test_clipping_bounds_each_tiles_norm_and_keeps_small_ones():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 1, 32)) * rng.uniform(0.1, 3.0, size=(50, 1, 1))
    clipped, was = clip_tiles(x, 2.0)
    norms_in = np.linalg.norm(x.reshape(50, -1), axis=1)
    norms_out = np.linalg.norm(clipped.reshape(50, -1), axis=1)
    assert np.all(norms_out <= 2.0 + 1e-12) and was.tolist() == (norms_in > 2.0).tolist()
    assert np.allclose(clipped[~was], x[~was])  # within the norm: untouched
    cos = (clipped.reshape(50, -1) * x.reshape(50, -1)).sum(1) / (norms_in * norms_out)
    assert np.allclose(cos, 1.0)  # clipping only rescales
    assert np.allclose(norms_out[was], 2.0)


def test_a_1024_px_tile_is_clipped_as_one_vector_of_its_16_embeddings():
    # one sub-tile embedding alone is longer than C / 4, but the concatenation is within C: nothing changes
    x = np.zeros((1, 16, 8))
    x[0, 0, 0] = 1.5
    x[0, 1:, 0] = 0.1
    clipped, was = clip_tiles(x, 2.0)
    assert not was[0] and np.allclose(clipped, x)
    big = np.ones((2, 16, 8))  # norm sqrt(128) per tile: both scaled to 2.0 as a whole
    clipped, was = clip_tiles(big, 2.0)
    assert was.all() and np.allclose(np.linalg.norm(clipped.reshape(2, -1), axis=1), 2.0)
    assert np.allclose(clipped[0], clipped[0, 0, 0])  # every sub-vector scaled by the same factor


def test_privatized_embeddings_are_clipped_plus_noise_of_the_calibrated_sigma():
    c = claim(clip_norm=1.0)
    x = np.random.default_rng(1).standard_normal((400, 1, 64)).astype(np.float32) * 5
    noisy, n_clipped = privatize(x, c)
    assert noisy.dtype == np.float32 and noisy.shape == x.shape and n_clipped == 400
    residual = noisy.astype(np.float64) - clip_tiles(x, 1.0)[0]
    n = residual.size
    assert abs(residual.mean()) < 5 * c.sigma / math.sqrt(n)
    assert abs(residual.std() / c.sigma - 1) < 5 / math.sqrt(2 * n)


def test_noise_is_not_reproducible_from_any_seed():
    c = claim()
    x = np.zeros((4, 1, 16), dtype=np.float32)
    draws = []
    for _ in range(2):  # the same seeds everywhere a run or a coordinator could set one
        np.random.seed(0)
        random.seed(0)
        import torch

        torch.manual_seed(0)
        draws.append(privatize(x, c)[0])
    assert not np.allclose(draws[0], draws[1])
    assert np.abs(draws[0] - draws[1]).min() > 0  # every coordinate differs


def test_secure_normal_samples_are_standard_normal():
    z = secure_standard_normal((200_001,))
    n = z.size
    assert z.shape == (200_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(z ** 3)) < 5 * math.sqrt(15 / n)  # symmetric
    assert abs(np.mean(z ** 4) - 3) < 5 * math.sqrt(96 / n)  # Gaussian tails, not uniform or Laplace


def test_mixed_draws_only_within_one_slide_and_label():
    rng = np.random.default_rng(3)
    groups = [("slide-1", "tumour")] * 7 + [("slide-2", "tumour")] * 5 + [("slide-3", "normal")] * 2 + [("slide-4", "normal")]
    x = rng.standard_normal((len(groups), 1, 8)).astype(np.float32)
    mixed, used = mix_within_groups(x, groups, 4, np.random.default_rng(0))
    for i, rows in enumerate(used):
        assert rows[0] == i and len(set(rows.tolist())) == len(rows)
        assert {groups[j] for j in rows} == {groups[i]}
        assert len(rows) == min(4, groups.count(groups[i]))
        assert np.allclose(mixed[i], x[rows].mean(axis=0), atol=1e-6)
    assert np.allclose(mixed[-1], x[-1])  # a slide with one tile cannot be mixed: it says so by using only itself
    again, used_again = mix_within_groups(x, groups, 4, np.random.default_rng(0))
    assert np.array_equal(again, mixed)  # reproducible from the run's seed (a heuristic needs no secret noise)


def test_per_slide_guarantee_is_the_exact_group_bound():
    c = claim(slide_tiles=9)
    assert c.sensitivity == 4.0 and c.sigma == pytest.approx(gm.calibrate_sigma(8.0, 1e-5, 4.0))
    assert c.slide_epsilon == pytest.approx(gm.epsilon_for(1e-5, 3 * c.tile_mu))
    assert c.tile_epsilon < c.slide_epsilon < 9 * c.tile_epsilon  # tighter than k * epsilon composition
    assert claim(slide_tiles=1).slide_epsilon == pytest.approx(8.0, rel=1e-8)


@pytest.mark.parametrize("c", [exact_claim(), mixed_claim(4), claim(), claim(vectors_per_tile=16, slide_tiles_capped=False)],
                         ids=["exact", "mixed", "dp", "dp-1024"])
def test_claim_round_trips_through_json_and_is_shareable(c):
    record = json.loads(json.dumps(c.to_record()))
    assert ConditioningClaim.from_record(record) == c
    check_shareable_value(record, "conditioning")  # may ship in the audit summary and bundle.json
    assert record["statement"] == c.statement()
    if c.mode == "dp":
        assert f"epsilon = {c.tile_epsilon:.3g}" in record["statement"]
        assert f"epsilon = {c.slide_epsilon:.3g}" in record["statement"]


@pytest.mark.parametrize("edit,reason", [
    (lambda r: r.update(tile_epsilon=2.0), "understates"),
    (lambda r: r.update(slide_epsilon=r["tile_epsilon"]), "understates"),
    (lambda r: r.update(sigma=r["sigma"] / 2, tile_mu=r["tile_mu"] * 2, slide_mu=r["slide_mu"] * 2), "understates"),
    (lambda r: r.update(slide_tiles=1), "slide_mu"),
    (lambda r: r.update(sensitivity=r["clip_norm"]), "twice the clip norm"),
    (lambda r: r.update(slide_delta=1e-3), "same per tile and per slide"),
    (lambda r: r.update(statement="Differential privacy: epsilon = 0.1"), "text"),
    (lambda r: r.update(mode="dp+"), "not one of"),
    (lambda r: r.update(extra=1), "keys"),
    (lambda r: r.pop("not_covered"), "keys"),
    (lambda r: r.update(tile_delta=float("nan")), "positive finite"),
])
def test_a_claim_that_does_not_follow_from_its_mechanism_is_refused(edit, reason):
    record = claim().to_record()
    edit(record)
    with pytest.raises(ClaimError, match=reason):
        ConditioningClaim.from_record(record)

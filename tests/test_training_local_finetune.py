"""The local fine-tune's pure parts: metrics from confusion matrices, the paired bootstrap of a difference, the
stratified sample of training tiles, and the fine-tune's budget."""

from __future__ import annotations

import numpy as np
import pytest

from pixcell_fed.federation.evaluation import classification_metrics
from pixcell_fed.training import local_finetune as L


def test_metrics_match_the_evaluation_metrics_including_absent_and_extra_classes():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d"]
    for _ in range(30):
        n = int(rng.integers(1, 40))
        truth = rng.integers(0, 3, n)  # class 3 is never true but can be predicted
        pred = rng.integers(0, 4, n)
        expected = classification_metrics([names[t] for t in truth], [names[p] for p in pred])
        got = L.metrics_of(truth, pred, 4)
        for key in L.METRICS:
            assert got[key] == pytest.approx(expected[key], abs=1e-12)


def test_paired_difference_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(1)
    truth, pred = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    out = L.paired_difference(truth, pred, pred, 2, bootstrap=200, seed=0)
    for key in L.METRICS:
        assert out["difference"][key] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert out["n"] == 50


def test_paired_difference_interval_is_seeded_and_separates_a_clearly_better_model():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, 200)
    good = np.where(rng.random(200) < 0.9, truth, 1 - truth)
    coin = rng.integers(0, 2, 200)
    out = L.paired_difference(truth, good, coin, 2, bootstrap=500, seed=3)
    assert out == L.paired_difference(truth, good, coin, 2, bootstrap=500, seed=3)
    d = out["difference"]["accuracy"]
    assert d["value"] == pytest.approx(out["a"]["accuracy"] - out["b"]["accuracy"])
    assert 0.25 < d["low"] < d["value"] < d["high"] < 0.6
    # the interval is paired: resampling a and b together, not separately (a, b share each resampled tile)
    a_only = L.paired_difference(truth, good, good, 2, bootstrap=500, seed=3)["difference"]["accuracy"]
    assert a_only["high"] - a_only["low"] == 0.0


def test_stratified_sample_keeps_label_shares_and_is_seeded(tmp_path):
    items = [(tmp_path / f"{lab}{i}.png", lab) for lab, n in (("x", 70), ("y", 25), ("z", 5)) for i in range(n)]
    sample = L.stratified_sample(items, 20, seed=4)
    counts = {lab: sum(1 for _, l in sample if l == lab) for lab in "xyz"}
    assert len(sample) == 20 and counts == {"x": 14, "y": 5, "z": 1}
    assert sample == L.stratified_sample(items, 20, seed=4) and sample != L.stratified_sample(items, 20, seed=5)
    assert L.stratified_sample(items, 500, seed=4) == sorted(items, key=lambda it: (it[1], str(it[0])))


def test_finetune_takes_exactly_the_recipes_steps(tmp_path):
    import torch

    from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles, write_labelled_folder
    from pixcell_fed.training.data import labelled_folder
    from pixcell_fed.training.models import ModelSpec, build_model

    items = labelled_folder(write_labelled_folder(tmp_path, real_labelled_tiles(10, size=32, seed=1)))
    spec = ModelSpec(arch=TINY_VIT["arch"], classes=("dense", "sparse"), img_size=32, kwargs=TINY_VIT["kwargs"])
    model = build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = L.finetune(model, items, spec.classes, spec, L.FinetuneRecipe(epochs=3, batch_size=4, lr=1e-3))
    assert steps == 3 * 3  # ceil(10 / 4) batches per epoch
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    probe = build_model(spec)
    head_before = {k: v.clone() for k, v in probe.state_dict().items()}
    L.finetune(probe, items, spec.classes, spec, L.FinetuneRecipe(epochs=1, batch_size=4, lr=1e-3, mode="linear_probe"))
    changed = {k for k, v in probe.state_dict().items() if not torch.equal(v, head_before[k])}
    assert changed and all(k.startswith("head.") for k in changed)

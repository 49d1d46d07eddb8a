"""The ssl recipe (SimCLR with lightly) on real-pixel tiles, and its k-NN evaluation at a site."""

from __future__ import annotations

import numpy as np
import torch

from pixcell_fed.federation.evaluation import evaluate_model
from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles, write_labelled_folder
from pixcell_fed.training.data import labelled_folder, load_arrays
from pixcell_fed.training.models import build_model, load_checkpoint
from pixcell_fed.training.ssl import SSLConfig, train_ssl


def _knn_loo_by_hand(features: np.ndarray, labels: list[str], k: int) -> list[str]:
    """Leave-one-out cosine k-NN written independently of the library: majority vote, ties to the nearest."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = unit @ unit.T
    preds = []
    for i in range(len(labels)):
        order = [j for j in np.argsort(-sim[i], kind="stable") if j != i][:k]
        votes = {lab: sum(labels[j] == lab for j in order) for lab in {labels[j] for j in order}}
        best = max(votes.values())
        preds.append(next(labels[j] for j in order if votes[labels[j]] == best))
    return preds


def test_simclr_encoder_checkpoint_resume_and_knn_eval(tmp_path):
    tiles = real_labelled_tiles(24, size=32, seed=5)
    items = labelled_folder(write_labelled_folder(tmp_path / "pool", tiles[:16]))
    cfg = dict(arch=TINY_VIT["arch"], kwargs=TINY_VIT["kwargs"], img_size=32, batch_size=8, lr=1e-3)
    first = train_ssl(items, tmp_path / "enc", SSLConfig(epochs=1, **cfg))
    assert first.spec.kind == "encoder" and first.spec.num_classes == 0
    # NT-Xent over 2 x 8 views is log(2B - 1) = log(15) when a tile's two views are no closer than other tiles;
    # below it only if the views are paired right (a mismatched pairing of views stays at or above it)
    assert 0 < first.history[0]["train_loss"] < np.log(15) - 0.3 and first.history[0]["samples"] == 16
    again = train_ssl(items, tmp_path / "enc", SSLConfig(epochs=2, **cfg))
    assert [h["epoch"] for h in again.history] == [1, 2] and again.history[0] == first.history[0]
    model, spec = load_checkpoint(tmp_path / "enc")
    torch.manual_seed(0)  # the recipe's seed: the same initial weights
    init = build_model(spec)
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in model.state_dict().items())  # it trained
    feats = model(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, TINY_VIT["kwargs"]["embed_dim"])

    # the site's k-NN probe gives exactly the figures of an independent leave-one-out k-NN on the same features
    eval_items = labelled_folder(write_labelled_folder(tmp_path / "eval", tiles[16:], prefix="e"))
    metrics = evaluate_model(model.state_dict(), spec, tmp_path / "eval", knn_k=3)
    model.eval()
    with torch.no_grad():
        features = model(load_arrays(eval_items, spec)).numpy()
    truth = [lab for _, lab in eval_items]
    preds = _knn_loo_by_hand(features, truth, k=3)
    accuracy = float(np.mean([p == t for p, t in zip(preds, truth)]))
    recalls = [np.mean([p == c for p, t in zip(preds, truth) if t == c]) for c in sorted(set(truth))]
    assert metrics["probe"] == "knn_loo" and metrics["n"] == 8 and metrics["n_classes"] == 2
    assert abs(metrics["accuracy"] - accuracy) < 1e-9
    assert abs(metrics["balanced_accuracy"] - float(np.mean(recalls))) < 1e-9

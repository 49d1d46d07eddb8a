"""The ssl recipe (SimCLR with lightly) on real-pixel tiles, and its k-NN evaluation at a site."""

from __future__ import annotations

import torch

from pixcell_fed.federation.evaluation import evaluate_model
from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles, write_labelled_folder
from pixcell_fed.training.data import labelled_folder
from pixcell_fed.training.models import load_checkpoint
from pixcell_fed.training.ssl import SSLConfig, train_ssl


def test_simclr_encoder_checkpoint_resume_and_knn_eval(tmp_path):
    tiles = real_labelled_tiles(24, size=32, seed=5)
    items = labelled_folder(write_labelled_folder(tmp_path / "pool", tiles[:16]))
    cfg = dict(arch=TINY_VIT["arch"], kwargs=TINY_VIT["kwargs"], img_size=32, batch_size=8, lr=1e-3)
    first = train_ssl(items, tmp_path / "enc", SSLConfig(epochs=1, **cfg))
    assert first.history[0]["train_loss"] > 0 and first.spec["kind"] == "encoder"
    again = train_ssl(items, tmp_path / "enc", SSLConfig(epochs=2, **cfg))
    assert [h["epoch"] for h in again.history] == [1, 2] and again.history[0] == first.history[0]
    model, spec = load_checkpoint(tmp_path / "enc")
    feats = model(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, TINY_VIT["kwargs"]["embed_dim"])
    eval_dir = write_labelled_folder(tmp_path / "eval", tiles[16:], prefix="e")
    metrics = evaluate_model(model.state_dict(), spec, eval_dir, knn_k=3)
    assert metrics["probe"] == "knn_loo" and metrics["n"] == 8
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0

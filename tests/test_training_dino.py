"""The ssl recipe's DINO method (lightly's head, loss, multi-crop transform and EMA update) on real-pixel tiles with
a tiny ViT: the loss falls, the teacher is an exponential moving average of the student, the checkpoint is the
teacher, training resumes, and a site evaluates the encoder with its k-NN probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles, write_labelled_folder
from pixcell_fed.training import dino as D
from pixcell_fed.training.data import labelled_folder
from pixcell_fed.training.models import ModelSpec, load_checkpoint
from pixcell_fed.training.ssl import SSLConfig, train_ssl


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    real = real_labelled_tiles(24, size=32, seed=5)
    root = tmp_path_factory.mktemp("dino")
    return labelled_folder(write_labelled_folder(root / "pool", real[:16])), root, real[16:]


def _model(seed: int = 0):
    spec = ModelSpec(arch=TINY_VIT["arch"], img_size=32, kwargs=TINY_VIT["kwargs"], kind="encoder")
    torch.manual_seed(seed)
    backbone, local = D._training_backbone(spec, D.local_crop_size(32))
    return spec, D.DinoModel.build(backbone, 256), local


def test_local_crops_are_small_for_a_vit():
    spec, model, local = _model()
    assert D.local_crop_size(224) == 96 and local == 16 < spec.img_size
    assert model.student_backbone(torch.zeros(2, 3, 16, 16)).shape == (2, TINY_VIT["kwargs"]["embed_dim"])


def test_the_loss_falls_and_the_teacher_is_an_ema_of_the_student(tiles):
    items, _, _ = tiles
    spec, model, local = _model()
    views_set = D._Views(items, spec, local, local_views=2)
    first = views_set[0]
    assert [tuple(v.shape) for v in first] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2  # two global, two local crops
    optimizer = torch.optim.AdamW(model.trainable(), lr=1e-3, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(views_set, batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    assert all(not p.requires_grad for p in (*model.teacher_backbone.parameters(), *model.teacher_head.parameters()))
    teacher_start = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
    assert all(torch.equal(v, model.student_backbone.state_dict()[k]) for k, v in teacher_start.items())
    losses, momentum = [], 0.9
    for epoch in range(4):
        model.train()
        for views in loader:
            before = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
            head_before = {k: v.clone() for k, v in model.teacher_head.state_dict().items()}
            losses.append(D.dino_step(model, views, optimizer, momentum=momentum, epoch=epoch))
            student = model.student_backbone.state_dict()
            for name, value in model.teacher_backbone.state_dict().items():
                if value.is_floating_point():
                    assert torch.allclose(value, momentum * before[name] + (1 - momentum) * student[name], atol=1e-6)
            for name, value in model.teacher_head.state_dict().items():
                expected = momentum * head_before[name] + (1 - momentum) * model.student_head.state_dict()[name]
                assert torch.allclose(value, expected, atol=1e-6), name
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.5, losses
    moved = [not torch.equal(v, teacher_start[k]) for k, v in model.teacher_backbone.state_dict().items()]
    assert any(moved)  # the teacher followed the student ...
    differs = [not torch.allclose(v, model.student_backbone.state_dict()[k])
               for k, v in model.teacher_backbone.state_dict().items() if v.is_floating_point()]
    assert any(differs)  # ... without becoming it


def test_recipe_saves_the_teacher_resumes_and_is_evaluated_by_knn(tiles, tmp_path):
    from pixcell_fed.federation.evaluation import evaluate_model

    items, _, held_out = tiles
    cfg = dict(method="dino", arch=TINY_VIT["arch"], kwargs=TINY_VIT["kwargs"], img_size=32, batch_size=8,
               lr=1e-3, dino_prototypes=128, dino_local_views=1)
    first = train_ssl(items, tmp_path / "enc", SSLConfig(epochs=1, **cfg))
    assert first.spec.kind == "encoder" and first.spec.num_classes == 0 and "dynamic_img_size" not in first.spec.kwargs
    assert first.history[0]["samples"] == 16 and first.history[0]["train_loss"] > 0
    again = train_ssl(items, tmp_path / "enc", SSLConfig(epochs=2, **cfg))
    assert [h["epoch"] for h in again.history] == [1, 2] and again.history[0] == first.history[0]
    saved = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert saved["recipe"] == "ssl" and saved["method"] == "dino"
    model, spec = load_checkpoint(tmp_path / "enc")
    state = torch.load(tmp_path / "enc" / "train_state.pt", weights_only=True)
    teacher, student = state["model"]["teacher_backbone"], state["model"]["student_backbone"]
    assert all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, student[k]) for k, v in model.state_dict().items())  # the teacher, not the student
    write_labelled_folder(tmp_path / "eval", held_out, prefix="e")
    metrics = evaluate_model(model.state_dict(), spec, tmp_path / "eval", knn_k=3)
    assert metrics["probe"] == "knn_loo" and metrics["n"] == 8 and 0.0 <= metrics["balanced_accuracy"] <= 1.0


def test_simclr_stays_the_default_and_the_method_is_checked():
    from pixcell_fed.config.loader import build_dataclass
    from pixcell_fed.errors import ConfigError

    assert SSLConfig().method == "simclr"
    with pytest.raises(ConfigError, match="method"):
        build_dataclass(SSLConfig, {"method": "byol"})
    with pytest.raises(ConfigError, match="dino_teacher_momentum"):
        build_dataclass(SSLConfig, {"method": "dino", "dino_teacher_momentum": 1.0})


def test_the_coordinator_run_key_selects_dino():
    from pixcell_fed.federation.config import from_run_config
    from pixcell_fed.federation.workflow import training_config

    cfg = from_run_config({"recipe": "ssl", "ssl-method": "dino", "epochs": 2})
    assert training_config(cfg, SSLConfig).method == "dino" and training_config(cfg, SSLConfig).epochs == 2
    assert training_config(from_run_config({}), SSLConfig).method == "simclr"

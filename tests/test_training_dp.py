"""DP fine-tune with Opacus on real tiles: a real DP-SGD step, epsilon accumulating, FedAvg, refusal of BatchNorm."""

from __future__ import annotations

import pytest
import torch

from pixcell_fed.errors import FederationError
from pixcell_fed.testing.federation import TINY_VIT, real_labelled_tiles
from pixcell_fed.training.dp_finetune import check_dp_compatible, fedavg, local_dp_train
from pixcell_fed.training.models import build_model, make_spec


def _data(n=24):
    import numpy as np

    from pixcell_fed.training.data import to_tensor

    tiles = real_labelled_tiles(n, size=32, seed=3)
    spec = make_spec(arch=TINY_VIT["arch"], classes=["dense", "sparse"], img_size=32, kwargs=TINY_VIT["kwargs"])
    x = to_tensor(np.stack([t for t, _ in tiles]), spec)
    y = torch.tensor([0 if lab == "dense" else 1 for _, lab in tiles])
    return spec, x, y


def test_real_dp_step_changes_weights_and_epsilon_accumulates():
    spec, x, y = _data()
    torch.manual_seed(0)
    model = build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, eps1, history = local_dp_train(model, x, y, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                            epochs=1, batch_size=8, lr=0.05)
    assert set(trained.state_dict()) == set(before)  # plain timm keys, ready for FedAvg and evaluation
    assert any(not torch.equal(trained.state_dict()[k], before[k]) for k in before)
    assert 0 < eps1 < float("inf") and history
    _, eps2, history2 = local_dp_train(trained, x, y, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                       epochs=1, batch_size=8, lr=0.05, history=history)
    assert eps2 > eps1 and len(history2) > len(history) - 1


def test_batchnorm_model_refused_before_training():
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    with pytest.raises(FederationError, match="not compatible with DP-SGD"):
        check_dp_compatible(model)


def test_fedavg_weighted():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([3.0, 2.0])) and int(out["n"]) == 3

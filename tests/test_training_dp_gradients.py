"""Architectures under DP-SGD: per-sample gradients must match a per-example loop, or the model is refused.

Tiny models of every family the DP fine-tune accepts (timm ViT, DeiT, ConvNeXt). On the code before this change
ConvNeXt's downsample convolutions got per-sample gradients off by 100-180 % (channels-last input), and the
documented ``drop_path_rate: 0.1`` crashed inside Opacus's vmap.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pixcell_fed.errors import DPRefused
from pixcell_fed.training import dp as D
from pixcell_fed.training.models import ModelSpec, build_model

TINY = {
    "vit": ("vit_tiny_patch16_224", {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}),
    "deit": ("deit_tiny_patch16_224", {"patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2}),
    "convnext": ("convnext_atto", {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}),
}


def _tiny(family: str, **extra) -> torch.nn.Module:
    arch, kwargs = TINY[family]
    torch.manual_seed(0)
    return build_model(ModelSpec(arch=arch, classes=("a", "b"), img_size=32, kwargs={**kwargs, **extra}))


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 1, 1])


@pytest.mark.parametrize("family", sorted(TINY))
def test_per_sample_gradients_match_a_per_example_loop(family):
    model = _tiny(family)
    errors = D.per_sample_gradient_errors(model, *_batch())
    assert len(errors) == len([p for p in model.parameters() if p.requires_grad])
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    D.check_dp_compatible(model, img_size=32, num_classes=2)  # accepted


def test_convnext_downsample_gradients_are_wrong_without_contiguous_input(monkeypatch):
    """The finding itself, and that the check refuses a model whose per-sample gradients disagree."""
    monkeypatch.setattr(D, "contiguous_conv_inputs", lambda model: contextlib.nullcontext())
    errors = D.per_sample_gradient_errors(_tiny("convnext"), *_batch())
    wrong = {k for k, e in errors.items() if e > 0.5}
    assert wrong and all(".downsample." in k for k in wrong), wrong
    with pytest.raises(DPRefused, match="per-sample gradients disagree.*downsample"):
        D.check_dp_compatible(_tiny("convnext"), img_size=32, num_classes=2)


@pytest.mark.parametrize("family,extra", [("vit", {"drop_path_rate": 0.1}), ("vit", {"drop_rate": 0.1}),
                                          ("convnext", {"drop_path_rate": 0.1})])
def test_stochastic_layers_are_refused_before_training(family, extra):
    with pytest.raises(DPRefused, match="stochastic layers"):
        D.check_dp_compatible(_tiny(family, **extra), img_size=32, num_classes=2)


def test_batchnorm_model_refused_before_training():
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    with pytest.raises(DPRefused, match="not compatible with DP-SGD"):
        D.check_dp_compatible(model, img_size=32, num_classes=2)


def test_convnext_trains_under_dp_with_correct_gradients():
    x, y = _batch()
    settings = D.DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, epochs=1, batch_size=3, lr=0.1)
    model = _tiny("convnext")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, steps = D.local_dp_train(model, x, y, settings)
    assert steps.steps == 1 and any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    hooks = [m for m in trained.modules() if isinstance(m, torch.nn.Conv2d) and m._forward_pre_hooks]
    assert not hooks  # the contiguous-input hooks are removed after training

"""Any timm architecture with a local weight file, as a pooled-feature encoder (``timm:<arch>``).

Used for extra audit feature spaces (``models.extra_audit_encoders``), not for conditioning PixCell. A timm-style
``config.json`` beside the weights (``model_args``, ``pretrained_cfg`` with mean/std/input_size) is honoured;
otherwise the architecture's own defaults are used. Classifier-head weights are dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pixcell_fed.devices import resolve_dtype
from pixcell_fed.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderFolder, Preprocess, find_weights_file
from pixcell_fed.errors import WeightsError
from pixcell_fed.weights import compare_shapes, read_json, read_state_dict

if TYPE_CHECKING:
    import torch


def _source(arch: str | None) -> str:
    return f"put the weight file of timm model {arch!r} (pytorch_model.bin or model.safetensors) in one folder"


def _meta_model(arch: str | None, weights_dir: Path | None) -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    """The architecture built on the meta device with the folder's ``model_args``, its weight file and config."""
    import timm
    import torch

    if arch is None or arch not in timm.list_models():
        raise WeightsError(f"timm has no architecture {arch!r}", hint="see timm.list_models() for valid names")
    path = find_weights_file(weights_dir, f"timm:{arch}", _source(arch))
    cfg_path = path.parent / "config.json"
    cfg = read_json(cfg_path, f"timm:{arch} config", _source(arch)) if cfg_path.is_file() else {}
    model_args = {**cfg.get("model_args", {}), "num_classes": 0}
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **model_args)
    return model, path, cfg


def _without_head(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the classifier-head tensors the headless model has no place for."""
    pretrained_cfg = cast("dict[str, Any]", model.pretrained_cfg)  # timm's attribute, untyped on nn.Module
    classifier = pretrained_cfg.get("classifier") or "head"
    heads = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    expected = model.state_dict()
    return {k: v for k, v in state.items() if k in expected or not any(k.startswith(h + ".") for h in heads)}


def _checked(arch: str | None, weights_dir: Path | None):
    model, path, cfg = _meta_model(arch, weights_dir)
    state = _without_head(model, read_state_dict(path, _source(arch)))
    problems = compare_shapes(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state.items()}
    )
    if problems:
        raise WeightsError(
            f"{path} does not match timm architecture {arch}: " + "; ".join(problems), hint=_source(arch)
        )
    folder = EncoderFolder(
        name=f"timm:{arch}", weights_file=path, architecture=str(arch), dim=int(cast(int, model.num_features))
    )
    return folder, model, state, cfg


def check_folder(weights_dir: Path | None, arch: str | None = None) -> EncoderFolder:
    """Check a timm weight folder without building real weights: tensor names and shapes match ``arch``."""
    return _checked(arch, weights_dir)[0]


def load_timm(
    weights_dir: Path | None, device: torch.device, dtype: torch.dtype | str | None = None, arch: str | None = None
) -> Encoder:
    """Load ``timm:<arch>`` from a local weight file (dtype None: fp32 on CPU, bf16 on a GPU)."""
    checked, model, state, cfg = _checked(arch, weights_dir)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=resolve_dtype(dtype, device))
    pre = {**model.pretrained_cfg, **cfg.get("pretrained_cfg", {})}
    size = int(pre.get("input_size", (3, 224, 224))[-1])
    return Encoder(
        model, checked, preprocess=Preprocess.of(size, pre.get("mean", IMAGENET_MEAN), pre.get("std", IMAGENET_STD))
    )

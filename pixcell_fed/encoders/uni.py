"""Built-in encoders: UNI2-h (PixCell's conditioning encoder), its tiny twin, and any timm model with local weights.

UNI2-h is built offline as timm's ``vit_giant_patch14_224`` with the published overrides and ``pretrained=False``,
then the site's ``pytorch_model.bin`` is loaded strictly (``torch.load(weights_only=True)``; safetensors accepted).
Its preprocessing is the hard-coded ImageNet transform: a locally built timm model would otherwise resolve timm's
default 0.5/0.5 statistics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.encoders.base import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, Encoder
from pixcell_fed.errors import WeightsError
from pixcell_fed.generation.weights import UNI_SOURCE

if TYPE_CHECKING:
    import torch

UNI_ARCH = "vit_giant_patch14_224"
UNI_DIM = 1536
UNI_PARAMS = 681_394_176
#: File that marks a folder written by pixcell_fed.testing.twins.save_tiny_uni.
TWIN_MARKER_FILE = "pixcell_fed_twin.json"
_WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors")


def uni2h_kwargs(**overrides: Any) -> dict[str, Any]:
    """timm overrides that turn ``vit_giant_patch14_224`` into UNI2-h."""
    import timm
    import torch

    kwargs = {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }
    kwargs.update(overrides)
    return kwargs


def uni_twin_kwargs(dim: int = 48) -> dict[str, Any]:
    """The same timm class and options at tiny size: 2 blocks, 2 heads, ``dim`` features, 16 px patches.

    ``dim * mlp_ratio`` must round to an even width for SwiGLU: 48, 96 or 1536 work; 64 does not.
    """
    return uni2h_kwargs(depth=2, num_heads=2, embed_dim=dim, patch_size=16)


def build_uni(kwargs: dict[str, Any] | None = None) -> "torch.nn.Module":
    """UNI2-h's architecture (random weights), or a variant of it with ``kwargs``; honours a torch device context."""
    import timm

    return timm.create_model(UNI_ARCH, pretrained=False, **(kwargs or uni2h_kwargs()))


def build_uni_twin(kwargs: dict[str, Any]) -> "torch.nn.Module":
    return build_uni(kwargs)


def _weights_file(weights_dir: Path | None, what: str, source: str) -> Path:
    if weights_dir is None:
        raise WeightsError(f"no weights folder given for {what}", hint=f"set models.encoder_dir; {source}")
    if weights_dir.is_file():
        return weights_dir
    if not weights_dir.is_dir():
        raise WeightsError(f"{what} weights folder not found: {weights_dir}", hint=source)
    for name in _WEIGHT_NAMES:
        if (weights_dir / name).is_file():
            return weights_dir / name
    candidates = sorted(p for p in weights_dir.iterdir() if p.suffix in (".bin", ".safetensors", ".pth", ".pt"))
    if len(candidates) == 1:
        return candidates[0]
    raise WeightsError(
        f"{what} weights not found: {weights_dir} has no pytorch_model.bin or model.safetensors",
        hint=source,
    )


def read_state_dict(path: Path, source: str) -> dict[str, "torch.Tensor"]:
    """Tensors from a safetensors file or a ``torch.save`` pickle read with ``weights_only=True`` (no code runs)."""
    import pickle

    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"cannot read weights {path}: {exc}", hint=f"the file is damaged or not a plain state dict; {source}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors", hint=source)
    return state


def load_strict(model: "torch.nn.Module", state: dict[str, "torch.Tensor"], path: Path, source: str) -> None:
    """Assign ``state`` into a (meta-built) model; every key and shape must match, reported all at once."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{label}: {'; '.join(items[:6])}{' ...' if len(items) > 6 else ''} ({len(items)})"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]
        raise WeightsError(f"{path} does not match the encoder architecture ({' | '.join(parts)})", hint=source)
    model.load_state_dict(state, strict=True, assign=True)


def _finish(model: "torch.nn.Module", device: "torch.device", dtype: "torch.dtype") -> "torch.nn.Module":
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_twin(weights_dir: Path | None, device: "torch.device", dtype: "torch.dtype") -> Encoder:
    import torch

    if weights_dir is None:
        raise WeightsError("no folder given for the uni2-h-twin encoder", hint="write one with pixcell_fed.testing.twins.save_tiny_uni(folder)")
    marker_path = (weights_dir if weights_dir.is_dir() else weights_dir.parent) / TWIN_MARKER_FILE
    if not marker_path.is_file():
        raise WeightsError(f"{weights_dir} is not a uni2-h twin folder (no {TWIN_MARKER_FILE})",
                           hint="write one with pixcell_fed.testing.twins.save_tiny_uni(folder)")
    marker = json.loads(marker_path.read_text())
    dim = int(marker["embed_dim"])
    path = _weights_file(weights_dir, "uni2-h-twin", "write it with pixcell_fed.testing.twins.save_tiny_uni(folder)")
    with torch.device("meta"):
        model = build_uni_twin(uni_twin_kwargs(dim))
    load_strict(model, read_state_dict(path, UNI_SOURCE), path, "re-create the twin with save_tiny_uni")
    return Encoder(_finish(model, device, dtype), name="uni2-h-twin", architecture=f"{UNI_ARCH} (UNI2-h options, tiny)",
                   dim=dim, weights_file=path, twin=True, resize=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@ENCODERS.register("uni2-h")
def load_uni2h(weights_dir: Path | None, device: "torch.device", dtype: "torch.dtype", arch: str | None = None) -> Encoder:
    """UNI2-h from the site's folder holding ``pytorch_model.bin`` (a twin folder is recognised by its marker)."""
    import torch

    if weights_dir is not None and (weights_dir / TWIN_MARKER_FILE).is_file():
        return _load_twin(weights_dir, device, dtype)
    path = _weights_file(weights_dir, "UNI2-h", UNI_SOURCE)
    with torch.device("meta"):
        model = build_uni()
    load_strict(model, read_state_dict(path, UNI_SOURCE), path, f"this is not UNI2-h's pytorch_model.bin; {UNI_SOURCE}")
    return Encoder(_finish(model, device, dtype), name="uni2-h", architecture=UNI_ARCH + " (UNI2-h options)", dim=UNI_DIM,
                   weights_file=path, twin=False, resize=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@ENCODERS.register("uni2-h-twin")
def load_uni2h_twin(weights_dir: Path | None, device: "torch.device", dtype: "torch.dtype", arch: str | None = None) -> Encoder:
    """The tiny random twin written by ``save_tiny_uni``: same timm class and options, tiny dims."""
    return _load_twin(weights_dir, device, dtype)


@ENCODERS.register("timm")
def load_timm(weights_dir: Path | None, device: "torch.device", dtype: "torch.dtype", arch: str | None = None) -> Encoder:
    """Any timm architecture (``timm:<arch>``) with a local weight file, as a pooled-feature encoder.

    A timm-style ``config.json`` beside the weights (``model_args``, ``pretrained_cfg`` with mean/std/input_size)
    is honoured; otherwise the architecture's own defaults are used. Classifier-head weights are dropped.
    """
    import timm
    import torch

    source = f"put the weight file of timm model {arch!r} (pytorch_model.bin or model.safetensors) in one folder"
    if arch is None or arch not in timm.list_models():
        raise WeightsError(f"timm has no architecture {arch!r}", hint="see timm.list_models() for valid names")
    path = _weights_file(weights_dir, f"timm:{arch}", source)
    cfg_path = path.parent / "config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
    model_args = dict(cfg.get("model_args", {}))
    model_args["num_classes"] = 0
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **model_args)
    state = read_state_dict(path, source)
    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not any(k.startswith(h + ".") for h in heads)}
    load_strict(model, state, path, source)
    pre = {**model.pretrained_cfg, **cfg.get("pretrained_cfg", {})}
    size = int(pre.get("input_size", (3, 224, 224))[-1])
    return Encoder(_finish(model, device, dtype), name=f"timm:{arch}", architecture=arch, dim=int(model.num_features),
                   weights_file=path, twin=False, resize=size, mean=pre.get("mean", IMAGENET_MEAN), std=pre.get("std", IMAGENET_STD))

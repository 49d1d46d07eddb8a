"""Models by spec: a timm backbone described by a small JSON-able dict, saved as safetensors + config.json.

A spec is ``{"arch": timm name, "kwargs": {...}, "num_classes": int, "classes": [...], "img_size": int,
"mean": [...], "std": [...], "kind": "classifier" | "encoder", "pretrained_file": path or null}``. The same
spec travels to the sites for evaluation, so a site rebuilds exactly the model the coordinator trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pixcell_fed.atomic import atomic_path, write_json_atomic
from pixcell_fed.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def make_spec(*, arch: str, classes: list[str] | tuple[str, ...], img_size: int, kwargs: dict | None = None,
              kind: str = "classifier", pretrained_file: str | None = None,
              mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> dict[str, Any]:
    """A model spec (see the module docstring)."""
    return {
        "arch": arch, "kwargs": dict(kwargs or {}), "num_classes": len(classes) if kind == "classifier" else 0,
        "classes": [str(c) for c in classes], "img_size": int(img_size), "mean": list(mean), "std": list(std),
        "kind": kind, "pretrained_file": pretrained_file,
    }


def _timm_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(spec.get("kwargs") or {})
    arch = spec["arch"]
    if any(arch.startswith(p) for p in ("vit_", "deit_", "eva", "swin")):
        kwargs.setdefault("img_size", int(spec["img_size"]))
    return kwargs


def build_model(spec: dict[str, Any]):
    """Create the timm model of ``spec`` (random init, or the local ``pretrained_file`` when given)."""
    import timm

    kwargs = _timm_kwargs(spec)
    pretrained_file = spec.get("pretrained_file")
    try:
        if pretrained_file:
            if not Path(pretrained_file).is_file():
                raise WeightsError(f"pretrained weights not found: {pretrained_file}",
                                   hint="set the backbone weights to a local .safetensors/.bin file, or leave it empty")
            model = timm.create_model(spec["arch"], pretrained=True, num_classes=int(spec["num_classes"]),
                                      pretrained_cfg_overlay={"file": str(pretrained_file)}, **kwargs)
        else:
            model = timm.create_model(spec["arch"], pretrained=False, num_classes=int(spec["num_classes"]), **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"cannot build timm model {spec['arch']!r} with {kwargs}: {exc}",
                           hint="check the backbone name and its keyword arguments (timm.list_models())") from exc
    return model


def save_checkpoint(model, spec: dict[str, Any], folder: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (the spec plus ``extra``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DDP / Opacus wrappers
    module = getattr(module, "_module", module)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / CONFIG_FILE, {**spec, **(extra or {})})
    return folder


def load_spec(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"no {CONFIG_FILE} in checkpoint folder {folder}", hint="point to a folder written by pixcell-fed training")
    return json.loads(path.read_text(encoding="utf-8"))


def load_checkpoint(folder: str | Path):
    """(model, spec) from a checkpoint folder written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    spec = load_spec(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"no {WEIGHTS_FILE} in checkpoint folder {folder}", hint="the training did not finish; rerun it")
    model = build_model({**spec, "pretrained_file": None})
    model.load_state_dict(load_file(str(weights)))
    return model, spec


def state_dict_of(model) -> dict:
    module = getattr(model, "module", model)
    module = getattr(module, "_module", module)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}

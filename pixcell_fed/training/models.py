"""Models by spec: a timm backbone described by a frozen :class:`ModelSpec`, saved as safetensors + config.json.

The same spec travels to the sites for evaluation and the DP fine-tune, so a site rebuilds exactly the model the
coordinator trained. :meth:`ModelSpec.to_wire` / :meth:`ModelSpec.from_wire` are the one conversion at the wire
boundary: what arrives is validated there (timm name, JSON-scalar keyword arguments, class names, sizes) and a
site-local ``pretrained_file`` never travels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pixcell_fed.atomic import atomic_path, write_json_atomic
from pixcell_fed.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

KINDS = ("classifier", "encoder")
_ARCH_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,79}$")
_KWARG_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_CLASS_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
_WIRE_KEYS = frozenset({"arch", "kwargs", "num_classes", "classes", "img_size", "mean", "std", "kind"})
MAX_CLASSES = 1000


class SpecError(ValueError):
    """A model spec that is malformed (raised at the wire boundary or when reading a checkpoint)."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: timm architecture and keyword arguments, classes, input size and normalisation."""

    arch: str
    classes: tuple[str, ...] = ()
    img_size: int = 224
    kind: Literal["classifier", "encoder"] = "classifier"
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pretrained_file: str | None = None  # site- or coordinator-local weights; never sent over the wire

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        _validate(self)

    @property
    def num_classes(self) -> int:
        """Size of the classification head (0 for an encoder: the model returns pooled features)."""
        return len(self.classes) if self.kind == "classifier" else 0

    def without_local_weights(self) -> ModelSpec:
        """The same spec with no local weights file (what a receiver builds before loading sent weights)."""
        return replace(self, pretrained_file=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (checkpoint ``config.json``, reports): the wire keys plus ``pretrained_file``."""
        return {**self._wire_dict(), "pretrained_file": self.pretrained_file}

    def _wire_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "kwargs": dict(self.kwargs),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "kind": self.kind,
        }

    def to_wire(self) -> str:
        """The JSON text sent to the other side (no local file paths)."""
        return json.dumps(self._wire_dict(), sort_keys=True)

    @classmethod
    def from_wire(cls, text: str) -> ModelSpec:
        """Parse and validate a spec received over the network; :class:`SpecError` on anything unexpected."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SpecError("the model spec is not JSON") from exc
        if not isinstance(data, dict):
            raise SpecError("the model spec is not a JSON object")
        unknown = set(data) - _WIRE_KEYS
        if unknown:
            raise SpecError(f"the model spec has unexpected keys: {', '.join(sorted(map(str, unknown)))}")
        spec = cls.from_dict(data)
        if "num_classes" in data and data["num_classes"] != spec.num_classes:
            raise SpecError(f"num_classes {data['num_classes']!r} does not match the {len(spec.classes)} classes")
        return spec

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """A spec from a checkpoint's ``config.json`` (extra keys such as ``history`` are ignored)."""
        try:
            return cls(
                arch=data["arch"],
                classes=tuple(data.get("classes") or ()),
                img_size=data.get("img_size", 224),
                kind=data.get("kind", "classifier"),
                kwargs=data.get("kwargs") or {},
                mean=tuple(data.get("mean") or IMAGENET_MEAN),
                std=tuple(data.get("std") or IMAGENET_STD),
                pretrained_file=data.get("pretrained_file"),
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed model spec: {exc}") from exc


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(spec: ModelSpec) -> None:
    if not isinstance(spec.arch, str) or not _ARCH_RE.match(spec.arch):
        raise SpecError(f"invalid timm architecture name {spec.arch!r}")
    if spec.kind not in KINDS:
        raise SpecError(f"invalid model kind {spec.kind!r} (one of {', '.join(KINDS)})")
    if not isinstance(spec.img_size, int) or isinstance(spec.img_size, bool) or not 8 <= spec.img_size <= 4096:
        raise SpecError(f"img_size must be an integer in [8, 4096] (got {spec.img_size!r})")
    if len(spec.classes) > MAX_CLASSES or len(set(spec.classes)) != len(spec.classes):
        raise SpecError(f"classes must be distinct and at most {MAX_CLASSES}")
    if any(not _CLASS_RE.match(c) for c in spec.classes):
        raise SpecError("class names must be 1-64 printable characters")
    if (
        len(spec.mean) != 3
        or len(spec.std) != 3
        or not all(_is_number(v) for v in (*spec.mean, *spec.std))
        or min(spec.std) <= 0
    ):
        raise SpecError("mean and std must be three finite numbers each (std > 0)")
    for key, value in spec.kwargs.items():
        if (
            not isinstance(key, str)
            or not _KWARG_RE.match(key)
            or key in ("num_classes", "pretrained", "pretrained_cfg_overlay")
        ):
            raise SpecError(f"invalid timm keyword argument {key!r}")
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) > 16 or not all(v is None or isinstance(v, (bool, str)) or _is_number(v) for v in items):
            raise SpecError(f"timm keyword argument {key!r} must be a number, string, boolean or a short list of them")
    if spec.pretrained_file is not None and not isinstance(spec.pretrained_file, str):
        raise SpecError("pretrained_file must be a path string or null")


def _timm_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.kwargs.items()}
    if any(spec.arch.startswith(p) for p in ("vit_", "deit_", "eva", "swin")):
        kwargs.setdefault("img_size", spec.img_size)
    return kwargs


def build_model(spec: ModelSpec):
    """Create the timm model of ``spec`` (random init, or the local ``pretrained_file`` when given)."""
    import timm

    kwargs = _timm_kwargs(spec)
    try:
        if spec.pretrained_file:
            if not Path(spec.pretrained_file).is_file():
                raise WeightsError(
                    f"pretrained weights not found: {spec.pretrained_file}",
                    hint="set the backbone weights to a local .safetensors/.bin file, or leave it empty",
                )
            model = timm.create_model(
                spec.arch,
                pretrained=True,
                num_classes=spec.num_classes,
                pretrained_cfg_overlay={"file": str(spec.pretrained_file)},
                **kwargs,
            )
        else:
            model = timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(
            f"cannot build timm model {spec.arch!r} with {kwargs}: {exc}",
            hint="check the backbone name and its keyword arguments (timm.list_models())",
        ) from exc
    return model


def unwrap(model):
    """The plain module inside DDP / Opacus wrappers."""
    module = getattr(model, "module", model)
    return getattr(module, "_module", module)


def save_checkpoint(model, spec: ModelSpec, folder: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (the spec plus ``extra``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / CONFIG_FILE, {**spec.to_dict(), **(extra or {})})
    return folder


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """The whole ``config.json`` of a checkpoint: the spec and what the recipe added (history, recipe, ...)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(
            f"no {CONFIG_FILE} in checkpoint folder {folder}", hint="point to a folder written by pixcell-fed training"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_spec(folder: str | Path) -> ModelSpec:
    try:
        return ModelSpec.from_dict(read_checkpoint_config(folder))
    except SpecError as exc:
        raise WeightsError(
            f"{Path(folder) / CONFIG_FILE}: {exc}", hint="point to a folder written by pixcell-fed training"
        ) from exc


def load_checkpoint(folder: str | Path):
    """(model, spec) from a checkpoint folder written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    spec = load_spec(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(
            f"no {WEIGHTS_FILE} in checkpoint folder {folder}", hint="the training did not finish; rerun it"
        )
    model = build_model(spec.without_local_weights())
    model.load_state_dict(load_file(str(weights)))
    return model, spec


def state_dict_of(model) -> dict:
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}

"""What a site accepts as an evaluation request: its own limits (``site.yaml``, ``federation.evaluation``), which a
request can only tighten, and the checks that run before any real tile is read.

* the model: an architecture of the site's list, a kind (recipe) the site evaluates, keyword arguments from the
  site's allow-list (numbers only, each within its bounds), a bounded input size and class list, no weights file;
* the weights: plain numeric arrays of exactly the model's names and shapes (never a pickle);
* the held-out set: at least ``min_tiles_per_class`` tiles of every class (the answer, aggregate metrics
  rounded to ``round_digits``, is :func:`pixcell_fed.federation.evaluation.rounded_answer`).

Every refusal is a :class:`~pixcell_fed.federation.protocol.Refusal`: only its generic code leaves the site.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pixcell_fed.bundle.manifest import LABEL_RE
from pixcell_fed.config.schema import FederationEvaluationConfig
from pixcell_fed.federation import protocol as P

if TYPE_CHECKING:
    from pixcell_fed.training.models import ModelSpec

#: keyword arguments that are counts or sizes: whole numbers only
INTEGER_KWARGS = frozenset({"patch_size", "depth", "embed_dim", "num_heads"})


def _refuse(detail: str) -> P.Refusal:
    return P.Refusal("refused-model", detail)


def effective_limits(site: FederationEvaluationConfig, request: Any) -> FederationEvaluationConfig:
    """The site's limits, tightened (never loosened) by ``min-tiles-per-class`` / ``round-digits`` of a request."""
    asked = P.config_values(request, {"min-tiles-per-class": int, "round-digits": int})
    return dataclasses.replace(
        site,
        min_tiles_per_class=max(site.min_tiles_per_class, asked.get("min-tiles-per-class", site.min_tiles_per_class)),
        round_digits=max(0, min(site.round_digits, asked.get("round-digits", site.round_digits))),
    )


def _number(value: Any, where: str, low: float, high: float, *, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(f"{where} is not a number: {value!r}"[:200])
    if whole and value != int(value):
        raise _refuse(f"{where} is not a whole number: {value!r}")
    if not low <= value <= high:
        raise _refuse(f"{where} = {value!r} is outside [{low:g}, {high:g}]")
    return value


def _check_kwargs(kwargs: Mapping[str, Any], limits: FederationEvaluationConfig) -> dict[str, Any]:
    extra = sorted(str(k)[:40] for k in kwargs if k not in limits.model_kwargs)
    if extra:
        raise _refuse(f"keyword arguments outside the site's allow-list: {', '.join(extra)}")
    checked = {}
    for key, value in kwargs.items():
        low, high = limits.model_kwargs[key]
        number = _number(value, f"keyword argument {key}", low, high, whole=key in INTEGER_KWARGS)
        checked[key] = int(number) if key in INTEGER_KWARGS else number
    return checked


def _check_classes(spec: ModelSpec, limits: FederationEvaluationConfig) -> None:
    fewest = 2 if spec.kind == "classifier" else 0  # an encoder is probed with the site's own labels
    if not fewest <= len(spec.classes) <= limits.max_classes or not all(LABEL_RE.match(c) for c in spec.classes):
        raise _refuse(f"the class list must be {fewest}-{limits.max_classes} distinct plain labels")


def check_model_spec(spec: ModelSpec, limits: FederationEvaluationConfig) -> ModelSpec:
    """``spec`` (as :meth:`ModelSpec.from_wire` read it), if the site builds such a model; otherwise
    :class:`Refusal` ``refused-model`` with the reason."""
    if spec.arch not in limits.architectures:
        raise _refuse(
            f"architecture {spec.arch[:80]!r} is not in the site's list "
            f"(federation.evaluation.architectures: {', '.join(limits.architectures)})"
        )
    if spec.kind not in limits.kinds:
        raise _refuse(f"model kind {spec.kind!r} is not one the site evaluates ({', '.join(limits.kinds)})")
    if spec.pretrained_file is not None:
        raise _refuse("a model spec may not name a weights file: weights travel as arrays only")
    _number(spec.img_size, "img_size", 16, limits.max_img_size, whole=True)
    for key, values in (("mean", spec.mean), ("std", spec.std)):
        for v in values:
            _number(v, key, 0.01 if key == "std" else 0.0, 10.0 if key == "std" else 1.0)
    _check_classes(spec, limits)
    return dataclasses.replace(spec, kwargs=_check_kwargs(spec.kwargs, limits))


def check_weights(state: Mapping[str, Any], model: Any) -> None:
    """The received arrays must be exactly the model's own parameters and buffers, name by name and shape by shape,
    and finite."""
    import torch

    own = model.state_dict()
    if set(state) != set(own):
        raise P.Refusal(
            "refused-weights",
            f"the weights name {len(set(state) ^ set(own))} tensor(s) the model does not have (or miss some it has)",
        )
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise P.Refusal(
                "refused-weights",
                f"weight {name} has shape {tuple(state[name].shape)}, the model's is {tuple(tensor.shape)}",
            )
        if state[name].is_floating_point() and not bool(torch.isfinite(state[name]).all()):
            raise P.Refusal("refused-weights", f"weight {name} is not finite")


def check_tiles_per_class(labels: Sequence[str], limits: FederationEvaluationConfig) -> None:
    """Answer only over classes large enough that one tile moves a metric little."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    small = sorted(label for label, n in counts.items() if n < limits.min_tiles_per_class)
    if not counts or small:
        raise P.Refusal(
            "too-few-tiles",
            f"held-out classes with fewer than {limits.min_tiles_per_class} tiles: {', '.join(small) or '(no tiles)'}",
        )

"""Local DP-SGD with Opacus on a site's tensors, the checks that make it correct, and FedAvg of weights.

Pure training: no files, no network, no ledger (the site's rounds, its policy and its ledger are in
:mod:`pixcell_fed.federation.dp_rounds` and :mod:`pixcell_fed.federation.dp_ledger`).

Secret randomness. Opacus's ``secure_mode`` needs ``torchcsprng``, which has no build for the torch this project
runs on. So both of DP-SGD's random sources are replaced by private ``torch.Generator`` objects, each seeded with
64 bits from the operating system's CSPRNG (:mod:`secrets`) at every call: the Gaussian noise (Opacus's
``noise_generator``) and the Poisson sampling of batches (the data loader's generator, which Opacus's
``DPDataLoader`` takes over). Nothing a caller passes (a round number, a seed) reaches them, and the global torch
generator is not used, so whoever knows every input of a round still cannot replay its noise or its batches.

Correct per-sample gradients. A model is accepted only if Opacus can wrap it (``ModuleValidator``), it has no
stochastic layer (dropout, stochastic depth: Opacus recomputes some layers under ``vmap``, where their randomness
either crashes or differs from the real forward pass), and its per-sample gradients, computed the way Opacus
computes them, match a per-example loop on a probe batch. Convolutions get contiguous NCHW input during DP
training (ConvNeXt's downsample convolutions receive channels-last tensors from ``LayerNorm2d``, for which
Opacus 1.6 computes wrong per-sample gradients).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from pixcell_fed.errors import DPRefused

#: relative error (per parameter tensor) above which per-sample gradients count as wrong
GRADIENT_TOLERANCE = 1e-3


def _finite_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class DPSettings:
    """How one site trains in one round: noise, clipping, epochs over its set, expected batch size, learning rate."""

    noise_multiplier: float
    max_grad_norm: float
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if not _finite_positive(self.noise_multiplier):
            raise ValueError(
                f"noise multiplier must be a finite number > 0 (got {self.noise_multiplier!r}): "
                "without noise DP-SGD gives no privacy"
            )
        if not _finite_positive(self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be a finite number > 0 (got {self.max_grad_norm!r})")
        if not _finite_positive(self.lr):
            raise ValueError(f"lr must be a finite number > 0 (got {self.lr!r})")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")


@dataclass(frozen=True)
class DPSteps:
    """A run of DP-SGD steps as a privacy accountant sees it: noise multiplier, Poisson sample rate, count."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def planned_steps(n_examples: int, settings: DPSettings) -> DPSteps:
    """The steps :func:`local_dp_train` takes on ``n_examples``: Opacus samples each example with rate
    ``1 / ceil(n / batch_size)`` and takes that many steps per epoch."""
    if n_examples < 1:
        raise ValueError("DP-SGD needs at least one example")
    batches = math.ceil(n_examples / settings.batch_size)
    return DPSteps(
        noise_multiplier=float(settings.noise_multiplier), sample_rate=1.0 / batches, steps=settings.epochs * batches
    )


def secret_generator():
    """A torch generator seeded with 64 bits from the OS CSPRNG (never from anything a caller supplies)."""
    import torch

    return torch.Generator().manual_seed(secrets.randbits(64))


# ------------------------------------------------------------------------------------------ model checks


@contextlib.contextmanager
def contiguous_conv_inputs(model) -> Iterator[None]:
    """While inside, every ``Conv2d`` of ``model`` receives contiguous (NCHW) input; Opacus's hooks see it too."""
    import torch

    def make_contiguous(module, args):
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    handles = [m.register_forward_pre_hook(make_contiguous) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stochastic_layers(model) -> list[str]:
    """Names of the layers that are random in training mode (dropout with p > 0, stochastic depth > 0)."""
    import torch

    found = []
    for name, module in model.named_modules():
        p = None
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            p = module.p
        elif type(module).__name__ in ("DropPath", "PatchDropout", "DropBlock2d"):
            p = getattr(module, "drop_prob", getattr(module, "prob", None))
        if p:
            found.append(f"{name or type(module).__name__} ({type(module).__name__}, p={p})")
    return found


def per_sample_gradient_errors(model, images, labels) -> dict[str, float]:
    """Per parameter: relative error of the per-sample gradients Opacus computes (with the contiguous-input fix)
    against a per-example loop. Leaves the model unwrapped, with no gradients."""
    import torch
    from opacus import GradSampleModule

    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.train()
    with contiguous_conv_inputs(model):
        wrapped = GradSampleModule(model, loss_reduction="sum")
        try:
            loss_fn(wrapped(images), labels).backward()
            per_sample = {name: p.grad_sample.detach().clone() for name, p in params.items()}
        finally:
            wrapped._close()
        errors = dict.fromkeys(params, 0.0)
        for i in range(len(images)):
            model.zero_grad(set_to_none=True)
            loss_fn(model(images[i : i + 1]), labels[i : i + 1]).backward()
            for name, p in params.items():
                reference = p.grad if p.grad is not None else torch.zeros_like(p)
                error = float((per_sample[name][i] - reference).norm() / (reference.norm() + 1e-12))
                if float(reference.norm()) < 1e-10 and float(per_sample[name][i].norm()) < 1e-10:
                    error = 0.0
                errors[name] = max(errors[name], error)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return errors


def check_dp_compatible(model, *, img_size: int, num_classes: int) -> None:
    """Refuse (:class:`DPRefused`, every reason at once) a model on which DP-SGD would not be what it claims."""
    import torch
    from opacus.validators import ModuleValidator

    reasons = [str(e) for e in ModuleValidator.validate(model, strict=False)[:5]]
    stochastic = stochastic_layers(model)
    if stochastic:
        reasons.append(
            "stochastic layers are not supported under DP-SGD (set drop_rate, drop_path_rate and the "
            f"other drop rates to 0): {', '.join(stochastic[:4])}"
        )
    if not reasons:
        probe = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([0, 1 % max(num_classes, 1)])
        try:
            errors = per_sample_gradient_errors(model, probe, labels)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError, IndexError) as exc:
            # Opacus or functorch cannot handle this model: a refusal, with their text
            reasons.append(f"Opacus cannot compute its per-sample gradients: {type(exc).__name__}: {exc}"[:300])
        else:
            wrong = sorted((e, n) for n, e in errors.items() if e > GRADIENT_TOLERANCE)
            if wrong:
                reasons.append(
                    "per-sample gradients disagree with a per-example loop for "
                    + ", ".join(f"{n} ({e:.0%})" for e, n in wrong[-4:])
                )
    if reasons:
        raise DPRefused(
            f"model is not compatible with DP-SGD: {'; '.join(reasons)}",
            hint="use a timm ViT/DeiT or ConvNeXt backbone without dropout or stochastic depth, "
            "or one built with GroupNorm instead of BatchNorm",
        )


# ------------------------------------------------------------------------------------------ training


def _private_engine():
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off. Both of its random sources are replaced below by generators
        # seeded from the OS CSPRNG (see the module docstring); only that one message is silenced, only here.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        return PrivacyEngine(accountant="prv")


def local_dp_train(model, images, labels, settings: DPSettings):
    """DP-SGD on ``(images, labels)`` tensors with secret noise and sampling; returns (trained module, steps taken
    as the accountant counts them). The caller checks the model (:func:`check_dp_compatible`) and its privacy
    budget before calling; the steps returned never exceed :func:`planned_steps`."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    planned = planned_steps(len(images), settings)
    noise_generator, sampling_generator = secret_generator(), secret_generator()
    loader = DataLoader(TensorDataset(images, labels), batch_size=settings.batch_size, generator=sampling_generator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=settings.lr, momentum=0.9)
    engine = _private_engine()
    model.train()
    with contiguous_conv_inputs(model):
        private, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
        )
        if loader.batch_sampler.generator is not sampling_generator:
            raise RuntimeError("Opacus did not take the private sampling generator")  # an Opacus upgrade changed it
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(settings.epochs):
            for x, y in loader:
                if len(y) == 0:  # Poisson sampling can draw an empty batch; the ledger counts the step anyway
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss_fn(private(x), y).backward()
                optimizer.step()
    taken = [tuple(h) for h in engine.accountant.history]
    trained = private._module
    private._close()  # remove Opacus's hooks so the plain module can be averaged, evaluated or saved
    if (
        any((float(s), float(q)) != (planned.noise_multiplier, planned.sample_rate) for s, q, _ in taken)
        or sum(int(n) for _, _, n in taken) > planned.steps
    ):
        raise RuntimeError(f"Opacus took steps {taken} outside the planned {planned}")
    return trained, planned


def fedavg(states: list[dict], weights: list[float]) -> dict:
    """Weighted mean of state dicts (floating tensors); other tensors are taken from the first."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key].double() * (w / total) for s, w in zip(states, weights)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out

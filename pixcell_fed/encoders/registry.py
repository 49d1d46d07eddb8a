"""Encoders by name: ``uni2-h`` (PixCell's conditioning encoder), ``uni2-h-twin`` and ``timm:<arch>``.

Each name maps to an :class:`EncoderFamily`: how to check a weight folder without loading it (what
``site-agent doctor`` reports) and how to load it. The built-in families are registered here, where the registry
is read, so the encoder modules never import the registry back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_fed.encoders import timm_models, uni
from pixcell_fed.encoders.base import Encoder, EncoderFolder
from pixcell_fed.errors import RegistryError, UsageError
from pixcell_fed.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EncoderFamily:
    """``check(weights_dir, arch) -> EncoderFolder`` and ``load(weights_dir, device, dtype, arch) -> Encoder``."""

    check: Callable[..., EncoderFolder]
    load: Callable[..., Encoder]


ENCODERS: Registry[EncoderFamily] = Registry("encoder")
ENCODERS.register("uni2-h", EncoderFamily(check=uni.check_folder, load=uni.load_uni2h))
ENCODERS.register("uni2-h-twin", EncoderFamily(check=uni.check_twin_folder, load=uni.load_uni2h_twin))
ENCODERS.register("timm", EncoderFamily(check=timm_models.check_folder, load=timm_models.load_timm))


def encoder_names() -> list[str]:
    """Registered encoder names (``timm`` stands for ``timm:<arch>``)."""
    return ENCODERS.names()


def _family(name: str) -> tuple[EncoderFamily, str | None]:
    """The family of encoder ``name`` and its timm architecture (for ``timm:<arch>``)."""
    key, arch = name, None
    if name.startswith("timm:"):
        key, arch = "timm", name[len("timm:") :]
        if not arch:
            raise UsageError(
                "encoder name 'timm:' lacks an architecture", hint="write timm:<arch>, e.g. timm:vit_base_patch16_224"
            )
    if key not in ENCODERS or name == "timm":
        valid = ", ".join(n if n != "timm" else "timm:<arch>" for n in encoder_names())
        raise RegistryError(f"unknown encoder {name!r}", hint=f"set models.encoder to one of: {valid}")
    return ENCODERS.get(key), arch


def check_folder(name: str, weights_dir: str | Path | None) -> EncoderFolder:
    """Check the weight folder of encoder ``name`` without loading it (raises WeightsError or RegistryError)."""
    family, arch = _family(name)
    return family.check(Path(weights_dir) if weights_dir is not None else None, arch)


def load_encoder(
    name: str,
    weights_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Encoder:
    """Build encoder ``name`` from a local weights folder (or file) on ``device``, after checking the folder.

    ``dtype`` None: UNI2-h runs in float32 on every device (as PixCell's conditioning was extracted); other
    encoders in fp32 on CPU and bf16 on a GPU.
    """
    from pixcell_fed.devices import resolve_device

    family, arch = _family(name)
    return family.load(Path(weights_dir) if weights_dir is not None else None, resolve_device(device), dtype, arch)

"""The SD3.5 VAE that decodes PixCell's latents: find its folder, check it without loading, load it offline.

:func:`check_folder` is the one check of a VAE folder; :func:`load_vae` runs it first and ``site-agent doctor``
reports it. The folder must be the SD3.5 VAE: PixCell's latents are scaled with SD3.5's ``scaling_factor`` and
``shift_factor``, and a VAE with other values decodes them to wrong colours without any error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_fed.errors import WeightsError
from pixcell_fed.generation.published import (
    SD35_VAE_PARAMS,
    SD35_VAE_REQUIRED,
    TWIN_MARKER,
    VAE_SOURCE,
    WEIGHTS_FILE,
)
from pixcell_fed.weights import (
    SafetensorsHeader,
    compare_shapes,
    config_mismatches,
    meta_shapes,
    read_complete_header,
    read_json,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class VaeFolder:
    """A checked VAE folder (nothing loaded): its config, weight file header, and whether it is a tiny twin."""

    folder: Path
    config: Mapping[str, Any]
    weights: SafetensorsHeader
    twin: bool

    @property
    def published_size(self) -> bool:
        """Whether the weights have the SD3.5 VAE's size (about 83.8 M parameters, within 2 %)."""
        return abs(self.weights.n_params - SD35_VAE_PARAMS) <= 0.02 * SD35_VAE_PARAMS

    def describe(self) -> str:
        return (
            f"AutoencoderKL at {self.folder} ({self.config['latent_channels']} latent channels, scaling "
            f"{self.config['scaling_factor']}, shift {self.config['shift_factor']}; {self.weights.summary()})"
        )


def resolve_vae_dir(vae_dir: str | Path | None, pixcell_dir: Path) -> Path:
    """The folder holding the VAE's config.json: ``vae_dir`` itself, its ``vae/`` subfolder, or ``pixcell_dir/vae``."""
    if vae_dir is None:
        folder = pixcell_dir / "vae"
        if not (folder / WEIGHTS_FILE).is_file():
            raise WeightsError(
                f"no VAE weights given and {folder} holds only a config (the PixCell repositories ship no VAE weights)",
                hint=VAE_SOURCE,
            )
        return folder
    folder = Path(vae_dir)
    if not folder.is_dir():
        raise WeightsError(f"VAE folder not found: {folder}", hint=VAE_SOURCE)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    return folder


def check_folder(folder: Path, *, latent_channels: int | None = None) -> VaeFolder:
    """Check a VAE folder without loading it: both files present, an ``AutoencoderKL`` config with SD3.5's latent
    channels, ``scaling_factor`` and ``shift_factor``, and a complete weight file whose tensors match the config.

    ``latent_channels``: what the PixCell transformer needs (its ``in_channels``). Raises :class:`WeightsError`
    naming the file that is wrong.
    """
    from diffusers import AutoencoderKL

    missing = [rel for rel in ("config.json", WEIGHTS_FILE) if not (folder / rel).is_file()]
    if missing:
        raise WeightsError(f"{folder} is incomplete: missing {', '.join(missing)}", hint=VAE_SOURCE)
    config_path = folder / "config.json"
    config = read_json(config_path, "VAE config", VAE_SOURCE)
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise WeightsError(f"{config_path} describes a {class_name}, not an AutoencoderKL", hint=VAE_SOURCE)
    problems = config_mismatches(config, SD35_VAE_REQUIRED)
    if latent_channels is not None and config.get("latent_channels") != latent_channels:
        problems.append(f"{config.get('latent_channels')} latent channels, PixCell needs {latent_channels}")
    if problems:
        raise WeightsError(
            f"{config_path} is not the SD3.5 VAE PixCell needs: " + "; ".join(problems),
            hint=f"PixCell's latents decode correctly only with the SD3.5 VAE; {VAE_SOURCE}",
        )
    header = read_complete_header(folder / WEIGHTS_FILE, VAE_SOURCE)
    try:
        expected = meta_shapes(lambda: AutoencoderKL.from_config(config))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{config_path} is not a valid AutoencoderKL config: {exc}", hint=VAE_SOURCE) from exc
    problems = compare_shapes(expected, header.shapes)
    if problems:
        raise WeightsError(
            f"{header.path} does not match {config_path.name}: " + "; ".join(problems),
            hint=f"the weights and the config come from different models; {VAE_SOURCE}",
        )
    return VaeFolder(folder=folder, config=config, weights=header, twin=bool(config.get(TWIN_MARKER, False)))


def vae_dtype_for(transformer_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The SD3.5 VAE is unstable in fp16: decode in bf16 when the transformer runs in reduced precision, else fp32."""
    import torch

    if (
        transformer_dtype in (torch.float16, torch.bfloat16)
        and device.type == "cuda"
        and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float32


def load_vae(folder: Path, *, device: torch.device, dtype: torch.dtype, latent_channels: int) -> tuple[Any, VaeFolder]:
    """Load the SD3.5 ``AutoencoderKL`` from a local folder (no network), after :func:`check_folder`."""
    from diffusers import AutoencoderKL

    checked = check_folder(folder, latent_channels=latent_channels)
    try:
        vae = AutoencoderKL.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"cannot load the VAE from {folder}: {exc}",
            hint=f"the folder is damaged or not the SD3.5 VAE; {VAE_SOURCE}",
        ) from exc
    vae.to(device=device).eval().requires_grad_(False)
    return vae, checked

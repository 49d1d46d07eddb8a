"""Tiny random twins of PixCell, the SD3.5 VAE and UNI2-h, written in the published folder layouts.

Built from the very classes the real weights load into, saved with ``save_pretrained`` / ``torch.save`` exactly as
the downloads are laid out, and read back by the real loaders, so tests and demos exercise the production code in
seconds on a CPU. Every twin carries a marker (``"_pixcell_fed_twin": true``) so outputs are labelled
"untrained twin". Same ``seed``, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pixcell_fed.generation.published import PUBLISHED_PIXCELL, TWIN_MARKER

__all__ = [
    "LEGACY_VALUES",
    "TWIN_COND_DIM",
    "TWIN_MARKER",
    "save_tiny_pixcell",
    "save_tiny_uni",
    "save_tiny_vae",
    "tiny_pixcell_config",
    "tiny_vae_config",
]
#: Output dim of the twin UNI encoder == caption_channels of the twin transformers.
TWIN_COND_DIM = 48
#: Published legacy PixArt keys, kept in the twin's transformer/config.json like in the real one.
LEGACY_VALUES = {
    "double_self_attention": False,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "use_linear_projection": False,
}


def _patch_json(path: Path, extra: dict[str, Any]) -> None:
    data = json.loads(path.read_text())
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tiny_vae_config() -> dict[str, Any]:
    """The SD3.5 VAE's structure (16 latent channels, x8 downsampling, same scaling and shift) at tiny widths."""
    from pixcell_fed.generation.published import SD35_VAE_CONFIG

    return {
        **SD35_VAE_CONFIG,
        "block_out_channels": [8, 8, 8, 8],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 256,
        "latents_mean": None,
        "latents_std": None,
    }


def tiny_pixcell_config(variant: int = 256, sample_size: int | None = None) -> dict[str, Any]:
    """PixCell config with published keys and values except the sizes: 2 layers, hidden 32, UNI dim 48."""
    if variant not in (256, 1024):
        raise ValueError(f"variant must be 256 or 1024, got {variant!r}")
    return {
        **PUBLISHED_PIXCELL[variant],
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "cross_attention_dim": 32,
        # 256: the twin makes real 256 px tiles (latent 32); 1024: a 128 px image (latent 16) keeps tests fast.
        "sample_size": sample_size or (32 if variant == 256 else 16),
        "caption_channels": TWIN_COND_DIM,
    }


def save_tiny_vae(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``AutoencoderKL`` (config.json + diffusion_pytorch_model.safetensors) to ``folder``."""
    import torch
    from diffusers import AutoencoderKL

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(tiny_vae_config())
    vae.save_pretrained(folder, safe_serialization=True)
    _patch_json(folder / "config.json", {TWIN_MARKER: True})
    return folder


def save_tiny_pixcell(
    folder: str | Path,
    variant: int = 256,
    with_y_pos_embed: bool = True,
    *,
    sample_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny PixCell-256/1024 folder in the published layout; ``with_y_pos_embed=False`` drops the buffer.

    Layout: model_index.json, scheduler/scheduler_config.json, transformer/config.json (with the four legacy PixArt
    keys), transformer/diffusion_pytorch_model.safetensors, vae/config.json (config only, like the real repos).
    """
    import torch
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
    from safetensors.torch import load_file, save_file

    from pixcell_fed.generation.transformer import Y_POS_KEY, PixCellTransformer2DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixCellTransformer2DModel.from_config(tiny_pixcell_config(variant, sample_size))
        # Non-zero output layers so twin outputs depend on noise, conditioning and timestep.
        torch.nn.init.normal_(model.proj_out.weight, std=0.02)
    tdir = folder / "transformer"
    model.save_pretrained(tdir, safe_serialization=True)
    _patch_json(tdir / "config.json", {**LEGACY_VALUES, TWIN_MARKER: True})
    weights = tdir / "diffusion_pytorch_model.safetensors"
    if not with_y_pos_embed and variant == 1024:
        state = load_file(str(weights))
        state.pop(Y_POS_KEY)
        save_file(state, str(weights), metadata={"format": "pt"})
    DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
    ).save_pretrained(folder / "scheduler")
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderKL", **tiny_vae_config(), TWIN_MARKER: True}, indent=2) + "\n"
    )
    index = {
        "_class_name": "PixCellPipeline",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "transformer": ["pixcell_transformer_2d", "PixCellTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        TWIN_MARKER: True,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def save_tiny_uni(folder: str | Path, *, dim: int = TWIN_COND_DIM, seed: int = 0) -> Path:
    """Write a tiny UNI2-h-like encoder: ``pytorch_model.bin`` (state dict) + ``pixcell_fed_twin.json`` marker."""
    import torch

    from pixcell_fed.encoders.uni import TWIN_MARKER_FILE, build_uni_twin, uni_twin_kwargs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = uni_twin_kwargs(dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_uni_twin(kwargs)
        # UNI2-h's layer scale starts at 1e-5, which makes a random twin map every image to nearly the same vector.
        # Unit layer scales and a larger patch projection keep the architecture but let twin embeddings follow
        # image content.
        for name, param in model.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                torch.nn.init.constant_(param, 1.0)
            elif name == "patch_embed.proj.weight":
                param.data.mul_(8.0)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    marker = {"architecture": "uni2-h-twin", "embed_dim": dim, TWIN_MARKER: True}
    (folder / TWIN_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return folder

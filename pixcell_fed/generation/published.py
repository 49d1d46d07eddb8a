"""Facts of the published weights: where a hospital gets them, PixCell's transformer configs and variants, and the
SD3.5 VAE's architecture config.

The VAE is not inside the PixCell repositories; a site supplies its folder. Its config here lets the benchmark build
a full-size VAE with random weights, the twins keep the same structure at tiny widths, and ``doctor`` check a site's
folder against it.
"""

from __future__ import annotations

from typing import Any

PIXCELL_SOURCE = (
    "download it on a machine with internet access from the Hugging Face Hub repository StonyBrook-CVLab/PixCell-256 "
    "or StonyBrook-CVLab/PixCell-1024 (licence CC BY-NC 4.0: non-commercial use), e.g. "
    "'hf download StonyBrook-CVLab/PixCell-256 --local-dir PixCell-256', and copy the whole folder to the site"
)
VAE_SOURCE = (
    "PixCell uses the Stable Diffusion 3.5 VAE, which is not inside the PixCell repositories: get the 'vae' folder "
    "(config.json + diffusion_pytorch_model.safetensors) of stabilityai/stable-diffusion-3.5-large (Stability AI "
    "Community License, gated: accept it on the Hub) or of StonyBrook-CVLab/PixCell-256-Cell-ControlNet, and pass "
    "that folder as the VAE folder (models.vae_dir)"
)

#: Weight file name of the transformer and of the VAE in their published folders.
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: Key written into every config of a tiny twin (pixcell_fed.simulation.twins): outputs say "untrained twin".
TWIN_MARKER = "_pixcell_fed_twin"
#: Keys a tiny twin shrinks; every other published key must hold its published value in a twin too.
TWIN_SIZE_KEYS = frozenset(
    {
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "cross_attention_dim",
        "sample_size",
        "caption_channels",
    }
)

#: The published ``transformer/config.json`` of PixCell-1024 and PixCell-256 (legacy PixArt keys left out: ignored).
PUBLISHED_PIXCELL: dict[int, dict[str, Any]] = {
    1024: {
        "num_layers": 28,
        "num_attention_heads": 16,
        "attention_head_dim": 72,
        "cross_attention_dim": 1152,
        "in_channels": 16,
        "out_channels": 32,
        "patch_size": 2,
        "sample_size": 128,
        "caption_channels": 1536,
        "caption_num_tokens": 16,
        "interpolation_scale": 2,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "num_embeds_ada_norm": 1000,
        "use_additional_conditions": False,
        "dropout": 0.0,
        "upcast_attention": False,
        "attention_type": "default",
        "norm_num_groups": 32,
    },
}
PUBLISHED_PIXCELL[256] = {
    **PUBLISHED_PIXCELL[1024],
    "sample_size": 32,
    "caption_num_tokens": 1,
    "interpolation_scale": 0.5,
}
#: Published variant (the tile size it is conditioned on and generates) by number of UNI tokens.
VARIANT_BY_TOKENS = {1: 256, 16: 1024}

#: ``vae/config.json`` of Stable Diffusion 3.5 (AutoencoderKL, 16 latent channels, x8 downsampling)
SD35_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

#: the keys a site's VAE folder must match exactly for PixCell's latents to decode
SD35_VAE_REQUIRED = {k: SD35_VAE_CONFIG[k] for k in ("latent_channels", "scaling_factor", "shift_factor")}
#: Parameters of the SD3.5 VAE (a folder far from it is not that VAE, whatever its config says)
SD35_VAE_PARAMS = 83.8e6

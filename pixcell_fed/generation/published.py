"""Facts of the published weights that code outside the loaders needs: the SD3.5 VAE's architecture config.

The VAE is not inside the PixCell repositories; a site supplies its folder. Its config here lets the benchmark build
a full-size VAE with random weights, the twins keep the same structure at tiny widths, and ``doctor`` check a site's
folder against it.
"""

from __future__ import annotations

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

"""PixCell's diffusion transformer, written from the published architecture facts with diffusers' building blocks.

A PixArt-style DiT: patch embedding with a fixed sin-cos position table, 28 ``BasicTransformerBlock``s with
adaLN-single timestep modulation and cross-attention to projected UNI2-h tokens, and a final modulated linear
projection. It loads the ``transformer/`` folders of ``StonyBrook-CVLab/PixCell-256`` and ``PixCell-1024`` as
published (same config keys, state-dict keys and shapes) without executing the code shipped beside those weights.

Two things differ from diffusers' stock ``PixArtTransformer2DModel``:

* ``caption_projection`` takes UNI2-h embeddings and keeps the fixed random null embedding used for classifier-free
  guidance in a saved buffer, ``caption_projection.uncond_embedding`` of shape ``(caption_num_tokens, 1536)``.
* Models conditioned on several UNI tokens (PixCell-1024: a 4x4 grid of 256 px tiles) add a fixed 2-D sin-cos
  position embedding to the tokens before the projection, ``y_pos_embed.y_pos_embed`` of shape
  ``(1, caption_num_tokens, caption_channels)``. The token centres sit at the centres of their tiles on the image's
  own position grid (4, 12, 20, 28 for PixCell-1024), so the table is rebuilt exactly when a checkpoint lacks it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock
from diffusers.models.embeddings import (
    PatchEmbed,
    PixArtAlphaTextProjection,
    get_2d_sincos_pos_embed,
    get_2d_sincos_pos_embed_from_grid,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn

#: Keys that PixArt-era config files carry and this architecture ignores (never passed on to any layer).
LEGACY_CONFIG_KEYS = ("double_self_attention", "num_vector_embeds", "only_cross_attention", "use_linear_projection")

#: Key of the UNI-token position table, absent from some PixCell-1024 checkpoints and then rebuilt.
Y_POS_KEY = "y_pos_embed.y_pos_embed"
#: Key of the saved null embedding used for classifier-free guidance.
UNCOND_KEY = "caption_projection.uncond_embedding"


def uni_token_pos_embed(embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a ``grid_size`` x ``grid_size`` grid of UNI tokens, ``(1, grid**2, dim)``.

    Each token sits at the centre of the image region it describes, measured on the image's own position grid
    (``base_size`` tokens per side, divided by ``interpolation_scale`` like diffusers' ``PatchEmbed``). For
    PixCell-1024 (grid 4, base 64, scale 2) the centres are 4, 12, 20 and 28. Row-major: token ``k = 4*row + col``.
    """
    step = base_size / grid_size / interpolation_scale
    positions = torch.arange(grid_size, dtype=torch.float32) * step + step / 2
    # Same (w, h) ordering as diffusers' get_2d_sincos_pos_embed, so both tables share one convention.
    grid = torch.stack(torch.meshgrid(positions, positions, indexing="xy"), dim=0).reshape(2, 1, grid_size, grid_size)
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid, output_type="pt").float().unsqueeze(0)


class UNITokenPosEmbed(nn.Module):
    """Adds the fixed UNI-token position table (a saved buffer named ``y_pos_embed``) to the conditioning tokens."""

    y_pos_embed: torch.Tensor  # a registered buffer

    def __init__(self, embed_dim: int, num_tokens: int, base_size: int, interpolation_scale: float) -> None:
        super().__init__()
        grid = math.isqrt(num_tokens)
        if grid * grid != num_tokens:
            raise ValueError(f"caption_num_tokens must be a square grid (1, 4, 16, ...), got {num_tokens}")
        self.grid_size, self.base_size, self.interpolation_scale = grid, base_size, interpolation_scale
        # Computed on the CPU, then placed on the current default device (meta when built without memory).
        self.register_buffer("y_pos_embed", self.table(embed_dim, torch.empty(0).device), persistent=True)

    def table(self, embed_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
        with torch.device("cpu"):
            table = uni_token_pos_embed(embed_dim, self.grid_size, self.base_size, self.interpolation_scale)
        return table.to(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.y_pos_embed.to(tokens.dtype)


class UNIProjection(PixArtAlphaTextProjection):
    """PixArt's caption MLP (Linear -> GELU(tanh) -> Linear) plus the saved null embedding for guidance."""

    uncond_embedding: torch.Tensor  # a registered buffer

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int) -> None:
        super().__init__(in_features=in_features, hidden_size=hidden_size, act_fn="gelu_tanh")
        # A fixed random vector, not trained; a checkpoint always overwrites it with its own.
        self.register_buffer(
            "uncond_embedding", torch.randn(num_tokens, in_features) / in_features**0.5, persistent=True
        )


class PixCellTransformer2DModel(ModelMixin, AttentionMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' mixins disagree on config_name
    """PixCell's latent diffusion transformer conditioned on UNI2-h embeddings.

    Forward: ``hidden_states [B, in_channels, h, w]``, ``encoder_hidden_states [B, caption_num_tokens,
    caption_channels]``, ``timestep [B]`` in 0..999 -> ``sample [B, out_channels, h, w]`` whose first
    ``in_channels`` channels are the noise prediction (the rest is the learned variance, unused when sampling).
    """

    _supports_gradient_checkpointing = True
    # diffusers declares these two as None in ModelMixin, yet documents lists of names
    _no_split_modules = ["BasicTransformerBlock", "PatchEmbed"]  # type: ignore[assignment]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "adaln_single", "y_pos_embed"]  # type: ignore[assignment]
    ignore_for_config = list(LEGACY_CONFIG_KEYS)

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 16,
        out_channels: int | None = 32,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = False,
        caption_channels: int = 1536,
        caption_num_tokens: int = 1,
        attention_type: str | None = "default",
        # Legacy PixArt keys found in the published config.json: accepted and ignored.
        double_self_attention: Any = None,
        num_vector_embeds: Any = None,
        only_cross_attention: Any = None,
        use_linear_projection: Any = None,
    ) -> None:
        super().__init__()
        if norm_type != "ada_norm_single":
            raise ValueError(f"PixCell uses norm_type 'ada_norm_single', got {norm_type!r}")
        if num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm must be set for norm_type 'ada_norm_single'")
        if use_additional_conditions:
            raise ValueError(
                "PixCell has no additional (resolution/aspect) conditions; use_additional_conditions must be false"
            )

        self.inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.use_additional_conditions = False
        self.gradient_checkpointing = False
        scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
            interpolation_scale=scale,
        )
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    self.inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    cross_attention_dim=cross_attention_dim,
                    activation_fn=activation_fn,
                    num_embeds_ada_norm=num_embeds_ada_norm,
                    attention_bias=attention_bias,
                    upcast_attention=upcast_attention,
                    norm_type=norm_type,
                    norm_elementwise_affine=norm_elementwise_affine,
                    norm_eps=norm_eps,
                    attention_type=attention_type or "default",  # BasicTransformerBlock treats None as "default"
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, self.inner_dim) / self.inner_dim**0.5)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(self.inner_dim, use_additional_conditions=False)
        self.caption_projection = UNIProjection(caption_channels, self.inner_dim, caption_num_tokens)
        self.y_pos_embed = (
            UNITokenPosEmbed(caption_channels, caption_num_tokens, sample_size // patch_size, scale)
            if caption_num_tokens > 1
            else None
        )

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # Drop the legacy PixArt keys silently: they are known, meaningless here, and must not reach __init__.
        config_dict = {k: v for k, v in config_dict.items() if k not in LEGACY_CONFIG_KEYS}
        return super().extract_init_dict(config_dict, **kwargs)

    # -- fixed tables -------------------------------------------------------------------------------------------
    def rebuild_fixed_buffers(self, *, include_y_pos: bool = True, device: torch.device | str | None = None) -> None:
        """Recompute the deterministic tables: the patch position table (never saved) and, if asked, y_pos_embed.

        Used after building the model on the meta device and when a PixCell-1024 checkpoint lacks ``y_pos_embed``.
        """
        if device is None:
            device = self.proj_out.weight.device
            if device.type == "meta":
                device = torch.device("cpu")
        pe = self.pos_embed
        with torch.device("cpu"):
            table = get_2d_sincos_pos_embed(
                self.inner_dim, pe.height, base_size=pe.base_size, interpolation_scale=pe.interpolation_scale
            )
        pe.register_buffer("pos_embed", table.float().unsqueeze(0).to(device), persistent=False)
        if include_y_pos and self.y_pos_embed is not None:
            table = self.y_pos_embed.table(self.config["caption_channels"], device)
            self.y_pos_embed.register_buffer("y_pos_embed", table, persistent=True)

    @property
    def uncond_embedding(self) -> torch.Tensor:
        """The checkpoint's null embedding, ``(caption_num_tokens, caption_channels)``."""
        return self.caption_projection.uncond_embedding

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and variance) for ``hidden_states`` at ``timestep`` given UNI tokens."""
        p = self.config["patch_size"]
        batch, _, h, w = hidden_states.shape
        height, width = h // p, w // p
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

        x = self.pos_embed(hidden_states)
        t_mod, t_emb = self.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=x.dtype)

        y = encoder_hidden_states
        if self.y_pos_embed is not None:
            y = self.y_pos_embed(y)
        y = self.caption_projection(y).view(batch, -1, x.shape[-1])

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(  # type: ignore[misc]  # set by enable_gradient_checkpointing
                    block, x, attention_mask, y, encoder_attention_mask, t_mod, cross_attention_kwargs, None
                )
            else:
                x = block(
                    x,
                    attention_mask=attention_mask,
                    encoder_hidden_states=y,
                    encoder_attention_mask=encoder_attention_mask,
                    timestep=t_mod,
                    cross_attention_kwargs=cross_attention_kwargs,
                    class_labels=None,
                )

        shift, scale = (self.scale_shift_table[None] + t_emb[:, None].to(self.scale_shift_table.device)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)
        x = x.reshape(batch, height, width, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(batch, self.out_channels, height * p, width * p)
        if not return_dict:
            return (x,)
        return Transformer2DModelOutput(sample=x)

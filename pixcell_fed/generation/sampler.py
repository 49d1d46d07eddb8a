"""Guided DPM-Solver++ sampling with PixCell: UNI2-h embeddings in, uint8 H&E tiles out.

Each sample's starting noise comes from its own ``torch.Generator`` seeded with that sample's seed (drawn on the CPU
in fp32), so a tile depends only on its conditioning, its seed, the weights and the device, not on which other
samples shared its batch (up to floating-point rounding, since kernels can differ with the batch shape).
Classifier-free guidance runs the conditional and the null-embedding branch in one doubled batch:
``eps = eps_null + w * (eps_cond - eps_null)``. As in PixArt (``do_classifier_free_guidance = guidance_scale > 1``),
a weight ``w <= 1`` turns guidance off: the conditional prediction alone, with no unconditional pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcell_fed.errors import UsageError
from pixcell_fed.generation.published import VARIANT_BY_TOKENS
from pixcell_fed.weights import sha256_file

if TYPE_CHECKING:
    import torch

#: Guidance weights with the paper's best FID (PixCell-256: w = 2.0; PixCell-1024: w = 1.2).
DEFAULT_GUIDANCE = {256: 2.0, 1024: 1.2}
DEFAULT_STEPS = 20
_MAX_SEED = 2**63 - 1
_SDE_MASK = 0x5DE0_5DE0_5DE0_5DE0


def uses_guidance(guidance: float) -> bool:
    """Whether classifier-free guidance runs: only above 1, as in PixArt; ``w <= 1`` samples the conditional
    prediction alone (no unconditional pass, so half the transformer work)."""
    return guidance > 1.0


def seeds_for(run_seed: int, count: int) -> list[int]:
    """``count`` independent 63-bit seeds derived from one run seed (same run seed, same list)."""
    if count < 0:
        raise UsageError(f"cannot derive {count} seeds", hint="ask for zero or more seeds")
    state = np.random.SeedSequence(int(run_seed)).generate_state(count, dtype=np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


def cut_grid(images: np.ndarray, grid: int = 4) -> np.ndarray:
    """Cut ``[B, H, W, 3]`` images into ``[B * grid**2, H/grid, W/grid, 3]`` tiles in row-major order per image.

    Embed the tiles and reshape to ``[B, grid**2, D]`` to condition PixCell-1024 (token ``k = grid*row + col``).
    """
    if images.ndim != 4 or images.shape[1] % grid or images.shape[2] % grid:
        raise UsageError(
            f"cannot cut images of shape {images.shape} into a {grid}x{grid} grid",
            hint=f"pass [B, H, W, 3] images whose height and width are multiples of {grid} (1024 px for PixCell-1024)",
        )
    b, h, w, c = images.shape
    th, tw = h // grid, w // grid
    tiles = images.reshape(b, grid, th, grid, tw, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(tiles.reshape(b * grid * grid, th, tw, c))


class PixCellPipeline:
    """A loaded PixCell transformer, SD3.5 VAE and noise schedule, ready to ``generate`` tiles.

    Build it with :func:`pixcell_fed.generation.load_pixcell`. Inputs are validated before any compute.
    """

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        scheduler_config: dict[str, Any],
        *,
        transformer_file: Path | None = None,
        vae_file: Path | None = None,
        twin: bool = False,
        scheduler_source: str = "built-in defaults",
        y_pos_embed_rebuilt: bool = False,
    ) -> None:
        import torch

        self.transformer = transformer
        self.vae = vae
        self.scheduler_config = self._dpm_solver_config(scheduler_config)
        self.transformer_file = transformer_file
        self.vae_file = vae_file
        self.twin = twin
        self.scheduler_source = scheduler_source
        self.y_pos_embed_rebuilt = y_pos_embed_rebuilt
        cfg = transformer.config
        self.latent_channels = int(cfg.in_channels)
        self.latent_size = int(cfg.sample_size)
        self.num_tokens = int(cfg.caption_num_tokens)
        self.cond_dim = int(cfg.caption_channels)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = self.latent_size * self.vae_scale_factor
        self.variant = VARIANT_BY_TOKENS[self.num_tokens]
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.device = transformer.device
        self.dtype = transformer.dtype
        self.vae_dtype = vae.dtype
        self._identity: dict[str, Any] | None = None
        self._generator_device = torch.device("cpu")

    @staticmethod
    def _dpm_solver_config(config: dict[str, Any]) -> dict[str, Any]:
        # Keep the site's schedule (betas, steps, spacing) but always solve with DPM-Solver++. The learned-variance
        # channels are dropped here before the scheduler sees them, so its variance_type must be None (diffusers'
        # "learned" path would slice the first 3 channels, not 16).
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if config.get("algorithm_type") not in ("dpmsolver++", "sde-dpmsolver++"):
            config["algorithm_type"] = "dpmsolver++"
        config["variance_type"] = None
        config.setdefault("solver_order", 2)
        return config

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def default_guidance(self) -> float:
        return DEFAULT_GUIDANCE[self.variant]

    @property
    def name(self) -> str:
        return f"PixCell-{self.variant}" + (" (untrained twin)" if self.twin else "")

    @property
    def identity(self) -> dict[str, Any]:
        """What produced the tiles: model, variant, weight sha256s, dtypes, scheduler, and whether it is a twin."""
        if self._identity is None:
            self._identity = {
                "model": f"PixCell-{self.variant}",
                "variant": self.variant,
                "image_size": self.image_size,
                "label": "untrained twin" if self.twin else f"PixCell-{self.variant}",
                "twin": self.twin,
                "transformer_sha256": sha256_file(self.transformer_file) if self.transformer_file else None,
                "vae_sha256": sha256_file(self.vae_file) if self.vae_file else None,
                "scheduler": f"DPMSolverMultistepScheduler ({self.scheduler_config['algorithm_type']}, "
                f"order {self.scheduler_config['solver_order']}; {self.scheduler_source})",
                "dtype": str(self.dtype).removeprefix("torch."),
                "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
                "device": self.device.type,
                "y_pos_embed_rebuilt": self.y_pos_embed_rebuilt,
            }
        return dict(self._identity)

    # -- validation -----------------------------------------------------------------------------------------------
    def validate(
        self, cond: np.ndarray | torch.Tensor, seeds: Sequence[int], steps: int, guidance: float | None
    ) -> tuple[torch.Tensor, list[int], int, float]:
        """Check every argument before compute; return conditioning as a float32 CPU tensor and the resolved values."""
        import torch

        expected = f"[B, {self.num_tokens}, {self.cond_dim}]"
        what = (
            "one UNI2-h embedding per 256 px tile"
            if self.num_tokens == 1
            else f"the {math.isqrt(self.num_tokens)}x{math.isqrt(self.num_tokens)} grid of 256 px tile embeddings "
            "in row-major order (see cut_grid)"
        )
        if isinstance(cond, np.ndarray):
            if not np.issubdtype(cond.dtype, np.floating):
                raise UsageError(
                    f"conditioning must be floating point, got dtype {cond.dtype}", hint=f"pass {what} as float32"
                )
            cond_t = torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32))
        elif isinstance(cond, torch.Tensor):
            if not cond.is_floating_point():
                raise UsageError(
                    f"conditioning must be floating point, got {cond.dtype}", hint=f"pass {what} as float32"
                )
            cond_t = cond.detach().to("cpu", torch.float32)
        else:
            raise UsageError(
                f"conditioning must be a numpy array or torch tensor, got {type(cond).__name__}",
                hint=f"pass {expected}",
            )
        if cond_t.ndim == 2 and self.num_tokens == 1:
            cond_t = cond_t[:, None, :]
        if cond_t.ndim != 3 or tuple(cond_t.shape[1:]) != (self.num_tokens, self.cond_dim):
            raise UsageError(
                f"{self.name} needs conditioning of shape {expected}, got {list(cond_t.shape)}",
                hint=f"pass {what}, embedded with the encoder PixCell was trained on (uni2-h)",
            )
        if cond_t.shape[0] == 0:
            raise UsageError("no conditioning embeddings given", hint="pass at least one embedding")
        if not torch.isfinite(cond_t).all():
            raise UsageError(
                "conditioning contains NaN or infinite values", hint="re-embed the tiles; check the encoder weights"
            )
        seeds = list(seeds)
        if len(seeds) != cond_t.shape[0]:
            raise UsageError(
                f"got {len(seeds)} seeds for {cond_t.shape[0]} conditioning rows",
                hint="pass one seed per row; for N samples of a tile repeat its row N times with different seeds "
                "(seeds_for)",
            )
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) <= _MAX_SEED:
                raise UsageError(
                    f"seed {s!r} is not an integer in [0, 2**63)", hint="use seeds_for(run_seed, n) to derive seeds"
                )
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= int(steps) <= 1000:
            raise UsageError(
                f"steps must be an integer from 1 to 1000, got {steps!r}", hint=f"the default is {DEFAULT_STEPS}"
            )
        g = self.default_guidance if guidance is None else guidance
        if isinstance(g, bool) or not isinstance(g, (int, float, np.floating)) or not math.isfinite(g) or g < 0:
            raise UsageError(
                f"guidance must be a finite number >= 0, got {guidance!r}",
                hint=f"{self.default_guidance} for {self.name} (1 or less turns guidance off)",
            )
        return cond_t, [int(s) for s in seeds], int(steps), float(g)

    # -- the sampling steps -----------------------------------------------------------------------------------------
    def make_scheduler(self, steps: int) -> Any:
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """``[B, C, h, w]`` fp32 noise on the CPU, sample i drawn from a generator seeded with ``seeds[i]``."""
        import torch

        shape = (self.latent_channels, self.latent_size, self.latent_size)
        rows = [torch.randn(shape, generator=torch.Generator(self._generator_device).manual_seed(s)) for s in seeds]
        return torch.stack(rows)

    def null_conditioning(self, batch: int) -> torch.Tensor:
        """The checkpoint's null embedding tiled to ``[batch, n_tok, dim]``."""
        return self.transformer.uncond_embedding.to(self.dtype)[None].expand(batch, -1, -1)

    def sample_latents(
        self,
        cond: torch.Tensor,
        seeds: Sequence[int],
        steps: int,
        guidance: float,
        *,
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Denoise one batch of validated inputs; returns fp32 latents. ``on_step(i, t, latents)`` after each step."""
        import torch

        batch = cond.shape[0]
        scheduler = self.make_scheduler(steps)
        latents = (self.initial_noise(seeds) * scheduler.init_noise_sigma).to(self.device)
        cond_dev = cond.to(self.device, self.dtype)
        use_cfg = uses_guidance(guidance)
        tokens = torch.cat([self.null_conditioning(batch), cond_dev]) if use_cfg else cond_dev
        sde = scheduler.config.algorithm_type.startswith("sde")
        # SDE solvers draw fresh noise every step: from each sample's own stream (seed XOR a fixed mask), never shared.
        generators = [torch.Generator(self._generator_device).manual_seed(s ^ _SDE_MASK) for s in seeds] if sde else []
        c = self.latent_channels
        with torch.inference_mode():
            for i, t in enumerate(scheduler.timesteps):
                x = torch.cat([latents, latents]) if use_cfg else latents
                x = scheduler.scale_model_input(x, t).to(self.dtype)
                out = self.transformer(
                    x, encoder_hidden_states=tokens, timestep=t.expand(x.shape[0]), return_dict=False
                )[0]
                eps = out[:, :c].float()
                if use_cfg:
                    eps_null, eps_cond = eps.chunk(2)
                    eps = eps_null + guidance * (eps_cond - eps_null)
                noise = None
                if sde:
                    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(
                        self.device
                    )
                latents = scheduler.step(eps, t, latents, variance_noise=noise, return_dict=False)[0]
                if on_step is not None:
                    on_step(i, t, latents)
        return latents

    def decode_batch_size(self) -> int:
        """Latents per VAE call: keeps every decoder activation under 2**30 elements (upsampling kernels index with
        32-bit integers, and one 256 px batch of 64 already crosses 2**31 at the SD3.5 VAE's 256-channel stage)."""
        widest = max(self.vae.config.block_out_channels)
        return max(1, min(32, 2**30 // (widest * self.image_size**2)))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """VAE-decode fp32 latents to ``[B, H, W, 3]`` uint8 RGB, in chunks of :meth:`decode_batch_size`."""
        import torch

        chunks = []
        step = self.decode_batch_size()
        with torch.inference_mode():
            for start in range(0, latents.shape[0], step):
                z = latents[start : start + step] / self.scaling_factor + self.shift_factor
                images = self.vae.decode(z.to(self.vae.device, self.vae_dtype), return_dict=False)[0].float()
                images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                chunks.append(images.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(chunks)

    def auto_batch_size(self) -> int:
        """Samples per denoising batch: modest on CPU; on CUDA sized to free memory (the VAE decodes in chunks)."""
        import torch

        if self.device.type != "cuda":
            return max(1, min(4, (4 * 256 * 256) // self.image_size**2))
        free, _total = torch.cuda.mem_get_info(self.device)
        tokens = (self.latent_size // self.transformer.config.patch_size) ** 2
        width = self.transformer.inner_dim
        # Guided batch is doubled; ~16 live token-by-width tensors per block (the feed-forward is 4x wide).
        per_sample = 2 * tokens * width * self.transformer.dtype.itemsize * 16
        cap = 128 if self.variant == 256 else 16
        return int(max(1, min(cap, 0.5 * free // per_sample)))

    def generate(
        self,
        cond: np.ndarray | torch.Tensor,
        *,
        seeds: Sequence[int],
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Generate one tile per conditioning row: ``cond [B, n_tok, dim]`` -> uint8 ``[B, H, W, 3]``.

        ``guidance`` defaults to 2.0 (PixCell-256) or 1.2 (PixCell-1024). For N samples of a tile, repeat its row N
        times with N seeds. ``batch_size`` defaults to :meth:`auto_batch_size`; a sample's noise does not depend on
        it, so results agree across batch sizes up to floating-point rounding (kernels may differ with the batch
        shape).
        """
        cond_t, seeds, steps, w = self.validate(cond, seeds, steps, guidance)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise UsageError(
                f"batch_size must be a positive integer, got {batch_size!r}",
                hint="leave it unset to size it to the device",
            )
        bs = batch_size or self.auto_batch_size()
        starts: Iterable[int] = range(0, cond_t.shape[0], bs)
        if show_progress:
            from pixcell_fed.progress import progress

            starts = progress(starts, desc="synthesising", unit="batch")
        out = np.empty((cond_t.shape[0], self.image_size, self.image_size, 3), dtype=np.uint8)
        for start in starts:
            stop = min(start + bs, cond_t.shape[0])
            latents = self.sample_latents(cond_t[start:stop], seeds[start:stop], steps, w)
            out[start:stop] = self.decode(latents)
        return out

"""Synthesis speed: the pipeline's overhead on tiny twins (CPU), and end-to-end tiles/s at full size (GPU).

Run from the repository root:

    python -m benchmarks.synthesis                 # CPU: pipeline vs the bare calls it makes (target <= 10 % overhead)
    python -m benchmarks.synthesis --gpu           # + full-size PixCell-256 on one CUDA GPU (target >= 25 tiles/s on an H100)
    python -m benchmarks.synthesis --gpu --dry-run # the GPU code path at tiny size on the CPU (checks it runs; records nothing)
    python -m benchmarks.synthesis --threads 1     # steadier CPU timings on a busy shared machine

CPU mode: tiny random twins written in the published layout and loaded by the real loader; ``PixCellPipeline.generate``
(20 steps, guidance 2.0) is timed against a bare loop written here that makes the same transformer, scheduler and
VAE calls. The two are interleaved; the overhead is taken from the best of several repeats (like ``timeit``), because
on a shared 2-core machine single runs are sometimes slowed many-fold by other processes; medians are reported too.

GPU mode: the full-size PixCell-256 architecture (608 M parameters, random weights), a UNI2-h-sized encoder and an
SD3.5-sized VAE (random weights), bf16 transformer, fp32 encoder (as PixCell extracted its conditioning), bf16 VAE decode, 20 steps with guidance: tiles per
second from uint8 tiles in to uint8 tiles out, beside a naive batch-1 fp32 loop and the FLOP bound (FLOPs per tile
counted on the meta device; peak from ``--peak-tflops``, 790 for an H100 as in the issue).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.record import record
from pixcell_fed.generation.published import SD35_VAE_CONFIG

PIXCELL_256_CONFIG = {"sample_size": 32, "caption_num_tokens": 1, "interpolation_scale": 0.5}  # the rest: defaults


# ---------------------------------------------------------------------------------------------------------------
# The bare loop: the same calls PixCellPipeline makes, with no validation, batching or bookkeeping.
# ---------------------------------------------------------------------------------------------------------------
def bare_generate(pipe: Any, cond: "Any", seeds: list[int], steps: int, guidance: float, batch: int) -> np.ndarray:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    transformer, vae = pipe.transformer, pipe.vae
    c, n = transformer.config.in_channels, transformer.config.sample_size
    outs = []
    with torch.inference_mode():
        for start in range(0, len(seeds), batch):
            s = seeds[start : start + batch]
            y = torch.as_tensor(cond[start : start + batch], dtype=pipe.dtype, device=pipe.device)
            sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler_config)
            sched.set_timesteps(steps, device=pipe.device)
            x = torch.stack([torch.randn(c, n, n, generator=torch.Generator().manual_seed(k)) for k in s])
            x = (x * sched.init_noise_sigma).to(pipe.device)
            null = transformer.caption_projection.uncond_embedding.to(pipe.dtype)[None].expand(len(s), -1, -1)
            tokens = torch.cat([null, y])
            for t in sched.timesteps:
                out = transformer(torch.cat([x, x]).to(pipe.dtype), encoder_hidden_states=tokens, timestep=t.expand(2 * len(s)),
                                  return_dict=False)[0]
                eps_u, eps_c = out[:, :c].float().chunk(2)
                x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, return_dict=False)[0]
            z = x / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
            outs.append(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(outs)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of ``fn()``, GPU work synchronised."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def cpu_overhead(repeats: int, n_tiles: int, steps: int) -> dict[str, Any]:
    """Tiny twins via the real loader: pipeline.generate vs bare_generate, interleaved, medians."""
    from pixcell_fed.generation import load_pixcell
    from pixcell_fed.generation.sampler import seeds_for
    from pixcell_fed.simulation.twins import TWIN_COND_DIM, save_tiny_pixcell, save_tiny_vae

    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pixcell(save_tiny_pixcell(Path(tmp) / "p256", 256), save_tiny_vae(Path(tmp) / "vae"), device="cpu")
    cond = np.random.default_rng(0).standard_normal((n_tiles, 1, TWIN_COND_DIM)).astype(np.float32)
    seeds = seeds_for(0, n_tiles)
    batch = pipe.auto_batch_size()
    ours = pipe.generate(cond, seeds=seeds, steps=steps, guidance=2.0, batch_size=batch)  # warm-up + equality check
    bare = bare_generate(pipe, cond, seeds, steps, 2.0, batch)
    max_diff = int(np.abs(ours.astype(int) - bare.astype(int)).max())
    t_pipe, t_bare, c_pipe, c_bare = [], [], [], []
    run_pipe = lambda: pipe.generate(cond, seeds=seeds, steps=steps, guidance=2.0, batch_size=batch)  # noqa: E731
    run_bare = lambda: bare_generate(pipe, cond, seeds, steps, 2.0, batch)  # noqa: E731
    for i in range(repeats):  # alternate which goes first, so order effects cancel
        order = [(run_bare, t_bare, c_bare), (run_pipe, t_pipe, c_pipe)]
        for fn, walls, cpus in order if i % 2 else order[::-1]:
            wall, cpu = timed(fn, "cpu")
            walls.append(wall)
            cpus.append(cpu)
    p, b = min(t_pipe), min(t_bare)
    return {
        "cpu_tiles": n_tiles,
        "cpu_steps": steps,
        "cpu_batch": batch,
        "cpu_repeats": repeats,
        "cpu_pipeline_s": round(p, 4),
        "cpu_bare_s": round(b, 4),
        "cpu_pipeline_median_s": round(statistics.median(t_pipe), 4),
        "cpu_bare_median_s": round(statistics.median(t_bare), 4),
        "cpu_overhead_pct": round(100 * (p / b - 1), 2),
        "cpu_overhead_median_pct": round(100 * (statistics.median(t_pipe) / statistics.median(t_bare) - 1), 2),
        "cpu_overhead_cpu_time_pct": round(100 * (min(c_pipe) / min(c_bare) - 1), 2),
        "cpu_overhead_target_pct": 10.0,
        "cpu_overhead_ok": p / b - 1 <= 0.10,
        "cpu_max_pixel_diff_vs_bare": max_diff,
    }


def flops_per_tile(steps: int, guidance: bool = True) -> dict[str, float]:
    """FLOPs of one 256 px tile at full size, counted on the meta device (no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from pixcell_fed.encoders.uni import build_uni
    from pixcell_fed.generation.transformer import PixCellTransformer2DModel

    with torch.device("meta"):
        transformer = PixCellTransformer2DModel.from_config(PIXCELL_256_CONFIG)
        encoder = build_uni()
        vae = AutoencoderKL.from_config(SD35_VAE_CONFIG)
        counts = {}
        for name, fn in (
            ("transformer_forward", lambda: transformer(torch.empty(1, 16, 32, 32), encoder_hidden_states=torch.empty(1, 1, 1536),
                                                        timestep=torch.zeros(1, dtype=torch.long))),
            ("encoder", lambda: encoder(torch.empty(1, 3, 224, 224))),
            ("vae_decode", lambda: vae.decode(torch.empty(1, 16, 32, 32))),
        ):
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[name] = counter.get_total_flops()
    forwards = steps * (2 if guidance else 1)
    total = counts["transformer_forward"] * forwards + counts["encoder"] + counts["vae_decode"]
    return {"tflop_per_tile": total / 1e12, **{f"tflop_{k}": v / 1e12 for k, v in counts.items()}}


def gpu_throughput(device_name: str, n_tiles: int, batch: int | None, naive_tiles: int, steps: int, tiny: bool) -> dict[str, Any]:
    """Full-size (or, for --dry-run, tiny) encoder + PixCell-256 + VAE: tiles/s end to end vs a naive fp32 loop."""
    import copy

    import torch
    from diffusers import AutoencoderKL

    from pixcell_fed.encoders.base import Encoder, EncoderFolder
    from pixcell_fed.encoders.uni import build_uni, uni_twin_kwargs
    from pixcell_fed.generation.loader import DEFAULT_SCHEDULER_CONFIG
    from pixcell_fed.generation.sampler import PixCellPipeline, seeds_for
    from pixcell_fed.generation.transformer import PixCellTransformer2DModel
    from pixcell_fed.simulation.twins import tiny_pixcell_config, tiny_vae_config

    device = torch.device(device_name)
    fast_dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        if tiny:
            t32 = PixCellTransformer2DModel.from_config(tiny_pixcell_config(256))
            v32 = AutoencoderKL.from_config(tiny_vae_config())
            e32 = build_uni(uni_twin_kwargs(t32.config.caption_channels))
        else:
            t32 = PixCellTransformer2DModel.from_config(PIXCELL_256_CONFIG)
            v32 = AutoencoderKL.from_config(SD35_VAE_CONFIG)
            e32 = build_uni()
    fast_vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def pipeline(transformer, vae, encoder_model, dtype, vae_dtype):
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast about fp32-kept modules (there are none).
        transformer = torch.nn.Module.to(copy.deepcopy(transformer), dtype=dtype).eval().requires_grad_(False)
        vae = torch.nn.Module.to(copy.deepcopy(vae), dtype=vae_dtype).eval().requires_grad_(False)
        # UNI2-h embeds in float32 on every device, as the site pipeline runs it (PixCell's conditioning was fp32).
        found = EncoderFolder(name="uni2-h-sized (random)", weights_file=None, architecture="vit_giant_patch14_224",
                              dim=transformer.config.caption_channels)
        enc = Encoder(copy.deepcopy(encoder_model).to(dtype=torch.float32), found, weights_sha256="random")
        return enc, PixCellPipeline(transformer, vae, dict(DEFAULT_SCHEDULER_CONFIG), twin=True)

    enc_fast, pipe_fast = pipeline(t32, v32, e32, fast_dtype, fast_vae_dtype)
    enc_naive, pipe_naive = pipeline(t32, v32, e32, torch.float32, torch.float32)
    del t32, v32, e32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    size = pipe_fast.image_size
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(n_tiles, size, size, 3), dtype=np.uint8)
    seeds = seeds_for(1, n_tiles)
    bs = batch or pipe_fast.auto_batch_size()
    enc_fast.batch_size = bs

    def end_to_end(enc, pipe, images, seeds_, batch_):
        cond = enc.embed(images)
        return pipe.generate(cond[:, None, :], seeds=seeds_, steps=steps, guidance=2.0, batch_size=batch_)

    end_to_end(enc_fast, pipe_fast, tiles[:bs], seeds[:bs], bs)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fast = timed(lambda: end_to_end(enc_fast, pipe_fast, tiles, seeds, bs), device)[0]
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    enc_naive.batch_size = 1
    end_to_end(enc_naive, pipe_naive, tiles[:1], seeds[:1], 1)  # warm-up
    t_naive = timed(lambda: end_to_end(enc_naive, pipe_naive, tiles[:naive_tiles], seeds[:naive_tiles], 1), device)[0]
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (dry run, tiny)",
        "gpu_tiles": n_tiles,
        "gpu_batch": bs,
        "gpu_steps": steps,
        "gpu_dtype": "bf16 transformer, fp32 encoder, " + ("bf16 VAE" if device.type == "cuda" else "fp32 VAE"),
        "gpu_tiles_per_s": round(n_tiles / t_fast, 3),
        "gpu_naive_fp32_batch1_tiles_per_s": round(naive_tiles / t_naive, 4),
        "gpu_speedup_vs_naive": round((n_tiles / t_fast) / (naive_tiles / t_naive), 2),
        "gpu_peak_mem_gib": round(peak_gb, 2) if peak_gb is not None else None,
        "gpu_target_tiles_per_s": 25.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthesis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per variant in CPU mode")
    parser.add_argument("--tiles", type=int, default=8, help="tiles per CPU repeat")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu", action="store_true", help="also measure full-size throughput on a CUDA GPU")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: run the GPU code path tiny, on the CPU; record nothing")
    parser.add_argument("--gpu-tiles", type=int, default=512)
    parser.add_argument("--gpu-batch", type=int, default=None, help="samples per batch (default: sized to free GPU memory)")
    parser.add_argument("--naive-tiles", type=int, default=4, help="tiles for the batch-1 fp32 baseline")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch in this process (default: torch's choice); 1 steadies timings on a busy machine")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak of the card for the FLOP bound")
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # this benchmark process only

    if args.gpu and args.dry_run:
        figures = gpu_throughput("cpu", n_tiles=4, batch=2, naive_tiles=2, steps=2, tiny=True)
        print({k: v for k, v in figures.items()})
        print("dry run: the GPU path ran end to end at tiny size on the CPU; nothing recorded")
        return 0

    figures: dict[str, Any] = cpu_overhead(args.repeats, args.tiles, args.steps)
    flops = flops_per_tile(args.steps)
    figures["full_size_tflop_per_tile"] = round(flops["tflop_per_tile"], 3)
    figures["full_size_tflop_breakdown"] = {k: round(v, 4) for k, v in flops.items() if k != "tflop_per_tile"}
    figures["flop_bound_tiles_per_s"] = round(args.peak_tflops / flops["tflop_per_tile"], 1)
    figures["flop_bound_peak_tflops"] = args.peak_tflops
    rows = [
        "| measure | value |",
        "|---|---|",
        f"| CPU, tiny twins, {figures['cpu_tiles']} tiles x {figures['cpu_steps']} steps, guidance 2.0: pipeline "
        f"(best / median of {figures['cpu_repeats']}) | {figures['cpu_pipeline_s']:.3f} s / {figures['cpu_pipeline_median_s']:.3f} s |",
        f"| CPU, same work, bare transformer + scheduler + VAE calls | {figures['cpu_bare_s']:.3f} s / "
        f"{figures['cpu_bare_median_s']:.3f} s |",
        f"| pipeline overhead, best (median) (target <= 10 %) | {figures['cpu_overhead_pct']:+.1f} % "
        f"({figures['cpu_overhead_median_pct']:+.1f} %) |",
        f"| pipeline overhead in process CPU time, best | {figures['cpu_overhead_cpu_time_pct']:+.1f} % |",
        f"| full-size FLOPs per 256 px tile (20 steps, CFG, UNI2-h + VAE), counted on meta | "
        f"{figures['full_size_tflop_per_tile']:.2f} TFLOP |",
        f"| FLOP bound at {args.peak_tflops:.0f} TFLOP/s | {figures['flop_bound_tiles_per_s']} tiles/s |",
    ]
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu asked for, but no CUDA GPU is visible; run without --gpu, or with --gpu --dry-run")
        gpu = gpu_throughput("cuda", args.gpu_tiles, args.gpu_batch, args.naive_tiles, args.steps, tiny=False)
        figures.update(gpu)
        figures["gpu_fraction_of_flop_bound"] = round(gpu["gpu_tiles_per_s"] / figures["flop_bound_tiles_per_s"], 3)
        rows += [
            f"| {gpu['gpu']}: end to end, full-size, bf16, batch {gpu['gpu_batch']}, {gpu['gpu_tiles']} tiles (target >= 25) | "
            f"{gpu['gpu_tiles_per_s']} tiles/s |",
            f"| {gpu['gpu']}: naive batch-1 fp32 loop | {gpu['gpu_naive_fp32_batch1_tiles_per_s']} tiles/s |",
            f"| speed-up vs naive; fraction of FLOP bound | {gpu['gpu_speedup_vs_naive']}x; {figures['gpu_fraction_of_flop_bound']:.0%} |",
        ]
    else:
        rows.append("| GPU throughput | not measured on this machine (run `python -m benchmarks.synthesis --gpu` on a CUDA GPU) |")
    command = "python -m benchmarks.synthesis" + (" --gpu" if args.gpu else "") + (
        f" --threads {args.threads}" if args.threads is not None else "")
    figures["cpu_threads"] = args.threads if args.threads is not None else "default"
    headline = f"CPU pipeline overhead {figures['cpu_overhead_pct']}% over the bare calls (target <= 10%)"
    if "gpu_tiles_per_s" in figures:
        headline += f"; {figures['gpu_tiles_per_s']} tiles/s full-size on {figures['gpu']} (target >= 25)"
    else:
        headline += "; GPU throughput not measured (no GPU)"
    record("synthesis", "Synthesis (PixCell sampler)", command, figures, "\n".join(rows), headline=headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

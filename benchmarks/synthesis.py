"""Synthesis speed: the pipeline's overhead on tiny twins (CPU), and end-to-end tiles/s at full size (GPU).

Run from the repository root:

    python -m benchmarks.synthesis                 # CPU: pipeline vs the bare calls it makes (target <= 10 % overhead)
    python -m benchmarks.synthesis --gpu           # + full-size PixCell-256 on one CUDA GPU (target >= 25 tiles/s on an H100)
    python -m benchmarks.synthesis --gpu --dry-run # the GPU code path at tiny size on the CPU (checks it runs; records nothing)
    python -m benchmarks.synthesis --threads 1     # steadier CPU timings on a busy shared machine
    python -m benchmarks.synthesis --processes 2   # sharded: 2 torchrun processes against 1, 1 thread each (>= 1.7x)

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


# ---------------------------------------------------------------------------------------------------------------
# Sharded synthesis: N processes (torchrun, gloo) against one, on the twins, one thread each
# ---------------------------------------------------------------------------------------------------------------
def shard_worker(models_dir: str, tiles_dir: str, work_dir: str, steps: int, batch: int, result: str) -> None:
    """One process of the sharded benchmark (a plain process, or one torchrun rank): the pipeline's own embedding
    and generation stages (``_embed_conditioning`` and ``_generate``) on the tiles of ``tiles_dir``, timed on rank 0
    between the checkpoints that all ranks pass."""
    import hashlib
    import json

    import pandas as pd
    import torch

    from pixcell_fed.config.schema import SiteConfig, SynthesisConfig
    from pixcell_fed.encoders import load_encoder
    from pixcell_fed.generation import load_pixcell
    from pixcell_fed.pipeline.distributed import launched_ranks
    from pixcell_fed.pipeline.run_layout import RunLayout
    from pixcell_fed.pipeline.synthesize import _embed_conditioning, _generate

    torch.set_num_threads(1)
    models = Path(models_dir)
    cfg = SiteConfig(synthesis=SynthesisConfig(steps=steps, batch_size=batch, guidance=2.0))
    files = sorted(p.name for p in Path(tiles_dir).glob("*.png"))
    with launched_ranks("cpu") as ranks:
        layout = RunLayout(Path(work_dir))
        layout.root.mkdir(parents=True, exist_ok=True)
        layout_tiles = layout.tiles_dir
        if ranks.is_main and not layout_tiles.exists():
            layout_tiles.symlink_to(Path(tiles_dir).resolve(), target_is_directory=True)
        pipe = load_pixcell(models / "pixcell-256-twin", models / "sd35-vae-twin", device="cpu")
        encoder = load_encoder("uni2-h-twin", models / "uni2-h-twin", device="cpu")
        rows = pd.DataFrame({"tile_id": [Path(f).stem for f in files], "tile_file": files,
                             "slide_file": ["bench.svs"] * len(files)})
        ranks.checkpoint("ready")
        t0 = time.perf_counter()
        cond, _ = _embed_conditioning(cfg, layout, rows, pipe.variant, encoder, ranks)
        ranks.checkpoint("embedded")
        t1 = time.perf_counter()
        table = _generate(cfg, layout, pipe, rows, cond, {}, ranks)
        t2 = time.perf_counter()
        if ranks.is_main:
            digest = hashlib.sha256()
            for name in sorted(table["synthetic_file"]):
                digest.update((layout.synthetic_dir / name).read_bytes())
            Path(result).write_text(json.dumps({"processes": ranks.world_size, "tiles": len(files), "embed_s": t1 - t0,
                                                "generate_s": t2 - t1, "tiles_sha256": digest.hexdigest()}))
        ranks.finish()


def sharded_speedup(processes: int, n_tiles: int, steps: int, batch: int, repeats: int) -> dict[str, Any]:
    """Embedding + generation of ``n_tiles`` twin tiles by ``processes`` torchrun ranks against one plain process,
    one thread each; the best of ``repeats`` alternating runs of each (startup and model loading excluded)."""
    import json
    import os
    import subprocess
    import sys

    import cv2

    from pixcell_fed.testing.audit_tiles import random_region_tiles
    from pixcell_fed.testing.sites import write_twin_models

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PIXCELL_FED_NO_PROGRESS": "1"}
    runs: dict[int, list[dict]] = {1: [], processes: []}
    with tempfile.TemporaryDirectory(prefix="pixcell-fed-sharded-") as tmp:
        root = Path(tmp)
        write_twin_models(root / "models")
        tiles = root / "tiles"
        tiles.mkdir()
        for i, tile in enumerate(random_region_tiles(n_tiles, 0, 2220, seed=0)):
            cv2.imwrite(str(tiles / f"tile{i:05d}.png"), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
        for rep in range(repeats):
            for procs in ((1, processes) if rep % 2 == 0 else (processes, 1)):
                work, result = root / f"work-{procs}-{rep}", root / f"result-{procs}-{rep}.json"
                worker = ["-m", "benchmarks.synthesis", "--shard-worker", str(root / "models"), str(tiles), str(work),
                          str(steps), str(batch), str(result)]
                launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                             "--standalone", f"--nproc_per_node={procs}"]
                proc = subprocess.run(launch + worker, capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise SystemExit(f"the {procs}-process run failed:\n{proc.stderr[-3000:]}")
                runs[procs].append(json.loads(result.read_text()))
    best = {p: min(r["embed_s"] + r["generate_s"] for r in rs) for p, rs in runs.items()}
    hashes = {r["tiles_sha256"] for rs in runs.values() for r in rs}
    return {
        "sharded_processes": processes, "sharded_tiles": n_tiles, "sharded_steps": steps, "sharded_batch": batch,
        "sharded_repeats": repeats, "threads_per_process": 1,
        "one_process_s": round(best[1], 3), "sharded_s": round(best[processes], 3),
        "one_process_tiles_per_s": round(n_tiles / best[1], 3),
        "sharded_tiles_per_s": round(n_tiles / best[processes], 3),
        "sharded_speedup": round(best[1] / best[processes], 2), "sharded_speedup_target": 1.7,
        "sharded_embed_s": round(min(r["embed_s"] for r in runs[processes]), 3),
        "one_process_embed_s": round(min(r["embed_s"] for r in runs[1]), 3),
        "same_tile_bytes": len(hashes) == 1,
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
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="instead: sharded synthesis with N torchrun processes against one, 1 thread each "
                             "(target >= 1.7x for 2)")
    parser.add_argument("--sharded-tiles", type=int, default=48, help="tiles for --processes")
    parser.add_argument("--sharded-batch", type=int, default=2, help="synthesis batch for --processes")
    parser.add_argument("--quick", action="store_true", help="with --processes: a smoke-sized run, recorded nowhere")
    parser.add_argument("--shard-worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shard_worker:
        models, tiles, work, steps, batch, result = args.shard_worker
        shard_worker(models, tiles, work, int(steps), int(batch), result)
        return 0
    if args.processes:
        return _record_sharded(args)
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


def _record_sharded(args: argparse.Namespace) -> int:
    if args.processes < 2:
        raise SystemExit("--processes needs at least 2 (it is compared with one process)")
    tiles, steps, repeats = (8, 4, 1) if args.quick else (args.sharded_tiles, args.steps, 3)
    figures = sharded_speedup(args.processes, tiles, steps, args.sharded_batch, repeats)
    figures["quick"] = args.quick
    table = (
        "| tiny twins, CPU, 1 thread per process | seconds (best of "
        f"{figures['sharded_repeats']}) | tiles/s |\n|---|---|---|\n"
        f"| one process: embedding + generation of {tiles} tiles x {steps} steps, batch {args.sharded_batch} | "
        f"{figures['one_process_s']} | {figures['one_process_tiles_per_s']} |\n"
        f"| {args.processes} torchrun processes (gloo), same work | {figures['sharded_s']} | "
        f"{figures['sharded_tiles_per_s']} |\n"
        f"| speed-up (target >= 1.7 for 2) | {figures['sharded_speedup']}x | |\n\n"
        f"Same tile bytes in every run: {figures['same_tile_bytes']}. Timed on rank 0 between checkpoints that every "
        "rank passes (process start and model loading excluded); the stages are the pipeline's own "
        "(`_embed_conditioning`, `_generate`)."
    )
    headline = (f"sharded synthesis {figures['sharded_speedup']}x with {args.processes} processes against 1 on the "
                f"twins, 1 thread each (target >= 1.7x); same tile bytes: {figures['same_tile_bytes']}")
    record("synthesis_sharded", "Sharded synthesis (torchrun, CPU processes)",
           f"python -m benchmarks.synthesis --processes {args.processes}" + (" --quick" if args.quick else ""),
           figures, table, headline=headline)
    return 0 if figures["same_tile_bytes"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

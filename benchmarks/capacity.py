"""Capacity: tiles per hour for tiling, embedding, synthesis and the audit, on this CPU and (estimated) on H100s.

Run from the repository root, on a quiet machine, after ``python -m benchmarks.tiling``, ``python -m benchmarks.audit``
and ``python -m benchmarks.audit_scaling`` (whose recorded figures it reads):

    python -m benchmarks.capacity           # measures full-size UNI2-h and PixCell-256 on this CPU (a few minutes)
    python -m benchmarks.capacity --quick   # 1 tile, 1 step: checks the script, records nothing

CPU, measured: tiling (``benchmarks.tiling``: the folder job writing PNGs), embedding (full-size UNI2-h, random
weights, float32, here), synthesis (full-size PixCell-256 + SD3.5 VAE, random weights, float32, 20 steps with
guidance, one tile per batch, here) and the whole audit (``benchmarks.audit``: 10,000 synthetic tiles against
10,000 + 5,000 real ones, JPEG files read and described).

GPU, estimated until measured (``python -m benchmarks.gpu``): the FLOPs of each model counted on the meta device, at
``--mfu`` (default 40 %) of ``--peak-tflops`` (790, dense bf16 of an H100 SXM). Embedding and synthesis split over
the GPUs (``torchrun``), so 8 GPUs give 8 times one; tiling runs on the CPUs of rank 0's machine and the audit on
rank 0's GPU, so they do not grow with the GPU count. The audit's GPU estimate keeps its measured non-search time
(reading, describing, pixel confirmation, statistics, reports: CPU work) and replaces the search by its FLOPs.

The table is written to BENCHMARKS.md and, between its markers, to docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.record import BENCHMARKS_MD

DEPLOYMENT_MD = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
#: pairs searched by one audit per (synthetic tile)^2, with |T| = |S| and |H| = |S| / 2: H->T 0.5, S->T 1, T->T 1,
#: the two DCR searches 0.25 each, membership (T_mia + H_mia = |H|) x S in each of 2 rounds 1
AUDIT_PAIRS_PER_S2 = 4.0
#: FLOPs of one pair: 8 rotations/flips x 10 crops of 143-d descriptors, a multiply-add each
AUDIT_FLOP_PER_PAIR = 8 * 10 * 143 * 2


def recorded(name: str) -> dict[str, Any] | None:
    """The JSON figures of one recorded section of BENCHMARKS.md, or None."""
    if not BENCHMARKS_MD.is_file():
        return None
    match = re.search(rf"<!-- {name}:start -->.*?```json\n(.*?)\n```", BENCHMARKS_MD.read_text(), re.S)
    return json.loads(match.group(1)) if match else None


def measure_embedding(tiles: int) -> float:
    """Seconds per tile of full-size UNI2-h (random weights) on this CPU, float32."""
    import torch

    from pixcell_fed.encoders.base import Encoder, EncoderFolder
    from pixcell_fed.encoders.uni import build_uni

    torch.manual_seed(0)
    found = EncoderFolder(name="uni2-h-sized (random)", weights_file=None, architecture="vit_giant_patch14_224",
                          dim=1536)
    encoder = Encoder(build_uni(), found, weights_sha256="random", batch_size=tiles)
    images = np.random.default_rng(0).integers(0, 256, (tiles, 256, 256, 3), dtype=np.uint8)
    encoder.embed(images[:1])  # warm-up
    t0 = time.perf_counter()
    encoder.embed(images)
    return (time.perf_counter() - t0) / tiles


def measure_synthesis(steps: int) -> float:
    """Seconds per tile of full-size PixCell-256 + SD3.5 VAE (random weights) on this CPU, float32, guidance 2."""
    import torch
    from diffusers import AutoencoderKL

    from benchmarks.synthesis import PIXCELL_256_CONFIG
    from pixcell_fed.generation.loader import DEFAULT_SCHEDULER_CONFIG
    from pixcell_fed.generation.published import SD35_VAE_CONFIG
    from pixcell_fed.generation.sampler import PixCellPipeline
    from pixcell_fed.generation.transformer import PixCellTransformer2DModel

    torch.manual_seed(0)
    transformer = PixCellTransformer2DModel.from_config(PIXCELL_256_CONFIG).eval().requires_grad_(False)
    vae = AutoencoderKL.from_config(SD35_VAE_CONFIG).eval().requires_grad_(False)
    pipe = PixCellPipeline(transformer, vae, dict(DEFAULT_SCHEDULER_CONFIG), twin=True)
    cond = np.random.default_rng(0).standard_normal((1, 1, 1536)).astype(np.float32)
    pipe.generate(cond, seeds=[0], steps=1, guidance=2.0, batch_size=1)  # warm-up
    t0 = time.perf_counter()
    pipe.generate(cond, seeds=[1], steps=steps, guidance=2.0, batch_size=1)
    return time.perf_counter() - t0


def per_hour(seconds_per_tile: float | None) -> float | None:
    return None if not seconds_per_tile else 3600.0 / seconds_per_tile


def _fmt(value: float | None) -> str:
    if value is None:
        return "not measured yet"
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    if value >= 1e3:
        return f"{value / 1e3:.0f} k"
    return f"{value:.0f}"


def capacity(embed_s: float | None, synth_s: float | None, steps: int, mfu: float,
             peak_tflops: float) -> dict[str, Any]:
    """The figures of the table (``embed_s``/``synth_s`` None: not measured here)."""
    from benchmarks.synthesis import flops_per_tile

    flops = flops_per_tile(20)
    rate = mfu * peak_tflops * 1e12
    embed_flop = flops["tflop_encoder"] * 1e12
    synth_flop = (flops["tflop_per_tile"] - flops["tflop_encoder"]) * 1e12
    tiling = recorded("tiling")
    audit = recorded("audit")
    scaling = recorded("audit_scaling_cpu")
    out: dict[str, Any] = {
        "mfu": mfu, "peak_tflops": peak_tflops, "synthesis_steps_measured": steps,
        "tflop_embedding_per_tile": round(embed_flop / 1e12, 3),
        "tflop_synthesis_per_tile": round(synth_flop / 1e12, 3),
        "cpu_embedding_s_per_tile": embed_s and round(embed_s, 3),
        "cpu_synthesis_s_per_tile": synth_s and round(synth_s * 20 / steps, 2),
        "cpu_tiling_tiles_per_s": tiling.get("folder_job_2_workers_with_png_tiles_per_s") if tiling else None,
        "tiling_machine": tiling.get("machine") if tiling else None,
    }
    out["cpu_per_hour"] = {"tiling": (out["cpu_tiling_tiles_per_s"] or 0) * 3600 or None,
                           "embedding": per_hour(embed_s), "synthesis": per_hour(synth_s and synth_s * 20 / steps)}
    one = {"embedding": rate / embed_flop * 3600, "synthesis": rate / synth_flop * 3600}
    if audit:
        n_s = audit["audit_S"]
        search_cpu = None
        if scaling:  # the search's share of a CPU audit at this size, from the scaling run
            run = next((r for r in scaling["runs"] if r["S"] == n_s), None)
            search_cpu = run["seconds"]["search"] if run else None
        gpu_search = AUDIT_PAIRS_PER_S2 * n_s ** 2 * AUDIT_FLOP_PER_PAIR / rate
        out["cpu_per_hour"]["audit"] = n_s / audit["audit_s"] * 3600
        out["audit_S"] = n_s
        if search_cpu is not None:
            one["audit"] = n_s / (audit["audit_s"] - search_cpu + gpu_search) * 3600
    out["h100_per_hour"] = one
    out["8xh100_per_hour"] = {"embedding": 8 * one["embedding"], "synthesis": 8 * one["synthesis"],
                              **({"audit": one["audit"]} if "audit" in one else {})}
    return out


def table(c: dict[str, Any]) -> str:
    cpu, one, eight = c["cpu_per_hour"], c["h100_per_hour"], c["8xh100_per_hour"]
    audit_note = f" (S = {c['audit_S']:,} tiles)" if "audit_S" in c else ""
    rows = [
        "| stage | CPU (measured) | 1 x H100 (estimate) | 8 x H100 (estimate) |",
        "|---|---|---|---|",
        f"| tiling (2 workers) | {_fmt(cpu['tiling'])} | CPU-bound: grows with `tiling.workers` (rank 0's machine's "
        "cores), not with GPUs | same |",
        f"| embedding (UNI2-h, {c['tflop_embedding_per_tile']} TFLOP/tile) | {_fmt(cpu['embedding'])} | "
        f"{_fmt(one['embedding'])} | {_fmt(eight['embedding'])} |",
        f"| synthesis (PixCell-256, 20 steps, guidance, VAE; {c['tflop_synthesis_per_tile']} TFLOP/tile) | "
        f"{_fmt(cpu['synthesis'])} | {_fmt(one['synthesis'])} | {_fmt(eight['synthesis'])} |",
        f"| audit{audit_note} | {_fmt(cpu.get('audit'))} | {_fmt(one.get('audit'))} | {_fmt(eight.get('audit'))} "
        "(rank 0's GPU) |",
    ]
    return "\n".join(rows) + (
        f"\n\nTiles per hour. GPU figures are estimates from the FLOPs counted on the meta device at {c['mfu']:.0%} of "
        f"{c['peak_tflops']:.0f} TFLOP/s until `python -m benchmarks.gpu` measures them. The audit's search grows as "
        "|S| x |T|: its hourly rate falls as the set grows (see the audit scaling table).")


def write_deployment_table(text: str, source: str) -> None:
    """Replace the capacity table of docs/deployment.md (between its markers)."""
    doc = DEPLOYMENT_MD.read_text()
    block = f"<!-- capacity:start -->\n{source}\n\n{text}\n<!-- capacity:end -->"
    doc, count = re.subn(r"<!-- capacity:start -->.*?<!-- capacity:end -->", lambda _m: block, doc, flags=re.S)
    if count != 1:
        raise SystemExit(f"{DEPLOYMENT_MD} has no capacity markers")
    DEPLOYMENT_MD.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.record import machine_description, record

    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 tile, 1 step: checks the script, records nothing")
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the GPU's peak the estimates assume")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak of one GPU")
    args = parser.parse_args(argv)
    steps = 1 if args.quick else 20
    embed_s = measure_embedding(1 if args.quick else 8)
    synth_s = measure_synthesis(steps)
    figures = capacity(embed_s, synth_s, steps, args.mfu, args.peak_tflops)
    figures["quick"] = args.quick
    text = table(figures)
    headline = (f"per hour on CPU: {_fmt(figures['cpu_per_hour']['synthesis'])} synthetic tiles; estimated "
                f"{_fmt(figures['h100_per_hour']['synthesis'])} on one H100, "
                f"{_fmt(figures['8xh100_per_hour']['synthesis'])} on 8")
    record("capacity", "Capacity: tiles per hour", "python -m benchmarks.capacity", figures, text, headline=headline)
    if not args.quick:
        write_deployment_table(text, f"Measured by `python -m benchmarks.capacity` on {machine_description()} "
                                     f"({time.strftime('%Y-%m-%d')}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

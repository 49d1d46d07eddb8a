"""Every GPU check and benchmark in one command, for the few minutes a CUDA machine is lent.

Run from the repository root on a machine with a CUDA GPU:

    python -m benchmarks.gpu            # at most 9 minutes (--budget-minutes) on one H100/H200
    python -m benchmarks.gpu --quick    # smaller sizes (about 4 minutes): a first look, recorded nowhere
    python -m benchmarks.gpu --dry-run  # every step's code path at tiny size on the CPU (no GPU; records nothing)

In order (each step runs in its own process, so one failure does not hide the others' figures):

1. ``pytest -m gpu``: the ``gpu``-marked tests (the certified search on CUDA against float64, the GPU search's
   linear memory, sharded synthesis over NCCL giving the same tiles as one GPU process, bf16 sampling).
2. The exact search on the GPU: top-5 of N x N unit vectors at 1,536 dimensions (the fidelity searches) and of the
   audit's descriptors (143-d, 8 rotations/flips x 10 crops), the certified bf16 first pass against the plain
   float32 GEMM path on the same GPU, with their agreement (disagreeing top-1 keys checked in float64).
3. ``benchmarks.synthesis --gpu``: full-size PixCell-256 tiles per second (its own section).
4. ``benchmarks.audit_scaling --device cuda``: the whole audit at 10k, 30k and 100k tiles (its own section), with
   the time that is left of the budget.

Steps 2-4 print their figures; the figures of 1 and 2 go to the ``gpu`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import numpy as np


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout:.0f} s", 124
    print(out[-4000:], file=sys.stderr, flush=True)
    return code, out, time.perf_counter() - t0


def gpu_tests(timeout: float) -> dict[str, Any]:
    """The gpu-marked tests; their summary line."""
    code, out, seconds = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                              timeout)
    summary = next((line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)),
                   out.strip().splitlines()[-1] if out.strip() else "no output")
    return {"gpu_tests_exit_code": code, "gpu_tests_summary": summary.strip("= "), "gpu_tests_s": round(seconds, 1)}


def _timed(fn, device) -> tuple[Any, float]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def search_on_device(n: int, dim: int, variants: tuple[int, int], device_name: str, seed: int = 0) -> dict[str, Any]:
    """The certified bf16 first pass against the float32 GEMM path, both on ``device_name``: N queries x N keys."""
    import torch

    from pixcell_fed.audit import search as S

    device = torch.device(device_name)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim), dtype=np.float32)

    def points(count: int, groups: int) -> np.ndarray:
        base = centres[rng.integers(0, 256, count)] + 0.8 * rng.standard_normal((count, dim), dtype=np.float32)
        spread = 0.3 if groups > 1 else 0.0   # variants of one tile (rotations, crops) stay close to it
        out = base[None] + spread * rng.standard_normal((groups, count, dim), dtype=np.float32)
        return S.l2_normalize(out)

    g, v = variants
    q, k = points(n, g), points(n, v)
    with S.ieee_float32():
        S._topk_float32(q[:, :64], k, 5, exclude_self=False, block_bytes=2**31, dev=device)  # warm-up
        ours, t_ours = _timed(lambda: S._topk_bf16_certified(q, k, 5, exclude_self=False, block_bytes=2**31,
                                                             dev=device), device)
        plain, t_plain = _timed(lambda: S._topk_float32(q, k, 5, exclude_self=False, block_bytes=2**31, dev=device),
                                device)
    differ = np.nonzero(ours.idx[:, 0] != plain.idx[:, 0])[0]
    if len(differ):   # float64 scores of the two keys named: a near-tie float32 cannot order?
        qd = q[:, differ].astype(np.float64)
        a = np.einsum("gnd,vnd->gvn", qd, k[:, ours.idx[differ, 0]].astype(np.float64)).max(axis=(0, 1))
        b = np.einsum("gnd,vnd->gvn", qd, k[:, plain.idx[differ, 0]].astype(np.float64)).max(axis=(0, 1))
        gap = float(np.abs(a - b).max())
    else:
        gap = 0.0
    name = f"search_{dim}d_{g}x{v}"
    return {f"{name}_n": n, f"{name}_certified_s": round(t_ours, 3), f"{name}_float32_s": round(t_plain, 3),
            f"{name}_speedup": round(t_plain / t_ours, 2),
            f"{name}_top1_agreement": float(np.mean(ours.idx[:, 0] == plain.idx[:, 0])),
            f"{name}_top1_disagreement_max_float64_gap": gap,
            f"{name}_max_abs_sim_diff": float(np.abs(ours.sims - plain.sims).max()),
            f"{name}_rows_widened": ours.widened_rows, f"{name}_rows_recomputed": ours.recomputed_rows}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.record import record

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes; records nothing")
    parser.add_argument("--dry-run", action="store_true", help="every step tiny, on the CPU; records nothing")
    parser.add_argument("--budget-minutes", type=float, default=9.0,
                        help="stop starting steps when this is spent (a lent GPU machine runs one command for at "
                             "most 10 minutes); a step that does not fit is reported as skipped")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run this on a GPU machine, or with --dry-run to check the script")
    device = "cpu" if args.dry_run else "cuda"
    figures: dict[str, Any] = {"quick": args.quick or args.dry_run, "dry_run": args.dry_run}
    steps: dict[str, int] = {}

    deadline = time.monotonic() + 60 * args.budget_minutes

    def left() -> float:
        return deadline - time.monotonic()

    if args.dry_run:
        figures["gpu_tests_summary"] = "not run (dry run)"
    else:
        figures.update(gpu_tests(timeout=min(300, left())))
        steps["gpu tests"] = figures["gpu_tests_exit_code"]

    sizes = {"dry": (600, 300), "quick": (20_000, 5_000), "full": (100_000, 20_000)}
    n_emb, n_desc = sizes["dry" if args.dry_run else "quick" if args.quick else "full"]
    for n, dim, variants in ((n_emb, 1536, (1, 1)), (n_desc, 143, (8, 10))):
        try:
            result = search_on_device(n, dim, variants, device)
            figures.update(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            steps[f"search {dim}-d"] = 0
        except Exception as exc:  # keep going: the other steps' figures still count
            print(f"search {dim}-d failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            steps[f"search {dim}-d"] = 1

    synthesis = [sys.executable, "-m", "benchmarks.synthesis", "--gpu"]
    if args.dry_run:
        synthesis += ["--dry-run"]
    elif args.quick:
        synthesis += ["--gpu-tiles", "128", "--repeats", "3", "--tiles", "4"]
    steps["synthesis"], _, figures["synthesis_s"] = _run(synthesis, timeout=max(30.0, min(300, left())))

    scaling = [sys.executable, "-m", "benchmarks.audit_scaling", "--device", device]
    if args.dry_run:
        scaling += ["--quick", "--sizes", "300", "400", "500"]
    elif args.quick:
        scaling += ["--quick", "--sizes", "5000", "10000", "20000"]
    if left() > 60:   # the last and longest step: the whole audit at 10k, 30k and 100k tiles
        steps["audit scaling"], _, figures["audit_scaling_s"] = _run(scaling, timeout=left())
    else:
        print("skipped the audit scaling: the time budget is spent (rerun it alone: "
              f"{' '.join(scaling[1:])})", file=sys.stderr)
        steps["audit scaling (skipped: no time left)"] = 1
    figures["steps_exit_codes"] = steps

    rows = ["| check | result |", "|---|---|", f"| `pytest -m gpu` | {figures['gpu_tests_summary']} |"]
    for dim, variants in ((1536, (1, 1)), (143, (8, 10))):
        name = f"search_{dim}d_{variants[0]}x{variants[1]}"
        if f"{name}_n" in figures:
            rows.append(
                f"| exact top-5 search, {figures[f'{name}_n']:,}^2 x {dim}-d, {variants[0]} x {variants[1]} variants: "
                f"certified bf16 / float32 GEMM on the same GPU | {figures[f'{name}_certified_s']} s / "
                f"{figures[f'{name}_float32_s']} s ({figures[f'{name}_speedup']}x); top-1 agreement "
                f"{figures[f'{name}_top1_agreement']:.5f} (float64 gap of disagreements <= "
                f"{figures[f'{name}_top1_disagreement_max_float64_gap']:.1e}); rows widened / recomputed "
                f"{figures[f'{name}_rows_widened']} / {figures[f'{name}_rows_recomputed']} |")
    rows.append("| whole audit at three sizes; full-size synthesis | sections `audit_scaling_cuda` and `synthesis` |")
    failed = [name for name, code in steps.items() if code]
    headline = (f"gpu tests: {figures['gpu_tests_summary']}; certified search "
                f"{figures.get('search_1536d_1x1_speedup', '?')}x / {figures.get('search_143d_8x10_speedup', '?')}x "
                "the float32 GEMM on the GPU (1,536-d / descriptors)" + (f"; FAILED: {failed}" if failed else ""))
    record("gpu", "GPU checks and the GPU search", "python -m benchmarks.gpu" + (" --quick" if args.quick else ""),
           figures, "\n".join(rows), headline=headline)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

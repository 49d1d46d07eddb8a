"""How the whole audit's cost grows: time and peak memory of each stage at three sizes of S (T and H to match).

Run from the repository root:

    python -m benchmarks.audit_scaling                  # |S| = 10k, 30k, 100k on the CPU (about 3 h on 2 cores)
    python -m benchmarks.audit_scaling --device cuda    # the same on a GPU (audit.device: cuda)
    python -m benchmarks.audit_scaling --quick          # |S| = 1k, 2k, 4k: checks the script (prints, records nothing)

Each size runs in a fresh process: ``run_audit`` itself, on |S| synthetic tiles, |T| = |S| conditioning tiles (one
sample per tile) and |H| = |S| / 2 held-out tiles (the pipeline keeps |H| >= |T| / 2), with the audit's default
settings. No model and no pixels are read: the tiles' descriptors (thumbnails, 143-d DCT descriptors and their
crop variants, the arrays ``TileSet.from_files`` returns) are synthetic, clustered like real ones, with 1 % planted
copies (rotated/flipped thumbnails of their source tile, described by the real descriptor code) so the pixel
confirmation has true candidates. The tile files exist (small distinct PNGs), so role checks, the identifier
scan, hashing and the reports run for real.

Stages measured (every call of each, summed): ``search`` (every nearest-neighbour search: H->T, S->T, T->T,
the DCR and membership searches, over 8 rotations/flips x 10 crops), ``pixel confirmation`` (candidates and given
pairs), ``pair similarity``, ``reports`` (JSON, summary and HTML), and ``rest`` (roles, identifier scan, hashing,
statistics and rounds: the audit's time outside the other stages). Not measured: reading and describing the tiles
(one linear pass per tile; ``benchmarks.audit`` measures it on real JPEGs).

Peak memory is the process's peak resident set (VmHWM, reset before each stage through /proc/self/clear_refs, so it
counts numpy and torch alike) above its size when the audit starts (the inputs are reported apart). Growth
exponents between sizes say how each cost scales: search time should grow as |S| x |T| (exponent 2 when both
grow), everything else linearly (1); memory should grow linearly, never quadratically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

STAGES = ("search", "pixel confirmation", "pair similarity", "reports", "rest")
#: (stage, module, function names): each call of these functions is timed and its memory peak taken
_INSTRUMENTED = (
    ("search", "pixcell_fed.audit.features", ("search_real", "search_from_real")),
    ("pixel confirmation", "pixcell_fed.audit.features", ("confirm_candidates", "confirm_given_pairs")),
    ("pair similarity", "pixcell_fed.audit.features", ("pair_similarity",)),
    ("reports", "pixcell_fed.audit.report_json", ("build_report", "write_report", "build_summary", "write_summary")),
    ("reports", "pixcell_fed.audit.report_html", ("write_html",)),
)
COPY_SHARE = 0.01


# ---------------------------------------------------------------------------------------------------------------
# Memory: the process's peak resident set, resettable (Linux)
# ---------------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak resident set to the current one (returns it, in bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_since_reset() -> int:
    return _status_kib("VmHWM") * 1024


class StageMeter:
    """Time and peak memory per stage; the time between stages goes to ``rest``.

    ``peak``: the highest resident set during the stage above the audit's start (what stays live plus what the stage
    needs); ``extra``: above the resident set when the stage was entered (the stage's own working memory).
    """

    def __init__(self) -> None:
        self.seconds = {s: 0.0 for s in STAGES}
        self.peak = {s: 0 for s in STAGES}
        self.extra = {s: 0 for s in STAGES}
        self.calls = {s: 0 for s in STAGES}
        self.base = 0
        self._mark = 0.0
        self._rest_entry = 0
        self._depth = 0

    def start(self) -> None:
        self.base = self._rest_entry = reset_peak()
        self._mark = time.perf_counter()

    def _close_rest(self) -> None:
        now = time.perf_counter()
        peak = peak_since_reset()
        self.seconds["rest"] += now - self._mark
        self.peak["rest"] = max(self.peak["rest"], peak - self.base)
        self.extra["rest"] = max(self.extra["rest"], peak - self._rest_entry)
        self._mark = now

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._depth:  # a stage called inside another counts as part of it
            yield
            return
        self._close_rest()
        self._depth += 1
        entry = reset_peak()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            self.seconds[name] += time.perf_counter() - t0
            peak = peak_since_reset()
            self.peak[name] = max(self.peak[name], peak - self.base)
            self.extra[name] = max(self.extra[name], peak - entry)
            self.calls[name] += 1
            self._rest_entry = reset_peak()
            self._mark = time.perf_counter()

    def stop(self) -> None:
        self._close_rest()


@contextlib.contextmanager
def instrumented(meter: StageMeter) -> Iterator[None]:
    """Wrap the audit's stage functions so that each call is timed and measured."""
    import importlib

    saved: list[tuple[Any, str, Callable]] = []

    def wrap(stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with meter.stage(stage):
                return fn(*args, **kwargs)
        return timed

    for stage, module_name, names in _INSTRUMENTED:
        module = importlib.import_module(module_name)
        for name in names:
            fn = getattr(module, name)
            saved.append((module, name, fn))
            setattr(module, name, wrap(stage, fn))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic descriptors
# ---------------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_tile_set(paths: list[Path], rng: np.random.Generator, centres: np.ndarray, planted: dict | None = None):
    """A ``TileSet`` of clustered random descriptors (and random thumbnails), with the rows of ``planted``
    (row -> thumbnail) described by the real descriptor code."""
    from pixcell_fed.audit import copy_features as cf
    from pixcell_fed.audit.features import TileSet

    n, dim = len(paths), centres.shape[1]
    thumbs = rng.random((n, cf.GRAY_SIZE, cf.GRAY_SIZE), dtype=np.float32)
    desc = _unit(centres[rng.integers(0, len(centres), n)] + 0.12 * rng.standard_normal((n, dim), dtype=np.float32))
    crops = np.empty((10, n, dim), np.float32)
    crops[0] = desc
    for v in range(1, 10):  # the crops of a tile look like the tile
        crops[v] = _unit(desc + 0.03 * rng.standard_normal((n, dim), dtype=np.float32))
    for row, thumb in (planted or {}).items():
        thumbs[row] = thumb
        crops[:, row] = cf.crop_variants(thumb[None])[:, 0]
        desc[row] = crops[0, row]
    return TileSet(tuple(paths), thumbs, desc, crops)


def _smooth_thumb(rng: np.random.Generator) -> np.ndarray:
    import cv2

    from pixcell_fed.audit.copy_features import GRAY_SIZE

    coarse = rng.random((8, 8), dtype=np.float32)
    fine = rng.random((GRAY_SIZE, GRAY_SIZE), dtype=np.float32)
    return 0.7 * cv2.resize(coarse, (GRAY_SIZE, GRAY_SIZE), interpolation=cv2.INTER_CUBIC) + 0.3 * fine


def _tile_files(folder: Path, prefix: str, n: int, rng: np.random.Generator) -> list[Path]:
    """``n`` small distinct PNG files (the roles refuse byte-identical tiles across S, T and H)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i:07d}.png" for i in range(n)]
    for path in paths:
        ok, data = cv2.imencode(".png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        path.write_bytes(data.tobytes())
    return paths


def measure(n_s: int, device: str, seed: int = 0) -> dict[str, Any]:
    """One size, in this process: the audit's stage times and memory peaks."""
    from pixcell_fed.audit import copy_features as cf
    from pixcell_fed.audit import features as F
    from pixcell_fed.audit.pixel_confirm import dihedral_images
    from pixcell_fed.audit.run import run_audit
    from pixcell_fed.config.schema import AuditConfig
    from pixcell_fed.progress import set_progress_enabled

    import torch  # noqa: F401  (loaded before the audit starts: its libraries are not the audit's memory)

    set_progress_enabled(False)
    n_t, n_h = n_s, n_s // 2
    rng = np.random.default_rng(seed)
    dim = cf.DCT_K ** 2 - 1
    centres = _unit(rng.standard_normal((512, dim), dtype=np.float32))
    copies = max(1, int(n_s * COPY_SHARE))
    sources = {i: _smooth_thumb(rng) for i in range(copies)}          # S tile i copies T tile i
    copied = {i: dihedral_images(t)[int(rng.integers(8))] + 0.01 * rng.standard_normal(t.shape).astype(np.float32)
              for i, t in sources.items()}
    with tempfile.TemporaryDirectory(prefix="pixcell-fed-audit-scaling-") as tmp:
        root = Path(tmp)
        s_paths = _tile_files(root / "S", "s", n_s, rng)
        t_paths = _tile_files(root / "T", "t", n_t, rng)
        h_paths = _tile_files(root / "H", "h", n_h, rng)
        sets = {"synthetic": synthetic_tile_set(s_paths, rng, centres, copied),
                "reference": synthetic_tile_set(t_paths, rng, centres, sources),
                "holdout": synthetic_tile_set(h_paths, rng, centres)}
        inputs = sum(a.nbytes for ts in sets.values() for a in (ts.thumbs, ts.desc, ts.crops))
        source_of = {s.name: t.name for s, t in zip(s_paths, t_paths)}
        original = F.TileSet.from_files
        F.TileSet.from_files = classmethod(lambda cls, paths, role, **_: sets[role])
        meter = StageMeter()
        try:
            with instrumented(meter):
                meter.start()
                t0 = time.perf_counter()
                result = run_audit(s_paths, t_paths, h_paths, source_of=source_of,
                                   audit_cfg=AuditConfig(device=device, region_copy=False),  # no pixels here:
                                   out_dir=root / "out")  # region copies cost: benchmarks.audit
                total = time.perf_counter() - t0
                meter.stop()
        finally:
            F.TileSet.from_files = original
        flagged_copies = sum(t["flagged"] and "copy" in " ".join(t["reasons"]) for t in result.report["tiles"][:copies])
        candidates = sum(t["pixel_score"] is not None for t in result.report["tiles"])
    return {"S": n_s, "T": n_t, "H": n_h, "device": device, "total_s": round(total, 2),
            "inputs_mib": round(inputs / 2**20, 1), "planted_copies": copies, "planted_copies_flagged": flagged_copies,
            "tiles_with_pixel_candidates": candidates, "verdict": result.verdict,
            "rounds": len(result.report["rounds"]),
            "seconds": {s: round(v, 3) for s, v in meter.seconds.items()},
            "peak_mib": {s: round(v / 2**20, 1) for s, v in meter.peak.items()},
            "extra_mib": {s: round(v / 2**20, 1) for s, v in meter.extra.items()},
            "calls": meter.calls}


def _exponent(a: float, b: float, n_a: int, n_b: int) -> float | None:
    if a <= 0 or b <= 0:
        return None
    return round(math.log(b / a) / math.log(n_b / n_a), 2)


def _expected_time_exponent(stage: str) -> float:
    return 2.0 if stage == "search" else 1.0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.record import record

    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="|S| = 1k, 2k, 4k: checks the script; records nothing")
    parser.add_argument("--sizes", type=int, nargs=3, default=None, metavar="S", help="the three sizes of S")
    parser.add_argument("--device", default="cpu", help="audit.device for the run: cpu, cuda, auto")
    parser.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)  # a child process's size
    args = parser.parse_args(argv)
    if args.one_size is not None:
        print(json.dumps(measure(args.one_size, args.device)))
        return 0
    sizes = args.sizes or ([1000, 2000, 4000] if args.quick else [10_000, 30_000, 100_000])
    runs = []
    for n in sizes:  # each size in a fresh process: clean memory baselines
        print(f"audit of |S| = {n:,} on {args.device} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.audit_scaling", "--one-size", str(n),
                               "--device", args.device], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the run at |S| = {n} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    growth: dict[str, dict[str, Any]] = {}
    for stage in STAGES + ("total",):
        times = [r["total_s"] if stage == "total" else r["seconds"][stage] for r in runs]
        peaks = [max(r["peak_mib"].values()) if stage == "total" else r["extra_mib"][stage] for r in runs]
        growth[stage] = {
            "time_exponents": [_exponent(times[i], times[i + 1], sizes[i], sizes[i + 1]) for i in range(2)],
            "memory_exponents": [_exponent(peaks[i], peaks[i + 1], sizes[i], sizes[i + 1]) for i in range(2)]}
    quadratic_memory = [s for s in STAGES if any(e is not None and e > 1.5 for e in growth[s]["memory_exponents"])
                        and runs[-1]["extra_mib"][s] > 64]
    header = "| stage | " + " | ".join(f"S = {n:,}: s / peak / own MiB" for n in sizes) + \
        " | time growth (expected) | own memory growth |"
    rows = [header, "|---" * (len(sizes) + 3) + "|"]
    for stage in STAGES:
        cells = " | ".join(f"{r['seconds'][stage]:.2f} / {r['peak_mib'][stage]:.0f} / {r['extra_mib'][stage]:.0f}"
                           for r in runs)
        g = growth[stage]
        rows.append(f"| {stage} | {cells} | {g['time_exponents']} ({_expected_time_exponent(stage):g}) | "
                    f"{g['memory_exponents']} |")
    rows.append("| whole audit | " + " | ".join(f"{r['total_s']:.2f} / {max(r['peak_mib'].values()):.0f} / -"
                                               for r in runs) +
                f" | {growth['total']['time_exponents']} | {growth['total']['memory_exponents']} |")
    inputs = ", ".join(str(r["inputs_mib"]) for r in runs)
    caught = ", ".join(f"{r['planted_copies_flagged']}/{r['planted_copies']}" for r in runs)
    candidates = ", ".join(str(r["tiles_with_pixel_candidates"]) for r in runs)
    notes = (f"\n\n|T| = |S|, |H| = |S| / 2; inputs (descriptors, crops, thumbnails) {inputs} MiB, not counted in "
             "the peaks. Peak: highest resident set during the stage above the audit's start; own: above the "
             "stage's entry. Growth: exponents of time (and of own memory; of the peak for the whole audit) between "
             "consecutive sizes, log(ratio) / "
             f"log(size ratio); |S| x |T| is 2. Planted copies flagged: {caught}; tiles with pixel candidates: "
             f"{candidates}. Not measured: reading and describing the tiles (linear).")
    figures = {"sizes": sizes, "device": args.device, "quick": args.quick, "runs": runs, "growth": growth,
               "stages_with_superlinear_memory": quadratic_memory, "load_avg_1min": round(os.getloadavg()[0], 2)}
    headline = (f"whole audit {runs[0]['total_s']:.0f} s / {runs[1]['total_s']:.0f} s / {runs[2]['total_s']:.0f} s at "
                f"S = {sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} on {args.device}; search time exponents "
                f"{growth['search']['time_exponents']} (2 expected); "
                + ("no stage's memory grows faster than linearly" if not quadratic_memory
                   else f"superlinear memory in {quadratic_memory}"))
    command = "python -m benchmarks.audit_scaling" + (f" --device {args.device}" if args.device != "cpu" else "") + \
        (" --quick" if args.quick else "") + (f" --sizes {' '.join(map(str, sizes))}" if args.sizes else "")
    record(f"audit_scaling_{args.device.split(':')[0]}", f"Audit scaling ({args.device})", command, figures,
           "\n".join(rows) + notes, headline=headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The audit's fidelity figures (``pixcell_fed.audit.fidelity_metrics``): their cost at a site's sizes, and the Fréchet
distance against the usual FID code path in the same run.

Run from the repository root: ``python -m benchmarks.fidelity`` (``--quick`` for a smoke-sized run that is printed,
not recorded).

Embeddings are drawn from a Gaussian with a decaying spectrum (as encoder features have) in UNI2-h's 1,536
dimensions; S is shifted a little from T and H. Two site sizes: a large site (2,000 tiles per role, more tiles
than dimensions) and a small one (100 per role: rank-deficient covariances). For each: the whole
``fidelity_figures`` call (FD with its 100 paired bootstrap replicates, precision/recall/density/coverage with
their 1,000 replicates), and one FD point estimate, ours (trace term as the nuclear norm of covariance factors)
against the baseline every FID implementation uses (``scipy.linalg.sqrtm`` of C1 C2, with an offset added to the
diagonal when the product is singular), with the two values beside each other.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def embeddings(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))  # a decaying spectrum
    return (rng.normal(size=(n, d)) * scales + shift * scales).astype(np.float32)


def scipy_frechet(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """The usual FID code path: sqrtm of the covariance product, offset when singular, real part."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> int:
    from benchmarks.record import record
    from pixcell_fed.audit.fidelity_metrics import fidelity_figures, frechet_distance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (printed, not recorded)")
    args = parser.parse_args()
    d = 256 if args.quick else 1536
    sizes = (("small site", 50), ("large site", 300)) if args.quick else (("small site", 100), ("large site", 2000))
    rows, figures = [], {"quick": args.quick, "dimensions": d}
    warm = embeddings(8, 4, 0)
    scipy_frechet(warm, warm), frechet_distance(warm, warm)  # imports and first calls outside the timings
    for label, n in sizes:
        s, t, h = embeddings(n, d, 1, shift=0.05), embeddings(n, d, 2), embeddings(n, d, 3)
        out, whole = timed(fidelity_figures, s, t, h)
        ours, ours_s = timed(frechet_distance, s, t)
        baseline, baseline_s = timed(scipy_frechet, s.astype(np.float64), t.astype(np.float64))
        key = label.replace(" ", "_")
        figures[key] = {"tiles_per_role": n, "fidelity_figures_s": round(whole, 2), "fd_ours_s": round(ours_s, 3),
                        "fd_scipy_sqrtm_s": round(baseline_s, 3), "fd_ours": ours, "fd_scipy_sqrtm": baseline,
                        "fd_ratio": out["fd"]["ratio"]["value"]}
        rows.append(f"| {label}: {n:,} tiles per role x {d:,} dims | {whole:.1f} | {ours_s:.4f} | {baseline_s:.4f} | "
                    f"{baseline_s / max(ours_s, 1e-9):.1f}x | {ours:.6f} | {baseline:.6f} |")
    table = ("| set | whole fidelity_figures (s) | one FD, ours (s) | one FD, scipy sqrtm (s) | speed-up | FD ours | "
             "FD scipy sqrtm |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(table)
    large = figures[sizes[-1][0].replace(" ", "_")]
    record("fidelity", "Fidelity figures", "python -m benchmarks.fidelity", figures, table,
           headline=f"fidelity figures at {large['tiles_per_role']:,} tiles x {d:,} dims: "
                    f"{large['fidelity_figures_s']:.0f} s; one FD {large['fd_ours_s']:.2f} s vs "
                    f"{large['fd_scipy_sqrtm_s']:.2f} s for scipy sqrtm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

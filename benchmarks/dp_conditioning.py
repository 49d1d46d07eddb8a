"""Benchmark: what differentially private conditioning costs in fidelity and buys in privacy.

Sweeps the per-tile epsilon of ``synthesis.conditioning: dp`` (infinity = exact conditioning, then 16, 8, 4, 2, 1)
on one fixed set of real tiles: the conditioning tiles T and held-out tiles H of a slide-level split, embedded once.
For each epsilon it privatizes T's embeddings exactly as ``site-agent synthesize`` does
(:mod:`pixcell_fed.privacy.conditioning`), generates one synthetic tile per conditioning tile with the same seeds,
and records:

- privacy: the audit's membership-inference AUC and its nearest-neighbour statistics (median similarity of S->T
  and H->T in the copy detector's space, and of each synthetic tile to its own source), from ``run_audit``;
- fidelity in the conditioning encoder's space: the Frechet distance ratio FD(S, T) / FD(H, T) (1 = as close to T
  as new real tissue) and k-NN precision and recall (Kynkaenniemi et al. 2019, k = 5) of S against T. These come
  from the audit's own fidelity module (``pixcell_fed/audit/fidelity_metrics.py``).

By default it runs on a simulated site: slides written from the real CMU-1-Small-Region H&E slide, with the tiny
UNTRAINED twins. That checks the pipeline and the measurement, not the trade-off: untrained twins generate
noise-like tiles whatever they are conditioned on. The real trade-off needs the real weights: ``--config
site.yaml`` runs the same sweep on a site's own slides and models (outputs go to ``--work``, never to the site's
work folder; nothing is bundled). The clip norm is the site's ``synthesis.dp.clip_norm`` or, when unset, the median
embedding norm of the public test slide's tiles (``--norms`` prints those percentiles: how to choose it from public
data, docs/privacy.md).

Run from the repository root: ``python -m benchmarks.dp_conditioning`` (``--quick`` for a smoke-sized run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

# fidelity in an encoder's space: the audit's own figures (FD with the rank-deficient-safe trace term, k-NN
# precision and recall), so that the benchmark and the audit report the same numbers
from pixcell_fed.audit.fidelity_metrics import frechet_distance, precision_recall

EPSILONS = (math.inf, 16.0, 8.0, 4.0, 2.0, 1.0)
QUICK_EPSILONS = (math.inf, 8.0, 1.0)


# --- the sweep ------------------------------------------------------------------------------------------------

def _simulated_site(work: Path, n_slides: int) -> Path:
    from pixcell_fed.testing.sites import SlideSpec, make_site, write_twin_models

    models = write_twin_models(work / "models")
    slides = [SlideSpec(f"slide-{i:02d}.svs", label="tumour" if i % 2 else "normal", seed=i) for i in range(n_slides)]
    return make_site(work / "site", name="bench-site", models=models, slides=slides)


def _embed(encoder, paths: list[Path], variant: int) -> np.ndarray:
    """Embeddings ``[N, n_tok, D]`` of tile files, as PixCell is conditioned on them (16 sub-tiles per 1024 px)."""
    from pixcell_fed.audit.copy_features import read_tile
    from pixcell_fed.generation.sampler import cut_grid

    out = []
    for start in range(0, len(paths), 16):
        images = np.stack([read_tile(p) for p in paths[start:start + 16]])
        if variant == 1024:
            out.append(encoder.embed(cut_grid(images)).reshape(len(images), 16, -1))
        else:
            out.append(encoder.embed(images)[:, None, :])
    return np.concatenate(out)


def _tile_vectors(embeddings: np.ndarray) -> np.ndarray:
    """One vector per tile for the fidelity figures: the embedding, or the mean of a 1024 px tile's 16."""
    return embeddings.mean(axis=1)


def public_norms(cfg, encoder, variant: int, work: Path) -> np.ndarray:
    """L2 norms of the conditioning encoder's embeddings (all of a tile's vectors together) of the tiles of the
    public CMU-1-Small-Region slide, tiled with the site's settings: public data to choose the clip norm from."""
    import shutil

    import pandas as pd

    from pixcell_fed.slides.folder_job import tile_folder
    from pixcell_fed.testing.real_slide import real_slide_path

    slides = work / "public-slide"
    slides.mkdir(parents=True, exist_ok=True)
    if not (slides / "public.svs").is_file():
        shutil.copyfile(real_slide_path(), slides / "public.svs")
    tile_folder(slides, work / "public-tiles", cfg.tiling)
    tiles = pd.read_parquet(work / "public-tiles" / "tiles.parquet")
    paths = [work / "public-tiles" / f for f in tiles.loc[tiles["qc"] == "pass", "tile_file"]][:256]
    emb = _embed(encoder, paths, variant)
    return np.linalg.norm(emb.reshape(len(emb), -1), axis=1)


def _statistic(report: dict, test: str, key: str):
    for t in report.get("tests", []):
        if t.get("name") == test:
            return (t.get("statistic") or {}).get(key)
    return None


def _percentile(report: dict, which: str, p: str):
    return ((report.get("figures") or {}).get("percentiles") or {}).get(which, {}).get(p)


def sweep(cfg, work: Path, *, epsilons, n_tiles: int, steps: int) -> dict:
    import pandas as pd

    from pixcell_fed.audit.roles import split_slides
    from pixcell_fed.audit.run import run_audit
    from pixcell_fed.bundle.png import clean_png_bytes
    from pixcell_fed.encoders import load_encoder
    from pixcell_fed.generation import load_pixcell
    from pixcell_fed.pipeline.conditioning import MAX_DEFAULT_DELTA
    from pixcell_fed.privacy.conditioning import dp_claim, privatize
    from pixcell_fed.privacy.gaussian_mechanism import default_delta
    from pixcell_fed.slides.folder_job import tile_folder

    t0 = time.perf_counter()
    tile_folder(cfg.site.slides_dir, work / "tiles", cfg.tiling)
    tiles = pd.read_parquet(work / "tiles" / "tiles.parquet")
    tiles = tiles[tiles["qc"] == "pass"]
    t_keys, h_keys = split_slides(sorted(tiles["slide_key"].unique()), cfg.split.holdout_fraction, cfg.split.seed)
    rng = np.random.default_rng(cfg.synthesis.seed)

    def pick(keys):
        rows = tiles[tiles["slide_key"].isin(keys)].sort_values("tile_id")
        return rows.iloc[np.sort(rng.choice(len(rows), size=min(n_tiles, len(rows)), replace=False))]

    t_rows, h_rows = pick(t_keys), pick(h_keys)
    t_paths = [work / "tiles" / f for f in t_rows["tile_file"]]
    h_paths = [work / "tiles" / f for f in h_rows["tile_file"]]
    pipeline = load_pixcell(cfg.models.pixcell_dir, cfg.models.vae_dir, device=cfg.models.device, dtype=cfg.models.dtype)
    encoder = load_encoder(cfg.models.encoder, cfg.models.encoder_dir, device=cfg.models.device)
    clean = _embed(encoder, t_paths, pipeline.variant)
    t_flat, h_flat = _tile_vectors(clean), _tile_vectors(_embed(encoder, h_paths, pipeline.variant))
    norms = public_norms(cfg, encoder, pipeline.variant, work)
    clip = cfg.synthesis.dp.clip_norm or float(np.median(norms))
    delta = cfg.synthesis.dp.delta or min(MAX_DEFAULT_DELTA, default_delta(len(t_rows)))
    per_slide = int(t_rows["slide_key"].value_counts().max())
    fd_floor = frechet_distance(h_flat, t_flat)
    seeds = [1000 + i for i in range(len(t_rows))]
    prep_s = time.perf_counter() - t0

    rows = []
    for eps in epsilons:
        t1 = time.perf_counter()
        name = "exact" if math.isinf(eps) else f"eps-{eps:g}"
        if math.isinf(eps):
            cond, sigma, slide_eps = clean, 0.0, math.inf
        else:
            claim = dp_claim(epsilon=eps, delta=delta, clip_norm=clip, vectors_per_tile=clean.shape[1],
                             slide_tiles=per_slide, slide_tiles_capped=False)
            cond, _ = privatize(clean, claim)
            sigma, slide_eps = claim.sigma, claim.slide_epsilon
        images = pipeline.generate(cond, seeds=seeds, steps=steps, guidance=cfg.synthesis.guidance)
        s_dir = work / name / "S"
        s_dir.mkdir(parents=True, exist_ok=True)
        s_paths = []
        for i, image in enumerate(images):
            (s_dir / f"s{i:05d}.png").write_bytes(clean_png_bytes(image))
            s_paths.append(s_dir / f"s{i:05d}.png")
        result = run_audit(s_paths, t_paths, h_paths, source_of={p.name: t.name for p, t in zip(s_paths, t_paths)},
                           audit_cfg=dataclasses.replace(cfg.audit, drop_flagged=False), out_dir=work / name / "audit")
        s_flat = _tile_vectors(_embed(encoder, s_paths, pipeline.variant))
        precision, recall = precision_recall(t_flat, s_flat)
        report = result.report
        rows.append({"epsilon": None if math.isinf(eps) else eps, "sigma": round(sigma, 4),
                     "slide_epsilon": None if math.isinf(slide_eps) else round(slide_eps, 3),
                     "mia_auc": _statistic(report, "membership_inference", "auc"),
                     "nn_median_S_T": _percentile(report, "S->T", "p50"),
                     "nn_median_H_T": _percentile(report, "H->T", "p50"),
                     "paired_median": _statistic(report, "paired", "median_similarity"),
                     "fd_ratio": round(frechet_distance(s_flat, t_flat) / fd_floor, 3) if fd_floor > 0 else None,
                     "precision": round(precision, 3), "recall": round(recall, 3), "verdict": result.verdict,
                     "seconds": round(time.perf_counter() - t1, 1)})
        print(f"epsilon {name}: {rows[-1]}", flush=True)
    return {"rows": rows, "clip_norm": round(clip, 4), "clip_norm_from": "synthesis.dp.clip_norm"
            if cfg.synthesis.dp.clip_norm else "median norm of the public slide's tiles", "delta": delta,
            "tiles_T": len(t_rows), "tiles_H": len(h_rows), "slide_tiles_max": per_slide, "steps": steps,
            "public_norm_percentiles": {p: round(float(np.percentile(norms, p)), 4) for p in (5, 50, 95)},
            "encoder": cfg.models.encoder, "variant": pipeline.variant,
            "twins": bool(pipeline.identity.get("twin")), "prep_s": round(prep_s, 1)}


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    from benchmarks.record import record
    from pixcell_fed.config import load_site_config
    from pixcell_fed.progress import set_progress_enabled

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a site's site.yaml: sweep on its slides and real models (default: a "
                                         "simulated site with untrained twins)")
    parser.add_argument("--work", help="folder for the benchmark's tiles and outputs (default: a temporary one)")
    parser.add_argument("--tiles", type=int, default=None, help="conditioning and held-out tiles each (default 96)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the site's)")
    parser.add_argument("--norms", action="store_true",
                        help="only print the embedding norms of the public test slide's tiles (to choose the clip norm)")
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (3 epsilons, 24 tiles, 2 steps)")
    args = parser.parse_args()
    set_progress_enabled(False)
    with tempfile.TemporaryDirectory(prefix="pixcell-fed-dp-bench-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        site_yaml = Path(args.config) if args.config else _simulated_site(work, 6)
        cfg = load_site_config(site_yaml)
        if args.norms:
            from pixcell_fed.encoders import load_encoder
            from pixcell_fed.generation import read_pixcell_variant

            encoder = load_encoder(cfg.models.encoder, cfg.models.encoder_dir, device=cfg.models.device)
            norms = public_norms(cfg, encoder, read_pixcell_variant(cfg.models.pixcell_dir), work)
            print({f"p{p}": round(float(np.percentile(norms, p)), 4) for p in (5, 25, 50, 75, 95)})
            return
        n_tiles = args.tiles or (24 if args.quick else 96)
        steps = args.steps or (2 if args.quick else cfg.synthesis.steps)
        result = sweep(cfg, work, epsilons=QUICK_EPSILONS if args.quick else EPSILONS, n_tiles=n_tiles, steps=steps)
    figures = {**{k: v for k, v in result.items() if k != "rows"}, "sweep": result["rows"], "quick": args.quick,
               "site": "site.yaml given" if args.config else "simulated (real H&E, untrained twins)",
               "load_avg_1min": round(os.getloadavg()[0], 2)}
    table = ["| epsilon per tile | sigma | epsilon per slide | MIA AUC | NN median S->T | NN median H->T | "
             "s vs own source | FD ratio | precision | recall | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        table.append(f"| {_fmt(r['epsilon'], 'g') if r['epsilon'] else 'exact'} | {r['sigma']:.4g} | "
                     f"{_fmt(r['slide_epsilon'], '.3g') if r['epsilon'] else 'n/a'} | {_fmt(r['mia_auc'])} | "
                     f"{_fmt(r['nn_median_S_T'])} | {_fmt(r['nn_median_H_T'])} | {_fmt(r['paired_median'])} | "
                     f"{_fmt(r['fd_ratio'], '.3g')} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {r['verdict']} |")
    twins = ("UNTRAINED twins: these figures check the plumbing, not the trade-off (rerun with --config on a site "
             "with the real weights)" if result["twins"] else "the site's real models")
    table.append(f"\n{result['tiles_T']} conditioning and {result['tiles_H']} held-out tiles, {result['steps']} steps, "
                 f"clip norm {result['clip_norm']} ({result['clip_norm_from']}), delta {result['delta']:.0e}, at most "
                 f"{result['slide_tiles_max']} conditioning tiles per slide; {twins}. Fidelity in the conditioning "
                 f"encoder's space ({result['encoder']}), by the benchmark's local helper.")
    exact, strongest = result["rows"][0], result["rows"][-1]
    headline = (f"{'twins' if result['twins'] else 'real models'}: FD ratio {_fmt(exact['fd_ratio'], '.3g')} exact -> "
                f"{_fmt(strongest['fd_ratio'], '.3g')} at epsilon {_fmt(strongest['epsilon'], 'g')}; MIA AUC "
                f"{_fmt(exact['mia_auc'], '.2f')} -> {_fmt(strongest['mia_auc'], '.2f')}")
    command = "python -m benchmarks.dp_conditioning" + (" --quick" if args.quick else "")
    record("dp_conditioning", "Differentially private conditioning: privacy against fidelity", command, figures,
           "\n".join(table), headline=headline)


if __name__ == "__main__":
    main()

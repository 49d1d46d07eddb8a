"""``site-agent synthesize``: slides -> tiles -> embeddings -> T/H split -> synthetic tiles -> audit -> bundle.

Every stage is resumable. Tiles, embeddings and synthetic tiles are written atomically one by one and skipped
when already present; the split and the audit are saved once done; the bundle is built once. Killing the run at
any point (SIGKILL included) and running the same command again continues where it stopped, and the set it
produces is the same, because every synthetic tile's noise comes from its own seed. A lock on the work folder
refuses a second run at the same time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.atomic import (folder_lock, remove_stale_temporaries, write_bytes_atomic, write_json_atomic,
                                write_parquet_atomic)
from pixcell_fed.config import SiteConfig, to_plain
from pixcell_fed.errors import ConfigError, PrivacyGateRefused, UsageError
from pixcell_fed.pipeline.conditioning import condition_embeddings
from pixcell_fed.pipeline.labels import check_labels_cover, load_slide_labels
from pixcell_fed.pipeline.provenance import versions
from pixcell_fed.pipeline.run_layout import RunLayout, find_or_create_run, run_fingerprint, trail_path
from pixcell_fed.runlog import get_logger, run_log

log = get_logger("synthesize")

#: run states written to run.json (read by ``site-agent status``, which shows the bundle's own state beside it)
STATE_RUNNING, STATE_REFUSED, STATE_FINISHED = "running", "refused by audit", "finished"


@dataclass
class SynthesizeSummary:
    """What a synthesize run did, printed at its end."""

    run_id: str
    run_dir: str
    slides_ok: list[str] = field(default_factory=list)
    slides_failed: list[tuple[str, str]] = field(default_factory=list)
    tiles: int = 0
    tiles_dropped_by_qc: dict[str, int] = field(default_factory=dict)
    conditioning_slides: int = 0
    holdout_slides: int = 0
    conditioning_tiles: int = 0
    holdout_tiles: int = 0
    synthetic_tiles: int = 0
    conditioning: str | None = None  # the conditioning mode and, for dp, its guarantee (one line)
    kept_tiles: int = 0
    verdict: str | None = None
    report: str | None = None
    bundle: str | None = None
    bundle_state: str | None = None
    models_are_twins: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(value: Path | None, key: str, what: str) -> Path:
    if value is None:
        raise ConfigError(f"models.{key} is not set", hint=f"set models.{key} to the local folder of {what}")
    return value


def _slide_inventory(slides_dir: Path) -> list[tuple[str, int]]:
    from pixcell_fed.slides.reader import list_slide_files

    if not slides_dir.is_dir():
        raise UsageError(f"slides folder not found: {slides_dir}", hint="set site.slides_dir to the folder of your slides")
    files = list_slide_files(slides_dir)
    if not files:
        raise UsageError(f"no slide files in {slides_dir}", hint="put the slides to synthesise from in site.slides_dir")
    return [(p.name, p.stat().st_size) for p in files]


def synthetic_seed(base_seed: int, tile_id: str, sample: int) -> int:
    """The seed of one synthetic tile: independent of batch order, so reruns and resumes reproduce it.

    Site-internal: seeds are never shipped (they are tied to the source tile).
    """
    digest = hashlib.sha256(f"{base_seed}:{tile_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _synthetic_name(tile_id: str, sample: int) -> str:
    return hashlib.sha256(f"{tile_id}:{sample}".encode()).hexdigest()[:20] + ".png"


def _synthesised(cfg: SiteConfig, layout: RunLayout):
    """Whether a conditioning tile (by id) already has a synthetic tile in the run."""
    def any_sample(tile_id: str) -> bool:
        return any((layout.synthetic_dir / _synthetic_name(tile_id, s)).is_file()
                   for s in range(cfg.synthesis.samples_per_tile))

    return any_sample


def _split(layout: RunLayout, cfg: SiteConfig, tiles, labels: dict[str, str]) -> tuple[list[str], list[str]]:
    """T/H split by slide, decided once per run (before any synthesis) and saved.

    With slide labels the split is stratified: each class with at least two slides is split on its own, so the
    held-out slides (the audit's null and the site's evaluation set) cover the classes.
    """
    from pixcell_fed.audit.roles import split_slides

    if layout.split_file.is_file():
        saved = json.loads(layout.split_file.read_text())
        return saved["conditioning"], saved["holdout"]
    slide_of = dict(zip(tiles["slide_key"], tiles["slide_file"]))
    groups: dict[str, list[str]] = {}
    for key in sorted(slide_of):
        groups.setdefault(labels.get(slide_of[key], ""), []).append(key)
    if labels and all(len(keys) >= 2 for keys in groups.values()):
        conditioning, holdout = [], []
        for keys in groups.values():
            t, h = split_slides(keys, cfg.split.holdout_fraction, cfg.split.seed)
            conditioning += t
            holdout += h
    else:
        conditioning, holdout = split_slides(sorted(slide_of), cfg.split.holdout_fraction, cfg.split.seed)
    conditioning, holdout = sorted(conditioning), sorted(holdout)
    write_json_atomic(layout.split_file, {"conditioning": conditioning, "holdout": holdout})
    return conditioning, holdout


def _conditioning_rows(cfg: SiteConfig, t_tiles, n_holdout: int):
    """The conditioning tiles: all of T, at most ``synthesis.max_tiles_per_slide`` per slide, capped by config and
    so that |H| >= |T| / 2 for the audit's null."""
    cap = 2 * n_holdout
    if cfg.synthesis.max_conditioning_tiles is not None:
        cap = min(cap, cfg.synthesis.max_conditioning_tiles)
    rows = _cap_per_slide(t_tiles.sort_values("tile_id"), cfg.synthesis.max_tiles_per_slide, cfg.synthesis.seed)
    if len(rows) > cap:
        rng = np.random.default_rng(cfg.synthesis.seed)
        rows = rows.iloc[np.sort(rng.choice(len(rows), size=cap, replace=False))]
        log.info("conditioning on %d of %d tiles of the conditioning slides (|H| = %d)", cap, len(t_tiles), n_holdout)
    return rows.reset_index(drop=True)


def _cap_per_slide(rows, cap: int | None, seed: int):
    """At most ``cap`` tiles of each slide (a random choice with the run's seed), in the order given."""
    if cap is None:
        return rows
    rng = np.random.default_rng([seed, cap])
    keep = np.zeros(len(rows), dtype=bool)
    for positions in rows.groupby("slide_key", sort=True).indices.values():
        keep[positions if len(positions) <= cap else rng.choice(positions, size=cap, replace=False)] = True
    if not keep.all():
        log.info("conditioning on at most %d tiles per slide (%d of %d tiles)", cap, int(keep.sum()), len(rows))
    return rows[keep]


def _audit_feature_spaces(cfg: SiteConfig, encoder) -> dict[str, Any]:
    """The encoders whose spaces the audit reports as fidelity: the conditioning encoder and any the site adds."""
    from pixcell_fed.encoders import load_encoder

    spaces = {f"conditioning encoder {cfg.models.encoder}": encoder}
    for name, folder in cfg.models.extra_audit_encoders.items():
        spaces[name] = load_encoder(name, folder, device=cfg.models.device)
    return spaces


def _embed_conditioning(cfg: SiteConfig, layout: RunLayout, rows, variant: int, encoder) -> tuple[np.ndarray, dict]:
    """Embeddings of the conditioning tiles, shaped [N, n_tok, D] (n_tok = 1 for 256, 16 for 1024)."""
    from pixcell_fed.audit.copy_features import read_tile
    from pixcell_fed.encoders import embed_tiles
    from pixcell_fed.generation.sampler import cut_grid

    paths = [layout.tiles_dir / f for f in rows["tile_file"]]
    if variant == 1024:
        def images():
            for path in paths:
                yield from cut_grid(read_tile(path)[None])

        ids = [f"{tid}-k{k:02d}" for tid in rows["tile_id"] for k in range(16)]
        emb = embed_tiles(encoder, ids, images(), layout.embeddings_cache)
        return emb.reshape(len(rows), 16, -1), encoder.identity
    emb = embed_tiles(encoder, paths, layout.embeddings_cache)
    return emb[:, None, :], encoder.identity


def _batch_size(layout: RunLayout, cfg: SiteConfig, pipeline) -> int:
    """The run's synthesis batch size, fixed at its first use: batch composition is part of reproducibility."""
    state = layout.read_state()
    if "synthesis_batch_size" not in state:
        state = layout.update_state(synthesis_batch_size=cfg.synthesis.batch_size or pipeline.auto_batch_size())
    return int(state["synthesis_batch_size"])


def _generate(cfg: SiteConfig, layout: RunLayout, pipeline, rows, cond: np.ndarray, labels: dict[str, str]):
    """Synthetic tiles, generated in fixed batches and written one by one (atomically).

    Batches are fixed slices of the run's job list, so a resumed run generates exactly the batches a run from
    scratch would: a batch whose tiles all exist is skipped; one cut short by a kill is generated again whole
    (same inputs, same seeds, same composition, so the same pixels) and only its missing tiles are written.
    """
    import pandas as pd

    from pixcell_fed.bundle.png import clean_png_bytes
    from pixcell_fed.progress import progress

    records = []
    for i in range(len(rows)):
        tile_id = rows["tile_id"].iloc[i]
        for s in range(cfg.synthesis.samples_per_tile):
            records.append({"synthetic_file": _synthetic_name(tile_id, s), "source_tile_id": tile_id,
                            "source_tile_file": rows["tile_file"].iloc[i], "sample": s, "row": i,
                            "seed": synthetic_seed(cfg.synthesis.seed, tile_id, s),
                            "label": labels.get(rows["slide_file"].iloc[i])})
    remove_stale_temporaries(layout.synthetic_dir)
    batch = _batch_size(layout, cfg, pipeline)
    batches = [records[start:start + batch] for start in range(0, len(records), batch)]
    todo = [b for b in batches if not all((layout.synthetic_dir / r["synthetic_file"]).is_file() for r in b)]
    if todo:
        log.info("generating %d synthetic tiles in %d batches (%d batches already done)",
                 sum(len(b) for b in todo), len(todo), len(batches) - len(todo))
    bar = progress(total=len(records), desc="synthesising", unit="tile")
    bar.update(len(records) - sum(len(b) for b in todo))
    for chunk in todo:
        images = pipeline.generate(np.stack([cond[r["row"]] for r in chunk]), seeds=[r["seed"] for r in chunk],
                                   steps=cfg.synthesis.steps, guidance=cfg.synthesis.guidance, batch_size=len(chunk))
        for record, image in zip(chunk, images):
            target = layout.synthetic_dir / record["synthetic_file"]
            if not target.is_file():
                write_bytes_atomic(target, clean_png_bytes(image))
        bar.update(len(chunk))
    bar.close()
    table = pd.DataFrame.from_records(records).drop(columns=["row"])
    write_parquet_atomic(layout.synthetic_table, table)
    return table


def _write_eval_set(layout: RunLayout, h_tiles, labels: dict[str, str]) -> None:
    """The real held-out tiles by label (hard links to the tiles): the site's federated evaluation set.

    Held-out slides never conditioned synthesis, so a shared model trained on the pooled synthetic sets is
    evaluated on tiles it has never seen any trace of. Site-internal: only metrics computed on it leave.
    """
    import os
    import shutil

    if not labels:
        return
    for tile_file, slide_file in zip(h_tiles["tile_file"], h_tiles["slide_file"]):
        source = layout.tiles_dir / tile_file
        target = layout.eval_dir / labels[slide_file] / source.name
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def _identifying_strings(slides_dir: Path, slide_files: list[str]) -> list[str]:
    """Strings that must never reach a bundle: slide names and stems, the slides folder, slide property values."""
    from pixcell_fed.slides.identifiers import slide_identifying_strings

    strings = {str(slides_dir.resolve())}
    for name in slide_files:
        strings.update({name, Path(name).stem})
        strings.update(slide_identifying_strings(slides_dir / name))
    return sorted(s for s in strings if len(s) >= 4)


def synthesize(cfg: SiteConfig) -> SynthesizeSummary:
    """Run (or continue) the whole site pipeline for ``cfg``; return its summary.

    Raises :class:`PrivacyGateRefused` (exit 3) when the audit fails; no bundle is built then.
    """
    import pandas as pd

    from pixcell_fed.audit import run_audit
    from pixcell_fed.bundle.build import build_bundle
    from pixcell_fed.bundle.layout import read_bundle_json
    from pixcell_fed.bundle.trail import append_event
    from pixcell_fed.encoders import load_encoder
    from pixcell_fed.generation import load_pixcell, read_pixcell_variant
    from pixcell_fed.generation.loader import check_tile_size_fits_model
    from pixcell_fed.keys import load_private_key, passphrase_from_env
    from pixcell_fed.slides.folder_job import tile_folder

    pixcell_dir = _require(cfg.models.pixcell_dir, "pixcell_dir", "PixCell-256 or PixCell-1024")
    check_tile_size_fits_model(cfg.tiling.tile_size, read_pixcell_variant(pixcell_dir))
    inventory = _slide_inventory(cfg.site.slides_dir)
    labels = load_slide_labels(cfg.site.labels_csv)
    site_key = load_private_key(cfg.keys.site_private_key, passphrase=passphrase_from_env(cfg.keys.passphrase_env))
    resolved = to_plain(cfg)
    work_dir = cfg.site.work_dir
    with folder_lock(work_dir, what="site-agent synthesize"):
        layout = find_or_create_run(work_dir, run_fingerprint(_output_settings(resolved), inventory))
        summary = SynthesizeSummary(run_id=layout.run_id, run_dir=str(layout.root))
        with run_log(layout.log_file):
            log.info("run %s in %s", layout.run_id, layout.root)
            write_json_atomic(layout.root / "config.resolved.json", resolved)
            write_json_atomic(layout.root / "versions.json", versions())
            layout.update_state(state=STATE_RUNNING)

            tiling = tile_folder(cfg.site.slides_dir, layout.tiles_dir, cfg.tiling)
            summary.slides_ok, summary.slides_failed = list(tiling.ok), list(tiling.failed)
            tiles = pd.read_parquet(layout.tiles_table)
            tiles = tiles[tiles["slide_file"].isin(summary.slides_ok) & (tiles["qc"] == "pass")]
            summary.tiles_dropped_by_qc = dict(tiling.qc_dropped)
            summary.tiles = len(tiles)
            check_labels_cover(labels, summary.slides_ok, cfg.site.labels_csv)

            conditioning, holdout = _split(layout, cfg, tiles, labels)
            t_tiles = tiles[tiles["slide_key"].isin(conditioning)]
            h_tiles = tiles[tiles["slide_key"].isin(holdout)]
            summary.conditioning_slides, summary.holdout_slides = len(conditioning), len(holdout)
            summary.holdout_tiles = len(h_tiles)
            rows = _conditioning_rows(cfg, t_tiles, len(h_tiles))
            summary.conditioning_tiles = len(rows)
            if rows.empty or len(h_tiles) < cfg.audit.min_holdout:
                raise UsageError(
                    f"not enough tissue tiles on both sides of the slide split: {len(rows)} conditioning tiles, "
                    f"{len(h_tiles)} held-out tiles (the audit needs at least {cfg.audit.min_holdout} held out)",
                    hint="add slides, raise split.holdout_fraction, or lower tiling.tissue_fraction")
            _write_eval_set(layout, h_tiles, labels)

            pipeline = load_pixcell(pixcell_dir, cfg.models.vae_dir, device=cfg.models.device, dtype=cfg.models.dtype)
            summary.models_are_twins = bool(pipeline.identity.get("twin"))
            encoder = load_encoder(cfg.models.encoder, cfg.models.encoder_dir, device=cfg.models.device)
            cond, encoder_identity = _embed_conditioning(cfg, layout, rows, pipeline.variant, encoder)
            cond, conditioning = condition_embeddings(cfg, layout, rows, cond, labels,
                                                      generated=_synthesised(cfg, layout))
            summary.conditioning = conditioning.short()
            synthetic = _generate(cfg, layout, pipeline, rows, cond, labels)
            summary.synthetic_tiles = len(synthetic)
            summary.models_are_twins = summary.models_are_twins or bool(encoder_identity.get("twin"))

            forbidden = _identifying_strings(cfg.site.slides_dir, summary.slides_ok)
            spaces = _audit_feature_spaces(cfg, encoder)
            result = run_audit(
                [layout.synthetic_dir / f for f in synthetic["synthetic_file"]],
                [layout.tiles_dir / f for f in rows["tile_file"]],
                [layout.tiles_dir / f for f in h_tiles["tile_file"]],
                source_of=dict(zip(synthetic["synthetic_file"], (Path(f).name for f in synthetic["source_tile_file"]))),
                audit_cfg=cfg.audit,
                out_dir=layout.audit_dir,
                identities={"generator": _shareable_identity(pipeline.identity),
                            "encoder": _shareable_identity(encoder_identity)},
                forbidden_strings=forbidden,
                extra_feature_spaces=spaces,
                conditioning=conditioning.to_record(),
            )
            summary.verdict, summary.report = result.verdict, str(result.report_path)
            summary.kept_tiles = len(result.kept)
            trail = trail_path(work_dir)
            if result.verdict == "FAIL":
                layout.update_state(state=STATE_REFUSED, verdict="FAIL")
                append_event(trail, "synthesize", run_id=layout.run_id, verdict="FAIL", synthetic=len(synthetic))
                raise PrivacyGateRefused(
                    f"the audit of run {layout.run_id} FAILED: no bundle was built",
                    hint=f"read the report at {result.report_path}; nothing from this run may leave the site")

            if not layout.bundle_dir.is_dir():
                kept_names = {Path(p).name for p in result.kept}
                kept = synthetic[synthetic["synthetic_file"].isin(kept_names)]
                build_bundle(  # the builder reads the run's own audit from layout.root/audit
                    layout.root,
                    site_name=cfg.site.name,
                    tiles=[layout.synthetic_dir / f for f in kept["synthetic_file"]],
                    tile_size=cfg.tiling.tile_size,
                    labels=list(kept["label"]) if labels else None,
                    generator=_shareable_identity(pipeline.identity),
                    encoder=_shareable_identity(encoder_identity),
                    site_key=site_key,
                    forbidden_strings=forbidden,
                )
                append_event(trail, "synthesize", run_id=layout.run_id, verdict=result.verdict,
                             synthetic=len(synthetic), bundled=len(kept))
            summary.bundle = str(layout.bundle_dir)
            summary.bundle_state = read_bundle_json(layout.bundle_dir)["state"]
            layout.update_state(state=STATE_FINISHED, verdict=result.verdict)
            write_json_atomic(layout.root / "summary.json", summary.to_dict())
    return summary


#: config sections that do not change what a run produces (a new certificate or port must not start a new run)
_NOT_OUTPUT_SETTINGS = ("keys", "federation")


def _output_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved.items() if k not in _NOT_OUTPUT_SETTINGS}


def _shareable_identity(identity: dict) -> dict:
    """A model identity as shipped: names, variant, hashes and the twin flag; no local paths."""
    allowed = ("model", "name", "label", "architecture", "variant", "image_size", "dim", "twin", "transformer_sha256",
               "vae_sha256", "weights_sha256", "dtype")
    return {k: identity[k] for k in allowed if k in identity}


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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.atomic import (
    folder_lock,
    remove_stale_temporaries,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from pixcell_fed.config import SiteConfig, to_plain
from pixcell_fed.errors import ConfigError, PrivacyGateRefused, UsageError
from pixcell_fed.pipeline.conditioning import condition_embeddings
from pixcell_fed.pipeline.distributed import Ranks, launched_ranks, release_device_memory
from pixcell_fed.pipeline.labels import SlideTable, check_labels_cover, load_slide_table
from pixcell_fed.pipeline.provenance import versions
from pixcell_fed.pipeline.run_layout import RunLayout, find_or_create_run, run_fingerprint, trail_path
from pixcell_fed.pipeline.split import check_split_unit
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
        raise UsageError(
            f"slides folder not found: {slides_dir}", hint="set site.slides_dir to the folder of your slides"
        )
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
        return any(
            (layout.synthetic_dir / _synthetic_name(tile_id, s)).is_file()
            for s in range(cfg.synthesis.samples_per_tile)
        )

    return any_sample


def _split(layout: RunLayout, cfg: SiteConfig, tiles, table: SlideTable) -> tuple[list[str], list[str]]:
    """T/H split by patient (or, when set, by slide), decided once per run (before any synthesis) and saved."""
    from pixcell_fed.pipeline.split import split_by_unit

    if layout.split_file.is_file():
        saved = json.loads(layout.split_file.read_text())
        return saved["conditioning"], saved["holdout"]
    conditioning, holdout = split_by_unit(dict(zip(tiles["slide_key"], tiles["slide_file"])), table, cfg.split)
    write_json_atomic(layout.split_file, {"conditioning": conditioning, "holdout": holdout, "unit": cfg.split.unit})
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


def _embed_conditioning(
    cfg: SiteConfig, layout: RunLayout, rows, variant: int, encoder, ranks: Ranks
) -> tuple[np.ndarray, dict]:
    """Embeddings of the conditioning tiles, shaped [N, n_tok, D] (n_tok = 1 for 256, 16 for 1024).

    Under torchrun each rank first embeds its whole global batches into the shared cache (the batches a one-process
    run makes, so the same embeddings); then every rank reads them all from the cache.
    """
    paths = [layout.tiles_dir / f for f in rows["tile_file"]]
    per_tile = 16 if variant == 1024 else 1
    if ranks.launched:
        mine = ranks.share_batches(len(paths) * per_tile, encoder.batch_size)
        _embed_items(encoder, layout, paths, list(rows["tile_id"]), per_tile, mine)
        ranks.checkpoint("embedding")
    emb = _embed_items(encoder, layout, paths, list(rows["tile_id"]), per_tile, range(len(paths) * per_tile))
    return emb.reshape(len(rows), per_tile, -1), encoder.identity


def _embed_items(
    encoder, layout: RunLayout, paths: list[Path], tile_ids: list[str], per_tile: int, items
) -> np.ndarray:
    """Embed items ``items`` of the conditioning stream (tile i for 256 px; cell k of tile i // 16 for 1024 px)."""
    from pixcell_fed.audit.copy_features import read_tile
    from pixcell_fed.encoders import embed_tiles
    from pixcell_fed.generation.sampler import cut_grid

    if per_tile == 1:
        return embed_tiles(encoder, [paths[i] for i in items], layout.embeddings_cache)

    def images():
        current, cells = -1, np.empty(0)
        for i in items:
            if i // per_tile != current:
                current = i // per_tile
                cells = cut_grid(read_tile(paths[current])[None])
            yield cells[i % per_tile]

    ids = [f"{tile_ids[i // per_tile]}-k{i % per_tile:02d}" for i in items]
    return embed_tiles(encoder, ids, images(), layout.embeddings_cache)


def _batch_size(layout: RunLayout, cfg: SiteConfig, pipeline) -> int:
    """The run's synthesis batch size, fixed at its first use: batch composition is part of reproducibility."""
    state = layout.read_state()
    if "synthesis_batch_size" not in state:
        state = layout.update_state(synthesis_batch_size=cfg.synthesis.batch_size or pipeline.auto_batch_size())
    return int(state["synthesis_batch_size"])


def _generate(
    cfg: SiteConfig, layout: RunLayout, pipeline, rows, cond: np.ndarray, labels: dict[str, str], ranks: Ranks
):
    """Synthetic tiles, generated in fixed batches and written one by one (atomically).

    Batches are fixed slices of the run's job list, so a resumed run generates exactly the batches a run from
    scratch would: a batch whose tiles all exist is skipped; one cut short by a kill is generated again whole
    (same inputs, same seeds, same composition, so the same pixels) and only its missing tiles are written.
    Under torchrun rank 0 lists the unfinished batches and each rank generates every ``world_size``-th of them.
    """
    import pandas as pd

    from pixcell_fed.bundle.png import clean_png_bytes
    from pixcell_fed.progress import progress

    records: list[dict[str, Any]] = []
    for i in range(len(rows)):
        tile_id = rows["tile_id"].iloc[i]
        records.extend(
            {
                "synthetic_file": _synthetic_name(tile_id, s),
                "source_tile_id": tile_id,
                "source_tile_file": rows["tile_file"].iloc[i],
                "sample": s,
                "row": i,
                "seed": synthetic_seed(cfg.synthesis.seed, tile_id, s),
                "label": labels.get(rows["slide_file"].iloc[i]),
            }
            for s in range(cfg.synthesis.samples_per_tile)
        )
    plan = None
    if ranks.is_main:  # rank 0 fixes the batches and lists the unfinished ones before any rank writes a tile
        remove_stale_temporaries(layout.synthetic_dir)
        batch = _batch_size(layout, cfg, pipeline)
        batches = [records[start : start + batch] for start in range(0, len(records), batch)]
        todo_index = [
            n
            for n, b in enumerate(batches)
            if not all((layout.synthetic_dir / r["synthetic_file"]).is_file() for r in b)
        ]
        if todo_index:
            log.info(
                "generating %d synthetic tiles in %d batches (%d batches already done)",
                sum(len(batches[n]) for n in todo_index),
                len(todo_index),
                len(batches) - len(todo_index),
            )
        plan = {"batch_size": batch, "todo": todo_index}
    plan = ranks.checkpoint("generation plan", plan)[0]
    batch = plan["batch_size"]
    batches = [records[start : start + batch] for start in range(0, len(records), batch)]
    todo = [batches[n] for n in ranks.share(plan["todo"])]
    if ranks.launched:
        log.info("%s generates %d synthetic tiles in %d batches", ranks.name, sum(len(b) for b in todo), len(todo))
    bar = progress(total=sum(len(b) for b in todo), desc="synthesising", unit="tile")
    for chunk in todo:
        images = pipeline.generate(
            np.stack([cond[r["row"]] for r in chunk]),
            seeds=[r["seed"] for r in chunk],
            steps=cfg.synthesis.steps,
            guidance=cfg.synthesis.guidance,
            batch_size=len(chunk),
        )
        for record, image in zip(chunk, images):
            target = layout.synthetic_dir / record["synthetic_file"]
            if not target.is_file():
                write_bytes_atomic(target, clean_png_bytes(image))
        bar.update(len(chunk))
    bar.close()
    ranks.checkpoint("generation")
    table = pd.DataFrame.from_records(records).drop(columns=["row"])
    if ranks.is_main:
        write_parquet_atomic(layout.synthetic_table, table)
    return table


def _write_eval_set(layout: RunLayout, h_tiles, labels: dict[str, str]) -> None:
    """The real held-out tiles by label (hard links to the tiles): the site's federated evaluation set.

    Held-out slides never conditioned synthesis, so a shared model trained on the pooled synthetic sets is
    evaluated on tiles it has never seen any trace of. Site-internal: only metrics computed on it leave.
    """
    from pixcell_fed.pipeline.labelled_tiles import link_tiles_by_label

    if not labels:
        return
    link_tiles_by_label(layout.tiles_dir, h_tiles["tile_file"], h_tiles["slide_file"], labels, layout.eval_dir)


def _identifying_strings(slides_dir: Path, slide_files: list[str], patients: Iterable[str] = ()) -> list[str]:
    """Strings that must never reach a bundle: slide names and stems, the slides folder, slide property values,
    patient identifiers."""
    from pixcell_fed.slides.identifiers import slide_identifying_strings

    strings = {str(slides_dir.resolve()), *patients}
    for name in slide_files:
        strings.update({name, Path(name).stem})
        strings.update(slide_identifying_strings(slides_dir / name))
    return sorted(s for s in strings if len(s) >= 4)


def synthesize(cfg: SiteConfig, *, wait_timeout: timedelta | None = None) -> SynthesizeSummary | None:
    """Run (or continue) the whole site pipeline for ``cfg``; return its summary (None on ranks other than 0).

    Raises :class:`PrivacyGateRefused` (exit 3) when the audit fails; no bundle is built then. Under torchrun
    the ranks share embedding and generation (:mod:`pixcell_fed.pipeline.distributed`); ``wait_timeout`` bounds
    how long a rank waits for the others at a checkpoint.
    """
    with launched_ranks(cfg.models.device, wait_timeout=wait_timeout) as ranks, ranks.reporting_failures():
        if not ranks.is_main:
            _synthesize_share(cfg, ranks)
            return None
        summary = _synthesize_as_rank0(cfg, ranks)
        ranks.finish()
        return summary


def _synthesize_share(cfg: SiteConfig, ranks: Ranks) -> None:
    """A rank other than 0: load the models, take rank 0's plan, embed and generate this rank's share, then wait
    while rank 0 audits and builds the bundle (its failure is reported here too)."""
    import pandas as pd

    from pixcell_fed.encoders import load_encoder
    from pixcell_fed.generation import load_pixcell

    pixcell_dir = _require(cfg.models.pixcell_dir, "pixcell_dir", "PixCell-256 or PixCell-1024")
    pipeline = load_pixcell(pixcell_dir, cfg.models.vae_dir, device=ranks.device, dtype=cfg.models.dtype)
    encoder = load_encoder(cfg.models.encoder, cfg.models.encoder_dir, device=ranks.device)
    plan = ranks.checkpoint("preparing the run")[0]
    if plan["settings"] != _settings_digest(cfg):
        raise ConfigError(
            f"{ranks.name} read a site config that differs from rank 0's",
            hint="every rank must read the same site.yaml (same path on every machine)",
        )
    layout = RunLayout(Path(plan["run_dir"]))
    if not layout.state_file.is_file():
        raise UsageError(
            f"{ranks.name} cannot see the run folder {layout.root}",
            hint="the work folder (site.work_dir) must be on a file system shared by every machine, "
            "mounted at the same path",
        )
    with run_log(layout.rank_log_file(ranks.rank)):
        rows = pd.DataFrame(plan["rows"])
        cond, _ = _embed_conditioning(cfg, layout, rows, pipeline.variant, encoder, ranks)
        ranks.checkpoint("conditioning")  # rank 0 has drawn (dp) and stored the release: load it, never draw
        cond, _ = condition_embeddings(
            cfg, layout, rows, cond, plan["labels"], generated=_synthesised(cfg, layout), may_draw=False
        )
        _generate(cfg, layout, pipeline, rows, cond, plan["labels"], ranks)
        del pipeline, encoder, cond
        release_device_memory(ranks.device)
        log.info("%s finished its share; waiting while rank 0 audits and builds the bundle", ranks.name)
        ranks.finish()
    return


def _settings_digest(cfg: SiteConfig) -> str:
    """A digest of the settings that decide a run's outputs (ranks check they read the same config)."""
    return run_fingerprint(_output_settings(to_plain(cfg)), [])


def _synthesize_as_rank0(cfg: SiteConfig, ranks: Ranks) -> SynthesizeSummary:
    """The whole pipeline as rank 0 (or the only process) runs it."""
    import pandas as pd

    from pixcell_fed.audit import SiteFacts, run_audit
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
    table = load_slide_table(cfg.site.labels_csv)
    labels = table.labels
    check_split_unit(cfg.split, table, cfg.site.labels_csv)
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
            if cfg.split.unit == "patient":
                check_labels_cover(table.patients, summary.slides_ok, cfg.site.labels_csv, what="patient")

            conditioning, holdout = _split(layout, cfg, tiles, table)
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
                    hint="add slides, raise split.holdout_fraction, or lower tiling.tissue_fraction",
                )
            _write_eval_set(layout, h_tiles, labels)

            pipeline = load_pixcell(pixcell_dir, cfg.models.vae_dir, device=ranks.device, dtype=cfg.models.dtype)
            summary.models_are_twins = bool(pipeline.identity.get("twin"))
            encoder = load_encoder(cfg.models.encoder, cfg.models.encoder_dir, device=ranks.device)
            ranks.checkpoint(
                "preparing the run",
                {
                    "run_dir": str(layout.root.resolve()),
                    "settings": _settings_digest(cfg),
                    "rows": rows[["tile_id", "tile_file", "slide_file", "slide_key"]].to_dict("list"),
                    "labels": {f: labels[f] for f in set(rows["slide_file"]) if f in labels},
                },
            )
            cond, encoder_identity = _embed_conditioning(cfg, layout, rows, pipeline.variant, encoder, ranks)
            cond, claim = condition_embeddings(cfg, layout, rows, cond, labels, generated=_synthesised(cfg, layout))
            ranks.checkpoint("conditioning")  # a dp release is stored before any other rank reads it
            summary.conditioning = claim.short()
            synthetic = _generate(cfg, layout, pipeline, rows, cond, labels, ranks)
            summary.synthetic_tiles = len(synthetic)
            summary.models_are_twins = summary.models_are_twins or bool(encoder_identity.get("twin"))

            forbidden = _identifying_strings(cfg.site.slides_dir, summary.slides_ok, table.patients.values())
            spaces = _audit_feature_spaces(cfg, encoder)
            result = run_audit(
                [layout.synthetic_dir / f for f in synthetic["synthetic_file"]],
                [layout.tiles_dir / f for f in rows["tile_file"]],
                [layout.tiles_dir / f for f in h_tiles["tile_file"]],
                source_of=dict(zip(synthetic["synthetic_file"], (Path(f).name for f in synthetic["source_tile_file"]))),
                audit_cfg=cfg.audit,
                out_dir=layout.audit_dir,
                identities={
                    "generator": _shareable_identity(pipeline.identity),
                    "encoder": _shareable_identity(encoder_identity),
                },
                site=SiteFacts(forbidden_strings=forbidden, feature_spaces=spaces, split_unit=cfg.split.unit),
                conditioning=claim.to_record(),
            )
            summary.verdict, summary.report = result.verdict, str(result.report_path)
            summary.kept_tiles = len(result.kept)
            trail = trail_path(work_dir)
            if result.verdict == "FAIL":
                layout.update_state(state=STATE_REFUSED, verdict="FAIL")
                append_event(trail, "synthesize", run_id=layout.run_id, verdict="FAIL", synthetic=len(synthetic))
                raise PrivacyGateRefused(
                    f"the audit of run {layout.run_id} FAILED: no bundle was built",
                    hint=f"read the report at {result.report_path}; nothing from this run may leave the site",
                )

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
                append_event(
                    trail,
                    "synthesize",
                    run_id=layout.run_id,
                    verdict=result.verdict,
                    synthetic=len(synthetic),
                    bundled=len(kept),
                )
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
    allowed = (
        "model",
        "name",
        "label",
        "architecture",
        "variant",
        "image_size",
        "dim",
        "twin",
        "transformer_sha256",
        "vae_sha256",
        "weights_sha256",
        "dtype",
    )
    return {k: identity[k] for k in allowed if k in identity}

"""The conditioning-privacy stage of ``site-agent synthesize``: the tiles' embeddings -> what PixCell is conditioned
on, with the claim the site will sign (:mod:`pixcell_fed.privacy.conditioning`, docs/privacy.md).

``exact`` passes the embeddings through. ``mixed`` averages each with ``mix_k - 1`` others of its slide and label
(drawn with the run's seed: reproducible). ``dp`` privatizes each tile once, with noise from the operating system's
CSPRNG, and stores the result in the run folder (``conditioning/privatized.npz``: site-internal, away from the clean
embedding cache, never bundled) *before* any synthetic tile is generated from it. A resumed run reuses the stored
release instead of drawing fresh noise, which would release the tile twice and spend its privacy twice; if the
store is lost while synthetic tiles made from it remain, the run is refused rather than mixing two releases.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np

from pixcell_fed.config import SiteConfig
from pixcell_fed.errors import ConfigError, PrivacyGateRefused
from pixcell_fed.pipeline.run_layout import RunLayout
from pixcell_fed.privacy.conditioning import (
    ConditioningClaim,
    dp_claim,
    exact_claim,
    mix_within_groups,
    mixed_claim,
    privatize,
)
from pixcell_fed.privacy.gaussian_mechanism import default_delta
from pixcell_fed.runlog import get_logger

log = get_logger("synthesize")

#: the default delta per tile is 1/(10 N) rounded down to a power of ten, and never above this
MAX_DEFAULT_DELTA = 1e-5
#: salt of the mixed mode's draws (so they do not repeat the draws other stages make from the same seed)
_MIX_SALT = 0x6D697865


def tiles_per_slide(rows) -> int:
    """The most conditioning tiles any one slide contributes."""
    return int(rows["slide_key"].value_counts().max()) if len(rows) else 0


def condition_embeddings(
    cfg: SiteConfig,
    layout: RunLayout,
    rows,
    embeddings: np.ndarray,
    labels: Mapping[str, str],
    *,
    generated: Callable[[str], bool],
    may_draw: bool = True,
) -> tuple[np.ndarray, ConditioningClaim]:
    """What each conditioning row is generated from, ``[N, n_tok, D]`` as ``embeddings``, and the run's claim.

    ``rows``: the conditioning tiles (``tile_id``, ``slide_key``, ``slide_file``), aligned with ``embeddings``.
    ``generated(tile_id)``: whether a synthetic tile of that source already exists. ``may_draw``: whether this
    process may draw dp noise (under a multi-process launch only the first process may; the others load).
    """
    syn = cfg.synthesis
    if syn.conditioning == "exact":
        return embeddings, exact_claim()
    if syn.conditioning == "mixed":
        groups = [(slide, labels.get(file, "")) for slide, file in zip(rows["slide_key"], rows["slide_file"])]
        mixed, _ = mix_within_groups(embeddings, groups, syn.mix_k, np.random.default_rng([syn.seed, _MIX_SALT]))
        return mixed, mixed_claim(syn.mix_k)
    return _dp_release(cfg, layout, rows, embeddings, generated=generated, may_draw=may_draw)


def _dp_release(
    cfg: SiteConfig,
    layout: RunLayout,
    rows,
    embeddings: np.ndarray,
    *,
    generated: Callable[[str], bool],
    may_draw: bool,
) -> tuple[np.ndarray, ConditioningClaim]:
    syn = cfg.synthesis
    tile_ids = [str(t) for t in rows["tile_id"]]
    stored_ids, stored, meta = _read_store(layout)
    delta = syn.dp.delta or meta.get("delta") or min(MAX_DEFAULT_DELTA, default_delta(len(tile_ids)))
    cap, clip_norm = syn.max_tiles_per_slide, syn.dp.clip_norm
    if clip_norm is None:  # SiteConfig refuses dp without a clip norm already
        raise ConfigError(
            "synthesis.dp.clip_norm must be set when synthesis.conditioning is dp",
            hint="choose it from public tiles (docs/privacy.md)",
        )
    claim = dp_claim(
        epsilon=syn.dp.epsilon,
        delta=delta,
        clip_norm=clip_norm,
        vectors_per_tile=int(embeddings.shape[1]),
        slide_tiles=cap if cap is not None else tiles_per_slide(rows),
        slide_tiles_capped=cap is not None,
    )
    mechanism = {
        "epsilon": claim.tile_epsilon,
        "delta": claim.tile_delta,
        "clip_norm": claim.clip_norm,
        "sigma": claim.sigma,
        "vectors_per_tile": claim.vectors_per_tile,
        "dim": int(embeddings.shape[2]),
    }
    if meta and any(meta.get(k) != v for k, v in mechanism.items()):
        raise PrivacyGateRefused(
            f"the run's stored dp conditioning ({layout.privatized_conditioning}) was drawn with other settings "
            f"({ {k: meta.get(k) for k in mechanism} }) than this run's ({mechanism})",
            hint="the run folder was edited; start a new run (remove the run folder or change synthesis.seed)",
        )
    index = {t: i for i, t in enumerate(stored_ids)}
    missing = [t for t in tile_ids if t not in index]
    if missing:
        lost = [t for t in missing if generated(t)]
        if lost:
            raise PrivacyGateRefused(
                f"{len(lost)} conditioning tile(s) already have synthetic tiles but their dp-privatized embeddings "
                f"are missing from {layout.privatized_conditioning}: drawing fresh noise would release them twice",
                hint=f"delete {layout.synthetic_dir} (nothing from it has left the site) and run again; it draws "
                "new noise once",
            )
        if not may_draw:
            raise PrivacyGateRefused(
                "dp noise for this run has not been drawn yet",
                hint="the first process of the run draws it; start the run normally",
            )
        rows_missing = [tile_ids.index(t) for t in missing]
        noisy, n_clipped = privatize(embeddings[rows_missing], claim)
        stored_ids = [*stored_ids, *missing]
        stored = noisy if stored is None else np.concatenate([stored, noisy])
        _write_store(
            layout, stored_ids, stored, {**mechanism, "clipped_tiles": meta.get("clipped_tiles", 0) + n_clipped}
        )
        index = {t: i for i, t in enumerate(stored_ids)}
        log.info(
            "dp conditioning: %d tile(s) privatized (sigma %.4g, clip norm %.4g; %d clipped); per tile %s",
            len(missing),
            claim.sigma,
            claim.clip_norm,
            n_clipped,
            claim.short(),
        )
        from pixcell_fed.bundle.trail import append_event
        from pixcell_fed.pipeline.run_layout import trail_path

        append_event(
            trail_path(cfg.site.work_dir),
            "dp-conditioning",
            run_id=layout.run_id,
            tiles=len(missing),
            tile_epsilon=claim.tile_epsilon,
            delta=claim.tile_delta,
            sigma=claim.sigma,
            clip_norm=claim.clip_norm,
            slide_epsilon=claim.slide_epsilon,
            slide_tiles=claim.slide_tiles,
        )
    assert stored is not None  # read above, or drawn for every tile it lacked
    return stored[[index[t] for t in tile_ids]], claim


def _read_store(layout: RunLayout) -> tuple[list[str], np.ndarray | None, dict]:
    path = layout.privatized_conditioning
    if not path.is_file():
        return [], None, {}
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, emb, meta = (
                [str(t) for t in data["tile_ids"]],
                np.asarray(data["privatized"]),
                json.loads(str(data["meta"])),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise PrivacyGateRefused(
            f"the run's dp conditioning store {path} is unreadable ({exc})",
            hint=f"delete {layout.synthetic_dir} and {path}, then run again",
        ) from exc
    if emb.ndim != 3 or len(emb) != len(ids):
        raise PrivacyGateRefused(
            f"the run's dp conditioning store {path} is damaged",
            hint=f"delete {layout.synthetic_dir} and {path}, then run again",
        )
    return ids, emb, meta


def _write_store(layout: RunLayout, tile_ids: list[str], privatized: np.ndarray, meta: dict) -> None:
    from pixcell_fed.atomic import atomic_path

    with atomic_path(layout.privatized_conditioning, mode=0o600) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            tile_ids=np.asarray(tile_ids, dtype=np.str_),
            privatized=privatized.astype(np.float32),
            meta=np.asarray(json.dumps(meta, sort_keys=True)),
        )

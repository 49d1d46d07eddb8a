"""Batched embedding of a tile stream with an on-disk cache in the site's work folder.

The cache is a folder per encoder identity (name + weight hash + dtype), holding shards written atomically, one per
batch: ``CACHE/<encoder>-<sha12>-<dtype>/shard-<n>-<rand>.npz`` with ``tile_ids`` and ``embeddings``. A rerun (or a run
resumed after a crash) reads the shards and embeds only tiles it has not seen. Embeddings identify their source
tiles: the cache belongs in the site work folder and nothing in it is ever shipped.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_fed.atomic import atomic_path, write_json_atomic
from pixcell_fed.encoders.base import Encoder
from pixcell_fed.errors import UsageError
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)


def cache_folder(encoder: Encoder, cache_path: str | Path) -> Path:
    """The shard folder of ``encoder`` under ``cache_path`` (embeddings of other encoders or of another precision
    never mix in)."""
    sha = encoder.weights_sha256 or "unhashed"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)
    return Path(cache_path) / f"{safe}-{sha[:12]}-{str(encoder.dtype).removeprefix('torch.')}"


def load_cache(folder: Path, dim: int) -> dict[str, np.ndarray]:
    """tile_id -> embedding from every complete shard in ``folder``."""
    cached: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            ids, emb = data["tile_ids"], data["embeddings"]
        if emb.ndim != 2 or emb.shape[1] != dim or len(ids) != len(emb):
            log.warning("ignoring cache shard %s: shape %s does not fit dim %d", shard.name, emb.shape, dim)
            continue
        cached.update(zip(ids.tolist(), emb))
    return cached


def _write_shard(folder: Path, index: int, ids: list[str], emb: np.ndarray) -> None:
    target = folder / f"shard-{index:06d}-{secrets.token_hex(4)}.npz"
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, tile_ids=np.asarray(ids, dtype=np.str_), embeddings=emb.astype(np.float32))


def _key_and_source(item: Any) -> tuple[str, Any]:
    """(tile_id, image source) for a path, a (record-or-id, image) pair, or an object with .tile_id and .image."""
    if isinstance(item, (str, Path)):
        return Path(item).stem, Path(item)
    if isinstance(item, tuple) and len(item) == 2:
        key, image = item
        tile_id = key if isinstance(key, str) else getattr(key, "tile_id", None)
        if isinstance(tile_id, str):
            return tile_id, image
    raise UsageError(
        f"cannot use {type(item).__name__} as a tile to embed",
        hint="pass tile PNG paths (the tile id is the file stem) or (TileRecord or tile_id, uint8 HxWx3 array) pairs",
    )


def _load_image(source: Any) -> np.ndarray:
    if isinstance(source, Path):
        from PIL import Image

        try:
            with Image.open(source) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise UsageError(f"cannot read tile image {source}: {exc}", hint="re-run tiling for this slide") from exc
    return np.asarray(source)


def _plan(items: Iterable[Any], cached: dict[str, np.ndarray], size: int) -> Iterator[tuple[str, list[str], list[Any]]]:
    """Yield ("tile", [tile_id], []) for every input in order, and ("batch", ids, sources) for uncached tiles."""
    ids: list[str] = []
    sources: list[Any] = []
    pending: set[str] = set()
    for item in items:
        tile_id, source = _key_and_source(item)
        yield "tile", [tile_id], []
        if tile_id in cached or tile_id in pending:
            continue
        pending.add(tile_id)
        ids.append(tile_id)
        sources.append(source)
        if len(ids) == size:
            yield "batch", ids, sources
            ids, sources = [], []
    if ids:
        yield "batch", ids, sources


def _zip_exact(ids: Iterable[Any], images: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    missing = object()
    ids_it, images_it = iter(ids), iter(images)
    for n, tile_id in enumerate(ids_it):
        image = next(images_it, missing)
        if image is missing:
            raise UsageError(
                f"fewer images than tile ids (only {n} images)", hint="pass one image per tile id, in the same order"
            )
        yield tile_id, image
    if next(images_it, missing) is not missing:
        raise UsageError("more images than tile ids", hint="pass one image per tile id, in the same order")


def embed_tiles(
    encoder: Encoder,
    items: Iterable[Any],
    images_or_cache_path: Any,
    cache_path: str | Path | None = None,
    *,
    batch_size: int | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Embed tiles in input order -> float32 ``(N, dim)``, reusing and extending the cache at ``cache_path``.

    Two call forms:

    * ``embed_tiles(encoder, items, cache_path)``: ``items`` are tile PNG paths (tile id = file stem), or
      ``(TileRecord | tile_id, uint8 HxWx3)`` pairs as yielded by ``pixcell_fed.slides.tiler.iter_slide_tiles``.
      Images of cached tiles are never read or embedded again.
    * ``embed_tiles(encoder, tile_ids, images, cache_path)``: ids and an iterable of uint8 images in the same order
      (images of cached tiles are consumed from the iterable but not embedded).
    """
    if cache_path is None:
        cache_path = images_or_cache_path
    else:
        items = _zip_exact(items, images_or_cache_path)
    folder = cache_folder(encoder, cache_path)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "encoder.json", encoder.identity)
    cached = load_cache(folder, encoder.dim)
    n_shards = len(list(folder.glob("shard-*.npz")))
    size = batch_size or encoder.batch_size
    order: list[str] = []
    computed = 0
    bar = None
    if show_progress:
        from pixcell_fed.progress import progress

        bar = progress(None, desc="embedding", unit="tile")
    for kind, ids, sources in _plan(items, cached, size):
        if kind == "tile":
            order.append(ids[0])
            continue
        images = [_load_image(s) for s in sources]
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise UsageError(
                f"tiles of different sizes in one batch: {sorted(shapes)}", hint="tile all slides at one tile size"
            )
        emb = encoder.embed(np.stack(images))
        _write_shard(folder, n_shards, ids, emb)
        n_shards += 1
        cached.update(zip(ids, emb))
        computed += len(ids)
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    log.info("embedded %d new tiles for %d requested (the rest from the cache)", computed, len(order))
    if not order:
        return np.empty((0, encoder.dim), dtype=np.float32)
    return np.stack([cached[t] for t in order]).astype(np.float32, copy=False)

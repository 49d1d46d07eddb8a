"""embed_tiles: batched embedding of real tiles with an on-disk cache keyed by tile_id; a rerun recomputes nothing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from pixcell_fed.encoders import embed_tiles, load_encoder
from pixcell_fed.encoders.cache import cache_folder
from pixcell_fed.errors import UsageError
from pixcell_fed.testing.real_slide import real_slide_path
from pixcell_fed.testing.twins import save_tiny_uni


@dataclass
class Record:  # stands in for the tiler's TileRecord: only .tile_id is used
    tile_id: str


@pytest.fixture(scope="module")
def tiles():
    import openslide

    with openslide.OpenSlide(str(real_slide_path())) as slide:
        spots = [(x, y) for x in (400, 900, 1400) for y in (600, 1400)]
        return {f"abc123-r{i:05d}-c00000": np.asarray(slide.read_region(xy, 0, (256, 256)).convert("RGB")) for i, xy in enumerate(spots)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_encoder("uni2-h", save_tiny_uni(tmp_path_factory.mktemp("uni") / "uni"))


class Counting:
    """Wraps an encoder and counts the tiles it embeds."""

    def __init__(self, enc):
        self.enc, self.count = enc, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def embed(self, images):
        self.count += len(images)
        return self.enc.embed(images)


def test_stream_is_embedded_in_order_and_cached(tmp_path, tiles, encoder):
    cache = tmp_path / "work" / "embeddings"
    items = [(Record(k), v) for k, v in tiles.items()]
    counting = Counting(encoder)
    first = embed_tiles(counting, items, cache, batch_size=4, show_progress=False)
    assert first.shape == (6, encoder.dim) and first.dtype == np.float32 and counting.count == 6
    np.testing.assert_allclose(first, encoder.embed(np.stack(list(tiles.values()))), rtol=1e-5, atol=1e-6)
    shards = sorted(cache_folder(encoder, cache).glob("shard-*.npz"))
    assert len(shards) == 2  # batches of 4 + 2, each written atomically
    assert not list(cache.rglob("*.tmp"))

    # A rerun recomputes nothing and never looks at the pixels of cached tiles.
    rerun = Counting(encoder)
    again = embed_tiles(rerun, [(Record(k), None) for k in tiles], cache, show_progress=False)
    assert rerun.count == 0
    np.testing.assert_array_equal(again, first)

    # New tiles mixed with cached ones: only the new ones are embedded; order follows the input; duplicates once.
    extra = {"def456-r00000-c00001": next(iter(tiles.values()))[::-1].copy()}
    mixed_items = [(Record("def456-r00000-c00001"), extra["def456-r00000-c00001"])] + items[:2] + items[:1]
    mixed_run = Counting(encoder)
    mixed = embed_tiles(mixed_run, mixed_items, cache, show_progress=False)
    assert mixed_run.count == 1 and mixed.shape == (4, encoder.dim)
    np.testing.assert_array_equal(mixed[1:3], first[:2])
    np.testing.assert_array_equal(mixed[3], first[0])


def test_png_paths_use_the_file_stem_as_tile_id(tmp_path, tiles, encoder):
    paths = []
    for tile_id, image in list(tiles.items())[:3]:
        path = tmp_path / "tiles" / "abc123" / f"{tile_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    cache = tmp_path / "cache"
    from_paths = embed_tiles(encoder, paths, cache, show_progress=False)
    counting = Counting(encoder)
    from_pairs = embed_tiles(counting, [(k, None) for k in list(tiles)[:3]], cache, show_progress=False)
    assert counting.count == 0
    np.testing.assert_array_equal(from_paths, from_pairs)


def test_embeddings_of_another_encoder_never_mix(tmp_path, tiles, encoder, tmp_path_factory):
    other = load_encoder("uni2-h", save_tiny_uni(tmp_path_factory.mktemp("uni-other") / "uni", seed=1))
    cache = tmp_path / "cache"
    items = [(k, v) for k, v in list(tiles.items())[:2]]
    a = embed_tiles(encoder, items, cache, show_progress=False)
    counting = Counting(other)
    b = embed_tiles(counting, items, cache, show_progress=False)
    assert counting.count == 2 and not np.allclose(a, b)
    assert cache_folder(encoder, cache) != cache_folder(other, cache)


def test_bad_items_are_refused(tmp_path, encoder):
    with pytest.raises(UsageError, match="cannot use int"):
        embed_tiles(encoder, [3], tmp_path / "c", show_progress=False)
    with pytest.raises(UsageError, match="cannot read tile image"):
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not a png")
        embed_tiles(encoder, [bad], tmp_path / "c", show_progress=False)


def test_ids_and_images_call_form(tmp_path, tiles, encoder):
    ids, images = list(tiles), list(tiles.values())
    cache = tmp_path / "cache"
    a = embed_tiles(encoder, ids, iter(images), cache, show_progress=False)
    counting = Counting(encoder)
    b = embed_tiles(counting, ids, (im for im in images), cache, show_progress=False)
    assert counting.count == 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, embed_tiles(encoder, list(zip(ids, images)), cache, show_progress=False))
    with pytest.raises(UsageError, match="images than tile ids"):
        embed_tiles(encoder, ids, images[:-1], tmp_path / "c2", show_progress=False)
    with pytest.raises(UsageError, match="images than tile ids"):
        embed_tiles(encoder, ids[:-1], images, tmp_path / "c3", show_progress=False)

"""Canonical tiles only: every shipped PNG is byte for byte the project's encoding of an 8-bit RGB tile of the
run's size, checked at build, approve and verify; a decompression bomb is refused from its header alone."""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from pixcell_fed.bundle import approve_bundle, build_bundle, verify_bundle
from pixcell_fed.bundle import png as P
from pixcell_fed.errors import BundleError, VerificationError
from pixcell_fed.testing.bundles import (ENCODER, GENERATOR, TILE_SIZE, audit_for, build_run_bundle, consortium,
                                         real_tile_arrays, resign, write_run)

BOMB_SIDE = 20000


def chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png(width: int, height: int, idats: list[bytes], *, bit_depth=8, colour=2, interlace=0,
        before_iend: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, interlace)
    return (P.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + b"".join(chunk(b"IDAT", d) for d in idats) + before_iend
            + chunk(b"IEND", b""))


def idat_of(data: bytes) -> bytes:
    """The payload of the single IDAT chunk of a canonical PNG."""
    (length,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    return data[41:41 + length]


def unfiltered_rows(pixels: np.ndarray) -> bytes:
    """Every row with filter type 0 (None): a valid PNG of the same pixels, but not the canonical choice."""
    h = pixels.shape[0]
    return np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, -1)], axis=1).tobytes()


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid all-black ``side`` x ``side`` RGB PNG of about 1 MB that decodes to 3 * side**2 bytes.

    Deflate resets its state at a full flush, so the compressed form of 100 zero rows repeats byte for byte; the
    Adler-32 of n zero bytes is (n mod 65521) << 16 | 1."""
    block = bytes(1 + 3 * side) * 100
    compressor = zlib.compressobj(9)
    head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()
    n = side * (1 + 3 * side)
    stream = head + body * (side // 100 - 1) + tail[:-4] + struct.pack(">I", ((n % 65521) << 16) | 1)
    return png(side, side, [stream])


@pytest.fixture(scope="module")
def arrays():
    return real_tile_arrays(6)


@pytest.fixture(scope="module")
def canonical(arrays):
    return P.clean_png_bytes(arrays[0])


@pytest.fixture(scope="module")
def bomb():
    return bomb_png()


def test_canonical_encoding_round_trips_and_is_deterministic(arrays):
    rng = np.random.default_rng(0)
    samples = list(arrays) + [rng.integers(0, 256, (TILE_SIZE, TILE_SIZE, 3), dtype=np.uint8),
                              np.zeros((TILE_SIZE, TILE_SIZE, 3), np.uint8), P._reference_pixels()]
    for pixels in samples:
        data = P.clean_png_bytes(pixels)
        assert data == P.clean_png_bytes(pixels.copy())
        assert P.list_chunks(data) == ["IHDR", "IDAT", "IEND"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)  # a standard decoder agrees
        assert np.array_equal(P.check_canonical_tile(data, tile_size=pixels.shape[0]), pixels)


def test_the_encoding_is_pinned_and_a_different_zlib_is_refused(monkeypatch):
    """Sites and the coordinator must produce the same bytes: a zlib that compresses differently fails closed."""
    assert hashlib.sha256(P._encode(P._reference_pixels())).hexdigest() == P.REFERENCE_ENCODING_SHA256
    P.check_encoder.cache_clear()
    monkeypatch.setattr(P, "ZLIB_LEVEL", 1)
    try:
        with pytest.raises(BundleError, match="does not reproduce pixcell-fed's canonical PNG encoding"):
            P.clean_png_bytes(P._reference_pixels())
    finally:
        P.check_encoder.cache_clear()


def _variants(pixels: np.ndarray, canonical: bytes) -> dict[str, tuple[bytes, str]]:
    side = pixels.shape[0]
    stream = idat_of(canonical)
    full = zlib.compressobj(P.ZLIB_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_FILTERED)
    filtered = P._filtered_rows(pixels)
    padded = full.compress(filtered[:100]) + full.flush(zlib.Z_FULL_FLUSH) + full.compress(filtered[100:]) + full.flush()
    rgba = io.BytesIO()
    Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])).save(rgba, format="PNG")
    grey = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(grey, format="PNG")
    palette = io.BytesIO()
    Image.fromarray(pixels).convert("P").save(palette, format="PNG")
    return {
        "IDAT trailer": (png(side, side, [stream + b"MRN-99887766 Doe^Jane"]), "bytes after the zlib stream inside IDAT"),
        "ancillary text chunk": (png(side, side, [stream], before_iend=chunk(b"tEXt", b"Patient\x00Doe^Jane")),
                                 "carries chunks tEXt"),
        "private chunk": (png(side, side, [stream], before_iend=chunk(b"prVt", b"CASE-2024-0815")), "carries chunks prVt"),
        "bytes after IEND": (canonical + b"CASE-2024-0815", "after the PNG's IEND"),
        "IDAT split in two": (png(side, side, [stream[:50], stream[50:]]), "one IHDR, one IDAT, one IEND"),
        "unfiltered rows": (png(side, side, [zlib.compress(unfiltered_rows(pixels), 6)]), "not the canonical encoding"),
        "other compression": (png(side, side, [zlib.compress(filtered, 1)]), "not the canonical encoding"),
        "flush padding": (png(side, side, [padded]), "not the canonical encoding"),
        "extra image data": (png(side, side, [zlib.compress(filtered + filtered[:side * 3 + 1], 6)]),
                             "decompresses to more than"),
        "wrong size": (P.clean_png_bytes(np.tile(pixels, (2, 2, 1))), f"{2 * side}x{2 * side} px, but this run's tiles"),
        "RGBA": (rgba.getvalue(), "8-bit RGBA"),
        "greyscale": (grey.getvalue(), "8-bit greyscale"),
        "palette": (palette.getvalue(), "8-bit palette"),
        "16-bit": (png(side, side, [stream], bit_depth=16), "16-bit RGB"),
        "interlaced": (png(side, side, [stream], interlace=1), "interlaced"),
    }


def test_every_non_canonical_tile_is_refused_naming_it(arrays, canonical):
    variants = _variants(arrays[0], canonical)
    # the covert channel is invisible to image viewers: the trailer decodes to the same picture
    trailer = variants["IDAT trailer"][0]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(trailer))), arrays[0])
    for what, (data, match) in variants.items():
        with pytest.raises(BundleError, match=match) as info:
            P.check_canonical_tile(data, tile_size=TILE_SIZE, name="tiles/x.png")
        assert info.value.message.startswith("tiles/x.png: "), what


def test_a_bomb_is_refused_from_its_header_without_allocating_it(bomb, tmp_path):
    from pixcell_fed.training.data import load_image

    assert len(bomb) < 2 * 1024 * 1024  # about 1 MB that decodes to 1.2 GB
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"{BOMB_SIDE}x{BOMB_SIDE} px, but this run's tiles are 48x48"):
            P.check_canonical_tile(bomb, tile_size=TILE_SIZE, name="tiles/bomb.png")
        # the coordinator's image loader: refused before decoding, as a typed error (not a crash)
        with pytest.raises(BundleError, match=f"{BOMB_SIDE}x{BOMB_SIDE} px, larger than the 1024 px tiles"):
            load_image(path, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # nothing near the 1.2 GB of pixels was allocated
    ordinary = tmp_path / "tile.png"
    ordinary.write_bytes(P.clean_png_bytes(real_tile_arrays(1)[0]))
    assert load_image(ordinary, 32).shape == (32, 32, 3)


@pytest.fixture
def site(tmp_path, arrays):
    keys = consortium(("site-a",))
    run = write_run(tmp_path / "work", "run-001", arrays)
    return keys, run


def test_build_refuses_a_non_canonical_tile_naming_it(site, arrays, canonical, bomb, tmp_path):
    keys, run = site
    for what, data in [("trailer", _variants(arrays[0], canonical)["IDAT trailer"][0]), ("bomb", bomb)]:
        bad = run.tiles[0].with_name(f"{what}.png")
        bad.write_bytes(data)
        with pytest.raises(BundleError, match=f"^{what}.png: "):
            build_bundle(run.run_dir, site_name="site-a", tiles=[bad, *run.tiles[1:]], tile_size=TILE_SIZE,
                         generator=GENERATOR, encoder=ENCODER, site_key=keys.site_keys["site-a"])
    with pytest.raises(BundleError, match=f"{TILE_SIZE}x{TILE_SIZE} px, but this run's tiles are 64x64"):
        build_bundle(run.run_dir, site_name="site-a", tiles=run.tiles, tile_size=64, generator=GENERATOR,
                     encoder=ENCODER, site_key=keys.site_keys["site-a"])
    assert not (run.run_dir / "bundle").exists()


@pytest.mark.parametrize("what", ["IDAT trailer", "ancillary text chunk", "wrong size", "RGBA", "bomb"])
def test_approve_and_verify_refuse_a_resigned_non_canonical_tile(site, arrays, canonical, bomb, what):
    """A site holding its key swaps a tile and re-signs everything (manifest, audit, bundle.json): the officer's
    gate refuses it, and so does the coordinator even when an officer signature is added behind the gate."""
    keys, run = site
    bundle = build_run_bundle(run, keys, "site-a", approve=False)
    name = sorted((bundle / "tiles").iterdir())[0].name
    data = bomb if what == "bomb" else _variants(arrays[0], canonical)[what][0]
    resign(bundle, keys.site_keys["site-a"], tiles={name: data})
    (run.run_dir / "audit" / "audit_summary.json").write_text((bundle / "audit.json").read_text())  # run agrees
    with pytest.raises(BundleError, match=f"damaged: tiles/{name}: "):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=keys.authority("site-a", run.work_dir))
    resign(bundle, keys.site_keys["site-a"], keys.officer_keys["site-a"])
    tracemalloc.start()
    try:
        with pytest.raises(VerificationError, match=f"^tiles/{name}: "):
            verify_bundle(bundle, keys.trust)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024


def test_audit_hashes_follow_the_canonical_bytes(arrays):
    """The audit keeps hashes of the files as written; canonical encoding makes them the bytes that ship."""
    summary = audit_for(arrays)
    assert summary["kept_sha256"] == sorted(hashlib.sha256(P.clean_png_bytes(a)).hexdigest() for a in arrays)

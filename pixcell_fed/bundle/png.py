"""PNG tiles as shipped: pixels only, no metadata chunks, random names.

A PNG can carry text (``tEXt``, ``iTXt``, ``zTXt``), EXIF (``eXIf``), a timestamp (``tIME``), ICC profiles and
private chunks, any of which can hold a slide name or a patient identifier. Shipped tiles are decoded and
re-encoded from their pixels so that only ``IHDR``, ``IDAT`` and ``IEND`` remain, and :func:`check_clean_png`
refuses anything else, including bytes after ``IEND``.
"""

from __future__ import annotations

import io
import re
import secrets
import struct
import zlib
from pathlib import Path

import numpy as np

from pixcell_fed.errors import BundleError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALLOWED_CHUNKS = frozenset({"IHDR", "IDAT", "IEND"})
TILE_NAME_RE = re.compile(r"^[0-9a-f]{32}\.png$")


def random_tile_name() -> str:
    """A random file name for a shipped tile: 128 random bits in hex, then ``.png``."""
    return secrets.token_hex(16) + ".png"


def list_chunks(data: bytes, *, name: str = "PNG") -> list[str]:
    """The chunk types of a PNG in file order; :class:`BundleError` on a bad signature, CRC or trailing bytes."""
    if not data.startswith(PNG_SIGNATURE):
        raise BundleError(f"{name}: not a PNG file (bad signature)", hint="ship tiles as PNG")
    pos = len(PNG_SIGNATURE)
    chunks: list[str] = []
    while pos < len(data):
        if pos + 12 > len(data):
            raise BundleError(f"{name}: truncated PNG chunk at byte {pos}", hint="re-encode the tile")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise BundleError(f"{name}: PNG chunk {ctype!r} runs past the end of the file", hint="re-encode the tile")
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(ctype + data[pos + 8:end - 4]) & 0xFFFFFFFF != crc:
            raise BundleError(f"{name}: PNG chunk {ctype!r} at byte {pos} has a bad CRC", hint="the file is corrupt")
        chunks.append(ctype.decode("latin-1"))
        pos = end
        if ctype == b"IEND":
            if pos != len(data):
                raise BundleError(f"{name}: {len(data) - pos} bytes after the PNG's IEND chunk",
                                  hint="re-encode the tile; trailing data can hide anything")
            return chunks
    raise BundleError(f"{name}: PNG without an IEND chunk", hint="re-encode the tile")


def check_clean_png(data: bytes, *, name: str = "PNG") -> None:
    """Refuse a PNG with any chunk other than IHDR, IDAT and IEND (metadata, ICC profile, private chunks...)."""
    chunks = list_chunks(data, name=name)
    extra = sorted(set(chunks) - ALLOWED_CHUNKS)
    if extra:
        raise BundleError(f"{name}: PNG carries metadata chunks {', '.join(extra)}",
                          hint="re-encode it with pixcell_fed.bundle.png.clean_png_bytes")
    if chunks[0] != "IHDR" or chunks[-1] != "IEND":
        raise BundleError(f"{name}: malformed PNG chunk order", hint="re-encode the tile")


def read_pixels(path: str | Path) -> np.ndarray:
    """Decode an image file to a uint8 HxWx3 RGB array (its metadata is not read)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise BundleError(f"cannot read tile image {path.name}: {exc}", hint="pass PNG tiles written by synthesize") from exc
    return np.asarray(rgb, dtype=np.uint8)


def clean_png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 HxWx3 RGB array as a PNG with only IHDR, IDAT and IEND (deterministic bytes)."""
    from PIL import Image

    array = np.asarray(pixels)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise BundleError(f"a tile must be uint8 HxWx3 RGB, got {array.dtype} {array.shape}", hint="convert the tile to RGB")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6)
    data = buf.getvalue()
    check_clean_png(data, name="re-encoded tile")
    return data



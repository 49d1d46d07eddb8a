"""PNG tiles as shipped: one canonical encoding of the pixels, nothing else, random names.

A PNG can carry text (``tEXt``, ``iTXt``, ``zTXt``), EXIF (``eXIf``), a timestamp (``tIME``), ICC profiles and
private chunks, any of which can hold a slide name or a patient identifier; and even a PNG with only ``IHDR``,
``IDAT`` and ``IEND`` can hide bytes after the zlib stream inside ``IDAT``, in padding, in how its rows are
filtered or how its stream is compressed. So a shipped tile must be byte for byte the project's own
deterministic encoding of its pixels (:func:`clean_png_bytes`): 8-bit RGB, no interlacing, each row filtered
with the filter that minimises the sum of absolute values (ties to the lowest filter type, as libpng's
heuristic), the rows compressed by zlib (level 6, strategy ``Z_FILTERED``, as libpng) into one ``IDAT``
chunk. :func:`check_canonical_tile` decodes a tile and demands exactly those bytes; it reads the size from
``IHDR`` before decoding anything, so a decompression bomb is refused without being allocated.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixcell_fed.errors import BundleError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CANONICAL_CHUNKS = ("IHDR", "IDAT", "IEND")
TILE_NAME_RE = re.compile(r"^[0-9a-f]{32}\.png$")
#: tile sides a bundle may declare: the largest is PixCell-1024's; a larger image is refused before decoding
MIN_TILE_SIZE, MAX_TILE_SIZE = 8, 1024
ZLIB_LEVEL = 6
_HEADER_BYTES = len(PNG_SIGNATURE) + 8 + 13 + 4  # signature, IHDR length and type, IHDR data, CRC
_COLOUR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale with alpha", 6: "RGBA"}
_REENCODE_HINT = "re-encode the tile with pixcell_fed.bundle.png.clean_png_bytes (what synthesize writes)"
#: sha256 of clean_png_bytes(_reference_pixels()): pins the encoding, so that every site and the coordinator
#: produce the same bytes for the same pixels (see check_encoder)
REFERENCE_ENCODING_SHA256 = "e9b5f68f82121fc60389e39cd6639bc4fa0588b7d3b39d239b7d7d914d2d1b07"


def random_tile_name() -> str:
    """A random file name for a shipped tile: 128 random bits in hex, then ``.png``."""
    return secrets.token_hex(16) + ".png"


@dataclass(frozen=True)
class PngHeader:
    """The fields of a PNG's ``IHDR`` chunk."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    compression: int
    filter_method: int
    interlace: int

    @property
    def is_8bit_rgb(self) -> bool:
        return self.bit_depth == 8 and self.colour_type == 2

    def describe(self) -> str:
        colour = _COLOUR_TYPES.get(self.colour_type, f"colour type {self.colour_type}")
        return f"{self.width}x{self.height} {self.bit_depth}-bit {colour}"


def read_png_header(source: bytes | str | Path, *, name: str | None = None) -> PngHeader:
    """The ``IHDR`` of a PNG (bytes or file), reading only its first 33 bytes; :class:`BundleError` if not a PNG."""
    if isinstance(source, (str, Path)):
        name = name or Path(source).name
        with open(source, "rb") as fh:
            head = fh.read(_HEADER_BYTES)
    else:
        head = bytes(source[:_HEADER_BYTES])
    name = name or "PNG"
    if not head.startswith(PNG_SIGNATURE):
        raise BundleError(f"{name}: not a PNG file (bad signature)", hint="ship tiles as PNG")
    if len(head) < _HEADER_BYTES or head[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise BundleError(f"{name}: a PNG must start with a 13-byte IHDR chunk", hint=_REENCODE_HINT)
    (crc,) = struct.unpack(">I", head[29:33])
    if zlib.crc32(head[12:29]) & 0xFFFFFFFF != crc:
        raise BundleError(f"{name}: the PNG's IHDR chunk has a bad CRC", hint="the file is corrupt")
    return PngHeader(*struct.unpack(">IIBBBBB", head[16:29]))


def _chunks(data: bytes, name: str) -> list[tuple[str, bytes]]:
    """``(type, payload)`` of every chunk in file order; bad signature, CRC or trailing bytes are errors."""
    if not data.startswith(PNG_SIGNATURE):
        raise BundleError(f"{name}: not a PNG file (bad signature)", hint="ship tiles as PNG")
    pos = len(PNG_SIGNATURE)
    chunks: list[tuple[str, bytes]] = []
    while pos < len(data):
        if pos + 12 > len(data):
            raise BundleError(f"{name}: truncated PNG chunk at byte {pos}", hint=_REENCODE_HINT)
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise BundleError(f"{name}: PNG chunk {ctype!r} runs past the end of the file", hint=_REENCODE_HINT)
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(ctype + data[pos + 8 : end - 4]) & 0xFFFFFFFF != crc:
            raise BundleError(f"{name}: PNG chunk {ctype!r} at byte {pos} has a bad CRC", hint="the file is corrupt")
        chunks.append((ctype.decode("latin-1"), data[pos + 8 : end - 4]))
        pos = end
        if ctype == b"IEND":
            if pos != len(data):
                raise BundleError(
                    f"{name}: {len(data) - pos} bytes after the PNG's IEND chunk",
                    hint="re-encode the tile; trailing data can hide anything",
                )
            return chunks
    raise BundleError(f"{name}: PNG without an IEND chunk", hint=_REENCODE_HINT)


def list_chunks(data: bytes, *, name: str = "PNG") -> list[str]:
    """The chunk types of a PNG in file order; :class:`BundleError` on a bad signature, CRC or trailing bytes."""
    return [ctype for ctype, _ in _chunks(data, name)]


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)
    )


def _filtered_rows(pixels: np.ndarray) -> bytes:
    """Each row prefixed by its filter type and filtered with it: the filter that minimises the sum of the
    filtered bytes read as signed values (libpng's heuristic), ties to the lowest type. Deterministic."""
    h, w, channels = pixels.shape
    x = pixels.reshape(h, w * channels).astype(np.int16)
    a = np.zeros_like(x)
    a[:, channels:] = x[:, :-channels]  # left
    b = np.zeros_like(x)
    b[1:] = x[:-1]  # up
    c = np.zeros_like(x)
    c[1:, channels:] = x[:-1, :-channels]  # up-left
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    candidates = np.stack([x, x - a, x - b, x - ((a + b) >> 1), x - paeth]) & 0xFF  # filter types 0..4
    cost = np.minimum(candidates, 256 - candidates).sum(axis=2)  # [5, h]
    choice = np.argmin(cost, axis=0)  # first minimum wins ties
    rows = candidates[choice, np.arange(h)].astype(np.uint8)
    return np.concatenate([choice.astype(np.uint8)[:, None], rows], axis=1).tobytes()


def clean_png_bytes(pixels: np.ndarray) -> bytes:
    """The project's one PNG encoding of a uint8 HxWx3 RGB array: ``IHDR``, one ``IDAT``, ``IEND`` (deterministic)."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise BundleError(
            f"a tile must be uint8 HxWx3 RGB, got {array.dtype} {array.shape}", hint="convert the tile to RGB"
        )
    check_encoder()
    return _encode(np.ascontiguousarray(array))


def _encode(array: np.ndarray) -> bytes:
    h, w, _ = array.shape
    compressor = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_FILTERED)
    idat = compressor.compress(_filtered_rows(array)) + compressor.flush()
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _reference_pixels() -> np.ndarray:
    """A fixed 64x64 RGB image with flat areas, gradients and texture (exercises every filter and the matcher)."""
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    r = (i * 3 + j) % 256
    g = np.where((i // 8 + j // 8) % 2 == 0, 200, (i * j) % 251)
    b = (i * 7 + j * 13 + (i ^ j) * 5) % 256
    return np.stack([r, g, b], axis=2).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def check_encoder() -> None:
    """Refuse to encode or verify tiles with a zlib whose output differs from the reference encoding.

    Canonical bytes are only canonical if every site and the coordinator compress alike. zlib's deflate output
    is stable across its releases; drop-in replacements (zlib-ng, some hardware-accelerated builds) differ.
    """
    digest = hashlib.sha256(_encode(_reference_pixels())).hexdigest()
    if digest != REFERENCE_ENCODING_SHA256:
        raise BundleError(
            f"this Python's zlib ({zlib.ZLIB_RUNTIME_VERSION}) does not reproduce pixcell-fed's canonical PNG "
            "encoding: tiles encoded or verified here would not match those of other sites",
            hint="run pixcell-fed with a Python linked against the reference zlib (not zlib-ng)",
        )


def _decompress_idat(payload: bytes, expected: int, name: str) -> None:
    """Refuse an IDAT stream that is not exactly one zlib stream of ``expected`` bytes (bounded: no bomb)."""
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(payload, expected + 1)
    except zlib.error as exc:
        raise BundleError(
            f"{name}: the PNG's image data is not a valid zlib stream ({exc})", hint=_REENCODE_HINT
        ) from exc
    if len(raw) > expected or stream.unconsumed_tail:
        raise BundleError(
            f"{name}: the PNG's image data decompresses to more than its {expected} bytes",
            hint="extra data can hide anything; " + _REENCODE_HINT,
        )
    if not stream.eof:
        raise BundleError(
            f"{name}: the PNG's image data is truncated ({len(raw)} of {expected} bytes)", hint=_REENCODE_HINT
        )
    if stream.unused_data:
        raise BundleError(
            f"{name}: {len(stream.unused_data)} bytes after the zlib stream inside IDAT",
            hint="trailing data can hide anything; " + _REENCODE_HINT,
        )
    if len(raw) != expected:
        raise BundleError(f"{name}: the PNG's image data holds {len(raw)} bytes, not {expected}", hint=_REENCODE_HINT)


def check_canonical_tile(data: bytes, *, tile_size: int, name: str = "PNG") -> np.ndarray:
    """Accept only the canonical encoding of an 8-bit RGB ``tile_size`` x ``tile_size`` image; return its pixels.

    The size and mode come from ``IHDR`` before anything is decompressed; then the chunk list (exactly one
    ``IHDR``, ``IDAT``, ``IEND``), the zlib stream (nothing after it), and finally the bytes are compared with
    :func:`clean_png_bytes` of the decoded pixels, which rules out any other filter choice or compression.
    """
    from PIL import Image, UnidentifiedImageError

    header = read_png_header(data, name=name)
    if (header.width, header.height) != (tile_size, tile_size):
        raise BundleError(
            f"{name}: {header.width}x{header.height} px, but this run's tiles are {tile_size}x{tile_size}",
            hint="ship only the run's own tiles, at the run's tile size",
        )
    if not header.is_8bit_rgb or header.interlace or header.compression or header.filter_method:
        raise BundleError(
            f"{name}: {header.describe()}{', interlaced' if header.interlace else ''}; "
            "a tile must be 8-bit RGB, not interlaced",
            hint=_REENCODE_HINT,
        )
    chunks = _chunks(data, name)
    types = [ctype for ctype, _ in chunks]
    extra = sorted(set(types) - set(CANONICAL_CHUNKS))
    if extra:
        raise BundleError(
            f"{name}: PNG carries chunks {', '.join(extra)} besides IHDR, IDAT and IEND",
            hint="metadata chunks can hold identifiers; " + _REENCODE_HINT,
        )
    if tuple(types) != CANONICAL_CHUNKS:
        raise BundleError(
            f"{name}: PNG chunks {', '.join(types)}; the canonical layout is one IHDR, one IDAT, one IEND",
            hint=_REENCODE_HINT,
        )
    _decompress_idat(chunks[1][1], tile_size * (1 + 3 * tile_size), name)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.load()
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BundleError(f"{name}: cannot decode the PNG ({exc})", hint=_REENCODE_HINT) from exc
    if pixels.shape != (tile_size, tile_size, 3):
        raise BundleError(f"{name}: decodes to {pixels.shape}, not {tile_size}x{tile_size} RGB", hint=_REENCODE_HINT)
    if clean_png_bytes(pixels) != data:
        raise BundleError(
            f"{name}: its bytes are not the canonical encoding of its pixels (other row filters, "
            "compression or padding)",
            hint="only canonical bytes leave a site; " + _REENCODE_HINT,
        )
    return pixels


def check_image_side(path: str | Path, max_side: int) -> None:
    """Refuse an image file wider or taller than ``max_side`` px, from its header alone (before any decoding)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    with open(path, "rb") as fh:
        is_png = fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    if is_png:
        header = read_png_header(path)
        width, height = header.width, header.height
    else:
        try:
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise BundleError(
                f"{path.name}: cannot read the image header ({exc})", hint="pass PNG, JPEG or TIFF tiles"
            ) from exc
    if max(width, height) > max_side:
        raise BundleError(
            f"{path.name}: {width}x{height} px, larger than the {max_side} px tiles allowed here; "
            "refused before decoding",
            hint="a tile that large is a decompression bomb or not a tile",
        )


def read_rgb_tile(path: str | Path, *, tile_size: int) -> bytes:
    """The bytes of a tile file to ship, after :func:`check_canonical_tile` (naming the file when refused)."""
    path = Path(path)
    data = path.read_bytes()
    check_canonical_tile(data, tile_size=tile_size, name=path.name)
    return data

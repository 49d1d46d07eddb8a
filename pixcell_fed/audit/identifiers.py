"""Scan files about to be shipped for identifying content outside the pixels.

Fail closed: a shipped image must carry no metadata at all, so any PNG text/time/EXIF chunk, any JPEG EXIF/XMP/
comment segment and any bytes after the image's end are findings, whatever they say. File names, and the full
text of non-image files (JSON, CSV, HTML, parquet values), are searched for the site's forbidden strings (slide
names, slide keys, property values, label text) and for generic markers of slide metadata and tile coordinates.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MIN_FORBIDDEN_LENGTH = 4
"""Forbidden strings shorter than this are ignored: they would match everywhere by chance."""

GENERIC_MARKERS = (
    "openslide.",
    "aperio.",
    "hamamatsu.",
    "mirax.",
    "philips.",
    "leica.",
    "ventana.",
    "tiff.imagedescription",
    "scanscope",
    "barcode",
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".isyntax",
)
"""Substrings that betray slide metadata or slide files wherever they appear."""

TILE_ID_PATTERN = re.compile(r"r\d{5}-c\d{5}|(?:^|[^a-z])x\d+[_-]y\d+", re.IGNORECASE)
"""Source tile ids (``...-r00012-c00034``) and coordinate-style names (``x1024_y2048``)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}
JPEG_ALLOWED_APP = {0xE0, 0xE2}  # JFIF header and ICC colour profile


@dataclass(frozen=True)
class Finding:
    """One piece of identifying content: which file, what kind, and what was found."""

    path: str
    kind: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def _needles(forbidden: Iterable[str]) -> list[str]:
    out = {s.strip().casefold() for s in forbidden if s and len(s.strip()) >= MIN_FORBIDDEN_LENGTH}
    return sorted(out)


def _matches(text: str, needles: Sequence[str]) -> list[str]:
    folded = text.casefold()
    hits = [n for n in needles if n in folded]
    hits += [m for m in GENERIC_MARKERS if m in folded]
    return hits


def _png_metadata(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(chunk type, decoded text) of each metadata chunk, and any bytes after IEND."""
    found: list[tuple[str, str]] = []
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if ctype in PNG_METADATA_CHUNKS:
            text = body
            if ctype == b"zTXt":
                key, _, rest = body.partition(b"\0")
                try:
                    text = key + b" " + zlib.decompress(rest[1:])
                except zlib.error:
                    text = body
            elif ctype == b"iTXt":
                parts = body.split(b"\0", 3)
                if len(parts) == 4 and len(parts[1]) and parts[1][:1] == b"\1":
                    try:
                        text = parts[0] + b" " + zlib.decompress(parts[3].split(b"\0", 1)[-1])
                    except zlib.error:
                        text = body
            found.append((ctype.decode("latin-1"), text.replace(b"\0", b" ").decode("latin-1", "replace")))
        if ctype == b"IEND":
            return found, data[pos:]
    return found, b""


def _jpeg_metadata(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(segment name, text) of each metadata segment, and any bytes after EOI."""
    found: list[tuple[str, str]] = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xD9:
            return found, data[pos + 2 :]
        if marker == 0xDA:  # start of scan: entropy-coded data follows up to EOI
            end = data.rfind(b"\xff\xd9")
            return found, data[end + 2 :] if end >= 0 else b""
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xFE:
            found.append(("COM", body.decode("latin-1", "replace")))
        elif 0xE0 <= marker <= 0xEF and marker not in JPEG_ALLOWED_APP:
            found.append((f"APP{marker - 0xE0}", body[:2000].replace(b"\0", b" ").decode("latin-1", "replace")))
        pos += 2 + length
    return found, b""


def _text_of(path: Path, data: bytes) -> str:
    if path.suffix.lower() == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        return " ".join(map(str, frame.columns)) + "\n" + frame.astype(str).to_csv(index=False)
    return data.decode("utf-8", "replace")


def scan_for_identifiers(paths: Iterable[str | Path], forbidden_strings: Iterable[str] = ()) -> list[Finding]:
    """Findings for every identifying item in ``paths`` (empty list: nothing found).

    ``forbidden_strings``: the site's own identifiers (slide file names and keys, property values, label text);
    matched case-insensitively, those shorter than ``MIN_FORBIDDEN_LENGTH`` are ignored.
    """
    needles = _needles(forbidden_strings)
    findings: list[Finding] = []
    for raw in paths:
        path = Path(raw)
        name = path.name
        findings.extend(
            Finding(str(path), "file_name", f"file name contains {hit!r}") for hit in _matches(name, needles)
        )
        if TILE_ID_PATTERN.search(name):
            findings.append(Finding(str(path), "file_name", "file name looks like a source tile id or coordinates"))
        data = path.read_bytes()
        if data.startswith((PNG_SIGNATURE, b"\xff\xd8")):
            is_png = data.startswith(PNG_SIGNATURE)
            meta, trailing = _png_metadata(data) if is_png else _jpeg_metadata(data)
            for kind, text in meta:
                hits = _matches(text, needles)
                what = f"; contains {', '.join(repr(h) for h in hits)}" if hits else ""
                findings.append(
                    Finding(
                        str(path),
                        "image_metadata",
                        f"{kind} {'chunk' if is_png else 'segment'} ({len(text)} bytes) must be stripped{what}",
                    )
                )
            if trailing.strip(b"\0"):
                hits = _matches(trailing.decode("latin-1"), needles)
                what = f"; contains {', '.join(repr(h) for h in hits)}" if hits else ""
                findings.append(Finding(str(path), "trailing_data", f"{len(trailing)} bytes after the image end{what}"))
            continue
        findings.extend(
            Finding(str(path), "content", f"content contains {hit!r}")
            for hit in _matches(_text_of(path, data), needles)
        )
    return findings

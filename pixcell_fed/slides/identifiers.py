"""Strings from a slide that could identify it or its patient, so that shipping code can refuse them.

Slide properties (file names in ImageDescription, barcodes, users, dates, vendor identifiers) are read from
OpenSlide; values that are plain numbers or too short to be specific are left out, since they would match by
chance. The label and macro images are never decoded here: nothing downstream ever reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

_NUMBER = re.compile(r"^[\s+\-]?\d+([.,]\d+)?([eE][+\-]?\d+)?\s*$")
_MIN_LEN = 6
# Generic property values that name formats or software, not a slide; they may legitimately appear elsewhere.
_GENERIC = re.compile(
    r"^(aperio|generic-tiff|hamamatsu|leica|mirax|philips|sakura|trestle|ventana|zeiss|dicom|"
    r"jpeg|lzw|none|centimeter|inch|rgb|true|false)$",
    re.IGNORECASE,
)


def identifying_strings_from_properties(properties: dict[str, str]) -> set[str]:
    """Specific strings among slide property values, including each ``|key = value`` field of descriptions."""
    found: set[str] = set()
    for value in properties.values():
        for part in re.split(r"[|\r\n]", str(value)):
            piece = part.split("=", 1)[1] if "=" in part else part
            piece = piece.strip()
            if len(piece) >= _MIN_LEN and not _NUMBER.match(piece) and not _GENERIC.match(piece):
                found.add(piece)
    return found


def slide_identifying_strings(path: str | Path) -> set[str]:
    """Identifying strings of one slide file: its name, stem and specific property values ({} if unreadable)."""
    import openslide

    path = Path(path)
    found = {path.name, path.stem}
    try:
        with openslide.OpenSlide(str(path)) as slide:
            found |= identifying_strings_from_properties(dict(slide.properties))
    except (openslide.OpenSlideError, OSError, ValueError):
        pass
    return found

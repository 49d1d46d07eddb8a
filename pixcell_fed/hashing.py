"""SHA-256 of bytes and files: the one digest every stage uses to identify what it wrote, shipped or received."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    """Lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, *, block_size: int = 1 << 22) -> str:
    """Lowercase hex sha256 of a file, read in blocks (multi-GB weight files included)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()

"""SHA-256 of bytes and files: the one digest every stage uses to identify what it wrote, shipped or received."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TypeGuard

#: A lowercase hex SHA-256, as :func:`sha256_bytes` writes it.
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a lowercase hex SHA-256 string."""
    return isinstance(value, str) and SHA256_HEX_RE.fullmatch(value) is not None


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

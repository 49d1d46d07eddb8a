"""Where a site's files land at the coordinator: a per-site staging folder until the bundle verified, then the pool.

Layout inside ``pool_dir``::

    staging/<site>/<run_id>/     what a site sent: the signed files, then tiles/ as they arrive (unverified,
                                 kept across runs so that a transfer resumes)
    bundles/<site>/<run_id>/     the site's verified, complete bundle (moved here from staging), at most one

``<site>`` is the name the site's authentication key maps to in the trust file and ``<run_id>`` a validated run
id: no name a site chose becomes a path before it matched its strict pattern, and every path is checked to stay
inside its folder. A site that left the trust file loses both folders on the next run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from pixcell_fed.atomic import write_bytes_atomic
from pixcell_fed.bundle import layout as L
from pixcell_fed.errors import FederationError
from pixcell_fed.federation import validation as V
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)

STAGING = "staging"
BUNDLES = "bundles"


def _inside(root: Path, *parts: str) -> Path:
    """``root/parts`` after checking that it cannot leave ``root`` (every part validated by the caller too)."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()) or any(
        p in ("", ".", "..") or "/" in p or "\\" in p for p in parts
    ):
        raise FederationError(f"refusing a path outside {root}: {'/'.join(parts)!r}")
    return path


def staging_dir(pool_dir: Path, site: str, run_id: str) -> Path:
    return _inside(pool_dir / STAGING, V.site_name(site, "site"), V.run_id(run_id, "run id"))


def pooled_dir(pool_dir: Path, site: str, run_id: str) -> Path:
    return _inside(pool_dir / BUNDLES, V.site_name(site, "site"), V.run_id(run_id, "run id"))


def pooled_bundle(pool_dir: Path, site: str) -> Path | None:
    """The verified bundle of ``site`` in the pool, if there is one."""
    folder = _inside(pool_dir / BUNDLES, V.site_name(site, "site"))
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return runs[-1] if runs else None


def stage_signed_files(pool_dir: Path, site: str, run_id: str, files: Mapping[str, bytes]) -> Path:
    """Write the validated signed files of ``site``'s bundle ``run_id`` into its staging folder.

    Staged runs of other run ids are dropped; tiles staged under a different manifest are dropped; when the pool
    already holds this very bundle (same manifest), its tiles move back to staging, so nothing travels twice.
    """
    target = staging_dir(pool_dir, site, run_id)
    site_root = target.parent
    for other in (p for p in site_root.iterdir() if p.is_dir() and p.name != run_id) if site_root.is_dir() else ():
        shutil.rmtree(other)
    old_manifest = target / L.MANIFEST
    if old_manifest.is_file() and old_manifest.read_bytes() != files[L.MANIFEST] and (target / L.TILES).is_dir():
        shutil.rmtree(target / L.TILES)
    pooled = pooled_dir(pool_dir, site, run_id)
    if (
        not (target / L.TILES).is_dir()
        and (pooled / L.TILES).is_dir()
        and (pooled / L.MANIFEST).is_file()
        and (pooled / L.MANIFEST).read_bytes() == files[L.MANIFEST]
    ):
        target.mkdir(parents=True, exist_ok=True)
        os.replace(pooled / L.TILES, target / L.TILES)
    for folder in (target, target / L.SIGNATURES):
        for stale in folder.iterdir() if folder.is_dir() else ():
            # signed files of an earlier attempt that this reply does not carry, and temporaries of a killed write
            if stale.is_file() and stale.relative_to(target).as_posix() not in files:
                stale.unlink()
    for name, blob in files.items():
        write_bytes_atomic(_inside(target, *name.split("/")), blob)
    (target / L.TILES).mkdir(parents=True, exist_ok=True)
    for stale in (target / L.TILES).glob(".*"):  # a tile write cut short by a crash
        stale.unlink()
    return target


def write_tile(staged: Path, name: str, data: bytes) -> None:
    """Write a received tile into ``staged/tiles`` (temporary name, then rename), without an fsync per file: a
    tile torn by a crash fails the bundle's verification and is simply asked for again."""
    path = _inside(staged / L.TILES, V.tile_name(name, "tile"))
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def discard(staged: Path) -> None:
    """Remove a staged bundle (and its site folder when nothing else is staged there)."""
    if staged.is_dir():
        shutil.rmtree(staged)
    if staged.parent.is_dir() and not any(staged.parent.iterdir()):
        staged.parent.rmdir()


def promote(pool_dir: Path, site: str, run_id: str) -> Path:
    """Move a verified staged bundle into the pool, replacing the site's earlier pooled bundle."""
    source = staging_dir(pool_dir, site, run_id)
    target = pooled_dir(pool_dir, site, run_id)
    site_root = target.parent
    if site_root.is_dir():
        shutil.rmtree(site_root)
    site_root.mkdir(parents=True)
    os.replace(source, target)
    discard(source)
    return target


def remove_untrusted(pool_dir: Path, trusted: Iterable[str]) -> list[str]:
    """Delete the pooled and staged files of every site that is not (or no longer) in the trust file."""
    keep = set(trusted)
    removed = set()
    for area in (pool_dir / BUNDLES, pool_dir / STAGING):
        for folder in sorted(area.iterdir()) if area.is_dir() else ():
            if folder.name not in keep:
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder)
                else:
                    folder.unlink()
                removed.add(folder.name)
    for name in sorted(removed):
        log.warning("pooling: %r is not in the trust file: its pooled and staged files were removed", name)
    return sorted(removed)

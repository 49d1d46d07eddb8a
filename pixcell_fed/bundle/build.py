"""Build a run's bundle: atomic, fail-closed, signed by the site, awaiting approval.

The bundle of run folder ``<work>/runs/<run_id>/`` is ``<run>/bundle``, and its audit is the run's own
(``<run>/audit/audit_summary.json``, with ``audit_summary.html`` when the audit wrote one): the builder takes it
from nowhere else, and refuses a run whose recorded verdict or audit verdict is FAIL
(:class:`PrivacyGateRefused`). The tiles must be exactly the audit's kept set, hash for hash, each already the
canonical PNG of an 8-bit RGB tile of the run's tile size; they are shipped byte for byte under random names.
The bundle is built in a temporary sibling folder and renamed into place only after a self-check has passed:
the signed files verified as a coordinator would, every byte scanned for the source file names and paths and
any strings the caller forbids.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.conditioning_policy import claim_of_audit
from pixcell_fed.bundle.manifest import (
    canonical_json,
    check_label,
    check_run_id,
    label_counts,
    manifest_bytes,
    manifest_frame,
)
from pixcell_fed.bundle.png import MAX_TILE_SIZE, MIN_TILE_SIZE, random_tile_name, read_rgb_tile
from pixcell_fed.bundle.run_binding import read_run_audit, run_refusal, tile_set_problem
from pixcell_fed.bundle.shareable import HASHES_KEY, audit_json_text, validate_identity
from pixcell_fed.bundle.state import AUDIT_SUMMARY_HTML, BUNDLE_DIR, audit_dir
from pixcell_fed.errors import BundleError, PrivacyGateRefused
from pixcell_fed.hashing import sha256_bytes, sha256_file
from pixcell_fed.privacy.conditioning import ClaimError
from pixcell_fed.runlog import get_logger

log = get_logger("bundle")


@dataclass(frozen=True)
class BundleInfo:
    """What :func:`build_bundle` built."""

    path: Path
    site_name: str
    run_id: str
    n_tiles: int
    verdict: str
    state: str


def _forbidden_from_inputs(tiles: Sequence[Path], extra: Iterable[str]) -> list[str]:
    """Strings that must not appear in any shipped byte: source file names, their folders' paths, caller's list."""
    strings = {s for s in extra if s}
    for tile in tiles:
        strings.add(tile.name)
        if len(tile.stem) >= 8 and not tile.stem.isdigit():
            strings.add(tile.stem)
        strings.add(str(tile.resolve().parent))
    return sorted(s for s in strings if len(s) >= 4)


def scan_bytes_for(bundle_dir: Path, forbidden: Sequence[str], *, skip_tiles: bool = False) -> list[tuple[str, str]]:
    """``(relative file, string)`` for each forbidden string found (case-insensitive) in the folder's files.

    ``skip_tiles``: leave out ``tiles/`` (freshly encoded pixels, checked chunk by chunk instead: searching
    compressed image data for short strings only finds chance matches).
    """
    needles = [(s, s.lower().encode("utf-8")) for s in forbidden if s]
    hits = []
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        if skip_tiles and path.parent.name == L.TILES and path.parent.parent == bundle_dir:
            continue
        data = path.read_bytes().lower()
        for text, needle in needles:
            if needle in data:
                hits.append((path.relative_to(bundle_dir).as_posix(), text))
    return hits


def self_check(bundle_dir: Path, forbidden: Sequence[str] = ()) -> None:
    """Fail-closed check of a freshly built bundle: its signed files verify, no forbidden byte anywhere."""
    from pixcell_fed.audit.identifiers import scan_for_identifiers
    from pixcell_fed.bundle.verify import check_signed_files
    from pixcell_fed.errors import VerificationError

    try:
        check_signed_files(bundle_dir, None)  # tiles: checked canonical as read, shipped byte for byte
    except VerificationError as exc:
        raise BundleError(
            f"self-check: {exc.message}", hint="this is a bug in pixcell-fed; the bundle was not built"
        ) from exc
    findings = scan_for_identifiers(sorted(p for p in bundle_dir.rglob("*") if p.is_file()), forbidden)
    if findings:
        where = "; ".join(f"{Path(f.path).relative_to(bundle_dir).as_posix()}: {f.detail}" for f in findings[:5])
        raise BundleError(
            f"self-check: identifying content found in the bundle: {where}",
            hint="nothing from source file names, folders or slide metadata may be shipped; the bundle was not built",
        )
    hits = scan_bytes_for(bundle_dir, forbidden, skip_tiles=True)  # raw bytes of every other file too
    if hits:
        where = "; ".join(f"{f} contains {s!r}" for f, s in hits[:5])
        raise BundleError(
            f"self-check: identifying strings found in the bundle: {where}",
            hint="nothing from source file names, folders or slide metadata may be shipped; the bundle was not built",
        )


def write_site_signature(bundle_dir: Path, site_key) -> None:
    """(Re)sign the bundle's statement with the site key (``signatures/site.sig``)."""
    info = L.read_bundle_json(bundle_dir)
    L.write_signature(bundle_dir, L.SITE_SIG, site_key, L.statement(info, role="site"), role="site")


def _clean_stale_temp(out_dir: Path) -> None:
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def build_bundle(
    run_dir: str | Path,
    *,
    site_name: str,
    tiles: Sequence[str | Path],
    tile_size: int,
    labels: Sequence[str | None] | None = None,
    generator: dict,
    encoder: dict,
    site_key,
    forbidden_strings: Iterable[str] = (),
) -> BundleInfo:
    """Build ``<run_dir>/bundle`` (which must not exist) in the state "awaiting approval".

    ``run_dir`` is the run's folder (its name is the run id; its audit is read from ``audit/``), ``tiles`` the
    audited synthetic PNG files (exactly the audit's kept set), ``tile_size`` the run's tile side in pixels,
    ``labels`` their class labels (aligned with ``tiles``, or ``None``), ``generator``/``encoder`` the model
    identities, ``site_key`` the site's Ed25519 private key. ``forbidden_strings`` (slide names, patient
    identifiers...) must not occur in any byte of the bundle.
    """
    run_dir = Path(run_dir)
    run_id = check_run_id(run_dir.name, "run folder name")
    L.check_site_name(site_name)
    refusal = run_refusal(run_dir)
    if refusal:
        raise PrivacyGateRefused(
            f"{refusal}: no bundle is built", hint="see the audit report; nothing may leave the site from this run"
        )
    audit = read_run_audit(run_dir)
    if audit["verdict"] == "FAIL":
        raise PrivacyGateRefused(
            f"the audit verdict of run {run_id} is FAIL: no bundle is built",
            hint="see the audit report; nothing may leave the site from this run",
        )
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE:
        raise BundleError(
            f"tile size {tile_size!r} is not {MIN_TILE_SIZE} to {MAX_TILE_SIZE} px",
            hint="pass the run's tiling.tile_size",
        )
    try:
        conditioning = claim_of_audit(audit)
    except ClaimError as exc:
        raise BundleError(
            f"run {run_id}: the audit's conditioning claim is invalid: {exc}",
            hint="rerun the audit with this version of pixcell-fed",
        ) from exc
    generator_id = validate_identity(generator, "generator")
    encoder_id = validate_identity(encoder, "encoder")
    tile_paths = [Path(t) for t in tiles]
    if not tile_paths:
        raise BundleError("no tiles to bundle", hint="check that synthesis and the audit kept tiles")
    labels = _checked_labels(labels, len(tile_paths))
    html_path = audit_dir(run_dir) / AUDIT_SUMMARY_HTML
    html_bytes = html_path.read_bytes() if html_path.is_file() else None
    if html_bytes is not None:
        from pixcell_fed.bundle.html import check_inert_html

        check_inert_html(html_bytes, name=f"run {run_id}: {html_path.name}")
    out_dir = run_dir / BUNDLE_DIR
    with L.bundle_lock(out_dir):
        if out_dir.exists():
            raise BundleError(
                f"bundle folder already exists: {out_dir}", hint="a bundle is built once per run; remove it to rebuild"
            )
        return _build_locked(
            out_dir,
            site_name=site_name,
            run_id=run_id,
            tiles=tile_paths,
            tile_size=tile_size,
            labels=labels,
            generator_id=generator_id,
            encoder_id=encoder_id,
            audit=audit,
            conditioning=conditioning,
            site_key=site_key,
            html_bytes=html_bytes,
            forbidden=_forbidden_from_inputs(tile_paths, forbidden_strings),
        )


def _checked_labels(labels: Sequence[str | None] | None, n_tiles: int) -> list | None:
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != n_tiles:
        raise BundleError(f"{len(labels)} labels for {n_tiles} tiles", hint="give one label per tile, or none")
    labelled = [lab is not None for lab in labels]
    if any(labelled) and not all(labelled):
        raise BundleError(
            "some tiles have a class label and others none", hint="label every slide in the labels CSV, or none"
        )
    for i, lab in enumerate(labels):
        if lab is not None:
            check_label(lab, f"label of tile {i}")
    return labels


def _build_locked(
    out_dir: Path,
    *,
    site_name: str,
    run_id: str,
    tiles: list[Path],
    tile_size: int,
    labels: list | None,
    generator_id: dict,
    encoder_id: dict,
    audit: dict,
    conditioning,
    site_key,
    html_bytes: bytes | None,
    forbidden: list[str],
) -> BundleInfo:
    from pixcell_fed.progress import progress

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temp(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    try:
        (tmp / L.TILES).mkdir(parents=True)
        (tmp / L.SIGNATURES).mkdir()
        generator_text, encoder_text = canonical_json(generator_id), canonical_json(encoder_id)
        rows: list[dict[str, Any]] = []
        for i, tile in enumerate(progress(tiles, total=len(tiles), desc="bundle", unit="tile")):
            data = read_rgb_tile(tile, tile_size=tile_size)  # read once: the bytes checked are the bytes shipped
            name = random_tile_name()
            (tmp / L.TILES / name).write_bytes(data)
            rows.append(
                {
                    "file_name": name,
                    "sha256": sha256_bytes(data),
                    "size": len(data),
                    "label": labels[i] if labels is not None else None,
                    "generator": generator_text,
                    "encoder": encoder_text,
                    "run_id": run_id,
                }
            )
        problem = tile_set_problem([r["sha256"] for r in rows], list(audit[HASHES_KEY]))
        if problem:
            raise BundleError(
                f"the tiles given are not exactly the run's audited kept set: {problem}",
                hint="bundle exactly the tiles the audit kept, as synthesize wrote them",
            )
        rows.sort(key=lambda r: r["file_name"])  # random order: the row order tells nothing about the sources
        frame = manifest_frame(rows)
        (tmp / L.MANIFEST).write_bytes(manifest_bytes(frame))
        (tmp / L.AUDIT).write_text(audit_json_text(audit), encoding="ascii")
        if html_bytes is not None:
            (tmp / L.SUMMARY_HTML).write_bytes(html_bytes)
        info = {
            "format": L.FORMAT,
            "format_version": L.FORMAT_VERSION,
            "site": site_name,
            "run_id": run_id,
            "created": L.utc_now(),
            "tile_size": tile_size,
            "counts": {"tiles": len(frame), "labels": label_counts(frame)},
            "verdict": audit["verdict"],
            "conditioning": conditioning.to_record(),
            "files": {
                L.MANIFEST: sha256_file(tmp / L.MANIFEST),
                L.AUDIT: sha256_file(tmp / L.AUDIT),
                L.SUMMARY_HTML: sha256_file(tmp / L.SUMMARY_HTML) if html_bytes is not None else None,
            },
            "state": L.STATE_AWAITING,
            "decision": None,
        }
        (tmp / L.BUNDLE_JSON).write_text(L.bundle_json_text(info), encoding="ascii")
        write_site_signature(tmp, site_key)
        self_check(tmp, forbidden)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError as exc:
            raise BundleError(
                f"cannot move the built bundle into place at {out_dir}: {exc}",
                hint="check that nothing else writes there, then run again",
            ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle of %d tiles for run %s built at %s, awaiting approval", len(frame), run_id, out_dir)
    return BundleInfo(
        path=out_dir,
        site_name=site_name,
        run_id=run_id,
        n_tiles=len(frame),
        verdict=audit["verdict"],
        state=L.STATE_AWAITING,
    )

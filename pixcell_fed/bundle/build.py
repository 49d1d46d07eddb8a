"""Build a bundle from audited synthetic tiles: atomic, fail-closed, signed by the site, awaiting approval.

The bundle is built in a temporary sibling folder and renamed into place only after a self-check has passed:
every tile re-encoded without metadata under a random name, the manifest and the shareable audit validated
against their allow-lists, every byte scanned for the source file names and paths and any strings the caller
forbids. A FAIL verdict builds nothing (:class:`PrivacyGateRefused`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.manifest import canonical_json, check_label, check_run_id, manifest_bytes, manifest_frame, read_manifest
from pixcell_fed.bundle.png import check_clean_png, clean_png_bytes, random_tile_name, read_pixels
from pixcell_fed.hashing import sha256_bytes, sha256_file
from pixcell_fed.bundle.shareable import validate_identity, validate_shareable_audit
from pixcell_fed.errors import BundleError, PrivacyGateRefused
from pixcell_fed.runlog import get_logger

log = get_logger("bundle")

MAX_SUMMARY_HTML_BYTES = 50 * 1024 * 1024
_REF_RE = re.compile(r"""(?:\b(?:src|href|srcset|action|poster|data)\s*=\s*["']?|url\(\s*["']?)([^"'\s>)]*)""", re.IGNORECASE)


@dataclass(frozen=True)
class BundleInfo:
    """What :func:`build_bundle` built."""

    path: Path
    site_name: str
    run_id: str
    n_tiles: int
    verdict: str
    state: str


def audit_json_text(summary: Mapping) -> str:
    """How ``audit.json`` is written in a bundle (verification demands these bytes)."""
    return json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def check_summary_html(data: bytes, *, name: str = L.SUMMARY_HTML) -> None:
    """A shareable summary must be self-contained UTF-8 HTML: no links to files or the network."""
    if len(data) > MAX_SUMMARY_HTML_BYTES:
        raise BundleError(f"{name}: {len(data)} bytes, more than {MAX_SUMMARY_HTML_BYTES}", hint="share a smaller summary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{name}: not UTF-8 text", hint="pass the audit's shareable summary HTML") from exc
    for match in _REF_RE.finditer(text):
        ref = match.group(1)
        if ref and not ref.startswith(("data:", "#")):
            raise BundleError(f"{name}: refers to {ref[:80]!r}; a shareable summary must embed everything",
                              hint="pass the audit's self-contained shareable summary (figures as data: URIs)")
    if "file:" in text.lower():
        raise BundleError(f"{name}: contains a file: reference", hint="remove local paths from the shareable summary")


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
    """Fail-closed check of a built bundle's contents: clean PNGs, valid manifest and audit, no forbidden bytes."""
    frame = read_manifest(bundle_dir / L.MANIFEST)
    tile_dir = bundle_dir / L.TILES
    names = sorted(p.name for p in tile_dir.iterdir())
    if names != sorted(frame["file_name"]):
        raise BundleError("self-check: tiles/ and the manifest disagree", hint="this is a bug in pixcell-fed")
    for name in names:
        check_clean_png((tile_dir / name).read_bytes(), name=f"tiles/{name}")
    validate_shareable_audit(json.loads((bundle_dir / L.AUDIT).read_text(encoding="ascii")), source=L.AUDIT)
    from pixcell_fed.audit.identifiers import scan_for_identifiers

    findings = scan_for_identifiers(sorted(p for p in bundle_dir.rglob("*") if p.is_file()), forbidden)
    if findings:
        where = "; ".join(f"{Path(f.path).relative_to(bundle_dir).as_posix()}: {f.detail}" for f in findings[:5])
        raise BundleError(f"self-check: identifying content found in the bundle: {where}",
                          hint="nothing from source file names, folders or slide metadata may be shipped; the bundle was not built")
    hits = scan_bytes_for(bundle_dir, forbidden, skip_tiles=True)  # raw bytes of every other file too
    if hits:
        where = "; ".join(f"{f} contains {s!r}" for f, s in hits[:5])
        raise BundleError(f"self-check: identifying strings found in the bundle: {where}",
                          hint="nothing from source file names, folders or slide metadata may be shipped; the bundle was not built")


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
    out_dir: str | Path,
    *,
    site_name: str,
    run_id: str,
    tiles: Sequence[str | Path],
    labels: Sequence[str | None] | None = None,
    generator: Mapping,
    encoder: Mapping,
    audit_summary: Mapping,
    site_key,
    summary_html: str | Path | None = None,
    forbidden_strings: Iterable[str] = (),
) -> BundleInfo:
    """Build the bundle folder ``out_dir`` (which must not exist) in the state "awaiting approval".

    ``tiles`` are the audited synthetic PNG files, ``labels`` their class labels (aligned with ``tiles``, or
    ``None``), ``generator``/``encoder`` the model identities, ``audit_summary`` the shareable audit summary
    (``audit_summary.json``; every tile, as re-encoded, must be among its ``kept_sha256``), ``site_key`` the
    site's Ed25519 private key, ``summary_html`` the shareable HTML summary. ``forbidden_strings`` (slide names,
    patient identifiers...) must not occur in any byte of the bundle.
    """
    out_dir = Path(out_dir)
    L.check_site_name(site_name)
    check_run_id(run_id)
    audit = validate_shareable_audit(audit_summary)
    if audit["verdict"] == "FAIL":
        raise PrivacyGateRefused(f"the audit verdict of run {run_id} is FAIL: no bundle is built",
                                 hint="see the audit report; nothing may leave the site from this run")
    generator_id = validate_identity(generator, "generator")
    encoder_id = validate_identity(encoder, "encoder")
    tiles = [Path(t) for t in tiles]
    if not tiles:
        raise BundleError("no tiles to bundle", hint="check that synthesis and the audit kept tiles")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(tiles):
            raise BundleError(f"{len(labels)} labels for {len(tiles)} tiles", hint="give one label per tile, or none")
        labelled = [lab is not None for lab in labels]
        if any(labelled) and not all(labelled):
            raise BundleError("some tiles have a class label and others none",
                              hint="label every slide in the labels CSV, or none")
        for i, lab in enumerate(labels):
            if lab is not None:
                check_label(lab, f"label of tile {i}")
    html_bytes = None
    if summary_html is not None:
        html_bytes = Path(summary_html).read_bytes()
        check_summary_html(html_bytes)
    with L.bundle_lock(out_dir):
        if out_dir.exists():
            raise BundleError(f"bundle folder already exists: {out_dir}",
                              hint="a bundle is built once per run; remove it to rebuild")
        return _build_locked(out_dir, site_name=site_name, run_id=run_id, tiles=tiles, labels=labels,
                             generator_id=generator_id, encoder_id=encoder_id, audit=audit, site_key=site_key,
                             html_bytes=html_bytes, forbidden=_forbidden_from_inputs(tiles, forbidden_strings))


def _build_locked(out_dir: Path, *, site_name: str, run_id: str, tiles: list[Path], labels: list | None,
                  generator_id: dict, encoder_id: dict, audit: dict, site_key, html_bytes: bytes | None,
                  forbidden: list[str]) -> BundleInfo:
    audited = set(audit["kept_sha256"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temp(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    try:
        (tmp / L.TILES).mkdir(parents=True)
        (tmp / L.SIGNATURES).mkdir()
        generator_text, encoder_text = canonical_json(generator_id), canonical_json(encoder_id)
        rows = []
        from pixcell_fed.progress import progress

        for i, tile in enumerate(progress(tiles, total=len(tiles), desc="bundle", unit="tile")):
            data = clean_png_bytes(read_pixels(tile))
            digest = sha256_bytes(data)
            if digest not in audited:
                raise BundleError(f"tile {i} ({tile.name}) is not among the audited tiles (its sha256 is not in the audit)",
                                  hint="bundle exactly the tiles the audit kept, written with pixcell_fed.bundle.png.clean_png_bytes")
            name = random_tile_name()
            (tmp / L.TILES / name).write_bytes(data)
            rows.append({"file_name": name, "sha256": digest, "size": len(data),
                         "label": labels[i] if labels is not None else None,
                         "generator": generator_text, "encoder": encoder_text, "run_id": run_id})
        rows.sort(key=lambda r: r["file_name"])  # random order: the row order tells nothing about the sources
        frame = manifest_frame(rows)
        (tmp / L.MANIFEST).write_bytes(manifest_bytes(frame))
        (tmp / L.AUDIT).write_text(audit_json_text(audit), encoding="ascii")
        if html_bytes is not None:
            (tmp / L.SUMMARY_HTML).write_bytes(html_bytes)
        label_counts: dict[str, int] = {}
        if "label" in frame.columns:
            label_counts = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
        info = {
            "format": L.FORMAT,
            "format_version": L.FORMAT_VERSION,
            "site": site_name,
            "run_id": run_id,
            "created": L.today(),
            "counts": {"tiles": len(frame), "labels": label_counts},
            "verdict": audit["verdict"],
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
            raise BundleError(f"cannot move the built bundle into place at {out_dir}: {exc}",
                              hint="check that nothing else writes there, then run again") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle of %d tiles for run %s built at %s, awaiting approval", len(frame), run_id, out_dir)
    return BundleInfo(path=out_dir, site_name=site_name, run_id=run_id, n_tiles=len(frame),
                      verdict=audit["verdict"], state=L.STATE_AWAITING)

"""The one bundle verifier, in three stages that callers combine as they need.

1. :func:`check_signed_files`: everything the site signed, without the tiles' bytes: ``bundle.json``, the
   layout of the signed files, the site in the trust file and its signing key, the site signature, the recorded
   hashes of manifest, audit and summary page, the manifest, the audit (canonical, shareable, its verdict the
   bundle's and not FAIL, its kept set exactly the manifest's tiles, hash for hash), the conditioning claim (valid,
   the audit's and bundle.json's the same), the summary page (inert) and the creation time (not in the future).
2. :func:`check_approval`: the bundle is approved, not rejected; the officer's signature is valid and made with
   the key of one of the site's officers in the trust file.
3. :func:`check_tiles`: ``tiles/`` holds exactly the manifest's files, each with its size and sha256, each the
   canonical PNG of an 8-bit RGB tile of the bundle's tile size (:func:`check_tile` checks one tile's bytes).

:func:`verify_bundle` runs all three (the coordinator's acceptance), :func:`verify_before_transfer` the first
two (a pooling coordinator, before asking for any tile), :func:`inspect_bundle` the first and the third against
the bundle's own site signature (the site's integrity check before its officer approves). Each stops at the
first failure with one precise reason (:class:`VerificationError`, exit code 3).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.png import check_canonical_tile
from pixcell_fed.bundle.trust import TrustStore
from pixcell_fed.errors import BundleError, VerificationError
from pixcell_fed.hashing import sha256_bytes, sha256_file

_HINT = "do not use this bundle; ask the site for a fresh copy or check the trust file"
#: how far a bundle's creation time may lie ahead of this machine's clock (clock skew between sites)
MAX_FUTURE_SKEW = _dt.timedelta(hours=1)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed the stages run so far: who made it, which run, when, its tiles and its audit."""

    path: Path
    site_name: str
    run_id: str
    created: _dt.datetime  # aware UTC: when the site built the bundle (signed)
    tile_size: int
    tiles: Any  # pandas DataFrame: file_name, sha256, size, [label], generator, encoder, run_id
    audit: dict
    verdict: str
    info: dict  # bundle.json as read
    site_key_fingerprint: str
    officer_key_fingerprint: str | None = None
    conditioning: Any = None  # ConditioningClaim: the signed conditioning mode and guarantee (audit and bundle.json)

    def tile_path(self, file_name: str) -> Path:
        return self.path / L.TILES / file_name

    @functools.cached_property
    def tile_records(self) -> dict[str, tuple[int, str]]:
        """File name -> (size, sha256), from the manifest."""
        return {
            str(n): (int(z), str(h))
            for n, z, h in zip(self.tiles["file_name"], self.tiles["size"], self.tiles["sha256"])
        }


def _fail(message: str, hint: str = _HINT) -> VerificationError:
    return VerificationError(message, hint=hint)


def _check_signed_layout(bundle_dir: Path, info: dict) -> None:
    """Only the bundle's own files at the top and in ``signatures/`` (``tiles/`` is :func:`check_tiles`' part)."""
    allowed = {L.BUNDLE_JSON, L.MANIFEST, L.AUDIT, L.SIGNATURES, L.TILES}
    if info["files"][L.SUMMARY_HTML] is not None:
        allowed.add(L.SUMMARY_HTML)
    signatures = bundle_dir / L.SIGNATURES
    entries = sorted(bundle_dir.iterdir()) + (sorted(signatures.iterdir()) if signatures.is_dir() else [])
    for path in entries:
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            raise _fail(f"{rel} is a symbolic link; a bundle holds plain files only")
        if rel in (L.TILES, L.SIGNATURES):
            if not path.is_dir():
                raise _fail(f"{rel} is not a folder")
            continue
        if rel not in allowed | {L.SITE_SIG, L.OFFICER_SIG}:
            raise _fail(f"unexpected {'folder' if path.is_dir() else 'file'} {rel} in the bundle")
        if not path.is_file():
            raise _fail(f"{rel} is not a plain file")
    for rel in (L.MANIFEST, L.AUDIT, L.SITE_SIG) + ((L.SUMMARY_HTML,) if L.SUMMARY_HTML in allowed else ()):
        if not (bundle_dir / rel).is_file():
            raise _fail(f"{rel} is missing from the bundle")


def _check_site_key(key, site: str, trust: TrustStore) -> None:
    from pixcell_fed.keys import fingerprint, public_key_raw

    trusted = trust.site(site)
    if trusted is None:
        raise _fail(
            f"site {site!r} named in bundle.json is not in the trust file {trust.source}",
            hint="add the site's signing key to the trust file if it belongs to the consortium",
        )
    if public_key_raw(key) != public_key_raw(trusted.signing_key):
        other = trust.site_with_signing_key(public_key_raw(key))
        why = f"; that is the key of site {other!r}: the bundle was replayed under another site's name" if other else ""
        raise _fail(
            f"bundle signed by an unknown key {fingerprint(key)}, not the trusted signing key "
            f"{fingerprint(trusted.signing_key)} of site {site!r}{why}"
        )


def _check_audit(bundle_dir: Path, info: dict, frame) -> dict:
    """The carried audit: canonical, shareable, the bundle's verdict and not FAIL, its kept set the tiles."""
    from pixcell_fed.bundle.run_binding import tile_set_problem
    from pixcell_fed.bundle.shareable import HASHES_KEY, audit_json_text, validate_shareable_audit

    audit_bytes = (bundle_dir / L.AUDIT).read_bytes()
    try:
        audit = json.loads(audit_bytes.decode("ascii"))
        validate_shareable_audit(audit, source=L.AUDIT)
        if audit_json_text(audit).encode("ascii") != audit_bytes:
            raise _fail(f"{L.AUDIT}: its bytes differ from the canonical form")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(f"{L.AUDIT} is not valid JSON ({exc})") from exc
    except BundleError as exc:
        if isinstance(exc, VerificationError):
            raise
        raise _fail(f"the audit is not shareable: {exc.message}") from exc
    if audit["verdict"] != info["verdict"]:
        raise _fail(f"the audit's verdict {audit['verdict']} differs from bundle.json's {info['verdict']}")
    if audit["verdict"] == "FAIL":
        raise _fail(
            "the audit verdict is FAIL: this synthetic set may not leave the site",
            hint="refuse the bundle and tell the site; a FAIL set must never be pooled",
        )
    problem = tile_set_problem(list(frame["sha256"]), list(audit[HASHES_KEY]))
    if problem:
        raise _fail(
            f"the bundle's tiles are not exactly its audit's kept set: {problem}",
            hint="refuse the bundle: an officer approves exactly the audited set, nothing more or less",
        )
    return audit


def _check_conditioning(info: dict, audit: dict):
    """The conditioning claim: the audit's (``exact`` when it states none), valid, and exactly bundle.json's."""
    from pixcell_fed.bundle.conditioning_policy import claim_of_audit
    from pixcell_fed.privacy.conditioning import ClaimError

    try:
        claim = claim_of_audit(audit)
    except ClaimError as exc:
        raise _fail(f"the audit's conditioning claim is invalid: {exc}") from exc
    if claim.to_record() != info["conditioning"]:
        raise _fail(
            f"bundle.json claims {info['conditioning'].get('mode')!r} conditioning, its audit "
            f"{claim.mode!r} with other figures: the two signed claims must be the same"
        )
    return claim


def check_signed_files(bundle_dir: str | Path, trust: TrustStore | None) -> VerifiedBundle:
    """Stage 1 (see the module docstring). Without ``trust`` the key in ``site.sig`` is taken as the site's."""
    from pixcell_fed.bundle.html import check_inert_html
    from pixcell_fed.bundle.manifest import label_counts, read_manifest
    from pixcell_fed.keys import fingerprint

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise _fail(f"bundle folder not found: {bundle_dir}", hint="pass the bundle folder")
    info = L.read_bundle_json(bundle_dir, verifying=True)
    _check_signed_layout(bundle_dir, info)

    key, signature = L.read_signature(bundle_dir, L.SITE_SIG, role="site")
    if trust is not None:
        _check_site_key(key, info["site"], trust)
    if not L.signature_valid(key, signature, L.statement(info, role="site")):
        raise _fail(
            "the site signature does not match the bundle: bundle.json (site name, run id, time, tile size, "
            "counts, verdict or file hashes) or signatures/site.sig was modified after signing"
        )
    created = L.parse_time(info["created"])
    if created is None:  # read_info refuses these already; fail closed all the same
        raise _fail(f"invalid 'created' time {str(info['created'])[:40]!r} in bundle.json")
    if created > _dt.datetime.now(_dt.UTC) + MAX_FUTURE_SKEW:
        raise _fail(
            f"the bundle claims to be built at {info['created']}, in the future",
            hint="check the site's clock; a bundle from the future would never age",
        )

    for rel in (L.MANIFEST, L.AUDIT, L.SUMMARY_HTML):  # the signature binds these files through their hashes
        expected = info["files"][rel]
        if expected is None:
            continue
        actual = sha256_file(bundle_dir / rel)
        if actual != expected:
            what = (
                "the audit bound to this bundle's signature (modified, or swapped from another bundle)"
                if rel == L.AUDIT
                else "the one bound to this bundle's signature (modified)"
            )
            raise _fail(f"{rel} does not match {what}: sha256 {actual[:16]}... != {expected[:16]}...")

    try:
        frame = read_manifest(bundle_dir / L.MANIFEST)
    except BundleError as exc:
        raise _fail(f"invalid manifest: {exc.message}") from exc
    if frame["run_id"].iloc[0] != info["run_id"]:
        raise _fail(f"the manifest's run id {frame['run_id'].iloc[0]!r} differs from bundle.json's {info['run_id']!r}")
    if info["counts"]["tiles"] != len(frame):
        raise _fail(f"bundle.json counts {info['counts']['tiles']} tiles, the manifest lists {len(frame)}")
    if info["counts"]["labels"] != label_counts(frame):
        raise _fail(f"bundle.json counts labels {info['counts']['labels']}, the manifest {label_counts(frame)}")
    audit = _check_audit(bundle_dir, info, frame)
    conditioning = _check_conditioning(info, audit)
    if info["files"][L.SUMMARY_HTML] is not None:
        try:
            check_inert_html((bundle_dir / L.SUMMARY_HTML).read_bytes(), name=L.SUMMARY_HTML)
        except BundleError as exc:
            raise _fail(exc.message, hint="refuse the bundle: its summary page is not inert") from exc
    return VerifiedBundle(
        path=bundle_dir,
        site_name=info["site"],
        run_id=info["run_id"],
        created=created,
        tile_size=info["tile_size"],
        tiles=frame,
        audit=audit,
        verdict=audit["verdict"],
        info=info,
        site_key_fingerprint=fingerprint(key),
        conditioning=conditioning,
    )


def check_approval(checked: VerifiedBundle, trust: TrustStore) -> VerifiedBundle:
    """Stage 2 (see the module docstring): returns ``checked`` with the officer's key fingerprint."""
    from pixcell_fed.keys import fingerprint, public_key_raw

    info, bundle_dir = checked.info, checked.path
    if info["state"] == L.STATE_REJECTED:
        raise _fail(
            f"the bundle was rejected by the site's privacy officer ({info['decision']['reason']})",
            hint="a rejected bundle can never be accepted",
        )
    if info["state"] != L.STATE_APPROVED:
        raise _fail(
            f"the bundle is not approved (state {info['state']})",
            hint="the site's privacy officer must approve it first ('site-agent approve')",
        )
    if not (bundle_dir / L.OFFICER_SIG).is_file():
        raise _fail(f"the bundle is marked approved but {L.OFFICER_SIG} is missing: it is not approved")
    key, signature = L.read_signature(bundle_dir, L.OFFICER_SIG, role="officer")
    trusted = trust.site(checked.site_name)
    if trusted is None:
        raise _fail(f"site {checked.site_name!r} is not in the trust file {trust.source}")
    if public_key_raw(key) not in {public_key_raw(o) for o in trusted.officers}:
        raise _fail(
            f"the approval was signed by key {fingerprint(key)}, which is not a privacy officer of site "
            f"{checked.site_name!r} in the trust file"
        )
    if not L.signature_valid(key, signature, L.statement(info, role="officer")):
        raise _fail("the officer's approval signature does not match this bundle")
    return replace(checked, officer_key_fingerprint=fingerprint(key))


def check_tile(checked: VerifiedBundle, file_name: str, data: bytes) -> None:
    """Stage 3 for one tile's bytes (e.g. as they arrive): the manifest's size and sha256, canonical at the
    bundle's tile size. :func:`check_tiles` runs it on every file of ``tiles/``."""
    name = f"{L.TILES}/{file_name}"
    if file_name not in checked.tile_records:
        raise _fail(f"tile added: {name} is not listed in the manifest")
    size, digest = checked.tile_records[file_name]
    if len(data) != size:
        raise _fail(f"{name} has {len(data)} bytes, the manifest says {size}: the tile was modified")
    if sha256_bytes(data) != digest:
        raise _fail(f"{name} does not match its sha256 in the manifest: the tile was modified")
    try:
        check_canonical_tile(data, tile_size=checked.tile_size, name=name)
    except BundleError as exc:
        raise _fail(
            exc.message, hint="refuse the bundle: only canonical tiles of the run's size may leave a site"
        ) from exc


def tile_files(checked: VerifiedBundle) -> dict[str, Path]:
    """The first part of stage 3, without reading a tile: ``tiles/`` holds plain files, exactly the manifest's
    names (a coordinator that ran :func:`check_tile` on each tile as it arrived needs no more)."""
    tiles_dir, frame = checked.path / L.TILES, checked.tiles
    if tiles_dir.is_symlink() or not tiles_dir.is_dir():
        raise _fail(f"{L.TILES}/ is missing from the bundle")
    present = {}
    for path in tiles_dir.iterdir():
        if path.is_symlink() or not path.is_file():
            raise _fail(f"{L.TILES}/{path.name} is not a plain file; a bundle holds plain files only")
        present[path.name] = path
    listed = set(frame["file_name"])
    added = sorted(set(present) - listed)
    if added:
        raise _fail(f"tile added: tiles/{added[0]} is not listed in the manifest ({len(added)} unlisted file(s))")
    removed = sorted(listed - set(present))
    if removed:
        raise _fail(f"tile removed: tiles/{removed[0]} is listed in the manifest but missing ({len(removed)} missing)")
    return present


def check_tiles(checked: VerifiedBundle, *, workers: int | None = None) -> None:
    """Stage 3 (see the module docstring). Tiles are checked by ``workers`` threads (default: one per CPU, at
    most 8; decoding and compressing release the GIL); the reason given is that of the first bad tile in
    manifest order, whatever the threads' timing."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from pixcell_fed.progress import progress

    present = tile_files(checked)
    names = list(checked.tiles["file_name"])
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda name: check_tile(checked, name, present[name].read_bytes()), names)
        try:
            for _ in progress(results, total=len(names), desc="verify tiles", unit="tile"):
                pass
        except VerificationError:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def inspect_bundle(bundle_dir: str | Path) -> VerifiedBundle:
    """Stages 1 and 3 against the bundle's own site signature: intact, canonical, what its audit kept."""
    checked = check_signed_files(bundle_dir, None)
    check_tiles(checked)
    return checked


def verify_before_transfer(bundle_dir: str | Path, trust: TrustStore) -> VerifiedBundle:
    """Stages 1 and 2: everything but the tiles' bytes (what a coordinator checks before asking for them)."""
    return check_approval(check_signed_files(bundle_dir, trust), trust)


def verify_bundle(bundle_dir: str | Path, trust: TrustStore) -> VerifiedBundle:
    """Accept an intact, trusted, approved bundle; otherwise :class:`VerificationError` with the precise reason."""
    checked = verify_before_transfer(bundle_dir, trust)
    check_tiles(checked)
    return checked

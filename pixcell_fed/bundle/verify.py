"""Verify every byte of a bundle against the consortium's trust file.

The checks run in a fixed order so that each failure has one precise reason: layout, trust of the named site,
the site signature's key, the site signature over bundle.json (which records the sha256 of manifest, audit
and summary), those hashes, the manifest, every tile (missing, added, size, sha256, metadata), the audit
(allow-list, verdict, every tile audited) and finally the approval (state, officer key, officer signature).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.trust import TrustStore
from pixcell_fed.errors import BundleError, VerificationError
from pixcell_fed.hashing import sha256_bytes, sha256_file

_HINT = "do not use this bundle; ask the site for a fresh copy or check the trust file"


@dataclass(frozen=True)
class VerifiedBundle:
    """An accepted bundle: who made it, which run, its tiles (the manifest) and its audit."""

    path: Path
    site_name: str
    run_id: str
    tiles: Any  # pandas DataFrame: file_name, sha256, size, [label], generator, encoder, run_id
    audit: dict
    verdict: str
    site_key_fingerprint: str
    officer_key_fingerprint: str | None

    def tile_path(self, file_name: str) -> Path:
        return self.path / L.TILES / file_name


def _fail(message: str, hint: str = _HINT) -> VerificationError:
    return VerificationError(message, hint=hint)


def _check_layout(bundle_dir: Path, info: dict) -> None:
    allowed = {L.BUNDLE_JSON, L.MANIFEST, L.AUDIT, L.SITE_SIG, L.OFFICER_SIG}
    if info["files"][L.SUMMARY_HTML] is not None:
        allowed.add(L.SUMMARY_HTML)
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_symlink():
            raise _fail(f"{rel} is a symbolic link; a bundle holds plain files only")
        if path.is_dir():
            if rel not in (L.TILES, L.SIGNATURES):
                raise _fail(f"unexpected folder {rel} in the bundle")
            continue
        if not path.is_file():
            raise _fail(f"{rel} is not a plain file")
        parent = path.parent.relative_to(bundle_dir).as_posix()
        if parent == L.TILES:
            continue  # tiles are checked against the manifest below
        if rel not in allowed:
            raise _fail(f"unexpected file {rel} in the bundle")
    for rel in (L.MANIFEST, L.AUDIT, L.SITE_SIG) + ((L.SUMMARY_HTML,) if L.SUMMARY_HTML in allowed else ()):
        if not (bundle_dir / rel).is_file():
            raise _fail(f"{rel} is missing from the bundle")
    if not (bundle_dir / L.TILES).is_dir():
        raise _fail(f"{L.TILES}/ is missing from the bundle")


def inspect_bundle(bundle_dir: str | Path, trust: TrustStore | None) -> VerifiedBundle:
    """All checks up to (not including) approval. Without ``trust`` the site key in ``site.sig`` is used as is."""
    from pixcell_fed.bundle.build import audit_json_text, check_summary_html
    from pixcell_fed.bundle.manifest import read_manifest
    from pixcell_fed.bundle.png import check_clean_png
    from pixcell_fed.bundle.shareable import validate_shareable_audit
    from pixcell_fed.keys import fingerprint, public_key_raw

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise _fail(f"bundle folder not found: {bundle_dir}", hint="pass the bundle folder")
    info = L.read_bundle_json(bundle_dir, verifying=True)
    site = info["site"]
    _check_layout(bundle_dir, info)

    # who signed
    key, signature = L.read_signature(bundle_dir, L.SITE_SIG, role="site")
    if trust is not None:
        trusted = trust.site(site)
        if trusted is None:
            raise _fail(f"site {site!r} named in bundle.json is not in the trust file {trust.source}",
                        hint="add the site's signing key to the trust file if it belongs to the consortium")
        if public_key_raw(key) != public_key_raw(trusted.signing_key):
            other = trust.site_with_signing_key(public_key_raw(key))
            why = (f"; that is the key of site {other!r}: the bundle was replayed under another site's name"
                   if other else "")
            raise _fail(f"bundle signed by an unknown key {fingerprint(key)}, not the trusted signing key "
                        f"{fingerprint(trusted.signing_key)} of site {site!r}{why}")

    # the site signature over bundle.json's immutable part, which records the hashes of the files below
    if not L.signature_valid(key, signature, L.statement(info, role="site")):
        raise _fail("the site signature does not match the bundle: bundle.json (site name, run id, counts, verdict "
                    "or file hashes) or signatures/site.sig was modified after signing")

    # bytes of manifest, audit and summary against the record in bundle.json
    for rel in (L.MANIFEST, L.AUDIT, L.SUMMARY_HTML):
        expected = info["files"][rel]
        if expected is None:
            continue
        actual = sha256_file(bundle_dir / rel)
        if actual != expected:
            what = "the audit bound to this bundle's signature (modified, or swapped from another bundle)" \
                if rel == L.AUDIT else "the one bound to this bundle's signature (modified)"
            raise _fail(f"{rel} does not match {what}: sha256 {actual[:16]}... != {expected[:16]}...")

    # manifest and tiles
    try:
        frame = read_manifest(bundle_dir / L.MANIFEST)
    except BundleError as exc:
        raise _fail(f"invalid manifest: {exc.message}") from exc
    if frame["run_id"].iloc[0] != info["run_id"]:
        raise _fail(f"the manifest's run id {frame['run_id'].iloc[0]!r} differs from bundle.json's {info['run_id']!r}")
    listed = set(frame["file_name"])
    present = {p.name for p in (bundle_dir / L.TILES).iterdir()}
    added = sorted(present - listed)
    if added:
        raise _fail(f"tile added: tiles/{added[0]} is not listed in the manifest ({len(added)} unlisted file(s))")
    removed = sorted(listed - present)
    if removed:
        raise _fail(f"tile removed: tiles/{removed[0]} is listed in the manifest but missing ({len(removed)} missing)")
    if info["counts"]["tiles"] != len(frame):
        raise _fail(f"bundle.json counts {info['counts']['tiles']} tiles, the manifest lists {len(frame)}")
    for row in frame.itertuples(index=False):
        data = (bundle_dir / L.TILES / row.file_name).read_bytes()
        if len(data) != row.size:
            raise _fail(f"tiles/{row.file_name} has {len(data)} bytes, the manifest says {row.size}: the tile was modified")
        if sha256_bytes(data) != row.sha256:
            raise _fail(f"tiles/{row.file_name} does not match its sha256 in the manifest: the tile was modified")
        try:
            check_clean_png(data, name=f"tiles/{row.file_name}")
        except BundleError as exc:
            raise _fail(exc.message) from exc

    # audit
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
        raise _fail("the audit verdict is FAIL: this synthetic set may not leave the site",
                    hint="refuse the bundle and tell the site; a FAIL set must never be pooled")
    audited = set(audit["kept_sha256"])
    not_audited = [n for n, h in zip(frame["file_name"], frame["sha256"]) if h not in audited]
    if not_audited:
        raise _fail(f"tiles/{not_audited[0]} is not among the audited tiles ({len(not_audited)} tile(s) not audited)")
    if info["files"][L.SUMMARY_HTML] is not None:
        try:
            check_summary_html((bundle_dir / L.SUMMARY_HTML).read_bytes())
        except BundleError as exc:
            raise _fail(exc.message) from exc

    return VerifiedBundle(path=bundle_dir, site_name=site, run_id=info["run_id"], tiles=frame, audit=audit,
                          verdict=audit["verdict"], site_key_fingerprint=fingerprint(key), officer_key_fingerprint=None)


def verify_bundle(bundle_dir: str | Path, trust: TrustStore) -> VerifiedBundle:
    """Accept an intact, trusted, approved bundle; otherwise :class:`VerificationError` with the precise reason."""
    from dataclasses import replace

    from pixcell_fed.keys import fingerprint, public_key_raw

    checked = inspect_bundle(bundle_dir, trust)
    bundle_dir = checked.path
    info = L.read_bundle_json(bundle_dir, verifying=True)
    if info["state"] == L.STATE_REJECTED:
        reason = (info["decision"] or {}).get("reason", "no reason recorded")
        raise _fail(f"the bundle was rejected by the site's privacy officer ({reason})",
                    hint="a rejected bundle can never be accepted")
    if info["state"] != L.STATE_APPROVED:
        raise _fail(f"the bundle is not approved (state {info['state']})",
                    hint="the site's privacy officer must approve it first ('site-agent approve')")
    if not (bundle_dir / L.OFFICER_SIG).is_file():
        raise _fail(f"the bundle is marked approved but {L.OFFICER_SIG} is missing: it is not approved")
    key, signature = L.read_signature(bundle_dir, L.OFFICER_SIG, role="officer")
    officers = trust.site(checked.site_name).officers
    if public_key_raw(key) not in {public_key_raw(o) for o in officers}:
        raise _fail(f"the approval was signed by key {fingerprint(key)}, which is not a privacy officer of site "
                    f"{checked.site_name!r} in the trust file")
    if not L.signature_valid(key, signature, L.statement(info, role="officer")):
        raise _fail("the officer's approval signature does not match this bundle")
    return replace(checked, officer_key_fingerprint=fingerprint(key))

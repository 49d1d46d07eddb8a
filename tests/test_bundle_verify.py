"""Approval and verification: an intact approved bundle is accepted; every tampering is refused with its reason."""

from __future__ import annotations

import re
import shutil

import pytest

from pixcell_fed.bundle import approve_bundle, build_bundle, reject_bundle, verify_bundle
from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.trail import verify_trail
from pixcell_fed.errors import BundleError, ExitCode, PrivacyGateRefused, UsageError, VerificationError
from pixcell_fed.keys import generate_private_key
from pixcell_fed.testing.bundles import (
    ENCODER, GENERATOR, audit_for, consortium, force_verdict, real_tile_arrays, write_tiles,
)


@pytest.fixture(scope="module")
def arrays():
    return real_tile_arrays(10)


@pytest.fixture(scope="module")
def keys():
    return consortium(("site-a", "site-b"))


def make(tmp_path, arrays, keys, *, site="site-a", run_id="run-001", name="bundle", approve=True, tiles=slice(0, 5),
         site_key=None):
    chosen = arrays[tiles]
    paths = write_tiles(tmp_path / f"{name}-src", chosen)
    html = tmp_path / f"{name}-summary.html"
    html.write_text("<html><body><h1>Audit: PASS</h1><p>0 of 5 synthetic tiles exceed the copy threshold.</p></body></html>")
    info = build_bundle(tmp_path / name, site_name=site, run_id=run_id, tiles=paths,
                        labels=["tumor"] * len(paths), generator=GENERATOR, encoder=ENCODER,
                        audit_summary=audit_for(chosen), site_key=site_key or keys.site_keys[site], summary_html=html)
    if approve:
        approve_bundle(info.path, keys.officer_keys[site])
    return info.path


def refused(bundle, trust, match):
    with pytest.raises(VerificationError, match=match) as info:
        verify_bundle(bundle, trust)
    assert info.value.exit_code == ExitCode.PRIVACY_REFUSED
    return str(info.value)


def test_intact_approved_bundle_accepted(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys)
    verified = verify_bundle(bundle, keys.trust)
    assert (verified.site_name, verified.run_id, verified.verdict) == ("site-a", "run-001", "PASS")
    assert len(verified.tiles) == 5 and set(verified.tiles["label"]) == {"tumor"}
    assert verified.officer_key_fingerprint and verified.tile_path(verified.tiles["file_name"][0]).is_file()


def test_flipped_byte_in_any_file_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys)
    files = sorted(p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file())
    assert len(files) == 6 + 5  # bundle.json, manifest, audit, summary, 2 signatures + 5 tiles
    for rel in files:
        copy = tmp_path / "flip" / str(rel).replace("/", "_")
        shutil.copytree(bundle, copy)
        data = bytearray((copy / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / rel).write_bytes(bytes(data))
        with pytest.raises(VerificationError) as info:
            verify_bundle(copy, keys.trust)
        expected = {"bundle.json": r"^bundle\.json: |site signature does not match",
                    "manifest.parquet": r"^manifest\.parquet does not match",
                    "audit.json": r"^audit\.json does not match",
                    "audit_summary.html": r"^audit_summary\.html does not match",
                    "site.sig": r"^signatures/site\.sig: |site signature does not match",
                    "officer.sig": r"^signatures/officer\.sig: |officer's approval signature does not match"}
        pattern = expected.get(rel.name, rf"^tiles/{re.escape(rel.name)} does not match its sha256")
        assert re.search(pattern, str(info.value)), (rel, str(info.value))


def test_tile_added_or_removed_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys)
    added = tmp_path / "added"
    shutil.copytree(bundle, added)
    shutil.copy(next((added / "tiles").iterdir()), added / "tiles" / ("0" * 32 + ".png"))
    refused(added, keys.trust, "tile added: tiles/0{32}.png")
    removed = tmp_path / "removed"
    shutil.copytree(bundle, removed)
    victim = sorted((removed / "tiles").iterdir())[2]
    victim.unlink()
    refused(removed, keys.trust, f"tile removed: tiles/{victim.name}")
    stray = tmp_path / "stray"
    shutil.copytree(bundle, stray)
    (stray / "notes.txt").write_text("CASE-1")
    refused(stray, keys.trust, "unexpected file notes.txt")


def test_audit_swapped_from_another_bundle_refused(tmp_path, arrays, keys):
    one = make(tmp_path, arrays, keys, name="one", run_id="run-001", tiles=slice(0, 5))
    two = make(tmp_path, arrays, keys, name="two", run_id="run-002", tiles=slice(5, 10))
    shutil.copy(two / "audit.json", one / "audit.json")
    refused(one, keys.trust, "audit.json does not match the audit bound to this bundle's signature")


def test_unknown_signing_key_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, site_key=generate_private_key())
    reason = refused(bundle, keys.trust, "signed by an unknown key")
    assert "site-a" in reason


def test_site_not_in_trust_refused(tmp_path, arrays, keys):
    outsider = generate_private_key()
    paths = write_tiles(tmp_path / "src", arrays[:3])
    info = build_bundle(tmp_path / "b", site_name="site-z", run_id="r1", tiles=paths, generator=GENERATOR,
                        encoder=ENCODER, audit_summary=audit_for(arrays[:3]), site_key=outsider)
    refused(info.path, keys.trust, "site 'site-z' named in bundle.json is not in the trust file")


def test_unapproved_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    refused(bundle, keys.trust, r"not approved \(state awaiting_approval\)")
    # marking it approved by hand is not an approval
    info = L.read_bundle_json(bundle)
    info["state"] = "approved"
    info["decision"] = {"state": "approved", "time": "2026-01-01T00:00:00+00:00", "officer": "SHA256:x"}
    L.write_bundle_json(bundle, info)
    refused(bundle, keys.trust, "officer.sig is missing")


def test_approval_record_is_signed(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys)
    info = L.read_bundle_json(bundle)
    info["decision"]["time"] = "2020-01-01T00:00:00+00:00"
    L.write_bundle_json(bundle, info)
    refused(bundle, keys.trust, "officer's approval signature does not match")


def test_approval_by_non_officer_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    approve_bundle(bundle, keys.officer_keys["site-b"])  # an officer, but of another site
    refused(bundle, keys.trust, "not a privacy officer of site 'site-a'")


def test_site_key_cannot_approve(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    with pytest.raises(UsageError, match="site's own signing key"):
        approve_bundle(bundle, keys.site_keys["site-a"])


def test_fail_verdict_refused_even_when_signed(tmp_path, arrays, keys):
    """A site that rewrites its audit to FAIL and re-signs (a misbehaving site) still cannot get it accepted."""
    bundle = make(tmp_path, arrays, keys, approve=False)
    force_verdict(bundle, "FAIL", keys.site_keys["site-a"])
    info = L.read_bundle_json(bundle)
    with pytest.raises(PrivacyGateRefused, match="FAIL"):
        approve_bundle(bundle, keys.officer_keys["site-a"])
    info["state"] = "approved"
    info["decision"] = {"state": "approved", "time": "2026-01-01T00:00:00+00:00", "officer": "SHA256:x"}
    L.write_signature(bundle, L.OFFICER_SIG, keys.officer_keys["site-a"], L.statement(info, role="officer"), role="officer")
    L.write_bundle_json(bundle, info)
    refused(bundle, keys.trust, "audit verdict is FAIL")


def test_rejected_bundle_never_verifies(tmp_path, arrays, keys):
    trail = tmp_path / "audit_trail.jsonl"
    bundle = make(tmp_path, arrays, keys)
    verify_bundle(bundle, keys.trust)
    reject_bundle(bundle, "closest pairs look like copies", trail=trail)
    assert not (bundle / L.OFFICER_SIG).exists()
    refused(bundle, keys.trust, "rejected by the site's privacy officer \\(closest pairs look like copies\\)")
    with pytest.raises(PrivacyGateRefused, match="can never be approved"):
        approve_bundle(bundle, keys.officer_keys["site-a"], trail=trail)
    with pytest.raises(BundleError, match="already rejected"):
        reject_bundle(bundle, "again")
    events = verify_trail(trail).entries
    assert [e["event"] for e in events] == ["reject"] and events[0]["reason"] == "closest pairs look like copies"


def test_replayed_under_another_sites_name_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, site="site-a")
    info = L.read_bundle_json(bundle)
    info["site"] = "site-b"
    L.write_bundle_json(bundle, info)
    refused(bundle, keys.trust, "that is the key of site 'site-a': the bundle was replayed under another site's name")
    # and if site-b's officer were tricked into approving a copy of site-a's bundle, site-a's key still gives it away
    copy = make(tmp_path, arrays, keys, site="site-a", name="again", approve=False)
    info = L.read_bundle_json(copy)
    info["site"] = "site-b"
    L.write_bundle_json(copy, info)
    refused(copy, keys.trust, "replayed under another site's name")


def test_state_change_keeps_site_signature_and_trail_records_approval(tmp_path, arrays, keys):
    trail = tmp_path / "audit_trail.jsonl"
    bundle = make(tmp_path, arrays, keys, approve=False)
    site_sig = (bundle / L.SITE_SIG).read_bytes()
    approve_bundle(bundle, keys.officer_keys["site-a"], trail=trail)
    assert (bundle / L.SITE_SIG).read_bytes() == site_sig
    verify_bundle(bundle, keys.trust)
    with pytest.raises(BundleError, match="already approved"):
        approve_bundle(bundle, keys.officer_keys["site-a"])
    (entry,) = verify_trail(trail).entries
    assert entry["event"] == "approve" and entry["run_id"] == "run-001" and entry["verdict"] == "PASS"


def test_damaged_bundle_cannot_be_approved(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    tile = sorted((bundle / "tiles").iterdir())[0]
    tile.write_bytes(tile.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError, match="damaged"):
        approve_bundle(bundle, keys.officer_keys["site-a"])

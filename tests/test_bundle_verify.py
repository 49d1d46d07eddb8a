"""Approval and verification: an intact approved bundle is accepted; every tampering is refused with its reason."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil

import pytest

from pixcell_fed.bundle import approve_bundle, reject_bundle, verify_bundle
from pixcell_fed.bundle import layout as L
from pixcell_fed.bundle.trail import verify_trail
from pixcell_fed.bundle.verify import (check_approval, check_signed_files, check_tile, check_tiles,
                                      verify_before_transfer)
from pixcell_fed.errors import BundleError, ExitCode, PrivacyGateRefused, UsageError, VerificationError
from pixcell_fed.keys import fingerprint, generate_private_key
from pixcell_fed.testing.bundles import (
    build_run_bundle, consortium, force_verdict, inert_summary_html, officer_signs, real_tile_arrays, resign, write_run,
)


@pytest.fixture(scope="module")
def arrays():
    return real_tile_arrays(10)


@pytest.fixture(scope="module")
def keys():
    return consortium(("site-a", "site-b"))


def make(tmp_path, arrays, keys, *, site="site-a", run_id="run-001", name="site", approve=True, tiles=slice(0, 5),
         site_key=None):
    run = write_run(tmp_path / name / "work", run_id, arrays[tiles], summary_html=inert_summary_html())
    return build_run_bundle(run, keys, site, labels=["tumor"] * len(arrays[tiles]), approve=approve, site_key=site_key)


def authority(keys, bundle, site="site-a"):
    return keys.authority(site, bundle.parent.parent.parent)


def refused(bundle, trust, match):
    with pytest.raises(VerificationError, match=match) as info:
        verify_bundle(bundle, trust)
    assert info.value.exit_code == ExitCode.PRIVACY_REFUSED
    return str(info.value)


def test_intact_approved_bundle_accepted(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys)
    verified = verify_bundle(bundle, keys.trust)
    assert (verified.site_name, verified.run_id, verified.verdict, verified.tile_size) == ("site-a", "run-001", "PASS", 48)
    assert len(verified.tiles) == 5 and set(verified.tiles["label"]) == {"tumor"}
    assert verified.officer_key_fingerprint == fingerprint(keys.officer_keys["site-a"].public_key())
    assert verified.tile_path(verified.tiles["file_name"][0]).is_file()
    assert abs(dt.datetime.now(dt.timezone.utc) - verified.created) < dt.timedelta(minutes=5)


def test_stages_compose_and_the_preflight_stage_needs_no_tile(tmp_path, arrays, keys):
    """Pooling checks everything but the tiles' bytes before any transfer, then the tiles once they arrived."""
    bundle = make(tmp_path, arrays, keys)
    shipped = tmp_path / "arriving"
    shutil.copytree(bundle, shipped)
    shutil.rmtree(shipped / "tiles")
    (shipped / "tiles").mkdir()
    checked = verify_before_transfer(shipped, keys.trust)
    assert checked.officer_key_fingerprint and len(checked.tiles) == 5
    with pytest.raises(VerificationError, match="tile removed"):
        check_tiles(checked)
    name = checked.tiles["file_name"][0]  # one tile as it arrives, before it is written anywhere
    check_tile(checked, name, (bundle / "tiles" / name).read_bytes())
    with pytest.raises(VerificationError, match=f"tiles/{name} has 3 bytes"):
        check_tile(checked, name, b"PNG")
    with pytest.raises(VerificationError, match="tile added"):
        check_tile(checked, "0" * 32 + ".png", (bundle / "tiles" / name).read_bytes())
    shutil.rmtree(shipped / "tiles")
    shutil.copytree(bundle / "tiles", shipped / "tiles")
    check_tiles(checked)
    # each stage alone: the signed files do not need an approval, the approval stage does
    unapproved = make(tmp_path, arrays, keys, name="unapproved", approve=False)
    signed = check_signed_files(unapproved, keys.trust)
    assert signed.officer_key_fingerprint is None
    with pytest.raises(VerificationError, match="not approved"):
        check_approval(signed, keys.trust)


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
    linked = tmp_path / "linked"
    shutil.copytree(bundle, linked)
    victim = sorted((linked / "tiles").iterdir())[0]
    victim.unlink()
    victim.symlink_to(sorted((bundle / "tiles").iterdir())[0])
    refused(linked, keys.trust, f"tiles/{victim.name} is not a plain file")


def test_a_subset_of_the_kept_set_is_refused(tmp_path, arrays, keys):
    """The site drops a kept tile and re-signs (the audit untouched): not what the officer's audit kept."""
    bundle = make(tmp_path, arrays, keys)
    victim = sorted((bundle / "tiles").iterdir())[0].name
    resign(bundle, keys.site_keys["site-a"], keys.officer_keys["site-a"], drop=[victim], audit_follows=False)
    refused(bundle, keys.trust, r"tiles are not exactly its audit's kept set: 0 tile\(s\) the audit did not keep, 1 kept tile\(s\) missing")


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
    outsider = consortium(("site-z",))
    bundle = make(tmp_path, arrays, outsider, site="site-z")
    refused(bundle, keys.trust, "site 'site-z' named in bundle.json is not in the trust file")


def test_created_in_the_future_refused(tmp_path, arrays, keys):
    """A bundle dated ahead would never reach a coordinator's maximum bundle age."""
    bundle = make(tmp_path, arrays, keys)
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)).isoformat(timespec="seconds")
    resign(bundle, keys.site_keys["site-a"], keys.officer_keys["site-a"], created=later)
    refused(bundle, keys.trust, "in the future")
    info = L.read_bundle_json(bundle)
    info["created"] = "2026-11-26"  # format 1's date only: not a time, refused
    L.write_bundle_json(bundle, info)
    refused(bundle, keys.trust, "invalid 'created' time")


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
    officer_signs(bundle, keys.officer_keys["site-b"])  # an officer, but of another site
    refused(bundle, keys.trust, "not a privacy officer of site 'site-a'")


def test_approve_refuses_an_officer_the_site_does_not_list(tmp_path, arrays, keys):
    """Any Ed25519 key could approve locally; now only keys.officers can, and nothing is asked or written."""
    bundle = make(tmp_path, arrays, keys, approve=False)
    asked = []
    for stranger in (generate_private_key(), keys.officer_keys["site-b"]):
        with pytest.raises(PrivacyGateRefused, match="is not one of the privacy officers of site site-a") as info:
            approve_bundle(bundle, stranger, site=authority(keys, bundle), confirm=asked.append)
        assert info.value.exit_code == ExitCode.PRIVACY_REFUSED
        with pytest.raises(PrivacyGateRefused, match="not one of the privacy officers"):
            reject_bundle(bundle, "no", stranger, site=authority(keys, bundle))
    assert asked == [] and not (bundle / L.OFFICER_SIG).exists()
    assert L.read_bundle_json(bundle)["state"] == L.STATE_AWAITING
    assert not authority(keys, bundle).trail.exists()


def test_site_key_cannot_approve(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    site = authority(keys, bundle)
    listed = type(site)(site.name, site.work_dir, (keys.site_keys["site-a"].public_key(),))
    with pytest.raises(UsageError, match="site's own signing key"):
        approve_bundle(bundle, keys.site_keys["site-a"], site=listed)


def test_fail_verdict_refused_even_when_signed(tmp_path, arrays, keys):
    """A site that rewrites its audit to FAIL and re-signs (a misbehaving site) still cannot get it accepted."""
    bundle = make(tmp_path, arrays, keys, approve=False)
    force_verdict(bundle, "FAIL", keys.site_keys["site-a"])
    with pytest.raises(PrivacyGateRefused, match="FAIL"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=authority(keys, bundle))
    officer_signs(bundle, keys.officer_keys["site-a"])
    refused(bundle, keys.trust, "audit verdict is FAIL")


def test_a_bundle_is_approved_only_as_its_runs(tmp_path, arrays, keys):
    """With the site key, a PASS bundle is placed as the bundle of a run whose audit FAILED: approve refuses before
    asking anything, status never shows it approved, and the site never serves it."""
    from pixcell_fed.bundle.state import newest_approved_bundle, site_status

    work = tmp_path / "site" / "work"
    failed = write_run(work, "run-002", arrays[:5], verdict="FAIL", run_json={"state": "refused by audit",
                                                                               "verdict": "FAIL"})
    forged = write_run(tmp_path / "elsewhere" / "work", "run-002", arrays[:5])  # a PASS summary for the same run id
    built = build_run_bundle(forged, keys, "site-a", approve=False)
    shutil.move(built, failed.run_dir / "bundle")
    bundle = failed.run_dir / "bundle"
    asked = []
    with pytest.raises(PrivacyGateRefused, match="not what its run audited: run run-002 was refused by its audit"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=keys.authority("site-a", work), confirm=asked.append)
    assert asked == [] and L.read_bundle_json(bundle)["state"] == L.STATE_AWAITING
    # even signed by the officer behind the gate's back, the site shows it as unusable and does not serve it
    officer_signs(bundle, keys.officer_keys["site-a"])
    (run,) = site_status(work).runs
    assert run.bundle_state == "unusable" and "refused by its audit" in run.problem
    assert newest_approved_bundle(work) is None


def test_a_bundle_must_carry_its_runs_audit(tmp_path, arrays, keys):
    """The run's audit changed after the build (rerun): the bundle no longer carries it, approve refuses."""
    bundle = make(tmp_path, arrays, keys, approve=False)
    summary = bundle.parent / "audit" / "audit_summary.json"
    audit = json.loads(summary.read_text())
    audit["sizes"]["S"] += 1
    summary.write_text(json.dumps(audit))
    with pytest.raises(PrivacyGateRefused, match="its audit.json is not the audit of run run-001"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=authority(keys, bundle))


def test_rejected_bundle_never_verifies(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys)
    site = authority(keys, bundle)
    verify_bundle(bundle, keys.trust)
    reject_bundle(bundle, "closest pairs look like copies", keys.officer_keys["site-a"], site=site)
    assert not (bundle / L.OFFICER_SIG).exists()
    refused(bundle, keys.trust, "rejected by the site's privacy officer \\(closest pairs look like copies\\)")
    with pytest.raises(PrivacyGateRefused, match="can never be approved"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=site)
    with pytest.raises(BundleError, match="already rejected"):
        reject_bundle(bundle, "again", keys.officer_keys["site-a"], site=site)
    events = verify_trail(site.trail).entries
    officer = fingerprint(keys.officer_keys["site-a"].public_key())
    assert [e["event"] for e in events] == ["approve", "reject"]
    assert events[1]["reason"] == "closest pairs look like copies" and events[1]["officer"] == officer
    assert L.read_bundle_json(bundle)["decision"]["officer"] == officer


def test_replayed_under_another_sites_name_refused(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, site="site-a")
    info = L.read_bundle_json(bundle)
    info["site"] = "site-b"
    L.write_bundle_json(bundle, info)
    refused(bundle, keys.trust, "that is the key of site 'site-a': the bundle was replayed under another site's name")
    # and if site-b's officer were tricked into signing a copy of site-a's bundle, site-a's key still gives it away
    copy = make(tmp_path, arrays, keys, site="site-a", name="again", approve=False)
    info = L.read_bundle_json(copy)
    info["site"] = "site-b"
    L.write_bundle_json(copy, info)
    officer_signs(copy, keys.officer_keys["site-b"])
    refused(copy, keys.trust, "replayed under another site's name")


def test_state_change_keeps_site_signature_and_trail_records_approval(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    site = authority(keys, bundle)
    site_sig = (bundle / L.SITE_SIG).read_bytes()
    seen = []
    approve_bundle(bundle, keys.officer_keys["site-a"], site=site, confirm=lambda o: seen.append(o) or True)
    assert seen[0]["verdict"] == "PASS" and seen[0]["tiles"] == 5 and seen[0]["state"] == L.STATE_AWAITING
    assert (bundle / L.SITE_SIG).read_bytes() == site_sig
    verify_bundle(bundle, keys.trust)
    with pytest.raises(BundleError, match="already approved"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=site)
    (entry,) = verify_trail(site.trail).entries
    assert entry["event"] == "approve" and entry["run_id"] == "run-001" and entry["verdict"] == "PASS"
    assert entry["officer"] == fingerprint(keys.officer_keys["site-a"].public_key())


def test_unconfirmed_approval_signs_nothing(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    with pytest.raises(UsageError, match="not confirmed"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=authority(keys, bundle), confirm=lambda o: False)
    assert not (bundle / L.OFFICER_SIG).exists() and L.read_bundle_json(bundle)["state"] == L.STATE_AWAITING


def test_damaged_bundle_cannot_be_approved(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, approve=False)
    tile = sorted((bundle / "tiles").iterdir())[0]
    tile.write_bytes(tile.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError, match="damaged"):
        approve_bundle(bundle, keys.officer_keys["site-a"], site=authority(keys, bundle))


def test_threaded_tile_checks_report_the_first_bad_tile_in_manifest_order(tmp_path, arrays, keys):
    bundle = make(tmp_path, arrays, keys, tiles=slice(0, 10))
    checked = verify_before_transfer(bundle, keys.trust)
    names = list(checked.tiles["file_name"])
    for name in (names[7], names[2]):  # the later one is damaged too, and would be found first by a fast thread
        path = bundle / "tiles" / name
        path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    for workers in (1, 4):
        with pytest.raises(VerificationError, match=f"^tiles/{names[2]} does not match its sha256"):
            check_tiles(checked, workers=workers)

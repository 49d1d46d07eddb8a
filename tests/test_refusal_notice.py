"""Refusal notices: what a site whose audit FAILED may tell the consortium, and what the coordinator accepts.

Trust model (docs/threat-model.md): the notice is the site's choice and carries the audit's numbers-only shareable
summary without its per-tile list or any tile hash. The coordinator (at best honest-but-curious) learns only that;
anyone else (another site, a holder of the CA certificate, the network) must not be able to make a site look
refused, change what its notice says, or smuggle tile data in through one.
"""

from __future__ import annotations

import json

import pytest

from pixcell_fed.bundle.refusal import make_refusal_notice, read_refusal_notice, read_refusal_notices
from pixcell_fed.bundle.trust import add_site_to_trust_file, load_trust
from pixcell_fed.bundle.work_layout import AUDIT_SUMMARY_PATH, run_dir, trail_path
from pixcell_fed.errors import UsageError, VerificationError
from pixcell_fed.keys import generate_private_key, public_key_text

TILE_HASH = "ab" * 32


def _summary(verdict: str = "FAIL") -> dict:
    return {
        "schema": "pixcell-fed/audit-summary/1", "verdict": verdict, "kept_sha256": [TILE_HASH],
        "sizes": {"S": 24, "T": 24, "H": 40},
        "identities": {"generator": {"label": "memorising twin", "model": "PixCell-256 memorising twin"}},
        "tests": [{"name": "memorisation", "title": "Memorisation", "status": verdict, "statistic": 0.5,
                   "sentence": "12 of 24 synthetic tiles are confirmed copies (50 %), above the 1 % allowed."}],
        "tiles": [{"sha256": TILE_HASH, "kept": False, "flagged": True, "nearest_similarity": 0.99}],
    }


def _run(work, run_id: str, summary: dict, *, bundle: bool = False) -> None:
    path = run_dir(work, run_id) / AUDIT_SUMMARY_PATH
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    if bundle:
        (run_dir(work, run_id) / "bundle").mkdir()


@pytest.fixture()
def site(tmp_path):
    key, other = generate_private_key(), generate_private_key()
    officer = generate_private_key()
    trust_file = tmp_path / "trust.yaml"
    add_site_to_trust_file(trust_file, "hospital-d", signing_key=public_key_text(key.public_key()),
                           officers=[public_key_text(officer.public_key())])
    add_site_to_trust_file(trust_file, "hospital-a", signing_key=public_key_text(other.public_key()),
                           officers=[public_key_text(generate_private_key().public_key())])
    work = tmp_path / "work"
    _run(work, "run-1", _summary())
    return {"key": key, "other": other, "trust": load_trust(trust_file), "work": work, "refusals": tmp_path / "refusals"}


def test_a_notice_carries_the_numbers_only_summary_and_the_coordinator_verifies_it(site):
    out = site["refusals"] / "hospital-d.json"
    out.parent.mkdir()
    made = make_refusal_notice(site["work"], out, site="hospital-d", site_key=site["key"])
    text = out.read_text()
    assert made.run_id == "run-1" and TILE_HASH not in text and '"tiles"' not in text  # no tile data leaves
    assert json.loads(text)["notice"]["audit"]["kept_sha256"] == []
    notice = read_refusal_notice(out, site["trust"])
    assert notice.site == "hospital-d" and notice.generator == "memorising twin"
    assert notice.reasons() == ["Memorisation: 12 of 24 synthetic tiles are confirmed copies (50 %), above the 1 % allowed."]
    events = [json.loads(line) for line in trail_path(site["work"]).read_text().splitlines()]
    assert events[-1]["event"] == "refusal_notice" and events[-1]["run_id"] == "run-1"  # the site's trail records it
    found = read_refusal_notices(site["refusals"], site["trust"])
    assert list(found.notices) == ["hospital-d"] and not found.ignored
    assert found.to_report()["sites"]["hospital-d"]["verdict"] == "FAIL"


def test_there_is_no_notice_for_a_run_that_passed_or_built_a_bundle(site, tmp_path):
    work = tmp_path / "other-work"
    _run(work, "passed", _summary("PASS"))
    _run(work, "bundled", _summary(), bundle=True)
    with pytest.raises(UsageError, match="no run"):
        make_refusal_notice(work, tmp_path / "n.json", site="hospital-d", site_key=site["key"])
    with pytest.raises(UsageError, match="was not refused"):
        make_refusal_notice(work, tmp_path / "n.json", site="hospital-d", site_key=site["key"], run_id="bundled")


def _notice(site, tmp_path):
    out = tmp_path / "n.json"
    make_refusal_notice(site["work"], out, site="hospital-d", site_key=site["key"])
    return out, json.loads(out.read_text())


def _resign(record: dict, key) -> dict:
    from pixcell_fed.bundle.layout import signature_record
    from pixcell_fed.bundle.manifest import canonical_json

    record["signature"] = signature_record(key, canonical_json(record["notice"]).encode("ascii"), role="site")
    return record


def test_another_site_cannot_make_a_site_look_refused(site, tmp_path):
    # hospital-a (or anyone with a key) signs a notice that names hospital-d
    out, record = _notice(site, tmp_path)
    out.write_text(json.dumps(_resign(record, site["other"])))
    with pytest.raises(VerificationError, match="not by the signing key of site 'hospital-d'"):
        read_refusal_notice(out, site["trust"])
    # a site the trust file does not hold
    out, record = _notice(site, tmp_path)
    record["notice"]["site"] = "hospital-x"
    out.write_text(json.dumps(_resign(record, site["key"])))
    with pytest.raises(VerificationError, match="not in the trust file"):
        read_refusal_notice(out, site["trust"])


def test_a_notice_changed_after_signing_is_ignored(site, tmp_path):
    out, record = _notice(site, tmp_path)
    record["notice"]["audit"]["tests"][0]["sentence"] = "nothing was copied"
    out.write_text(json.dumps(record))
    folder = tmp_path / "refusals"
    folder.mkdir()
    out.replace(folder / "hospital-d.json")
    found = read_refusal_notices(folder, site["trust"])
    assert not found.notices and "does not match" in found.ignored[0]


@pytest.mark.parametrize("smuggle, match", [
    (lambda a: a.update(tiles=[{"sha256": TILE_HASH}]), "per-tile|not allowed|tile hashes"),
    (lambda a: a.update(kept_sha256=[TILE_HASH]), "tile hashes"),
    (lambda a: a["tests"][0].update(sentence="see /data/slides/patient-0042.svs"), "looks like a file path"),
    (lambda a: a.update(embeddings=[0.1, 0.2]), "not allowed"),
    (lambda a: a.update(verdict="PASS"), "FAIL only"),
])
def test_a_notice_cannot_carry_tiles_hashes_paths_or_embeddings_even_signed_by_the_site(site, tmp_path, smuggle, match):
    out, record = _notice(site, tmp_path)
    smuggle(record["notice"]["audit"])
    out.write_text(json.dumps(_resign(record, site["key"])))
    with pytest.raises(VerificationError, match=match):
        read_refusal_notice(out, site["trust"])


def test_the_site_refuses_to_write_a_notice_that_would_carry_a_path(site, tmp_path):
    work = tmp_path / "w"
    summary = _summary()
    summary["tests"][0]["sentence"] = "copies of /data/slides/patient-0042.svs"
    _run(work, "run-2", summary)
    with pytest.raises(Exception, match="looks like a file path"):
        make_refusal_notice(work, tmp_path / "n.json", site="hospital-d", site_key=site["key"])
    assert not (tmp_path / "n.json").exists()

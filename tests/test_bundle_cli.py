"""The CLI flow: init, officer-key, approve/reject, status, coordinator verify, with their exit codes."""

from __future__ import annotations

import io
import json
import re
import stat

import pytest

from pixcell_fed.bundle import build_bundle
from pixcell_fed.bundle.state import bundle_dir, trail_path
from pixcell_fed.cli_support import run_cli
from pixcell_fed.config import load_site_config
from pixcell_fed.keys import load_private_key, public_key_text
from pixcell_fed.testing.bundles import ENCODER, GENERATOR, TILE_SIZE, real_tile_arrays, write_run

SITE = ["site_agent.commands.init", "site_agent.commands.officer_key", "site_agent.commands.approve",
        "site_agent.commands.status"]
COORD = ["coordinator.commands.verify", "coordinator.commands.trust"]


def site_agent(*argv):
    return run_cli("site-agent", "test", SITE, ["--no-progress", *argv])


def coordinator(*argv):
    return run_cli("coordinator", "test", COORD, list(argv))


def test_cli_modules_are_registered():
    from coordinator.cli import COMMANDS as coord
    from site_agent.cli import COMMANDS as site

    assert set(SITE) <= set(site) and set(COORD) <= set(coord)


def list_officer(site_yaml, public_key_line: str) -> None:
    """What the administrator does with the line 'site-agent officer-key' printed: add it to keys.officers."""
    text = site_yaml.read_text()
    text, n = re.subn(r"(?m)^  officers: \[\].*$", f"  officers:\n    {public_key_line}", text)
    assert n == 1
    site_yaml.write_text(text)


@pytest.fixture
def site(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SITE_PASS", "site secret")
    monkeypatch.setenv("OFFICER_PASS", "officer secret")
    assert site_agent("init", str(tmp_path / "site"), "--name", "hospital-a", "--passphrase-env", "SITE_PASS") == 0
    assert "public key:  ed25519:" in capsys.readouterr().out
    assert site_agent("officer-key", "--out", str(tmp_path / "officer"), "--passphrase-env", "OFFICER_PASS") == 0
    printed = capsys.readouterr().out
    (line,) = [x.strip() for x in printed.splitlines() if x.strip().startswith("- ed25519:")]
    assert "keys: officers:" in printed and "site.yaml" in printed
    list_officer(tmp_path / "site" / "site.yaml", line)
    officer = {"public_key_text": line[2:], "key": str(tmp_path / "officer" / "officer.key")}
    return tmp_path / "site", officer


def _bundle(site_dir, run_id, arrays, verdict="PASS", run_json=None):
    cfg = load_site_config(site_dir / "site.yaml")
    key = load_private_key(cfg.keys.site_private_key, passphrase="site secret")
    run = write_run(cfg.site.work_dir, run_id, arrays, verdict=verdict, run_json=run_json)
    build_bundle(run.run_dir, site_name=cfg.site.name, tiles=run.tiles, tile_size=TILE_SIZE, generator=GENERATOR,
                 encoder=ENCODER, site_key=key)
    return bundle_dir(cfg.site.work_dir, run_id)


def test_init_writes_site_folder(site, tmp_path, capsys):
    site_dir, officer = site
    cfg = load_site_config(site_dir / "site.yaml")
    assert cfg.site.name == "hospital-a" and cfg.keys.passphrase_env == "SITE_PASS"
    assert stat.S_IMODE(cfg.keys.site_private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "officer" / "officer.key").stat().st_mode) == 0o600
    assert "site-agent officer-key" in (site_dir / "OFFICER.md").read_text()
    assert cfg.keys.officers == (officer["public_key_text"],)
    # a second init never overwrites the site or its key
    assert site_agent("init", str(site_dir), "--name", "hospital-a") == 2
    assert "already exists" in capsys.readouterr().err
    assert site_agent("init", str(tmp_path / "bad"), "--name", "bad/name") == 2


def test_approve_verify_reject_status_flow(site, tmp_path, capsys, monkeypatch):
    site_dir, officer = site
    arrays = real_tile_arrays(6)
    good = _bundle(site_dir, "run-001", arrays[:3])
    other = _bundle(site_dir, "run-002", arrays[3:])
    capsys.readouterr()

    assert site_agent("status", "--config", str(site_dir / "site.yaml"), "--format", "json") == 0
    status = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["bundle_state"]) for r in status["runs"]] == [("run-001", "awaiting_approval"),
                                                                            ("run-002", "awaiting_approval")]

    key = ["--key", officer["key"], "--config", str(site_dir / "site.yaml")]
    monkeypatch.setattr("sys.stdin", io.StringIO("no\n"))
    assert site_agent("approve", str(good), *key, "--passphrase-env", "OFFICER_PASS") == 2
    out = capsys.readouterr()
    assert "verdict: PASS" in out.out and "not confirmed" in out.err
    monkeypatch.setenv("WRONG", "nope")
    assert site_agent("approve", str(good), *key, "--passphrase-env", "WRONG", "--yes") == 2
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("approve\n"))
    assert site_agent("approve", str(good), *key, "--passphrase-env", "OFFICER_PASS") == 0
    out = capsys.readouterr().out
    assert out.index("verdict: PASS") < out.index("report:") < out.index("approved:")

    trust = tmp_path / "trust.yaml"
    site_pub = (site_dir / "keys" / "site_signing.pub").read_text().strip()
    trust.write_text(f"sites:\n  hospital-a:\n    signing_key: {site_pub}\n    officers:\n"
                     f"      - {officer['public_key_text']}\n")
    assert coordinator("verify", str(good), "--trust", str(trust), "--format", "json") == 0
    accepted = json.loads(capsys.readouterr().out)
    assert accepted["tiles"] == 3 and accepted["tile_size"] == TILE_SIZE and accepted["created"].endswith("+00:00")
    assert coordinator("verify", str(other), "--trust", str(trust)) == 3
    assert "not approved" in capsys.readouterr().err

    tile = sorted((good / "tiles").iterdir())[0]
    original = tile.read_bytes()
    tile.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    assert coordinator("verify", str(good), "--trust", str(trust)) == 3
    assert f"tiles/{tile.name} does not match its sha256" in capsys.readouterr().err
    tile.write_bytes(original)

    assert site_agent("reject", str(other), *key, "--passphrase-env", "OFFICER_PASS",
                      "--reason", "tiles look like copies of the closest pairs") == 0
    assert coordinator("verify", str(other), "--trust", str(trust)) == 3
    assert "rejected" in capsys.readouterr().err

    assert site_agent("status", "--config", str(site_dir / "site.yaml")) == 0
    out = capsys.readouterr().out
    assert "run-001: run unknown; bundle approved" in out and "run-002: run unknown; bundle rejected" in out
    assert "2 entries, chain intact" in out
    entries = [json.loads(line) for line in trail_path(site_dir / "work").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["approve", "reject"]
    assert {e["officer"] for e in entries} == {accepted["officer_key"]}  # the trail names the officer's key

    # a broken trail makes status fail
    path = trail_path(site_dir / "work")
    path.write_text(path.read_text().replace("approve", "apprOve", 1))
    assert site_agent("status", "--config", str(site_dir / "site.yaml")) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_approve_fail_bundle_exits_3(site, tmp_path, capsys):
    from pixcell_fed.errors import PrivacyGateRefused
    from pixcell_fed.testing.bundles import force_verdict

    site_dir, _ = site
    arrays = real_tile_arrays(2)
    with pytest.raises(PrivacyGateRefused):
        _bundle(site_dir, "run-009", arrays, verdict="FAIL")
    assert not bundle_dir(site_dir / "work", "run-009").exists()
    bundle = _bundle(site_dir, "run-010", arrays)
    cfg = load_site_config(site_dir / "site.yaml")
    force_verdict(bundle, "FAIL", load_private_key(cfg.keys.site_private_key, passphrase="site secret"))
    capsys.readouterr()
    assert site_agent("approve", str(bundle), "--key", str(tmp_path / "officer" / "officer.key"),
                      "--config", str(site_dir / "site.yaml"), "--passphrase-env", "OFFICER_PASS", "--yes") == 3
    out = capsys.readouterr()
    assert "verdict: FAIL" in out.out and "cannot be approved" in out.err
    assert not (bundle / "signatures" / "officer.sig").exists()


def test_verify_bad_trust_file_exits_2(tmp_path, capsys):
    trust = tmp_path / "trust.yaml"
    trust.write_text("sites:\n  a:\n    signing_key: ed25519:AAAA\n    officers: []\n")
    assert coordinator("verify", str(tmp_path), "--trust", str(trust)) == 2
    assert "sites.a.signing_key" in capsys.readouterr().err
    trust.write_text("sites:\n  a:\n    signin_key: x\n")
    assert coordinator("verify", str(tmp_path), "--trust", str(trust)) == 2
    assert "did you mean 'signing_key'" in capsys.readouterr().err


def test_trust_example_loads():
    from pathlib import Path

    from pixcell_fed.bundle.trust import load_trust

    trust = load_trust(Path(__file__).resolve().parents[1] / "configs" / "trust.example.yaml")
    assert set(trust.sites) == {"hospital-a", "hospital-b"}


def test_officer_key_same_as_signing_key_refused_in_trust(tmp_path):
    from pixcell_fed.bundle.trust import load_trust
    from pixcell_fed.errors import ConfigError
    from pixcell_fed.keys import generate_private_key

    pub = public_key_text(generate_private_key().public_key())
    trust = tmp_path / "t.yaml"
    trust.write_text(f"sites:\n  a:\n    signing_key: {pub}\n    officers: [{pub}]\n")
    with pytest.raises(ConfigError, match="already used at sites.a.signing_key"):
        load_trust(trust)


def test_cli_usage_errors(site, tmp_path, capsys, monkeypatch):
    site_dir, officer = site
    arrays = real_tile_arrays(2)
    bundle = _bundle(site_dir, "run-003", arrays)
    moved = tmp_path / "elsewhere" / "bundle"
    moved.parent.mkdir()
    bundle.rename(moved)
    config = ["--config", str(site_dir / "site.yaml")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # argparse: a decision always names the site's config
        site_agent("approve", str(moved), "--key", officer["key"], "--yes")
    assert info.value.code == 2 and "--config" in capsys.readouterr().err
    assert site_agent("reject", str(moved), "--reason", "  ", "--key", officer["key"], "--passphrase-env",
                      "OFFICER_PASS", *config) == 2
    assert "needs a reason" in capsys.readouterr().err
    monkeypatch.delenv("OFFICER_PASS")
    assert site_agent("approve", str(moved), "--key", officer["key"], "--yes", *config) == 2
    assert "passphrase-protected" in capsys.readouterr().err
    assert site_agent("approve", str(moved), "--key", officer["key"], "--passphrase-env", "OFFICER_PASS", "--yes",
                      *config) == 2
    assert "OFFICER_PASS" in capsys.readouterr().err
    monkeypatch.setenv("OFFICER_PASS", "officer secret")
    # a moved bundle is still checked against its run in the site's work folder, then approved
    assert site_agent("approve", str(moved), "--key", officer["key"], "--passphrase-env", "OFFICER_PASS", "--yes",
                      *config) == 0
    assert site_agent("approve", str(moved), "--key", officer["key"], "--passphrase-env", "OFFICER_PASS", "--yes",
                      *config) == 1
    assert "already approved" in capsys.readouterr().err
    assert site_agent("init", str(tmp_path / "other"), "--passphrase-env", "NOT_SET_ANYWHERE") == 2
    assert not (tmp_path / "other" / "keys").exists()


def test_an_officer_key_the_site_does_not_list_decides_nothing(site, tmp_path, capsys, monkeypatch):
    """Any Ed25519 key used to approve locally; now approve and reject refuse a key not in keys.officers."""
    site_dir, _ = site
    bundle = _bundle(site_dir, "run-004", real_tile_arrays(2))
    assert site_agent("officer-key", "--out", str(tmp_path / "stranger")) == 0
    capsys.readouterr()
    stranger = ["--key", str(tmp_path / "stranger" / "officer.key"), "--config", str(site_dir / "site.yaml")]
    monkeypatch.setattr("sys.stdin", io.StringIO("approve\n"))
    assert site_agent("approve", str(bundle), *stranger) == 3
    err = capsys.readouterr().err
    assert "not one of the privacy officers of site hospital-a" in err and "Type 'approve'" not in err
    assert site_agent("reject", str(bundle), *stranger, "--reason", "x") == 3
    assert not (bundle / "signatures" / "officer.sig").exists()
    assert json.loads((bundle / "bundle.json").read_text())["state"] == "awaiting_approval"
    assert not trail_path(site_dir / "work").exists()  # nothing was recorded either


def test_officer_list_in_site_yaml_is_validated(site, capsys):
    site_dir, _ = site
    site_yaml = site_dir / "site.yaml"
    text = site_yaml.read_text()
    site_yaml.write_text(re.sub(r"(?m)^    - ed25519:.*$", "    - ed25519:not-a-key", text))
    assert site_agent("status", "--config", str(site_yaml)) == 2
    assert "keys.officers[0]" in capsys.readouterr().err
    (line,) = re.findall(r"(?m)^    - ed25519:.*$", text)
    site_yaml.write_text(text.replace(line, f"{line}\n{line}"))
    assert site_agent("status", "--config", str(site_yaml)) == 2
    assert "keys.officers[1] repeats keys.officers[0]" in capsys.readouterr().err


def test_status_never_shows_a_refused_run_beside_an_approved_bundle(site, capsys):
    """The run's audit is rerun and FAILS after its bundle was approved: status shows the bundle unusable."""
    site_dir, officer = site
    bundle = _bundle(site_dir, "run-005", real_tile_arrays(2))
    config = ["--config", str(site_dir / "site.yaml")]
    assert site_agent("approve", str(bundle), "--key", officer["key"], "--passphrase-env", "OFFICER_PASS", "--yes",
                      *config) == 0
    (bundle.parent / "run.json").write_text(json.dumps({"state": "refused by audit", "verdict": "FAIL"}))
    capsys.readouterr()
    assert site_agent("status", *config) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "run-005" in x]
    assert "refused by audit" in line and "approved" not in line
    assert "bundle unusable (run run-005 was refused by its audit" in line and "must not leave the site" in line


def test_trust_add_names_the_entry_a_reused_key_already_has(tmp_path, capsys):
    """One key, one role: trust-add refuses site B's signing key when it is site A's officer key, naming A's entry."""
    from pixcell_fed.keys import write_key_pair

    keys = {n: write_key_pair(tmp_path / f"{n}.key")[1] for n in ("a-site", "a-officer", "b-officer")}
    trust = tmp_path / "trust.yaml"
    assert coordinator("trust-add", str(trust), "--site", "hospital-a", "--signing-key", str(keys["a-site"]),
                       "--officer", str(keys["a-officer"])) == 0
    before = trust.read_text()
    assert coordinator("trust-add", str(trust), "--site", "hospital-b", "--signing-key", str(keys["a-officer"]),
                       "--officer", str(keys["b-officer"])) == 2
    err = capsys.readouterr().err
    assert ("the key at sites.hospital-b.signing_key (the signing key of site hospital-b) is already used at "
            "sites.hospital-a.officers[0] (an officer key of site hospital-a)") in err
    assert "one key, one role" in err
    assert trust.read_text() == before  # nothing written

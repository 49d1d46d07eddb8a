"""The deployment commands: the locked-down command lines, and what they refuse before anything starts.

No Flower process is started here (``--print-command``, or a refusal before the first process); the processes
themselves are exercised in ``test_federation_lockdown.py`` and ``test_federation_deployment.py``.
"""

from __future__ import annotations

import shlex

import pytest

from pixcell_fed.cli_support import run_cli
from pixcell_fed.federation.app_bundle import app_sha256


# only this area's command modules, so that the test does not depend on other commands being importable
def site_main(argv):
    return run_cli("site-agent", "test", ("site_agent.commands.serve", "site_agent.commands.app_hash",
                                         "site_agent.commands.launcher"), argv)


def coordinator_main(argv):
    return run_cli("coordinator", "test", ("coordinator.commands.serve", "coordinator.commands.run",
                                           "coordinator.commands.trust", "coordinator.commands.fleet_front"), argv)


def _commands(out: str) -> dict[str, list[str]]:
    """``name: command`` lines of --print-command."""
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    return {name: shlex.split(cmd) for name, cmd in lines.items()}


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_commands_are_listed_in_the_clis():
    from coordinator.cli import COMMANDS as coordinator_commands
    from site_agent.cli import COMMANDS as site_commands

    assert {"site_agent.commands.serve", "site_agent.commands.app_hash", "site_agent.commands.launcher"} <= set(site_commands)
    assert {"coordinator.commands.serve", "coordinator.commands.run", "coordinator.commands.trust",
            "coordinator.commands.fleet_front"} <= set(coordinator_commands)


def test_site_agent_serve_runs_the_supernode_in_process_isolation_with_the_pinned_launcher(tmp_path, capsys):
    assert site_main(["auth-key", "--config", str(_site_yaml(tmp_path)), "--out", str(tmp_path / "keys")]) == 0
    key = tmp_path / "keys" / "alpha_auth"
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (tmp_path / "keys" / "alpha_auth.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    bundle = _bundle(tmp_path, "run-001", state="approved")
    _bundle(tmp_path, "run-002", state="awaiting")  # newer, but awaiting approval: never served
    (tmp_path / "ca.crt").write_text("x")
    capsys.readouterr()
    assert site_main(["serve", "--config", str(tmp_path / "site.yaml"), "--print-command"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert list(cmds) == ["supernode", "pinned-launcher"]
    node, launcher = cmds["supernode"], cmds["pinned-launcher"]
    assert node[0].endswith("flower-supernode") and "--insecure" not in node
    assert _arg(node, "--superlink") == "127.0.0.1:9555"
    assert _arg(node, "--root-certificates") == str(tmp_path / "ca.crt")
    assert _arg(node, "--auth-supernode-private-key") == str(key)
    assert _arg(node, "--isolation") == "process"  # the SuperNode runs no app code itself
    assert _arg(node, "--host") == "127.0.0.1" and _arg(node, "--port") == "9777"  # runtime API on loopback only
    node_config = _arg(node, "--node-config")
    assert 'site-name="alpha"' in node_config and f'bundle-dir="{bundle.resolve()}"' in node_config
    assert f'eval-dir="{(tmp_path / "eval").resolve()}"' in node_config
    assert launcher[1:4] == ["-m", "site_agent.cli", "pinned-launcher"]
    assert _arg(launcher, "--runtime-api-address") == "127.0.0.1:9777"
    assert _arg(launcher, "--allow-app-sha256") == app_sha256() and launcher.count("--allow-app-sha256") == 1
    assert _arg(launcher, "--superexec-auth-secret-file") == _arg(node, "--superexec-auth-secret-file")


def test_site_agent_serve_refuses_without_tls_or_without_a_pin(tmp_path, capsys):
    bundle = _bundle(tmp_path, "run-001", state="approved")
    cfg = _site_yaml(tmp_path, ca=False)
    assert site_main(["serve", "--config", str(cfg), "--bundle", str(bundle), "--print-command"]) == 2
    assert "root_certificates" in capsys.readouterr().err
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "alpha_auth").write_text("x")
    cfg = _site_yaml(tmp_path, pin=False)
    assert site_main(["serve", "--config", str(cfg), "--bundle", str(bundle)]) == 2
    assert "federation.app_sha256" in capsys.readouterr().err


@pytest.mark.parametrize("state", ["awaiting", "rejected"])
def test_site_agent_serve_refuses_a_bundle_that_is_not_approved(tmp_path, capsys, state):
    bundle = _bundle(tmp_path, "run-001", state=state)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alpha_auth").write_text("x")
    cfg = _site_yaml(tmp_path)
    # named on the command line, or in site.yaml: refused (exit 3) before any process starts
    assert site_main(["serve", "--config", str(cfg), "--bundle", str(bundle)]) == 3
    err = capsys.readouterr().err
    assert ("awaiting approval" if state == "awaiting" else "is rejected") in err and "only an approved bundle" in err
    cfg.write_text(cfg.read_text() + f"  bundle_dir: {bundle}\n")
    assert site_main(["serve", "--config", str(cfg)]) == 3
    # and with no bundle named, the newest approved one is looked for: there is none
    cfg = _site_yaml(tmp_path)
    assert site_main(["serve", "--config", str(cfg)]) == 2
    assert "no approved bundle" in capsys.readouterr().err


def test_coordinator_serve_keeps_the_superlink_on_loopback_behind_the_fleet_front(tmp_path, capsys):
    assert coordinator_main(["serve", "--certs", str(tmp_path / "certs"), "--port", "9777", "--internal-port", "9778",
                             "--hostname", "coord.example.org", "--print-command"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert list(cmds) == ["superlink", "superexec", "fleet-front"]
    link, superexec, front = cmds["superlink"], cmds["superexec"], cmds["fleet-front"]
    assert link[0].endswith("flower-superlink") and "--insecure" not in link
    assert _arg(link, "--host") == "127.0.0.1" and _arg(link, "--port") == "9778"
    assert "--enable-supernode-auth" in link and _arg(link, "--isolation") == "process"
    assert _arg(link, "--ssl-ca-certfile") == str(tmp_path / "certs" / "ca.crt")
    assert superexec[0].endswith("flower-superexec")
    assert _arg(superexec, "--runtime-api-address") == "127.0.0.1:9778"
    assert _arg(superexec, "--root-certificates") == str(tmp_path / "certs" / "ca.crt")
    assert _arg(superexec, "--superexec-auth-secret-file") == _arg(link, "--superexec-auth-secret-file")
    assert front[1:4] == ["-m", "coordinator.cli", "fleet-front"]
    assert _arg(front, "--host") == "0.0.0.0" and _arg(front, "--port") == "9777"
    assert _arg(front, "--upstream") == "127.0.0.1:9778"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["coord.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert coordinator_main(["serve", "--certs", str(tmp_path / "certs"), "--port", "9777", "--internal-port", "9777",
                             "--print-command"]) == 2


def test_register_site_admits_only_the_trust_files_key_for_that_name(tmp_path, capsys, monkeypatch):
    from pixcell_fed.federation import deployment as D

    calls = []

    def fake_flwr(args, **kwargs):
        calls.append(list(args))
        import subprocess

        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(D, "run_flwr", fake_flwr)
    keys = {s: D.make_site_auth_key(tmp_path / "keys", s) for s in ("alpha", "beta", "outsider")}
    trust = tmp_path / "trust.yaml"
    _trust_add(tmp_path, trust, "alpha", auth=keys["alpha"][1])
    _trust_add(tmp_path, trust, "beta", auth=keys["beta"][1])
    _trust_add(tmp_path, trust, "gamma", auth=None)
    assert "alpha_auth.pub" not in trust.read_text() and "ecdsa-sha2-nistp384" in trust.read_text()
    home = tmp_path / "home"

    def register(key, name, superlink="127.0.0.1:9093"):
        return coordinator_main(["register-site", str(key), "--name", name, "--trust", str(trust), "--superlink",
                                 superlink, "--ca", str(tmp_path / "ca.crt"), "--flwr-home", str(home)])

    capsys.readouterr()
    for key, name, why in ((keys["outsider"][1], "alpha", "is not the auth_key of site 'alpha'"),
                           (keys["beta"][1], "alpha", "(it is 'beta''s)"),
                           (keys["alpha"][1], "mallory", "not in the trust file"),
                           (keys["alpha"][1], "gamma", "no auth_key")):
        assert register(key, name) == 2
        assert why in capsys.readouterr().err
    assert calls == [] and not home.exists()  # refused before anything was written or run
    assert register(keys["alpha"][1], "alpha", superlink="coord.example.org:9092") == 2  # Control API: loopback only
    assert "not on this machine" in capsys.readouterr().err and calls == []
    assert register(keys["alpha"][1], "alpha") == 0
    assert calls == [["supernode", "register", str(keys["alpha"][1]), "consortium", "--name", "alpha"]]
    assert 'address = "127.0.0.1:9093"' in (home / "config.toml").read_text()


def test_trust_add_records_the_sites_supernode_key(tmp_path, capsys):
    from pixcell_fed.bundle.trust import auth_key_der, load_trust
    from pixcell_fed.federation import deployment as D

    _, public = D.make_site_auth_key(tmp_path / "keys", "alpha")
    trust = tmp_path / "trust.yaml"
    _trust_add(tmp_path, trust, "alpha", auth=public)
    assert load_trust(trust).site("alpha").auth_key == auth_key_der(public.read_text())
    _trust_add(tmp_path, trust, "beta", auth=None)
    assert "beta has no SuperNode key" in capsys.readouterr().err
    assert load_trust(trust).site("beta").auth_key is None
    # one key, one role: the same SuperNode key cannot be given to a second site
    assert _trust_add(tmp_path, trust, "gamma", auth=public, expect=2) == 2


def test_coordinator_run_rejects_unknown_setting_before_starting(tmp_path, capsys):
    settings = tmp_path / "run.toml"
    settings.write_text('work-dir = "/tmp/w"\nepochz = 3\n')
    code = coordinator_main(["run", "--settings", str(settings), "--ca", str(tmp_path / "ca.crt"),
                             "--flwr-home", str(tmp_path / "home")])
    err = capsys.readouterr().err
    assert code == 2 and "epochz" in err and "epochs" in err
    assert not (tmp_path / "home").exists()  # nothing was started or written
    settings.write_text('work-dir = "/tmp/w"\n')
    assert coordinator_main(["run", "--settings", str(settings), "--superlink", "coord.example.org:9092", "--ca",
                             str(tmp_path / "ca.crt"), "--flwr-home", str(tmp_path / "home")]) == 2
    assert "not on this machine" in capsys.readouterr().err and not (tmp_path / "home").exists()


def _trust_add(tmp_path, trust, site, *, auth, expect=0):
    from pixcell_fed.keys import generate_private_key, public_key_text

    keys = tmp_path / "pub"
    keys.mkdir(exist_ok=True)
    (keys / f"{site}_signing.pub").write_text(public_key_text(generate_private_key().public_key()))
    (keys / f"{site}_officer.pub").write_text(public_key_text(generate_private_key().public_key()))
    argv = ["trust-add", str(trust), "--site", site, "--signing-key", str(keys / f"{site}_signing.pub"),
            "--officer", str(keys / f"{site}_officer.pub")] + (["--auth-key", str(auth)] if auth else [])
    code = coordinator_main(argv)
    assert code == expect
    return code


def _bundle(tmp_path, run_id, *, state):
    from pixcell_fed.bundle.approval import reject_bundle
    from pixcell_fed.testing.bundles import build_run_bundle, consortium, inert_summary_html, real_tile_arrays, write_run

    keys = consortium(("alpha",))
    run = write_run(tmp_path / "work", run_id, real_tile_arrays(2), summary_html=inert_summary_html())
    bundle = build_run_bundle(run, keys, "alpha", labels=["tumor", "normal"], approve=state in ("approved", "rejected"))
    if state == "rejected":
        reject_bundle(bundle, "tiles look like the source slides", keys.officer_keys["alpha"],
                      site=keys.authority("alpha", run.work_dir))
    return bundle


def _site_yaml(tmp_path, ca=True, pin=True):
    path = tmp_path / "site.yaml"
    key = tmp_path / "keys" / "alpha_auth"
    path.write_text(
        "site:\n  name: alpha\n  work_dir: work\n"
        "federation:\n  superlink: 127.0.0.1:9555\n  port: 9777\n"
        + (f"  root_certificates: {tmp_path / 'ca.crt'}\n" if ca else "")
        + (f"  app_sha256: {app_sha256()}\n" if pin else "")
        + f"  auth_private_key: {key}\n  eval_dir: eval\n")
    return path

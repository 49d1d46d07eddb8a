"""The serve commands build the right Flower command lines from site.yaml / flags (no Flower process started)."""

from __future__ import annotations

import shlex

from pixcell_fed.cli_support import run_cli


# only this area's command modules, so that the test does not depend on other commands being importable
def site_main(argv):
    return run_cli("site-agent", "test", ("site_agent.commands.serve",), argv)


def coordinator_main(argv):
    return run_cli("coordinator", "test", ("coordinator.commands.serve", "coordinator.commands.run"), argv)


def test_commands_are_listed_in_the_clis():
    from coordinator.cli import COMMANDS as coordinator_commands
    from site_agent.cli import COMMANDS as site_commands

    assert "site_agent.commands.serve" in site_commands
    assert {"coordinator.commands.serve", "coordinator.commands.run"} <= set(coordinator_commands)


def test_site_agent_serve_command(tmp_path, capsys):
    assert site_main(["auth-key", "--config", str(_site_yaml(tmp_path)), "--out", str(tmp_path / "keys")]) == 0
    key = tmp_path / "keys" / "alpha_auth"
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (tmp_path / "keys" / "alpha_auth.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    bundle = _bundle(tmp_path, "run-001", approve=True)
    _bundle(tmp_path, "run-002", approve=False)  # newer, but awaiting approval: never served
    (tmp_path / "ca.crt").write_text("x")
    capsys.readouterr()
    assert site_main(["serve", "--config", str(tmp_path / "site.yaml"), "--print-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[0].endswith("flower-supernode")
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9555"
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key)
    node_config = cmd[cmd.index("--node-config") + 1]
    assert 'site-name="alpha"' in node_config and f'bundle-dir="{bundle.resolve()}"' in node_config
    assert f'eval-dir="{(tmp_path / "eval").resolve()}"' in node_config
    assert "--insecure" not in cmd


def test_site_agent_serve_refuses_without_tls(tmp_path, capsys):
    cfg = _site_yaml(tmp_path, ca=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bundle.json").write_text("{}")
    assert site_main(["serve", "--config", str(cfg), "--bundle", str(tmp_path / "b"), "--print-command"]) == 2
    assert "root_certificates" in capsys.readouterr().err


def test_coordinator_serve_creates_certs_and_enables_auth(tmp_path, capsys):
    assert coordinator_main(["serve", "--certs", str(tmp_path / "certs"), "--port", "9777", "--print-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[0].endswith("flower-superlink") and "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(tmp_path / "certs" / "ca.crt")
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def _bundle(tmp_path, run_id, *, approve):
    from pixcell_fed.testing.bundles import build_run_bundle, consortium, inert_summary_html, real_tile_arrays, write_run

    run = write_run(tmp_path / "work", run_id, real_tile_arrays(2), summary_html=inert_summary_html())
    return build_run_bundle(run, consortium(("alpha",)), "alpha", labels=["tumor", "normal"], approve=approve)


def _site_yaml(tmp_path, ca=True):
    path = tmp_path / "site.yaml"
    key = tmp_path / "keys" / "alpha_auth"
    path.write_text(
        "site:\n  name: alpha\n  work_dir: work\n"
        "federation:\n  superlink: 127.0.0.1:9555\n"
        + (f"  root_certificates: {tmp_path / 'ca.crt'}\n" if ca else "")
        + f"  auth_private_key: {key}\n  eval_dir: eval\n")
    return path


def test_coordinator_run_rejects_unknown_setting_before_starting(tmp_path, capsys):
    settings = tmp_path / "run.toml"
    settings.write_text('work-dir = "/tmp/w"\nepochz = 3\n')
    code = coordinator_main(["run", "--settings", str(settings), "--ca", str(tmp_path / "ca.crt"),
                             "--flwr-home", str(tmp_path / "home")])
    err = capsys.readouterr().err
    assert code == 2 and "epochz" in err and "epochs" in err
    assert not (tmp_path / "home").exists()  # nothing was started or written

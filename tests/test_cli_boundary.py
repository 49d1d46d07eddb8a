"""The CLI error boundary: known errors become one line, a hint and the documented exit code."""

from __future__ import annotations

import argparse
import sys
import types

import pytest

from pixcell_fed.cli_support import run_cli
from pixcell_fed.errors import ConfigError, ExitCode, PartialSuccess, PrivacyGateRefused


def _install_command(monkeypatch, name: str, behaviour):
    module = types.ModuleType(name)

    def register(sub):
        p = sub.add_parser("boom")
        p.set_defaults(func=behaviour)

    module.register = register
    monkeypatch.setitem(sys.modules, name, module)
    return name


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError("bad key 'x'", hint="remove it"), ExitCode.USAGE),
        (PrivacyGateRefused("audit FAIL", hint="read the report"), ExitCode.PRIVACY_REFUSED),
        (PartialSuccess("2 slides failed", hint="see the summary"), ExitCode.PARTIAL),
    ],
)
def test_known_errors_map_to_exit_codes(monkeypatch, capsys, error, code):
    def behaviour(args: argparse.Namespace) -> int:
        raise error

    mod = _install_command(monkeypatch, "fake_cmd_module", behaviour)
    assert run_cli("prog", "desc", [mod], ["boom"]) == code
    err = capsys.readouterr().err
    assert f"error: {error.message}" in err
    assert f"hint: {error.hint}" in err


def test_usage_errors_exit_2(monkeypatch, capsys):
    mod = _install_command(monkeypatch, "fake_cmd_module2", lambda args: 0)
    with pytest.raises(SystemExit) as info:
        run_cli("prog", "desc", [mod], ["nonexistent-command"])
    assert info.value.code == ExitCode.USAGE
    assert run_cli("prog", "desc", [mod], ["boom"]) == ExitCode.OK


def test_unknown_errors_are_not_swallowed(monkeypatch):
    def behaviour(args):
        raise RuntimeError("a bug")

    mod = _install_command(monkeypatch, "fake_cmd_module3", behaviour)
    with pytest.raises(RuntimeError):
        run_cli("prog", "desc", [mod], ["boom"])


def test_import_has_no_heavy_side_effects():
    import subprocess

    code = "import sys, pixcell_fed, pixcell_fed.config, pixcell_fed.errors; " \
           "heavy = [m for m in ('torch', 'openslide', 'diffusers', 'flwr', 'pandas', 'timm') if m in sys.modules]; " \
           "print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

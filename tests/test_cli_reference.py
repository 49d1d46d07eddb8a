"""docs/cli.md is generated from the CLIs and must match them; every command documents the exit codes."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pixcell_fed.cli_reference import CLIS, REGENERATE, build_cli_parser, main, render, subcommands
from pixcell_fed.cli_support import EXIT_CODES_EPILOG


#: The repository's reference (also when the tests run against an installed package, which carries no docs/).
CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_docs_cli_md_is_up_to_date_with_the_clis():
    """Word for word; the line breaks are argparse's, which wraps differently from Python 3.13 on (the file is
    generated on 3.11, CI's Python)."""
    assert CLI_MD.is_file(), f"{CLI_MD} is missing: run '{REGENERATE}'"
    assert CLI_MD.read_text(encoding="utf-8").split() == render().split(), \
        f"docs/cli.md is out of date: run '{REGENERATE}'"


@pytest.mark.parametrize("prog,module_name", CLIS)
def test_every_command_is_documented_with_its_exit_codes(prog, module_name):
    text = render()
    parser = build_cli_parser(module_name, prog)
    subs = subcommands(parser)
    # Every module in COMMANDS registers at least one sub-command, and each one is in the reference.
    assert len(subs) >= len(importlib.import_module(module_name).COMMANDS)
    assert EXIT_CODES_EPILOG in parser.format_help()
    for name, sub in subs.items():
        assert f"### `{prog} {name}`" in text
        assert sub.epilog and "exit codes:" in sub.epilog, f"'{prog} {name}' does not document its exit codes"
        assert EXIT_CODES_EPILOG.splitlines()[1] in sub.format_help()  # the table survives help formatting
        assert sub.description, f"'{prog} {name}' has no description"


def test_check_mode_detects_a_stale_file(tmp_path, capsys):
    out = tmp_path / "cli.md"
    assert main(["--check", "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("doctor", "doktor", 1))
    assert main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and REGENERATE in err


def test_rendering_does_not_depend_on_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = render()
    monkeypatch.setenv("COLUMNS", "250")
    assert render() == narrow
    import os

    assert os.environ["COLUMNS"] == "250"  # restored after rendering

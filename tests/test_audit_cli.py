"""``site-agent audit`` on three plain folders: exit 0 for PASS/WARN, 3 when the gate refuses, 2 for usage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixcell_fed.cli_support import run_cli
from pixcell_fed.testing.audit_tiles import COPY_TRANSFORMS, stripe_tiles, write_tiles
from site_agent import cli


def main(argv):
    """The site agent's own error boundary with only this command loaded (other commands are other issues')."""
    assert "site_agent.commands.audit" in cli.COMMANDS
    return run_cli("site-agent", "test", ("site_agent.commands.audit",), argv)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_cli")
    t_tiles = stripe_tiles(2, stride=128)[0]
    write_tiles(root / "T", t_tiles, "ref")
    write_tiles(root / "H", stripe_tiles(1, stride=128)[0], "hold", suffix=".jpg")
    write_tiles(root / "S", stripe_tiles(0, stride=128)[0][:20], "new")
    write_tiles(root / "S", [COPY_TRANSFORMS["flip"](t_tiles[3], np.random.default_rng(0))], "zz-copy")
    (root / "strict.yaml").write_text("audit:\n  drop_flagged: false\n")
    (root / "lenient.yaml").write_text("audit:\n  max_copy_share: 0.05\n")
    return root


def _args(root, out, *extra):
    return ["--no-progress", "audit", "--synthetic", str(root / "S"), "--reference", str(root / "T"),
            "--holdout", str(root / "H"), "--out", str(root / out), *extra]


def test_default_gate_drops_an_accepted_rare_copy_and_exits_0(folders, capsys):
    assert main(_args(folders, "out0", "--config", str(folders / "lenient.yaml"))) == 0
    out = capsys.readouterr().out
    # the copy (1 of 21 tiles, within the 5% this site accepts) was dropped; its memorisation warning stays
    assert "Audit verdict WARN" in out and "2 tests passed, 1 warned, 0 failed, 5 inconclusive" in out
    assert "(Memorisation rate of the generator: WARN)" in out
    # 20 tiles against 27 held-out ones cannot show that a 5% leak is absent; the split was not declared
    assert "The sets are too small to conclude" in out and "would let it detect a 5% leak" in out
    assert "split in a way this audit was not told" in out
    assert "20 of 21 synthetic tiles" in out and str(folders / "out0" / "audit.html") in out
    assert (folders / "out0" / "audit_summary.json").is_file()
    page = folders / "out0" / "audit_summary.html"  # the shareable page says what was dropped, as audit.html does
    assert f"(page: {page})" in out
    for html in (page, folders / "out0" / "audit.html"):
        assert "1 flagged synthetic tiles (" in html.read_text() and "dropped in earlier rounds" in html.read_text()
    report = json.loads((folders / "out0" / "audit.json").read_text())
    assert next(t for t in report["tests"] if t["name"] == "paired")["status"] == "N/A"


def test_one_copy_in_21_tiles_is_memorisation_with_the_default_config(folders, capsys):
    assert main(_args(folders, "out1")) == 3
    out = capsys.readouterr().out
    assert "Audit verdict FAIL: 20 of 21" in out and "(Memorisation rate of the generator: FAIL)" in out


def test_a_declared_patient_split_needs_no_warning_and_inconclusive_exits_0(folders, capsys):
    clean = folders / "clean"
    clean.mkdir(exist_ok=True)
    for p in sorted((folders / "S").glob("new*.png")):
        (clean / p.name).write_bytes(p.read_bytes())
    args = _args(folders, "outp", "--split-unit", "patient", "--format", "json")
    args[args.index("--synthetic") + 1] = str(clean)
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "INCONCLUSIVE" and out["kept"] == 20
    report = json.loads((folders / "outp" / "audit.json").read_text())
    assert report["statistics"]["split_unit"] == "patient"
    assert 'id="split-warning"' not in (folders / "outp" / "audit.html").read_text()


def test_gate_refuses_with_exit_3_when_flagged_tiles_are_not_dropped(folders, capsys):
    assert main(_args(folders, "out3", "--config", str(folders / "strict.yaml"))) == 3
    captured = capsys.readouterr()
    assert "Audit verdict FAIL" in captured.out and "Copies of real tiles: FAIL" in captured.out
    assert "privacy gate refused" in captured.err and "hint:" in captured.err


def test_forbidden_string_in_a_file_name_is_refused(folders, capsys):
    bad = folders / "S" / "new-CMU1-SLIDE.png"
    bad.write_bytes((folders / "S" / "new0000.png").read_bytes())
    try:
        code = main(_args(folders, "outf", "--config", str(folders / "strict.yaml"), "--forbid", "cmu1-slide"))
    finally:
        bad.unlink()
    out = capsys.readouterr().out
    assert code == 3 and "Identifying content in the files to ship: FAIL" in out


def test_missing_folder_or_bad_config_exit_2(folders, capsys):
    args = _args(folders, "out2")
    args[args.index("--holdout") + 1] = str(folders / "nope")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    (folders / "bad.yaml").write_text("audit:\n  copy_similarity: 2\n")
    assert main(_args(folders, "out2", "--config", str(folders / "bad.yaml"))) == 2

"""The memorisation rate is a gated test over the first round, carried through every round (issue 12 item 1).

A generator that copies more than a tiny share of its inputs is memorising: every tile it made is suspect,
including those that escaped detection, so dropping the detected copies must never turn its FAIL into a pass.
On the old code, the 140-of-165 set below failed round 1, the 140 copies were dropped and round 2 passed on the
25 left: ``site-agent audit`` exited 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixcell_fed.cli_support import run_cli
from pixcell_fed.testing.audit_tiles import COPY_TRANSFORMS, stripe_tiles, write_tiles


def main(argv):
    return run_cli("site-agent", "test", ("site_agent.commands.audit",), argv)


@pytest.fixture(scope="module")
def memorising(tmp_path_factory):
    """165 synthetic tiles: 140 copies of 20 conditioning tiles under all 7 transforms, and 25 new tiles."""
    root = tmp_path_factory.mktemp("memorising")
    t_tiles = stripe_tiles(2, stride=128)[0]
    write_tiles(root / "T", t_tiles, "ref")
    write_tiles(root / "H", stripe_tiles(1, stride=128)[0], "hold")
    write_tiles(root / "S", stripe_tiles(0, stride=128)[0][:25], "new")
    rng = np.random.default_rng(12)
    for name, transform in COPY_TRANSFORMS.items():
        write_tiles(root / "S", [transform(t, rng) for t in t_tiles[:20]], f"copy-{name}-")
    return root


def _audit(root, out, *extra):
    return main(["--no-progress", "audit", "--synthetic", str(root / "S"), "--reference", str(root / "T"),
                 "--holdout", str(root / "H"), "--out", str(root / out), *extra])


def test_a_memorising_generator_fails_with_the_default_config_and_exit_3(memorising, capsys):
    assert len(list((memorising / "S").glob("*.png"))) == 165
    assert _audit(memorising, "out") == 3
    captured = capsys.readouterr()
    assert "Audit verdict FAIL" in captured.out and "Memorisation rate of the generator: FAIL" in captured.out
    report = json.loads((memorising / "out" / "audit.json").read_text())
    test = next(t for t in report["tests"] if t["name"] == "memorisation")
    assert test["statistic"] == {"copies": 140, "generated": 165, "copy_share": pytest.approx(140 / 165)}
    assert test["thresholds"] == {"max_copy_share": 0.01} and "issue 12" in test["provenance"]["max_copy_share"]
    # the copies were dropped, and the 25 left pass every per-tile test, yet the FAIL stands in every round
    assert [r["tests"]["memorisation"] for r in report["rounds"]] == ["FAIL", "FAIL"]
    assert [r["verdict"] for r in report["rounds"]] == ["FAIL", "FAIL"]
    assert report["rounds"][0]["dropped"] == 140 and report["sizes"]["S_kept"] == 25
    assert report["rounds"][1]["tests"]["copy_detection"] == "PASS"
    summary = json.loads((memorising / "out" / "audit_summary.json").read_text())
    assert summary["verdict"] == "FAIL"


def test_the_reports_first_sentence_says_how_many_tiles_were_copies_and_what_that_means(memorising):
    html = (memorising / "out" / "audit.html").read_text()
    body = html[html.index("<body>"):]
    first = body[body.index("<p"):body.index("</p>")]
    assert "140 of the 165 synthetic tiles (84.8%) were copies of real tiles" in first
    assert "memorises" in first and "nothing from this run may be shipped" in first
    assert body.index('id="memorisation-sentence"') < body.index('id="verdict"')


def test_a_rare_copy_warns_and_is_dropped_when_the_site_accepts_that_share(tmp_path, capsys):
    t_tiles = stripe_tiles(2, stride=128)[0]
    write_tiles(tmp_path / "T", t_tiles, "ref")
    write_tiles(tmp_path / "H", stripe_tiles(1, stride=128)[0], "hold")
    write_tiles(tmp_path / "S", stripe_tiles(0, stride=128)[0][:24], "new")
    write_tiles(tmp_path / "S", [COPY_TRANSFORMS["jpeg70"](t_tiles[7], np.random.default_rng(0))], "zz-copy")
    assert _audit(tmp_path, "strict") == 3  # 1 of 25 is 4% of the generator's output: more than the default 1%
    assert "Memorisation rate of the generator: FAIL" in capsys.readouterr().out
    (tmp_path / "lenient.yaml").write_text("audit:\n  max_copy_share: 0.05\n")
    assert _audit(tmp_path, "lenient", "--config", str(tmp_path / "lenient.yaml")) == 0
    assert "Audit verdict WARN" in capsys.readouterr().out
    report = json.loads((tmp_path / "lenient" / "audit.json").read_text())
    assert [r["tests"]["memorisation"] for r in report["rounds"]] == ["WARN", "WARN"]
    assert report["rounds"][0]["tests"]["copy_detection"] == "FAIL" and report["sizes"]["S_kept"] == 24
    assert "within the 5.0% accepted as rare accidents" in (tmp_path / "lenient" / "audit.html").read_text()


def test_max_copy_share_is_range_checked(tmp_path, capsys):
    from pixcell_fed.config.schema import AuditConfig

    with pytest.raises(ValueError, match="max_copy_share"):
        AuditConfig(max_copy_share=1.5)
    assert AuditConfig().max_copy_share == 0.01

"""The audit of a dp-conditioned set: the guarantee in every report, no tile dropped, minimal shared statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixcell_fed.audit.run import run_audit
from pixcell_fed.bundle.shareable import validate_shareable_audit
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.privacy.conditioning import dp_claim
from pixcell_fed.testing.audit_tiles import COPY_TRANSFORMS, stripe_tiles, write_tiles

CLAIM = dp_claim(epsilon=2.0, delta=1e-6, clip_norm=30.0, vectors_per_tile=1, slide_tiles=12, slide_tiles_capped=True)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """New real tissue as the synthetic set, plus one planted copy of a conditioning tile."""
    root = tmp_path_factory.mktemp("audit_dp")
    t_tiles = stripe_tiles(2, stride=128)[0]
    t = write_tiles(root / "T", t_tiles, "ref")
    h = write_tiles(root / "H", stripe_tiles(1, stride=64)[0], "hold")
    s = write_tiles(root / "S", stripe_tiles(0, stride=128)[0], "new")
    s += write_tiles(root / "C", [COPY_TRANSFORMS["jpeg70"](t_tiles[5], np.random.default_rng(0))], "syn-copy")
    return root, s, t, h


@pytest.fixture(scope="module")
def audits(sets):
    root, s, t, h = sets
    cfg = AuditConfig(drop_flagged=True)  # as a site.yaml may say: dp mode overrides it
    return {mode: run_audit(s, t, h, audit_cfg=cfg, out_dir=root / mode,
                            conditioning=None if mode == "plain" else CLAIM.to_record())
            for mode in ("plain", "dp")}


def test_dp_audit_drops_no_tile_and_only_passes_or_fails(audits, sets):
    _, s, _, _ = sets
    plain, dp = audits["plain"], audits["dp"]
    assert len(plain.report["rounds"]) == 2 and len(plain.kept) < len(s)  # the control: the copy is dropped
    assert len(dp.report["rounds"]) == 1 and len(dp.kept) == len(s)  # dp: nothing dropped ...
    assert dp.verdict == "FAIL"  # ... so the copy fails the whole set
    assert dp.report["config"]["drop_flagged"] is False


def test_dp_audit_states_the_guarantee_and_what_it_does_not_cover(audits):
    dp = audits["dp"]
    assert json.loads(dp.json_path.read_text())["conditioning"] == CLAIM.to_record()
    page = dp.report_path.read_text()
    assert "Conditioning privacy: dp" in page and "Not covered by the guarantee" in page
    assert f"epsilon {CLAIM.tile_epsilon:.3g}, delta 1e-06" in page
    assert f"epsilon {CLAIM.slide_epsilon:.3g}, delta 1e-06 (at most 12 conditioning tiles per slide)" in page
    assert "conditioning" not in json.loads(audits["plain"].json_path.read_text())  # none given, none stated


def test_dp_summary_ships_the_gate_not_the_statistics(audits):
    plain = json.loads(audits["plain"].summary_path.read_text())
    dp = json.loads(audits["dp"].summary_path.read_text())
    validate_shareable_audit(dp)
    assert {"figures", "fidelity", "null", "rounds"} <= set(plain)
    assert not {"figures", "fidelity", "null", "rounds", "statistics"} & set(dp)
    assert dp["conditioning"] == CLAIM.to_record() and dp["verdict"] == "FAIL"
    assert set(dp["sizes"]) == {"S", "S_kept"}
    assert [t["name"] for t in dp["tests"]] == [t["name"] for t in plain["tests"]]
    assert all(set(t) == {"name", "title", "status", "gates"} for t in dp["tests"])
    assert all(set(t) == {"sha256", "kept"} for t in dp["tiles"]) and len(dp["kept_sha256"]) == len(dp["tiles"])
    text = json.dumps(dp)
    for number in (f"{t['nearest_similarity']}" for t in plain["tiles"][:5]):
        assert number not in text  # no similarity to a real tile


def test_the_shareable_page_of_a_dp_set_shows_the_guarantee_and_is_inert(audits):
    from pixcell_fed.audit.conditioning_section import dp_summary_page_body
    from pixcell_fed.bundle.html import INERT_CSP_META, check_inert_html

    summary = json.loads(audits["dp"].summary_path.read_text())
    body = "".join(dp_summary_page_body(summary))
    page = f'<!DOCTYPE html><html><head><meta charset="utf-8">{INERT_CSP_META}<title>t</title></head><body>{body}</body></html>'
    check_inert_html(page.encode())
    assert "Conditioning privacy: dp" in body and "Not covered by the guarantee" in body
    assert f"{len(summary['tiles'])} of {len(summary['tiles'])} synthetic tiles were audited" in body
    assert all(t["title"] in body for t in summary["tests"]) and "Verdict: FAIL" in body

"""The fidelity figures in the audit's outputs: audit.json, the shareable audit_summary.json (numbers only),
audit.html, and the optional warning (audit.fidelity_warn_fd_ratio) that never gates by default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixcell_fed.audit.run import SiteFacts, run_audit
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.testing.audit_tiles import stripe_tiles, write_tiles

TWIN = {"generator": {"name": "pixcell-256", "label": "untrained twin", "twin": True}}


def _mean_colour(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1, 3).mean(1).astype(np.float32)


def _colour_spread(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1, 3).astype(np.float32)
    return np.concatenate([flat.mean(1), flat.std(1), np.percentile(flat, [10, 90], axis=1).transpose(1, 0, 2)
                           .reshape(len(images), -1)], axis=1)


SPACES = {"mean colour": _mean_colour, "colour spread": _colour_spread}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity_report")
    t = write_tiles(root / "T", stripe_tiles(2, stride=96)[0], "ref")
    h = write_tiles(root / "H", stripe_tiles(1, stride=64)[0], "hold")
    s = write_tiles(root / "S", stripe_tiles(0, stride=96)[0], "new")
    rng = np.random.default_rng(0)
    noise = write_tiles(root / "N", [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(len(s))], "noise")
    return {"root": root, "T": t, "H": h, "S": s, "noise": noise}


def _numbers_only(value, where="fidelity"):
    if isinstance(value, dict):
        for k, v in value.items():
            _numbers_only(v, f"{where}.{k}")
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} = {value!r}"


def test_figures_reach_every_output_and_do_not_gate_by_default(sets):
    plain = run_audit(sets["S"], sets["T"], sets["H"], audit_cfg=AuditConfig(), out_dir=sets["root"] / "plain",
                      site=SiteFacts(feature_spaces=SPACES), identities=TWIN)
    report = json.loads(plain.json_path.read_text())
    fidelity_test = next(t for t in report["tests"] if t["name"] == "fidelity")
    assert fidelity_test["status"] == "N/A" and "not set" in fidelity_test["sentence"]  # reported, never gating
    for name, entry in report["fidelity"].items():
        assert entry["sizes"]["compared"] == min(len(sets["S"]), len(sets["H"]))
        assert entry["fd"]["S->T"]["value"] > 0 and entry["fd"]["H->T"]["value"] > 0
        ratio = entry["fd"]["ratio"]
        assert ratio["value"] == pytest.approx(entry["fd"]["S->T"]["value"] / entry["fd"]["H->T"]["value"])
        for figure in ("precision", "recall", "density", "coverage"):
            assert set(entry[figure]) == {"S", "H"} and entry[figure]["S"]["value"] is not None
        assert "S->T" in entry and "H->T" in entry  # the nearest-neighbour percentiles stay
    assert report["fidelity"]["colour spread"]["dim"] == 12

    summary = json.loads(plain.summary_path.read_text())
    assert set(summary["fidelity"]) == set(SPACES)
    _numbers_only(summary["fidelity"])
    assert summary["fidelity"]["mean colour"]["fd"]["ratio"] == report["fidelity"]["mean colour"]["fd"]["ratio"]
    from pixcell_fed.bundle.shareable import validate_shareable_audit

    validate_shareable_audit(summary)

    page = plain.report_path.read_text()
    assert 'id="fidelity"' in page and "FD ratio S / H" in page and "Coverage" in page and "colour spread" in page
    assert "untrained twin" in page and "do not gate" in page

    # the same data with a threshold no ratio reaches: a PASS test that leaves the verdict as it was
    lenient = run_audit(sets["S"], sets["T"], sets["H"], audit_cfg=AuditConfig(fidelity_warn_fd_ratio=1000.0),
                        out_dir=sets["root"] / "lenient", site=SiteFacts(feature_spaces=SPACES))
    tests = {t.name: t for t in lenient.tests}
    assert tests["fidelity"].status == "PASS" and lenient.verdict == plain.verdict


def test_a_set_far_from_real_tissue_warns_when_a_threshold_is_set(sets):
    cfg = AuditConfig(fidelity_warn_fd_ratio=1.5)
    result = run_audit(sets["noise"], sets["T"], sets["H"], audit_cfg=cfg, out_dir=sets["root"] / "noise",
                       site=SiteFacts(feature_spaces=SPACES))
    test = next(t for t in result.tests if t.name == "fidelity")
    assert test.status == "WARN" and test.gates and result.verdict in ("WARN", "FAIL")
    assert set(test.statistic["statuses"].values()) == {"WARN"}
    assert "1.5" in test.sentence and "mean colour" in test.sentence
    report = json.loads(result.json_path.read_text())
    assert report["rounds"][-1]["tests"]["fidelity"] == "WARN"
    assert report["fidelity"]["mean colour"]["precision"]["S"]["value"] == 0.0
    assert report["provenance"]["fidelity_warn_fd_ratio"]
    assert "wholly above 1.5" in result.report_path.read_text()


def test_threshold_below_one_is_a_config_error():
    from pixcell_fed.config.loader import build_dataclass
    from pixcell_fed.errors import ConfigError

    with pytest.raises(ConfigError, match="fidelity_warn_fd_ratio"):
        build_dataclass(AuditConfig, {"fidelity_warn_fd_ratio": 0.5})
    assert build_dataclass(AuditConfig, {"fidelity_warn_fd_ratio": 2}).fidelity_warn_fd_ratio == 2.0

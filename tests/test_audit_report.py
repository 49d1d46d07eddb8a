"""Gate verdicts, the JSON reports (on-site and shareable) and the HTML report rendered in headless Chromium."""

from __future__ import annotations

import json
import subprocess

import cv2
import numpy as np
import pytest

from pixcell_fed.audit.run import run_audit
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.errors import AuditError
from pixcell_fed.testing.audit_tiles import COPY_TRANSFORMS, stripe_tiles, write_tiles

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_report")
    t_tiles = stripe_tiles(2, stride=128)[0]
    t = write_tiles(root / "T", t_tiles, "ref")
    h = write_tiles(root / "H", stripe_tiles(1, stride=64)[0], "hold")
    new = write_tiles(root / "S", stripe_tiles(0, stride=128)[0], "new")
    copy = write_tiles(root / "C", [COPY_TRANSFORMS["jpeg70"](t_tiles[5], np.random.default_rng(0))], "syn-copy")
    return {"root": root, "T": t, "H": h, "new": new, "copy": copy[0]}


def _mean_colour(images: np.ndarray) -> np.ndarray:  # a stand-in encoder for the fidelity section
    return images.reshape(len(images), -1, 3).mean(1).astype(np.float32)


@pytest.fixture(scope="module")
def clean(sets):
    ident = {"generator": {"name": "tiny-twin", "transformer_sha256": "ab" * 32},
             "conditioning_encoder": {"name": "uni2-h-twin", "weights_sha256": "cd" * 32}}
    mapping = {p.name: sets["T"][i % len(sets["T"])].name for i, p in enumerate(sets["new"])}
    return run_audit(sets["new"], sets["T"], sets["H"], source_of=mapping, audit_cfg=AuditConfig(),
                     out_dir=sets["root"] / "clean", identities=ident,
                     extra_feature_spaces={"mean-colour": _mean_colour})


def test_clean_set_passes_or_warns_and_every_test_has_its_fields(clean, sets):
    assert clean.verdict in ("PASS", "WARN")
    report = json.loads(clean.json_path.read_text())
    assert report["verdict"] == clean.verdict
    assert report["sizes"] == {"S": len(sets["new"]), "T": len(sets["T"]), "H": len(sets["H"]),
                               "S_kept": len(sets["new"]), "mapping": True}
    names = {t["name"]: t for t in report["tests"]}
    assert set(names) == {"copy_detection", "paired", "outliers", "replication", "dcr", "authenticity",
                          "membership_inference", "identifiers"}
    assert names["copy_detection"]["status"] == "PASS" and names["paired"]["status"] == "PASS"
    for test in report["tests"]:
        assert {"status", "statistic", "thresholds", "provenance", "sentence"} <= set(test)
        assert all(test["provenance"][k] for k in test["thresholds"])
    tile = report["tiles"][0]
    assert {"file", "sha256", "flagged", "reasons", "nearest_similarity"} <= set(tile)
    assert report["identities"]["conditioning_encoder"]["weights_sha256"] == "cd" * 32
    assert report["fidelity"]["mean-colour"]["dim"] == 3 and "paired" in report["fidelity"]["mean-colour"]
    assert 0.0 <= names["membership_inference"]["statistic"]["auc"] <= 1.0


def test_shareable_summary_has_no_real_names_paths_or_tiles(clean, sets):
    text = clean.summary_path.read_text()
    summary = json.loads(text)
    assert summary["verdict"] == clean.verdict
    assert str(sets["root"]) not in text and "ref0" not in text and "hold0" not in text and "new0" not in text
    assert all(set(t) == {"sha256", "kept", "flagged", "reasons", "nearest_similarity"} for t in summary["tiles"])
    assert sorted(summary["kept_sha256"]) == summary["kept_sha256"] and len(summary["kept_sha256"]) == len(sets["new"])
    assert "closest_pairs" not in summary and "data:image" not in text
    from pixcell_fed.bundle.shareable import validate_shareable_audit

    validate_shareable_audit(summary)  # the bundle's allow-list accepts it as is


def test_summary_refuses_to_carry_a_real_path(sets):
    with pytest.raises(AuditError, match="shareable audit summary"):
        run_audit(sets["new"][:5], sets["T"], sets["H"], out_dir=sets["root"] / "leak",
                  identities={"encoder": {"weights_dir": str(sets["T"][0].parent)}})


def test_a_copy_fails_without_dropping_and_dropping_it_passes(sets):
    synthetic = sets["new"] + [sets["copy"]]
    failed = run_audit(synthetic, sets["T"], sets["H"], audit_cfg=AuditConfig(drop_flagged=False),
                       out_dir=sets["root"] / "nodrop")
    assert failed.verdict == "FAIL"
    tile = next(t for t in failed.report["tiles"] if t["file"] == str(sets["copy"]))
    assert "copy" in tile["reasons"] and tile["pixel_match"] == str(sets["T"][5])
    dropped = run_audit(synthetic, sets["T"], sets["H"], audit_cfg=AuditConfig(drop_flagged=True, max_rounds=2),
                        out_dir=sets["root"] / "drop")
    assert dropped.verdict == "PASS", dropped.report["tests"]
    assert sets["copy"] not in dropped.kept and len(dropped.kept) == len(sets["new"])
    assert [r["verdict"] for r in dropped.report["rounds"]] == ["FAIL", "PASS"]
    summary = json.loads(dropped.summary_path.read_text())
    assert len(summary["kept_sha256"]) == len(sets["new"])


def test_paired_check_catches_a_copy_of_its_own_source(sets):
    mapping = {sets["copy"].name: sets["T"][5].name}
    res = run_audit([sets["copy"]] + sets["new"][:10], sets["T"], sets["H"], source_of=mapping,
                    audit_cfg=AuditConfig(drop_flagged=False), out_dir=sets["root"] / "paired")
    tile = next(t for t in res.report["tiles"] if t["file"] == str(sets["copy"]))
    assert "paired_copy" in tile["reasons"]
    assert next(t for t in res.tests if t.name == "paired").status == "FAIL"


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(clean, tmp_path):
    html = clean.report_path.read_text()
    assert "<svg" in html and "data:image/png;base64," in html
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}"]
    url = clean.report_path.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"Verdict: {clean.verdict}" in dom.stdout and "The audit passed" in dom.stdout
    assert 'class="figure-hist"' in dom.stdout and 'class="figure-roc"' in dom.stdout
    assert dom.stdout.count('alt="nearest real"') >= 3 and 'id="percentiles"' in dom.stdout
    shot = tmp_path / "page.png"
    run = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[0] >= 1000 and float(img.std()) > 20
    banner = np.array([0x37, 0x7F, 0x1A]) if clean.verdict == "PASS" else np.array([0x1F, 0x79, 0xB7])  # BGR
    assert (np.abs(img.astype(int) - banner).sum(axis=2) < 30).sum() > 2000  # the verdict banner was painted


def test_a_set_of_only_copies_is_dropped_entirely_and_fails_with_strict_json(sets):
    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    res = run_audit([sets["copy"]], sets["T"], sets["H"], out_dir=sets["root"] / "all-copies")
    assert res.verdict == "FAIL" and res.kept == []
    report = strict(res.json_path.read_text())
    assert report["rounds"][-1]["audited"] == 0 and report["kept_sha256"] == []
    strict(res.summary_path.read_text())
    assert "Verdict: FAIL" in res.report_path.read_text()

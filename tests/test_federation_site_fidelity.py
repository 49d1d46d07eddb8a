"""Each site's fidelity figures in the consortium report: read from the pooled bundles' shareable audits, every
value checked before it is shown, names kept only when plain, untrained twins marked."""

from __future__ import annotations

import json

import numpy as np

from pixcell_fed.audit.fidelity_metrics import fidelity_figures
from pixcell_fed.audit.fidelity_report import summary_section
from pixcell_fed.federation.site_fidelity import audit_fidelity, fidelity_section_html, pooled_fidelity


def _summary():
    rng = np.random.default_rng(0)
    figures = fidelity_figures(rng.normal(1.0, size=(30, 4)), rng.normal(size=(40, 4)), rng.normal(size=(30, 4)),
                               fd_bootstrap=20, count_bootstrap=50)
    return {"verdict": "PASS", "fidelity": summary_section({"conditioning encoder uni2-h": figures})}, figures


def test_figures_of_a_shareable_audit_are_read_back():
    summary, figures = _summary()
    read = audit_fidelity(json.loads(json.dumps(summary)))["conditioning encoder uni2-h"]
    assert read["fd"]["ratio"] == figures["fd"]["ratio"] and read["compared"] == 30
    for name in ("precision", "recall", "density", "coverage"):
        assert read[name]["S"] == figures[name]["S"] and read[name]["H"] == figures[name]["H"]


def test_forged_values_and_names_are_dropped():
    summary, _ = _summary()
    entry = summary["fidelity"]["conditioning encoder uni2-h"]
    forged = {"<script>alert(1)</script>": {**entry, "precision": {"S": {"value": 1.5}, "H": {"value": "high"}},
                                            "fd": {"ratio": {"value": -2.0}, "S->T": {"value": float("inf")}}},
              "plain": "not a mapping"}
    read = audit_fidelity({"fidelity": forged})
    assert list(read) == ["space 1"]  # an unplain name is replaced; a non-mapping entry is dropped
    space = read["space 1"]
    assert space["precision"] == {"S": None, "H": None} and space["fd"]["ratio"] is None and space["fd"]["S->T"] is None
    assert space["coverage"]["S"] is not None  # the valid figures stay
    assert audit_fidelity({"fidelity": ["x"]}) == {} and audit_fidelity("junk") == {}


def test_pooled_sites_and_the_report_section(tmp_path):
    summary, _ = _summary()
    bundle = tmp_path / "pool" / "bundles" / "hospital-a" / "run-1"
    bundle.mkdir(parents=True)
    (bundle / "audit.json").write_text(json.dumps(summary))
    sites = {"hospital-a": {"status": "complete", "run_id": "run-1"},
             "hospital-b": {"status": "missing", "run_id": None},
             "hospital-c": {"status": "complete", "run_id": "run-9"}}  # its audit is not there: no figures
    by_site = pooled_fidelity(tmp_path / "pool", sites)
    assert set(by_site) == {"hospital-a", "hospital-c"} and by_site["hospital-c"] == {}
    html = fidelity_section_html(by_site, ["hospital-a"])
    assert "Fidelity of each site&#x27;s synthetic set" in html or "Fidelity of each site's synthetic set" in html
    assert "hospital-a: untrained twin models" in html and "FD ratio S / H" in html and "Coverage S" in html
    assert "no fidelity figures in its audit" in html
    assert fidelity_section_html({}, []) == ""

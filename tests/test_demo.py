"""The README's main command: the demo consortium, end to end, and a second run that reuses what the first made.

The demo takes the real slide from the local cache (or ``--slide``) and never reaches the network for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from import_graph import import_graph, reachable

from pixcell_fed.demo.consortium import DP_SITE
from pixcell_fed.testing.real_slide import real_slide_path

#: Any pip run inside the demo fails at once: no index, and an index URL nothing listens on.
NO_REGISTRY = {"PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": ""}


def demo(out: Path, *args: str, cache: Path, timeout: float = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1", "PIXCELL_FED_CACHE": str(cache), **NO_REGISTRY}
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def runs(out: Path) -> dict[str, list[str]]:
    return {site.name: sorted(p.name for p in (site / "work" / "runs").iterdir() if p.is_dir())
            for site in sorted((out / "sites").iterdir())}


def test_demo_code_does_not_import_the_test_material():
    graph = import_graph()
    for module in (m for m in graph if m.startswith(("pixcell_fed.demo", "coordinator.commands.demo"))):
        leaks = sorted(m for m in reachable(graph, module) if m.startswith("pixcell_fed.testing"))
        assert not leaks, f"{module} imports {leaks}"


def test_without_a_cached_slide_the_demo_stops_at_once_and_says_what_to_do(tmp_path):
    result = demo(tmp_path / "demo", cache=tmp_path / "empty-cache", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "CMU-1-Small-Region.svs is not in the local cache" in result.stderr
    assert "scripts/setup.sh" in result.stderr and "--slide" in result.stderr
    assert "pip" not in result.stderr and not (tmp_path / "demo" / "models").exists()  # stopped before any work

    wrong = tmp_path / "other.svs"
    wrong.write_bytes(b"II*\x00 not the slide")
    result = demo(tmp_path / "demo", "--slide", str(wrong), cache=tmp_path / "empty-cache", timeout=120)
    assert result.returncode == 2 and "is not CMU-1-Small-Region.svs" in result.stderr


def _eval_counts(site: Path) -> dict[str, int]:
    """Real held-out tiles per label in the site's run: what the site evaluates the shared model on."""
    (run,) = [p for p in (site / "work" / "runs").iterdir() if p.is_dir()]
    return {label.name: len(list(label.glob("*.png"))) for label in sorted((run / "eval").iterdir())}


def _recall_sums(accuracy: float, balanced: float, counts: list[int]) -> bool:
    """Whether some numbers of correct tiles per class give both this accuracy and this balanced accuracy, as the
    site rounds them (``federation.evaluation.round_digits``, the demo sites keep the default)."""
    from pixcell_fed.config.schema import FederationEvaluationConfig

    tolerance = 0.5 * 10.0 ** -FederationEvaluationConfig().round_digits + 1e-9
    n = sum(counts)
    (n0, n1) = counts
    return any(abs((k0 + k1) / n - accuracy) < tolerance and abs((k0 / n0 + k1 / n1) / 2 - balanced) < tolerance
               for k0 in range(n0 + 1) for k1 in range(n1 + 1))


@pytest.mark.slow
def test_demo_consortium_runs_end_to_end_offline_and_reuses_its_set_up(tmp_path):
    out = tmp_path / "demo"
    slide = real_slide_path()
    first = demo(out, "--slide", str(slide), cache=tmp_path / "empty-cache")  # no cached slide, no registry
    assert first.returncode == 0, first.stderr[-4000:]
    assert "UNTRAINED twins" in first.stdout
    report = json.loads((out / "coordinator" / "work" / "report" / "report.json").read_text())
    pool = report["pool"]
    assert pool["complete"] == ["hospital-a", "hospital-b", "hospital-c"] and pool["missing"] == []
    for site, status in pool["sites"].items():
        site_dir = out / "sites" / site
        (audit,) = (site_dir / "work" / "runs").glob("*/audit/audit.json")
        assert status["generator"] == "untrained twin"
        assert status["audit_verdict"] == json.loads(audit.read_text())["verdict"]  # what the site's audit said
        bundled = len(list((site_dir / "work" / "runs").glob("*/bundle/tiles/*.png")))
        assert status["n_received"] == status["n_tiles"] == bundled > 0
        metrics, counts = report["evaluation"][site], _eval_counts(site_dir)
        assert sorted(counts) == ["normal", "tumour"] and all(counts.values())  # both classes held out
        assert metrics["n"] == sum(counts.values())  # a site answers aggregate metrics and n only
        assert _recall_sums(metrics["accuracy"], metrics["balanced_accuracy"], list(counts.values()))
    page = (out / "coordinator" / "work" / "report" / "report.html").read_text()
    assert "untrained twin" in page
    # the leaking hospital: its memorising twin's set FAILED the audit, synthesize exited 3, no bundle was built
    leaking = out / "sites" / "hospital-d"
    commands = (out / "logs" / "demo-commands.log").read_text()
    assert "$ leaking-site-agent synthesize" in commands
    assert commands.split("$ leaking-site-agent synthesize", 1)[1].split("\n$ ", 1)[0].rstrip().endswith("[exit 3]")
    assert not list((leaking / "work" / "runs").glob("*/bundle")) and "hospital-d" not in pool["sites"]
    (failed,) = (leaking / "work" / "runs").glob("*/audit/audit.json")
    assert json.loads(failed.read_text())["verdict"] == "FAIL" and "memorising twin" in failed.read_text()
    import pandas as pd

    pooled = pd.read_parquet(out / "coordinator" / "work" / "pool" / "pool.parquet")
    assert sorted(set(pooled["site"])) == ["hospital-a", "hospital-b", "hospital-c"]  # absent from the pool
    # ... and listed as refused in the report, with the audit's reason, from the notice the site chose to send
    refused = report["refusals"]["sites"]["hospital-d"]
    assert refused["verdict"] == "FAIL" and refused["generator"] == "memorising twin" and refused["reasons"]
    assert "Refused by their own audit" in page and "hospital-d" in page and not report["refusals"]["ignored"]
    summary = [line for line in first.stdout.splitlines() if line.strip().startswith("hospital-d:")]
    assert len(summary) == 1 and "exited 3" in summary[0] and "refused" in summary[0]
    assert Path(summary[0].rsplit(" ", 1)[1]) == failed.with_name("audit.html")
    trail = [json.loads(t) for t in (leaking / "work" / "audit_trail.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("verdict")) for e in trail][:2] == [("synthesize", "FAIL"), ("refusal_notice", None)]
    # what each other site shared, at a glance: a montage of its pooled tiles with its label counts
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        montage = report["montage"][site]
        assert montage["shown"] > 0 and montage["png_base64"] and f"id='montage-{site}'" in page
        assert sum(montage["label_counts"].values()) == montage["n_tiles"] == pool["sites"][site]["n_tiles"]
        assert montage["audit"]["verdict"] == pool["sites"][site]["audit_verdict"]
    assert "hospital-d" not in report["montage"]
    if any(s["audit_verdict"] == "INCONCLUSIVE" for s in pool["sites"].values()):
        assert "audit INCONCLUSIVE because a demo site is too small" in first.stdout
    consortium_page = (out / "coordinator" / "work" / "report" / "report.html").read_text()
    assert "untrained twin" in consortium_page
    # the dp hospital's guarantee, as its signed bundle states it, in its audit report and the consortium report
    dp_site = out / "sites" / DP_SITE
    (dp_bundle,) = (dp_site / "work" / "runs").glob("*/bundle/bundle.json")
    claim = json.loads(dp_bundle.read_text())["conditioning"]
    assert claim["mode"] == "dp" and pool["sites"][DP_SITE]["conditioning"] == claim
    assert f"per tile epsilon 8, per slide epsilon {claim['slide_epsilon']:.3g}" in consortium_page
    (dp_page,) = (dp_site / "work" / "runs").glob("*/audit/audit.html")
    assert "Conditioning privacy: dp" in dp_page.read_text() and "Not covered by the guarantee" in dp_page.read_text()
    assert pool["sites"]["hospital-a"]["conditioning"]["mode"] == "exact"
    # fidelity per site (from each signed audit; a dp set's shareable summary carries none: its figures use T's
    # statistics, outside the guarantee) and what the pool adds where a site allows it (hospital-a)
    assert set(report["fidelity"]) == set(pool["complete"]) and report["fidelity"][DP_SITE] == {}
    for site in pool["complete"]:
        (audit_page,) = (out / "sites" / site / "work" / "runs").glob("*/audit/audit.html")
        assert 'id="fidelity"' in audit_page.read_text() and "untrained twin" in audit_page.read_text()
        if site != DP_SITE:
            (space,) = report["fidelity"][site].values()
            assert space["fd"]["ratio"]["value"] > 0 and space["coverage"]["S"] is not None
    augmentation = report["augmentation"]
    assert augmentation["hospital-b"] == augmentation["hospital-c"] == {"status": "not-allowed"}
    assert augmentation["hospital-a"]["status"] == "done" and augmentation["hospital-a"]["epochs"] == 2
    assert "Fidelity of each site" in consortium_page and "What the pool adds at each site" in consortium_page
    for line in first.stdout.splitlines():
        if "audit report" in line or "consortium report" in line:
            assert Path(line.rsplit(" ", 1)[1]).is_file(), line
    # the site audit trails hold synthesize and approve, chained
    trail = (out / "sites" / "hospital-a" / "work" / "audit_trail.jsonl").read_text().splitlines()
    assert [json.loads(t)["event"] for t in trail][:2] == ["synthesize", "approve"]

    before = runs(out)
    bundle = next((out / "sites" / "hospital-a" / "work" / "runs").glob("*/bundle/bundle.json"))
    stamp = bundle.stat().st_mtime_ns
    second = demo(out, cache=tmp_path / "empty-cache")  # every slide is written: the real slide is not needed
    assert second.returncode == 0, second.stderr[-4000:]
    assert runs(out) == before, "a second demo run must continue the same site runs, not start new ones"
    assert bundle.stat().st_mtime_ns == stamp

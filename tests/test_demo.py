"""The README's main command: the demo consortium, end to end, and a second run that reuses what the first made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=1500)


def runs(out: Path) -> dict[str, list[str]]:
    return {site.name: sorted(p.name for p in (site / "work" / "runs").iterdir() if p.is_dir())
            for site in sorted((out / "sites").iterdir())}


def test_demo_consortium_runs_end_to_end_and_reuses_its_set_up(tmp_path):
    out = tmp_path / "demo"
    first = demo(out)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "UNTRAINED twins" in first.stdout
    report = json.loads((out / "coordinator" / "work" / "report" / "report.json").read_text())
    pool = report["pool"]
    assert pool["complete"] == ["hospital-a", "hospital-b", "hospital-c"] and pool["missing"] == []
    for site, status in pool["sites"].items():
        assert status["generator"] == "untrained twin" and status["audit_verdict"] in ("PASS", "WARN")
        assert status["n_received"] == status["n_tiles"] > 0
        metrics = report["evaluation"][site]
        assert metrics["n"] > 0 and 0 <= metrics["balanced_accuracy"] <= 1
    assert "untrained twin" in (out / "coordinator" / "work" / "report" / "report.html").read_text()
    for line in first.stdout.splitlines():
        if "audit report" in line or "consortium report" in line:
            assert Path(line.rsplit(" ", 1)[1]).is_file(), line
    # the site audit trails hold synthesize and approve, chained
    trail = (out / "sites" / "hospital-a" / "work" / "audit_trail.jsonl").read_text().splitlines()
    assert [json.loads(t)["event"] for t in trail][:2] == ["synthesize", "approve"]

    before = runs(out)
    bundle = next((out / "sites" / "hospital-a" / "work" / "runs").glob("*/bundle/bundle.json"))
    stamp = bundle.stat().st_mtime_ns
    second = demo(out)
    assert second.returncode == 0, second.stderr[-4000:]
    assert runs(out) == before, "a second demo run must continue the same site runs, not start new ones"
    assert bundle.stat().st_mtime_ns == stamp

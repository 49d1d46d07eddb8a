"""The T/H split holds out whole patients (issue 20 item 4): the slide table may carry a patient (or case)
column, the split groups by it, and without it the site must choose ``split.unit: slide`` explicitly.

On the old code the split was by slide only: a patient with two slides could have one in T and one in H, which
makes H look like T and hides leaks (detection at a large site fell from 100 % to 25 % in issue 20's review).
"""

from __future__ import annotations

import pytest

from pixcell_fed.config.schema import SplitConfig
from pixcell_fed.errors import ConfigError, ExitCode
from pixcell_fed.pipeline.labels import load_slide_table
from pixcell_fed.pipeline.split import check_split_unit, split_by_unit


def _table(tmp_path, text):
    path = tmp_path / "slides.csv"
    path.write_text(text)
    return load_slide_table(path), path


def test_the_slide_table_reads_labels_and_patients_or_cases(tmp_path):
    table, _ = _table(tmp_path, "slide,label,patient\na.svs,tumour,P1\nb.svs,normal,P1\nc.svs,tumour,P2\n")
    assert table.labels == {"a.svs": "tumour", "b.svs": "normal", "c.svs": "tumour"}
    assert table.patients == {"a.svs": "P1", "b.svs": "P1", "c.svs": "P2"}
    table, _ = _table(tmp_path, "slide,case\na.svs,C-7\n")
    assert table.patients == {"a.svs": "C-7"} and table.labels == {}


@pytest.mark.parametrize("text, message", [
    ("slide,label,patient\na.svs,tumour,P1\na.svs,tumour,P2\n", "two patients"),
    ("slide,label,patient\na.svs,tumour,\n", "empty value"),
    ("slide,patient,case\na.svs,P1,C1\n", "header"),
    ("slide,label,ward\na.svs,tumour,W1\n", "header"),
    ("slide\na.svs\n", "header"),
])
def test_bad_slide_tables_are_refused_naming_the_line_or_header(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _table(tmp_path, text)


def test_the_split_holds_out_whole_patients_and_is_stratified_by_class():
    rows = {f"k{i:02d}": (f"s{i:02d}.svs", f"P{i // 3}", "tumour" if (i // 3) % 2 else "normal") for i in range(24)}
    from pixcell_fed.pipeline.labels import SlideTable

    table = SlideTable({f: lab for f, _, lab in rows.values()}, {f: pat for f, pat, _ in rows.values()})
    slide_of = {k: f for k, (f, _, _) in rows.items()}
    t, h = split_by_unit(slide_of, table, SplitConfig(holdout_fraction=0.34, seed=1))
    patients = {k: rows[k][1] for k in rows}
    assert set(t).isdisjoint(h) and sorted(t + h) == sorted(rows)
    assert {patients[k] for k in t}.isdisjoint({patients[k] for k in h})  # no patient on both sides
    assert {rows[k][2] for k in h} == {"tumour", "normal"}  # H covers the classes
    assert split_by_unit(slide_of, table, SplitConfig(holdout_fraction=0.34, seed=1)) == (t, h)
    mixed = [split_by_unit(slide_of, table, SplitConfig(holdout_fraction=0.34, seed=s, unit="slide")) for s in range(5)]
    assert any({patients[k] for k in a} & {patients[k] for k in b} for a, b in mixed)  # what the slide unit risks


def test_a_patient_split_without_patients_is_refused_with_the_way_out(tmp_path):
    table, path = _table(tmp_path, "slide,label\na.svs,tumour\n")
    with pytest.raises(ConfigError, match="no patient column") as info:
        check_split_unit(SplitConfig(), table, path)
    assert "split.unit: slide" in info.value.hint and info.value.exit_code == ExitCode.USAGE
    check_split_unit(SplitConfig(unit="slide"), table, path)
    with pytest.raises(ConfigError, match="site.labels_csv is not set"):
        check_split_unit(SplitConfig(), load_slide_table(None), None)
    with pytest.raises(ValueError):
        SplitConfig(unit="tile")


def test_patient_identifiers_are_forbidden_in_shipped_files(tmp_path):
    from pixcell_fed.pipeline.synthesize import _identifying_strings

    (tmp_path / "slides").mkdir()
    strings = _identifying_strings(tmp_path / "slides", [], ["PATIENT-0042", "P1"])
    assert "PATIENT-0042" in strings and "P1" not in strings  # under 4 characters would match anything


def test_synthesize_holds_out_whole_patients_and_refuses_a_patient_split_without_patients(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import pandas as pd
    import yaml

    from pixcell_fed.testing.sites import SlideSpec, make_site, write_twin_models

    def synthesize(site_yaml):
        env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1"}
        return subprocess.run([sys.executable, "-m", "site_agent.cli", "synthesize", "--config", str(site_yaml)],
                              capture_output=True, text=True, env=env, timeout=900)

    models = write_twin_models(tmp_path / "models")
    specs = [SlideSpec(f"scan-{i}.svs", seed=i) for i in range(4)]
    site_yaml = make_site(tmp_path / "site", name="site-p", models=models, slides=specs, config={
        "synthesis": {"max_conditioning_tiles": 4, "steps": 2}, "split": {"unit": "patient", "holdout_fraction": 0.5}})
    refused = synthesize(site_yaml)
    assert refused.returncode == ExitCode.USAGE and "no patient column" in refused.stderr
    assert not (tmp_path / "site" / "work" / "runs").exists() or not any((tmp_path / "site" / "work" / "runs").iterdir())

    (tmp_path / "site" / "slides.csv").write_text("slide,patient\nscan-0.svs,PAT-A1\nscan-1.svs,PAT-A1\n"
                                                  "scan-2.svs,PAT-B2\nscan-3.svs,PAT-B2\n")
    config = yaml.safe_load(site_yaml.read_text())
    config["site"]["labels_csv"] = "slides.csv"
    site_yaml.write_text(yaml.safe_dump(config))
    done = synthesize(site_yaml)
    assert done.returncode == ExitCode.OK, done.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "site" / "work" / "runs").iterdir() if p.is_dir()]
    split = json.loads((run / "split.json").read_text())
    tiles = pd.read_parquet(run / "tiles" / "tiles.parquet")
    patient = {"scan-0.svs": "A", "scan-1.svs": "A", "scan-2.svs": "B", "scan-3.svs": "B"}
    side = {patient[f]: ("T" if k in split["conditioning"] else "H") for k, f in zip(tiles["slide_key"], tiles["slide_file"])}
    assert split["unit"] == "patient" and sorted(side.values()) == ["H", "T"]  # each patient wholly on one side
    audit = json.loads((run / "audit" / "audit.json").read_text())
    assert audit["statistics"]["split_unit"] == "patient"
    assert 'id="split-warning"' not in (run / "audit" / "audit.html").read_text()
    assert "PAT-A1" not in (run / "bundle" / "audit.json").read_text()

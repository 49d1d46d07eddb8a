"""``site-agent synthesize`` end to end on real H&E pixels and tiny twins: bundle, resume, lock, labels, privacy."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coordinator.cli import main as coordinator
from pixcell_fed.atomic import folder_lock
from pixcell_fed.errors import ExitCode
from pixcell_fed.testing.sites import SlideSpec, make_site, write_twin_models

MARKERS = ("ZZMARKERNAME", "PATIENTDOE4711", "MRN-99887766", "BARCODE-QX42", "MACROTEXT-77")
FAST = {"synthesis": {"max_conditioning_tiles": 6, "steps": 3}, "split": {"holdout_fraction": 0.34}}


def site_agent(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "site_agent.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def slides(prefix: str = "") -> list[SlideSpec]:
    fields = {"Filename": f"{MARKERS[0]}_scan", "User": MARKERS[1], "Barcode": MARKERS[2]}
    return [SlideSpec(f"{prefix}{MARKERS[0]}-{i}.svs", label="tumour" if i % 2 else "normal", seed=i,
                      description_fields=fields, label_text=MARKERS[3], macro_text=MARKERS[4]) for i in range(3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_twin_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def finished_site(tmp_path_factory, models):
    folder = tmp_path_factory.mktemp("site")
    site_yaml = make_site(folder, name="site-a", models=models, slides=slides(), config=FAST)
    proc = site_agent("synthesize", "--config", str(site_yaml))
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    return folder, site_yaml, proc


def synthetic_set(folder: Path) -> dict[str, str]:
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run / "synthetic").glob("*.png")}


def test_synthesize_builds_a_bundle_awaiting_approval(finished_site):
    folder, site_yaml, proc = finished_site
    assert "awaiting" in proc.stdout and "audit verdict" in proc.stdout
    assert "UNTRAINED twins" in proc.stdout
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    for name in ("config.resolved.json", "versions.json", "run.log", "audit/audit.html", "audit/audit.json",
                 "bundle/bundle.json", "bundle/manifest.parquet", "bundle/audit_summary.html"):
        assert (run / name).is_file(), name
    page = (run / "bundle" / "audit_summary.html").read_bytes()  # the audit's shareable page, as the audit wrote it
    assert page == (run / "audit" / "audit_summary.html").read_bytes() and b"Verdict: " in page
    assert json.loads((run / "bundle" / "bundle.json").read_text())["files"]["audit_summary.html"] == \
        hashlib.sha256(page).hexdigest()
    status = site_agent("status", "--config", str(site_yaml), "--format", "json")
    assert status.returncode == 0, status.stderr
    (listed,) = json.loads(status.stdout)["runs"]
    assert listed["run_state"] == "finished" and listed["bundle_state"] == "awaiting_approval"
    audit = json.loads((run / "audit" / "audit.json").read_text())
    fidelity = audit["fidelity"]["conditioning encoder uni2-h-twin"]  # the conditioning space, reported as fidelity
    assert set(fidelity) >= {"S->T", "H->T", "paired"}
    shared = json.loads((run / "bundle" / "audit.json").read_text())
    assert "conditioning encoder uni2-h-twin" in json.dumps(shared)  # fidelity figures are shareable
    trail = (folder / "work" / "audit_trail.jsonl").read_text()
    assert '"event":"synthesize"' in trail.replace(" ", "")


def test_synthetic_tiles_inherit_their_slide_label(finished_site):
    folder, _, _ = finished_site
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    table = pd.read_parquet(run / "synthetic.parquet")
    tiles = pd.read_parquet(run / "tiles" / "tiles.parquet").set_index("tile_id")
    expected = {f"{MARKERS[0]}-{i}.svs": ("tumour" if i % 2 else "normal") for i in range(3)}
    for _, row in table.iterrows():
        assert row["label"] == expected[tiles.loc[row["source_tile_id"], "slide_file"]]
    manifest = pd.read_parquet(run / "bundle" / "manifest.parquet")
    assert set(manifest["label"]) <= {"tumour", "normal"} and manifest["label"].notna().all()


def test_nothing_identifying_reaches_the_approved_bundle(finished_site, tmp_path, models):
    folder, site_yaml, _ = finished_site
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    assert site_agent("officer-key", "--out", str(tmp_path)).returncode == 0
    key = tmp_path / "officer.key"
    officers = {"keys": {"officers": [(tmp_path / "officer.pub").read_text().strip()]}}  # listed in site.yaml
    make_site(folder, name="site-a", models=models, slides=[], config=officers)
    approve = site_agent("approve", str(run / "bundle"), "--key", str(key), "--config", str(site_yaml), "--yes")
    assert approve.returncode == 0, approve.stderr
    trust = tmp_path / "trust.yaml"  # the consortium lists the site's key and its officer's
    site_key = (folder / "keys" / "site_signing.pub").read_text().strip()
    trust.write_text(f"sites:\n  site-a:\n    signing_key: {site_key}\n    officers:\n"
                     f"      - {officers['keys']['officers'][0]}\n")
    assert coordinator(["verify", str(run / "bundle"), "--trust", str(trust)]) == 0  # summary page included
    # every byte of the shipped bundle: no marker, no slide name or folder, no embedding
    needles = [m.encode() for m in MARKERS] + [str(folder).encode(), b"tiles.parquet", b".svs"]
    emb_rows = []
    for path in (run / "embeddings").rglob("shard-*.npz"):
        with np.load(path) as shard:
            emb_rows += [row.astype(np.float32).tobytes()[:16] for row in shard["embeddings"]]
    assert emb_rows, "the embedding cache should hold the conditioning embeddings"
    files = [p for p in (run / "bundle").rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files)
    for path in files:
        data = path.read_bytes()
        low = data.lower()
        for needle in needles:
            assert needle.lower() not in low, f"{needle!r} found in {path.name}"
        for row in emb_rows:
            assert row not in data, f"an embedding row was found in {path.name}"


@pytest.mark.slow
def test_rerun_reuses_everything_and_second_site_reproduces_the_set(finished_site, tmp_path, models):
    folder, site_yaml, _ = finished_site
    before = synthetic_set(folder)
    again = site_agent("synthesize", "--config", str(site_yaml))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "generating" not in again.stderr  # nothing regenerated
    assert synthetic_set(folder) == before
    other = make_site(tmp_path / "copy", name="site-a", models=models, slides=slides(), config=FAST)
    assert site_agent("synthesize", "--config", str(other)).returncode == 0
    assert synthetic_set(tmp_path / "copy") == before


def test_sigkill_midway_then_rerun_loses_and_duplicates_nothing(finished_site, tmp_path, models):
    folder, _, _ = finished_site
    reference = synthetic_set(folder)
    site_yaml = make_site(tmp_path / "killed", name="site-a", models=models, slides=slides(), config=FAST)
    env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "site_agent.cli", "synthesize", "--config", str(site_yaml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    runs = tmp_path / "killed" / "work" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(runs.glob("*/synthetic/*.png")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = site_agent("synthesize", "--config", str(site_yaml))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert synthetic_set(tmp_path / "killed") == reference
    assert not list((tmp_path / "killed").rglob("*.tmp"))


def test_a_second_run_on_the_same_site_is_refused(finished_site):
    folder, site_yaml, _ = finished_site
    with folder_lock(folder / "work"):
        proc = site_agent("synthesize", "--config", str(site_yaml))
    assert proc.returncode == ExitCode.USAGE
    assert "already running" in proc.stderr


def test_a_failing_audit_exits_3_and_builds_no_bundle(tmp_path, models):
    strict = {**FAST, "audit": {"copy_similarity": 0.01, "copy_pixel_confirm": 0.01, "drop_flagged": False}}
    site_yaml = make_site(tmp_path / "strict", name="site-b", models=models, slides=slides(), config=strict)
    proc = site_agent("synthesize", "--config", str(site_yaml))
    assert proc.returncode == ExitCode.PRIVACY_REFUSED, proc.stderr[-2000:]
    assert "FAIL" in proc.stderr and "audit.html" in proc.stderr
    assert not list((tmp_path / "strict" / "work" / "runs").glob("*/bundle"))


def test_labels_csv_errors_name_the_line(tmp_path):
    from pixcell_fed.errors import ConfigError
    from pixcell_fed.pipeline.labels import check_labels_cover, load_slide_labels

    path = tmp_path / "labels.csv"
    path.write_text("slide,label\na.svs,tumour\nb.svs,../../etc\n")
    with pytest.raises(ConfigError, match=r"labels.csv:3"):
        load_slide_labels(path)
    path.write_text("file,class\na.svs,tumour\n")
    with pytest.raises(ConfigError, match="header"):
        load_slide_labels(path)
    path.write_text("slide,label\na.svs,tumour\na.svs,normal\n")
    with pytest.raises(ConfigError, match="two labels"):
        load_slide_labels(path)
    path.write_text("slide,label\na.svs,tumour\n")
    labels = load_slide_labels(path)
    assert labels == {"a.svs": "tumour"}
    with pytest.raises(ConfigError, match="no label for 1 slide"):
        check_labels_cover(labels, ["a.svs", "b.svs"], path)


def test_held_out_slides_become_the_sites_labelled_evaluation_set(finished_site):
    folder, _, _ = finished_site
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    split = json.loads((run / "split.json").read_text())
    tiles = pd.read_parquet(run / "tiles" / "tiles.parquet")
    held_out = tiles[tiles["slide_key"].isin(split["holdout"])]
    evaluated = sorted(p.stem for p in (run / "eval").rglob("*.png"))
    assert evaluated == sorted(held_out["tile_id"])
    assert not set(split["holdout"]) & set(split["conditioning"])


@pytest.fixture(scope="module")
def models_1024(tmp_path_factory):
    return write_twin_models(tmp_path_factory.mktemp("models1024"), pixcell_variant=1024)


@pytest.mark.slow
def test_pixcell_1024_site_end_to_end(tmp_path, models_1024):
    """PixCell-1024: 1024 px tiles at 20x, each conditioned by its 4x4 grid of UNI embeddings, 1024 px surrogates,
    audited and bundled like the 256 px ones."""
    from PIL import Image

    config = {**FAST, "tiling": {"tile_size": 1024}, "audit": {"min_holdout": 4}}
    specs = [SlideSpec(f"big-{i}.svs", label="tumour" if i % 2 else "normal", seed=i, size=(4096, 3072))
             for i in range(3)]
    site_yaml = make_site(tmp_path / "site", name="site-1024", models=models_1024, slides=specs, config=config)
    proc = site_agent("synthesize", "--config", str(site_yaml))
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "site" / "work" / "runs").iterdir() if p.is_dir()]
    tiles = pd.read_parquet(run / "tiles" / "tiles.parquet")
    assert (tiles["tile_size"] == 1024).all() and (tiles["mpp"] == 0.5).all()  # 1024 px at 20x
    synthetic = sorted((run / "synthetic").glob("*.png"))
    assert len(synthetic) == 6 and all(Image.open(p).size == (1024, 1024) for p in synthetic)
    audit = json.loads((run / "audit" / "audit.json").read_text())
    # 6 synthetic tiles cannot show that a 5% leak is absent: no alarm, and the audit says it cannot conclude
    assert audit["verdict"] == "INCONCLUSIVE" and audit["sizes"]["S"] == 6
    assert audit["statistics"]["split_unit"] == "slide"
    assert "PixCell-1024" in json.dumps(audit["identities"])
    manifest = pd.read_parquet(run / "bundle" / "manifest.parquet")
    assert len(manifest) >= 1 and set(manifest["label"]) <= {"tumour", "normal"}


def test_a_model_for_the_other_tile_size_is_refused_before_any_work(tmp_path, models_1024):
    site_yaml = make_site(tmp_path / "site", name="site-mismatch", models=models_1024, slides=slides()[:1],
                          config=FAST)  # PixCell-1024 with the default 256 px tiles
    proc = site_agent("synthesize", "--config", str(site_yaml))
    assert proc.returncode == ExitCode.USAGE
    assert "PixCell-1024" in proc.stderr and "tiling.tile_size: 1024" in proc.stderr
    assert not (tmp_path / "site" / "work" / "runs").exists()
    doctor = site_agent("doctor", "--config", str(site_yaml))
    assert doctor.returncode != 0 and "tiling.tile_size is 256" in doctor.stdout

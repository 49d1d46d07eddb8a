"""Building a bundle: clean PNGs under random names, an allow-listed manifest and audit, nothing identifying."""

from __future__ import annotations

import json
import re
import stat

import numpy as np
import pandas as pd
import pytest

from pixcell_fed.bundle import build_bundle
from pixcell_fed.bundle.build import scan_bytes_for
from pixcell_fed.bundle.layout import read_bundle_json
from pixcell_fed.bundle.manifest import manifest_bytes, read_manifest, validate_manifest
from pixcell_fed.bundle.png import check_clean_png, clean_png_bytes, list_chunks
from pixcell_fed.bundle.shareable import validate_shareable_audit
from pixcell_fed.errors import BundleError, ExitCode, PrivacyGateRefused
from pixcell_fed.keys import generate_private_key
from pixcell_fed.testing.bundles import ENCODER, GENERATOR, audit_for, real_tile_arrays, write_tiles

MARKERS = {
    "Patient": "PAT-4471-MARKER Doe^Jane",
    "Barcode": "BARCODE-ZX81-MARKER",
    "SlideName": "CASE-2024-0815-MARKER.svs",
    "openslide.comment": "MRN 99887766 MARKER",
}


@pytest.fixture(scope="module")
def arrays():
    return real_tile_arrays(6)


def _build(tmp_path, arrays, **overrides):
    paths = write_tiles(tmp_path / "synthetic", arrays)
    kwargs = dict(site_name="site-a", run_id="run-001", tiles=paths, labels=None, generator=GENERATOR, encoder=ENCODER,
                  audit_summary=audit_for(arrays), site_key=generate_private_key())
    kwargs.update(overrides)
    return build_bundle(tmp_path / "bundle", **kwargs)


def test_bundle_layout_and_state(tmp_path, arrays):
    info = _build(tmp_path, arrays, labels=["tumor", "normal", "tumor", "tumor", "normal", "tumor"])
    root = info.path
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files[:4] == ["audit.json", "bundle.json", "manifest.parquet", "signatures/site.sig"]
    assert len([f for f in files if f.startswith("tiles/")]) == 6
    assert read_bundle_json(root)["state"] == "awaiting_approval" == info.state
    meta = read_bundle_json(root)
    assert meta["counts"] == {"tiles": 6, "labels": {"normal": 2, "tumor": 4}}
    frame = read_manifest(root / "manifest.parquet")
    assert list(frame.columns) == ["file_name", "sha256", "size", "label", "generator", "encoder", "run_id"]
    assert all(re.fullmatch(r"[0-9a-f]{32}\.png", n) for n in frame["file_name"])
    assert list(frame["file_name"]) == sorted(frame["file_name"])  # row order reveals nothing about the sources
    assert not list(tmp_path.glob(".bundle.tmp-*"))  # built in a temporary folder, renamed into place
    # pixels survive exactly
    from PIL import Image

    shipped = {np.asarray(Image.open(root / "tiles" / n)).tobytes() for n in frame["file_name"]}
    assert shipped == {a.tobytes() for a in arrays}


def test_unlabelled_bundle_has_no_label_column(tmp_path, arrays):
    info = _build(tmp_path, arrays)
    assert "label" not in read_manifest(info.path / "manifest.parquet").columns


def test_fail_verdict_builds_nothing(tmp_path, arrays):
    with pytest.raises(PrivacyGateRefused, match="FAIL") as info:
        _build(tmp_path, arrays, audit_summary=audit_for(arrays, "FAIL"))
    assert info.value.exit_code == ExitCode.PRIVACY_REFUSED
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))


def test_unaudited_tile_refused(tmp_path, arrays):
    with pytest.raises(BundleError, match="not among the audited tiles"):
        _build(tmp_path, arrays, audit_summary=audit_for(arrays[:-1]))
    assert not (tmp_path / "bundle").exists()


def test_existing_bundle_not_overwritten(tmp_path, arrays):
    _build(tmp_path, arrays)
    with pytest.raises(BundleError, match="already exists"):
        _build(tmp_path, arrays)


def test_png_metadata_stripped(tmp_path, arrays):
    paths = write_tiles(tmp_path / "dirty", arrays[:2], text_chunks=MARKERS)
    assert {"tEXt", "zTXt", "iTXt"} <= set(list_chunks(paths[0].read_bytes()))
    with pytest.raises(BundleError, match="metadata chunks"):
        check_clean_png(paths[0].read_bytes())
    clean = clean_png_bytes(np.asarray(arrays[0]))
    assert list_chunks(clean) == ["IHDR", "IDAT", "IEND"]
    with pytest.raises(BundleError, match="after the PNG's IEND"):
        list_chunks(clean + b"PAT-4471")


def test_nothing_identifying_in_any_byte(tmp_path, arrays):
    """Markers in PNG text chunks and in source file names and folders: none reaches the bundle."""
    src = tmp_path / "CASE-2024-0815-MARKER_slides" / "synthetic"
    paths = write_tiles(src, arrays, stem="CASE-2024-0815-MARKER-r00012-c00034", text_chunks=MARKERS)
    forbidden = ["PAT-4471", "Doe^Jane", "BARCODE-ZX81", "CASE-2024-0815", "99887766", "MARKER", "r00012-c00034",
                 str(src), "synthetic_tile"]
    info = build_bundle(tmp_path / "bundle", site_name="site-a", run_id="run-001", tiles=paths, labels=None,
                        generator=GENERATOR, encoder=ENCODER, audit_summary=audit_for(arrays),
                        site_key=generate_private_key(), forbidden_strings=["PAT-4471", "BARCODE-ZX81"])
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
    with pytest.raises(BundleError, match="identifying"):
        _build(tmp_path, arrays, run_id="run-PAT4471", forbidden_strings=["PAT4471"])
    assert not (tmp_path / "bundle").exists()


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
        _build(tmp_path, arrays, generator={**GENERATOR, "weights": "/home/admin/pixcell/model.safetensors"})


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


def test_summary_html_must_be_self_contained(tmp_path, arrays):
    good = tmp_path / "good.html"
    good.write_text('<html><body><h1>PASS</h1><img src="data:image/png;base64,AAAA"><a href="#t1">t</a></body></html>')
    info = _build(tmp_path, arrays, summary_html=good)
    assert (info.path / "audit_summary.html").read_bytes() == good.read_bytes()
    bad = tmp_path / "bad.html"
    bad.write_text('<html><img src="/srv/site/audit/closest_pairs/real_0001.png"></html>')
    with pytest.raises(BundleError, match="embed everything"):
        build_bundle(tmp_path / "bundle2", site_name="site-a", run_id="run-001", tiles=write_tiles(tmp_path / "s2", arrays),
                     generator=GENERATOR, encoder=ENCODER, audit_summary=audit_for(arrays),
                     site_key=generate_private_key(), summary_html=bad)


def test_site_key_file_mode(tmp_path):
    from pixcell_fed.keys import write_key_pair

    private, _, _ = write_key_pair(tmp_path / "site_signing.key")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_the_audits_own_summary_is_bundled_and_verified(tmp_path):
    """Compatibility with the audit stage: its audit_summary.json passes the allow-list and binds the tiles."""
    from pixcell_fed.audit.run import run_audit
    from pixcell_fed.bundle import approve_bundle, verify_bundle
    from pixcell_fed.testing.bundles import consortium

    arrays = real_tile_arrays(64, size=32)
    synthetic = write_tiles(tmp_path / "s", arrays[:10], stem="syn")
    result = run_audit(synthetic, write_tiles(tmp_path / "t", arrays[10:37], stem="ref"),
                       write_tiles(tmp_path / "h", arrays[37:], stem="hold"), source_of=None, audit_cfg=None,
                       out_dir=tmp_path / "audit", identities={"generator": GENERATOR, "encoder": ENCODER})
    summary = json.loads((tmp_path / "audit" / "audit_summary.json").read_text())
    keys = consortium(("site-a",))
    info = build_bundle(tmp_path / "bundle", site_name="site-a", run_id="run-001", tiles=result.kept,
                        generator=GENERATOR, encoder=ENCODER, audit_summary=summary, site_key=keys.site_keys["site-a"])
    approve_bundle(info.path, keys.officer_keys["site-a"])
    verified = verify_bundle(info.path, keys.trust)
    assert verified.verdict == result.verdict and len(verified.tiles) == len(result.kept)
    assert set(verified.tiles["sha256"]) <= set(summary["kept_sha256"])

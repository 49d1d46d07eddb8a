"""The consortium report's montage: pooled synthetic tiles only, never a real tile or any other file.

Abuse considered: a pool table (tampered with, stale, or written by a buggy import) that points a row at a real
tile on the coordinator's machine, at a file swapped in after verification, or at a link out of the pool. The
montage must skip every such row, whatever the row's sha256 says.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixcell_fed.bundle.png import clean_png_bytes
from pixcell_fed.federation.montage import PER_ROW, THUMB_PX, site_montages
from pixcell_fed.federation.pooling import POOL_COLUMNS, POOL_TABLE
from pixcell_fed.federation.report import render_html

GREEN, RED = (40, 200, 60), (230, 20, 20)


def _tile(colour, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.full((64, 64, 3), colour, np.int16)
    return np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)


def _row(pool, site, run, name, data, label, path=None):
    return {"file_name": name, "site": site, "bundle_run_id": run, "label": label,
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "path": path or f"bundles/{site}/{run}/tiles/{name}", "generator": "untrained twin", "encoder": "uni2-h-twin"}


@pytest.fixture()
def pool(tmp_path):
    pool = tmp_path / "pool"
    real_dir = tmp_path / "site-real-tiles"  # a real tile somewhere on the coordinator's machine
    real_dir.mkdir()
    real = clean_png_bytes(_tile(RED, 99))
    (real_dir / "real.png").write_bytes(real)
    rows = []
    for s, site in enumerate(("hospital-a", "hospital-b")):
        bundle = pool / "bundles" / site / "run-1"
        (bundle / "tiles").mkdir(parents=True)
        (bundle / "audit.json").write_text(json.dumps({"verdict": "INCONCLUSIVE", "tests": [
            {"name": "memorisation", "title": "Memorisation", "status": "INCONCLUSIVE", "sentence": "too few tiles"}]}))
        for i in range(6):
            data = clean_png_bytes(_tile(GREEN, 10 * s + i))
            (bundle / "tiles" / f"t{i}.png").write_bytes(data)
            rows.append(_row(pool, site, "run-1", f"t{i}.png", data, "tumour" if i % 3 == 0 else "normal"))
    # hostile rows of hospital-a: a path out of the pool, a file swapped after pooling, a link to the real tile
    rows.append(_row(pool, "hospital-a", "run-1", "out.png", real, "normal", path="../site-real-tiles/real.png"))
    swapped = pool / "bundles" / "hospital-a" / "run-1" / "tiles" / "swapped.png"
    rows.append(_row(pool, "hospital-a", "run-1", "swapped.png", clean_png_bytes(_tile(GREEN, 7)), "normal"))
    swapped.write_bytes(real)
    link = pool / "bundles" / "hospital-a" / "run-1" / "tiles" / "link.png"
    os.symlink(real_dir / "real.png", link)
    rows.append(_row(pool, "hospital-a", "run-1", "link.png", real, "normal"))
    pd.DataFrame(rows, columns=POOL_COLUMNS).to_parquet(pool / POOL_TABLE)
    return pool


def _cells(entry) -> list[np.ndarray]:
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png_base64"]))).convert("RGB"))
    step = THUMB_PX + 2
    return [image[(i // PER_ROW) * step:(i // PER_ROW) * step + THUMB_PX, (i % PER_ROW) * step:(i % PER_ROW) * step + THUMB_PX]
            for i in range(entry["shown"])]


def test_the_montage_shows_only_verified_pooled_tiles_never_a_real_one(pool):
    montage = site_montages(pool, per_site=20)  # more than there are: every row is tried
    a = montage["hospital-a"]
    assert a["shown"] == 6 and a["n_tiles"] == 9  # the three hostile rows are skipped
    for cell in _cells(a):
        mean = cell.reshape(-1, 3).mean(0)
        assert abs(mean - GREEN).max() < 12, mean  # a pooled (green) tile, never the real (red) one
    assert montage["hospital-b"]["shown"] == 6


def test_label_counts_random_choice_and_the_shareable_audit_facts(pool):
    montage = site_montages(pool, per_site=4, seed=1)
    b = montage["hospital-b"]
    assert b["label_counts"] == {"normal": 4, "tumour": 2} and b["shown"] == 4 and len(b["shown_labels"]) == 4
    assert b["audit"] == {"verdict": "INCONCLUSIVE", "tests": [
        {"title": "Memorisation", "status": "INCONCLUSIVE", "sentence": "too few tiles"}]}
    assert site_montages(pool, per_site=4, seed=1)["hospital-b"]["png_base64"] == b["png_base64"]  # reproducible


def test_the_report_embeds_the_montage_inertly_and_lists_refused_sites(pool):
    page = render_html({"pool": {"sites": {}}, "montage": site_montages(pool, per_site=4),
                        "refusals": {"sites": {"hospital-d": {"run_id": "r1", "verdict": "FAIL",
                                                               "generator": "memorising twin",
                                                               "reasons": ["Memorisation: <b>50 %</b> copies"]}},
                                     "ignored": []}})
    assert page.count("src='data:image/png;base64,") == 2 and "id='montage-hospital-a'" in page
    assert "Refused by their own audit" in page and "memorising twin" in page
    assert "&lt;b&gt;50 %&lt;/b&gt;" in page and "<script" not in page and "http" not in page

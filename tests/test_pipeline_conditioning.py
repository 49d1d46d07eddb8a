"""The conditioning stage of synthesize: dp noise drawn once per tile and stored away from the clean embeddings,
reused on resume, never re-drawn for tiles already synthesised; mixing within one slide and label; and a dp site
end to end, whose guarantee reaches its reports and its signed bundle."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pixcell_fed.config import SiteConfig, build_dataclass
from pixcell_fed.errors import ExitCode, PrivacyGateRefused
from pixcell_fed.pipeline.conditioning import condition_embeddings
from pixcell_fed.pipeline.run_layout import RunLayout
from pixcell_fed.privacy.conditioning import ConditioningClaim
from pixcell_fed.testing.sites import SlideSpec, make_site, write_twin_models

DP_SYNTHESIS = {"conditioning": "dp", "dp": {"epsilon": 8.0, "clip_norm": 7.0}}


def site_config(tmp_path, **synthesis) -> SiteConfig:
    return build_dataclass(SiteConfig, {"site": {"name": "site-a", "work_dir": str(tmp_path / "work")},
                                        "synthesis": synthesis})


def conditioning_rows(n_per_slide=(4, 3)) -> pd.DataFrame:
    rows = [{"tile_id": f"s{s}-t{t:02d}", "slide_key": f"slide{s}", "slide_file": f"slide{s}.svs"}
            for s, n in enumerate(n_per_slide) for t in range(n)]
    return pd.DataFrame(rows)


def never(_tile_id: str) -> bool:
    return False


def test_dp_noise_is_drawn_once_stored_away_from_the_clean_cache_and_reused(tmp_path):
    cfg = site_config(tmp_path, **DP_SYNTHESIS)
    layout = RunLayout(tmp_path / "work" / "runs" / "run-1")
    rows, clean = conditioning_rows(), np.random.default_rng(0).standard_normal((7, 1, 48)).astype(np.float32)
    first, claim = condition_embeddings(cfg, layout, rows, clean, {}, generated=never)
    assert claim.mode == "dp" and claim.slide_tiles == 4 and not claim.slide_tiles_capped
    assert layout.privatized_conditioning.is_file()
    assert layout.privatized_conditioning.parent != layout.embeddings_cache
    assert not layout.embeddings_cache.exists()  # nothing privatized is written into the clean cache
    assert not np.allclose(first, clean)
    # a resumed run (even after every tile is synthesised) reuses the same release: nothing is drawn again
    again, claim_again = condition_embeddings(cfg, layout, rows, clean, {}, generated=lambda t: True)
    assert np.array_equal(again, first) and claim_again == claim
    trail = [json.loads(line) for line in (tmp_path / "work" / "audit_trail.jsonl").read_text().splitlines()]
    assert [e["event"] for e in trail] == ["dp-conditioning"] and trail[0]["tiles"] == 7
    assert trail[0]["sigma"] == pytest.approx(claim.sigma)


def test_dp_noise_is_not_reproducible_from_the_runs_seed(tmp_path):
    """Two runs with the same config (seed included) and the same embeddings draw different noise."""
    cfg = site_config(tmp_path, **DP_SYNTHESIS)
    rows, clean = conditioning_rows(), np.zeros((7, 1, 48), dtype=np.float32)
    a, _ = condition_embeddings(cfg, RunLayout(tmp_path / "work" / "runs" / "run-a"), rows, clean, {}, generated=never)
    b, _ = condition_embeddings(cfg, RunLayout(tmp_path / "work" / "runs" / "run-b"), rows, clean, {}, generated=never)
    assert np.abs(a - b).min() > 0


def test_tiles_already_synthesised_are_never_released_twice(tmp_path):
    cfg = site_config(tmp_path, **DP_SYNTHESIS)
    layout = RunLayout(tmp_path / "work" / "runs" / "run-1")
    rows, clean = conditioning_rows(), np.ones((7, 1, 48), dtype=np.float32)
    with pytest.raises(PrivacyGateRefused, match="release them twice"):  # the store was lost, tiles remain
        condition_embeddings(cfg, layout, rows, clean, {}, generated=lambda t: t == "s0-t01")
    with pytest.raises(PrivacyGateRefused, match="not been drawn yet"):  # a second process of a launch never draws
        condition_embeddings(cfg, layout, rows, clean, {}, generated=never, may_draw=False)
    assert not layout.privatized_conditioning.exists()
    condition_embeddings(cfg, layout, rows.iloc[:4], clean[:4], {}, generated=never)
    stored = np.load(layout.privatized_conditioning)["privatized"].copy()
    # new tiles (e.g. a slide that failed before) get their own noise once; the first four keep theirs
    out, _ = condition_embeddings(cfg, layout, rows, clean, {}, generated=lambda t: t.startswith("s0"))
    assert np.array_equal(out[:4], stored) and not np.allclose(out[4:], clean[4:])
    other = site_config(tmp_path, conditioning="dp", dp={"epsilon": 2.0, "clip_norm": 7.0})
    with pytest.raises(PrivacyGateRefused, match="other settings"):
        condition_embeddings(other, layout, rows, clean, {}, generated=never)


def test_max_tiles_per_slide_bounds_the_per_slide_guarantee_in_advance(tmp_path):
    cfg = site_config(tmp_path, max_tiles_per_slide=5, **DP_SYNTHESIS)
    _, claim = condition_embeddings(cfg, RunLayout(tmp_path / "r"), conditioning_rows(), np.ones((7, 1, 8)), {},
                                    generated=never)
    assert claim.slide_tiles == 5 and claim.slide_tiles_capped
    assert "the cap synthesis.max_tiles_per_slide" in claim.statement()


def test_mixed_mode_averages_within_one_slide_and_label_only(tmp_path):
    cfg = site_config(tmp_path, conditioning="mixed", mix_k=3)
    rows = conditioning_rows((4, 3, 2))
    labels = {"slide0.svs": "tumour", "slide1.svs": "tumour", "slide2.svs": "normal"}
    emb = np.zeros((9, 1, 9), dtype=np.float32)
    for i, slide in enumerate(rows["slide_key"]):  # each slide's embeddings live in their own coordinates
        s = int(slide[-1])
        emb[i, 0, 3 * s:3 * s + 3] = np.random.default_rng(i).uniform(1, 2, 3)
    mixed, claim = condition_embeddings(cfg, RunLayout(tmp_path / "r"), rows, emb, labels, generated=never)
    assert claim == ConditioningClaim(mode="mixed", mix_k=3)
    for i, slide in enumerate(rows["slide_key"]):
        s = int(slide[-1])
        outside = np.delete(mixed[i, 0], np.arange(3 * s, 3 * s + 3))
        assert np.all(outside == 0) and not np.allclose(mixed[i], emb[i])


def test_exact_mode_passes_embeddings_through(tmp_path):
    cfg = site_config(tmp_path)
    emb = np.ones((7, 1, 8), dtype=np.float32)
    out, claim = condition_embeddings(cfg, RunLayout(tmp_path / "r"), conditioning_rows(), emb, {}, generated=never)
    assert out is emb and claim.mode == "exact"


# --- a dp site end to end (two synthesize runs and a refused one: the slow tier) ----------------------------------

def site_agent(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIXCELL_FED_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "site_agent.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dp_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp-site")
    models = write_twin_models(tmp_path_factory.mktemp("models"))
    slides = [SlideSpec(f"slide-{i}.svs", label="tumour" if i % 2 else "normal", seed=i) for i in range(3)]
    config = {"synthesis": {"max_conditioning_tiles": 6, "steps": 3, "max_tiles_per_slide": 3, **DP_SYNTHESIS},
              "split": {"holdout_fraction": 0.34}}
    site_yaml = make_site(folder, name="site-a", models=models, slides=slides, config=config)
    proc = site_agent("synthesize", "--config", str(site_yaml))
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    (run,) = [p for p in (folder / "work" / "runs").iterdir() if p.is_dir()]
    return site_yaml, run, proc, models


@pytest.mark.slow
def test_dp_site_states_its_guarantee_in_every_report_and_the_signed_bundle(dp_site):
    from pixcell_fed.bundle.verify import inspect_bundle

    _, run, proc, _ = dp_site
    assert "conditioning privacy: dp: per tile epsilon 8, per slide epsilon" in proc.stdout
    audit = json.loads((run / "audit" / "audit.json").read_text())
    shared = json.loads((run / "audit" / "audit_summary.json").read_text())
    bundle_json = json.loads((run / "bundle" / "bundle.json").read_text())
    record = audit["conditioning"]
    assert record == shared["conditioning"] == bundle_json["conditioning"]
    claim = ConditioningClaim.from_record(record)
    assert claim.tile_epsilon == 8.0 and claim.slide_tiles == 3 and claim.slide_tiles_capped
    assert inspect_bundle(run / "bundle").conditioning == claim  # under the site's signature
    page = (run / "audit" / "audit.html").read_text()
    assert "Conditioning privacy: dp" in page and "Not covered by the guarantee" in page
    assert f"epsilon {claim.slide_epsilon:.3g}, delta {claim.slide_delta:.0e}" in page
    # the audit only passes or fails in dp mode, and ships no statistic computed from the real tiles
    assert audit["config"]["drop_flagged"] is False and len(audit["rounds"]) == 1
    assert not {"figures", "fidelity", "null", "rounds"} & set(shared)
    assert set(shared["sizes"]) == {"S", "S_kept"}
    assert all(set(t) == {"name", "title", "status", "gates"} for t in shared["tests"])
    assert all(set(t) == {"sha256", "kept"} for t in shared["tiles"])


@pytest.mark.slow
def test_dp_site_keeps_the_clean_and_privatized_embeddings_apart_and_never_ships_them(dp_site):
    from pixcell_fed.audit.copy_features import read_tile
    from pixcell_fed.encoders import load_encoder
    from pixcell_fed.encoders.cache import cache_folder, load_cache

    site_yaml, run, _, models = dp_site
    synthetic = pd.read_parquet(run / "synthetic.parquet")
    tiles = pd.read_parquet(run / "tiles" / "tiles.parquet").set_index("tile_id")
    per_slide = tiles.loc[synthetic["source_tile_id"], "slide_key"].value_counts()
    assert per_slide.max() <= 3  # synthesis.max_tiles_per_slide
    store = np.load(run / "conditioning" / "privatized.npz")
    ids = [str(t) for t in store["tile_ids"]]
    assert sorted(ids) == sorted(set(synthetic["source_tile_id"]))
    encoder = load_encoder(models.encoder, models.encoder_dir, device="cpu")
    cache = load_cache(cache_folder(encoder, run / "embeddings"), encoder.dim)
    fresh = encoder.embed(np.stack([read_tile(run / "tiles" / tiles.loc[t, "tile_file"]) for t in ids]))
    assert np.allclose(np.stack([cache[t] for t in ids]), fresh, atol=1e-5)  # the cache holds the clean embeddings
    assert not np.allclose(store["privatized"][:, 0], fresh, atol=1.0)  # the conditioning was not
    assert not any(p.suffix in (".npz", ".npy") for p in (run / "bundle").rglob("*"))
    privatized_bytes = store["privatized"].tobytes()
    for path in (run / "bundle").rglob("*"):
        if path.is_file():
            assert privatized_bytes[:64] not in path.read_bytes()


@pytest.mark.slow
def test_dp_site_resumes_with_the_same_noise_and_refuses_when_it_is_lost(dp_site):
    site_yaml, run, _, _ = dp_site
    store = run / "conditioning" / "privatized.npz"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run / "synthetic").glob("*.png")}
    store_bytes = store.read_bytes()
    again = site_agent("synthesize", "--config", str(site_yaml))
    assert again.returncode == ExitCode.OK, again.stderr[-3000:]
    assert store.read_bytes() == store_bytes
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run / "synthetic").glob("*.png")} == before
    store.rename(store.with_name("moved-away.npz"))
    try:
        lost = site_agent("synthesize", "--config", str(site_yaml))
        assert lost.returncode == ExitCode.PRIVACY_REFUSED and "release them twice" in lost.stderr
    finally:
        store.with_name("moved-away.npz").rename(store)

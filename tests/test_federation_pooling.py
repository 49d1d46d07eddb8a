"""Pooling against an in-memory Flower stand-in: verification first, corrupt chunks, drop-out and resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pixcell_fed.federation.pooling import POOL_STATE, pool_bundles
from pixcell_fed.federation.site_server import SiteSettings
from pixcell_fed.testing.federation import FakeTransport, make_site_bundles


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return make_site_bundles(tmp_path_factory.mktemp("sites"), {"alpha": 10, "beta": 8, "gamma": 6}, tile_size=48)


def _transport(sites, **kw):
    return FakeTransport(sites={101 + i: SiteSettings(site_name=s.name, bundle_dir=s.bundle_dir, eval_dir=s.eval_dir)
                                for i, s in enumerate(sites.sites)}, **kw)


def test_pool_all_sites_with_corrupt_chunk_reasked(sites, tmp_path):
    fake = _transport(sites, corrupt_once={"beta"})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, chunk_bytes=20_000, expected_sites=("alpha", "beta", "gamma"))
    assert report.complete == ["alpha", "beta", "gamma"] and report.missing == [] and report.rejected == []
    table = pd.read_parquet(tmp_path / "pool" / "pool.parquet")
    assert len(table) == 24 and report.n_pooled == 24
    assert table.groupby("site").size().to_dict() == {"alpha": 10, "beta": 8, "gamma": 6}
    # each tile records its site and bundle, and its bytes are the signed ones
    for s in sites.sites:
        rows = table[table["site"] == s.name]
        assert set(rows["bundle_run_id"]) == {s.run_id}
        manifest = pd.read_parquet(s.bundle_dir / "manifest.parquet").set_index("file_name")
        for r in rows.itertuples():
            assert (tmp_path / "pool" / r.path).read_bytes() == (s.bundle_dir / "tiles" / r.file_name).read_bytes()
            assert manifest.loc[r.file_name, "label"] == r.label
    # the corrupted tile(s) of beta were asked for again, and nothing else twice
    beta = [n for req in fake.chunk_requests["beta"] for n in req]
    assert len(beta) > 8 and len(set(beta)) == 8
    alpha = [n for req in fake.chunk_requests["alpha"] for n in req]
    assert len(alpha) == len(set(alpha)) == 10
    assert len(fake.chunk_requests["alpha"]) > 1  # chunking by bytes really split the transfer
    state = json.loads((tmp_path / "pool" / POOL_STATE).read_text())
    assert state["sites"]["alpha"]["status"] == "complete" and state["sites"]["alpha"]["audit_verdict"] == "PASS"


def test_drop_out_then_resume_without_resending(sites, tmp_path):
    pool = tmp_path / "pool"
    fake = _transport(sites, drop_after={"alpha": 2})
    report = pool_bundles(fake, pool, sites.verify, chunk_bytes=15_000, expected_sites=("alpha", "beta", "gamma", "delta"))
    assert report.complete == ["beta", "gamma"]
    assert report.missing == ["alpha", "delta"]
    assert "dropped out" in report.sites["alpha"].reason and report.sites["delta"].reason == "never connected"
    got = report.sites["alpha"].n_received
    assert 0 < got < 10
    assert set(pd.read_parquet(pool / "pool.parquet")["site"]) == {"beta", "gamma"}

    # alpha comes back alone later: only the missing tiles travel, the earlier complete sites stay pooled
    sent_before = {n for req in fake.chunk_requests["alpha"][:2] for n in req}
    only_alpha = FakeTransport(sites={7: SiteSettings(site_name="alpha", bundle_dir=sites.by_name["alpha"].bundle_dir, eval_dir=None)})
    report2 = pool_bundles(only_alpha, pool, sites.verify, chunk_bytes=15_000)
    asked = [n for req in only_alpha.chunk_requests["alpha"] for n in req]
    assert len(asked) == 10 - got and not set(asked) & sent_before
    assert report2.sites["alpha"].status == "complete"
    table = pd.read_parquet(pool / "pool.parquet")
    assert table.groupby("site").size().to_dict() == {"alpha": 10, "beta": 8, "gamma": 6}


def test_unverifiable_bundle_is_rejected_before_any_tile(sites, tmp_path):
    tampered = sites.tampered_copy(tmp_path / "work" / "runs" / "run-beta-1" / "bundle", "beta")
    fake = FakeTransport(sites={1: SiteSettings(site_name="alpha", bundle_dir=sites.by_name["alpha"].bundle_dir, eval_dir=None),
                                2: SiteSettings(site_name="beta", bundle_dir=tampered, eval_dir=None)})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, chunk_bytes=1 << 20)
    assert report.rejected == ["beta"] and report.complete == ["alpha"]
    assert "verification failed" in report.sites["beta"].reason
    assert "beta" not in fake.chunk_requests or fake.chunk_requests["beta"] == []
    assert set(pd.read_parquet(tmp_path / "pool" / "pool.parquet")["site"]) == {"alpha"}


def test_site_serves_manifest_tiles_only(sites):
    from pixcell_fed.federation import protocol as P
    from pixcell_fed.federation import site_server

    site = SiteSettings(site_name="alpha", bundle_dir=sites.by_name["alpha"].bundle_dir, eval_dir=None)
    name = pd.read_parquet(site.bundle_dir / "manifest.parquet")["file_name"].iloc[0]
    reply = site_server.handle_chunk(P.request_record(files=[name, "../bundle.json", "manifest.parquet"]), site)
    good, bad, missing = P.records_to_files(reply)
    assert list(good) == [name] and bad == [] and missing == ["../bundle.json", "manifest.parquet"]


def test_second_node_claiming_a_site_name_is_ignored(sites, tmp_path):
    alpha = SiteSettings(site_name="alpha", bundle_dir=sites.by_name["alpha"].bundle_dir, eval_dir=None)
    fake = FakeTransport(sites={1: alpha, 2: alpha})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify)
    assert report.complete == ["alpha"] and report.n_pooled == 10
    assert "second node" in report.sites["alpha"].reason
    assert len([n for req in fake.chunk_requests["alpha"] for n in req]) == 10  # fetched once, from one node


def test_serving_a_bundle_is_recorded_as_an_export_in_the_site_trail(sites, tmp_path):
    import shutil

    from pixcell_fed.bundle.state import trail_path, work_dir_of_bundle
    from pixcell_fed.bundle.trail import verify_trail
    from pixcell_fed.errors import FederationError
    from pixcell_fed.federation import protocol as P
    from pixcell_fed.federation import site_server

    site = SiteSettings(site_name="alpha", bundle_dir=sites.by_name["alpha"].bundle_dir, eval_dir=None)
    trail = trail_path(work_dir_of_bundle(site.bundle_dir))
    before = verify_trail(trail).count
    site_server.handle_manifest(P.request_record(), site)
    entries = verify_trail(trail).entries
    assert len(entries) == before + 1
    assert entries[-1]["event"] == "export" and entries[-1]["run_id"] == sites.by_name["alpha"].run_id
    # a bundle outside any site work folder cannot be logged, so it is not served (fail closed)
    loose = tmp_path / "loose"
    shutil.copytree(site.bundle_dir, loose)
    with pytest.raises(FederationError, match="audit trail"):
        site_server.handle_manifest(P.request_record(), SiteSettings(site_name="alpha", bundle_dir=loose, eval_dir=None))

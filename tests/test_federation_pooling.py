"""Pooling against an in-memory Flower stand-in: names from keys, validated replies, staging, two rounds, resume.

The attack tests (traversal names, impostor nodes, replayed bundles, revoked sites, stale bundles) each fail on the
code before issue 11: there, a reply's site name and file names became paths, a node's name was what it said, and
an earlier site's tiles stayed in the pool whatever the trust file said.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pixcell_fed.federation import protocol as P
from pixcell_fed.federation.pooling import POOL_STATE, PoolSettings, pool_bundles, trust_verifier
from pixcell_fed.testing.federation import FakeTransport, auth_key_for_tests, make_site_bundles


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return make_site_bundles(tmp_path_factory.mktemp("sites"), {"alpha": 10, "beta": 8, "gamma": 6}, tile_size=48)


def _settings(message_bytes: int = 512 << 20, **kw) -> PoolSettings:
    return PoolSettings(message_mb=message_bytes / (1 << 20), **kw)


def _asked(fake: FakeTransport, site: str) -> list[str]:
    return [n for req in fake.chunk_requests.get(site, []) for n in req]


# ------------------------------------------------------------------------------------------- the normal path

def test_pool_all_sites_in_two_rounds_with_a_corrupt_chunk_reasked(sites, tmp_path):
    fake = sites.transport(corrupt_once={"beta"})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify,
                          _settings(20_000, expected_sites=("alpha", "beta", "gamma")))
    assert report.complete == ["alpha", "beta", "gamma"] and report.missing == [] and report.rejected == []
    table = pd.read_parquet(tmp_path / "pool" / "pool.parquet")
    assert len(table) == 24 and report.n_pooled == 24
    assert table.groupby("site").size().to_dict() == {"alpha": 10, "beta": 8, "gamma": 6}
    # each tile records its site and bundle, and its bytes are the signed ones, in the pool (not in staging)
    for s in sites.sites:
        rows = table[table["site"] == s.name]
        assert set(rows["bundle_run_id"]) == {s.run_id}
        manifest = pd.read_parquet(s.bundle_dir / "manifest.parquet").set_index("file_name")
        for r in rows.itertuples():
            assert r.path.startswith(f"bundles/{s.name}/{s.run_id}/tiles/")
            assert (tmp_path / "pool" / r.path).read_bytes() == (s.bundle_dir / "tiles" / r.file_name).read_bytes()
            assert manifest.loc[r.file_name, "label"] == r.label
    assert not (tmp_path / "pool" / "staging" / "alpha").exists()
    # the corrupted tile(s) of beta were asked for again, and nothing else twice
    beta = _asked(fake, "beta")
    assert len(beta) > 8 and len(set(beta)) == 8
    alpha = _asked(fake, "alpha")
    assert len(alpha) == len(set(alpha)) == 10
    assert len(fake.chunk_requests["alpha"]) > 1  # the message cap really split alpha's tiles...
    # ...yet all of a site's data requests went out in one round: manifest + data (+ one retry round for beta)
    assert report.traffic["rounds"] == 3 and report.traffic["messages_manifest"] == 3
    assert report.traffic["messages_chunk"] == sum(len(r) for r in fake.chunk_requests.values())
    state = json.loads((tmp_path / "pool" / POOL_STATE).read_text())
    assert state["sites"]["alpha"]["status"] == "complete" and state["sites"]["alpha"]["audit_verdict"] == "PASS"
    assert set(state["timings"]) >= {"manifest_round", "data_round", "preflight", "accept_tiles", "final_verify"}


def test_one_data_message_per_site_under_the_cap(sites, tmp_path):
    fake = sites.transport()
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.complete == ["alpha", "beta", "gamma"]
    assert {s: len(r) for s, r in fake.chunk_requests.items()} == {"alpha": 1, "beta": 1, "gamma": 1}
    assert report.traffic["rounds"] == 2 and report.traffic["bytes"] == report.bytes_received > 0


def test_drop_out_then_resume_without_resending(sites, tmp_path):
    pool = tmp_path / "pool"
    fake = sites.transport(drop_after={"alpha": 2})
    report = pool_bundles(fake, pool, sites.verify, _settings(15_000, expected_sites=("alpha", "beta", "gamma", "delta")))
    assert report.complete == ["beta", "gamma"]
    assert report.missing == ["alpha", "delta"]
    assert "dropped out" in report.sites["alpha"].reason and report.sites["delta"].reason == "never connected"
    got = report.sites["alpha"].n_received
    assert 0 < got < 10
    assert set(pd.read_parquet(pool / "pool.parquet")["site"]) == {"beta", "gamma"}
    assert len(list((pool / "staging" / "alpha").glob("*/tiles/*.png"))) == got  # unverified: staged only

    # alpha comes back alone later: only the missing tiles travel, the earlier complete sites stay pooled
    sent_before = {n for req in fake.chunk_requests["alpha"][:2] for n in req}
    only_alpha = FakeTransport(sites={7: sites.by_name["alpha"].settings()})
    report2 = pool_bundles(only_alpha, pool, sites.verify, _settings(15_000))
    asked = _asked(only_alpha, "alpha")
    assert len(asked) == 10 - got and not set(asked) & sent_before
    assert report2.sites["alpha"].status == "complete"
    assert report2.sites["beta"].reason == "pooled in an earlier run; not connected now"
    table = pd.read_parquet(pool / "pool.parquet")
    assert table.groupby("site").size().to_dict() == {"alpha": 10, "beta": 8, "gamma": 6}


def test_unverifiable_bundle_is_rejected_before_any_tile(sites, tmp_path):
    tampered = sites.tampered_copy(tmp_path / "work" / "runs" / "run-beta-1" / "bundle", "beta")
    fake = FakeTransport(sites={1: sites.by_name["alpha"].settings(), 2: sites.by_name["beta"].settings(bundle_dir=tampered)})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.rejected == ["beta"] and report.complete == ["alpha"]
    assert "refused before any tile" in report.sites["beta"].reason and "manifest" in report.sites["beta"].reason
    assert _asked(fake, "beta") == []
    assert not (tmp_path / "pool" / "staging" / "beta").exists()  # nothing unverified stays behind
    assert set(pd.read_parquet(tmp_path / "pool" / "pool.parquet")["site"]) == {"alpha"}


# --------------------------------------------------------------------------------------- names come from keys

def test_impostor_registered_under_a_site_name_is_ignored(sites, tmp_path):
    """A node registered as 'beta' with a key that is not beta's auth_key, replaying beta's approved bundle."""
    beta = sites.by_name["beta"]
    impostor_key = auth_key_for_tests("not-in-the-trust-file")
    fake = FakeTransport(sites={1: sites.by_name["alpha"].settings(), 2: beta.settings(), 9: beta.settings()},
                         keys={9: impostor_key})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.complete == ["alpha", "beta"] and report.nodes == {"alpha": 1, "beta": 2}
    assert 9 not in fake.received  # it was never asked anything
    assert len(report.ignored_nodes) == 1 and report.ignored_nodes[0].startswith("node 9 ")
    assert "not the auth_key of any site" in report.ignored_nodes[0]


def test_node_registered_under_another_sites_name_is_ignored(sites, tmp_path):
    """alpha's key, registered as 'beta': the registered name does not match the key's site."""
    fake = FakeTransport(sites={1: sites.by_name["alpha"].settings()}, names={1: "beta"})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.complete == [] and fake.received == {}
    assert "registered as 'beta' but holds the key of site 'alpha'" in report.ignored_nodes[0]


def test_trusted_node_replaying_another_sites_bundle_is_rejected(sites, tmp_path):
    """alpha's own node serves beta's approved bundle: it is pooled under no name and gets no tile request."""
    alpha, beta = sites.by_name["alpha"], sites.by_name["beta"]

    def says_alpha(node, kind, reply):  # a modified site: it names itself correctly, its bundle is beta's
        reply[P.KEY_SITE]["site-name"] = "alpha"
        return reply
    fake = FakeTransport(sites={1: alpha.settings(site_name="beta", bundle_dir=beta.bundle_dir)},
                         keys={1: auth_key_for_tests("alpha")}, names={1: "alpha"}, tamper=says_alpha)
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.rejected == ["alpha"] and "beta" not in report.sites
    assert "serves a bundle of site 'beta'" in report.sites["alpha"].reason
    assert fake.received == {1: [P.MSG_MANIFEST]} and report.n_pooled == 0


def test_second_node_with_the_same_key_is_ignored(sites, tmp_path):
    alpha = sites.by_name["alpha"].settings()
    fake = FakeTransport(sites={1: alpha, 2: alpha})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.complete == ["alpha"] and report.n_pooled == 10
    assert "already connected as node 1" in report.ignored_nodes[0]
    assert 2 not in fake.received and len(_asked(fake, "alpha")) == 10  # fetched once, from one node


def test_revoked_site_leaves_the_pool_with_its_files(sites, tmp_path):
    pool = tmp_path / "pool"
    first = pool_bundles(sites.transport(drop_after={"gamma": 0}), pool, sites.verify, _settings())
    assert first.complete == ["alpha", "beta"] and (pool / "staging" / "gamma").is_dir() is False
    # gamma left some staged state too: an unfinished transfer
    (pool / "staging" / "gamma" / "run-gamma-1" / "tiles").mkdir(parents=True)
    import yaml

    trust = yaml.safe_load(sites.trust_file.read_text())
    del trust["sites"]["beta"], trust["sites"]["gamma"]
    revoked = tmp_path / "trust-without-beta.yaml"
    revoked.write_text(yaml.safe_dump(trust))
    # beta is still connected and still serves its approved bundle; it is no trusted site any more
    second = pool_bundles(sites.transport(), pool, trust_verifier(revoked), _settings())
    assert second.complete == ["alpha"] and set(second.removed_sites) == {"beta", "gamma"}
    assert set(pd.read_parquet(pool / "pool.parquet")["site"]) == {"alpha"}
    assert not (pool / "bundles" / "beta").exists() and not (pool / "staging" / "gamma").exists()
    assert any("node 102" in n for n in second.ignored_nodes)


def test_bundle_older_than_the_run_allows_is_refused(sites, tmp_path, monkeypatch):
    import datetime as dt

    from pixcell_fed.federation import validation as V

    later = V.utc_now() + dt.timedelta(days=30)
    monkeypatch.setattr(V, "utc_now", lambda: later)
    fake = sites.transport()
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings(max_bundle_age_days=7))
    assert report.rejected == ["alpha", "beta", "gamma"] and report.n_pooled == 0
    assert "days old" in report.sites["alpha"].reason and not any(fake.chunk_requests.values())
    report = pool_bundles(sites.transport(), tmp_path / "pool2", sites.verify, _settings(max_bundle_age_days=60))
    assert report.complete == ["alpha", "beta", "gamma"]


def test_bundle_age_is_measured_from_the_verified_creation_time():
    import datetime as dt

    from pixcell_fed.bundle.layout import parse_time
    from pixcell_fed.federation import validation as V

    now = dt.datetime(2025, 6, 1, 12, tzinfo=dt.timezone.utc)
    created = parse_time("2025-05-30T10:00:00+00:00")  # as the bundle verifier reads bundle.json's signed time
    V.check_bundle_age(created, 7, now=now)
    V.check_bundle_age(created, 0, now=now + dt.timedelta(days=365))  # no maximum set: not checked
    with pytest.raises(V.ReplyRejected, match="12.1 days old"):
        V.check_bundle_age(created, 7, now=now + dt.timedelta(days=10))
    for unusable in ("2025-05-30", "2025-05-30T10:00:00", "yesterday", None):  # refused by the verifier's stage 1
        assert parse_time(unusable) is None


# ------------------------------------------------------------------------------- validated replies, staging

def _files_under(root) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _repack_manifest(reply, change):
    """A manifest reply whose signed files went through ``change(dict) -> list[(name, bytes)]``."""
    items, _ = P.records_to_files(reply)
    P.packed_to_records(P.pack_files(change(dict(items))), reply)
    return reply


def _traversal_cases():
    def site_name(reply):
        reply[P.KEY_SITE]["site-name"] = "../../../../escaped"
        return reply

    def file_name(reply):
        return _repack_manifest(reply, lambda f: [*f.items(), ("../../../../escaped.pth", b"import os\n")])

    def run_id(reply):
        def rename(files):
            info = json.loads(files["bundle.json"])
            info["run_id"] = "../../../../escaped"
            return [*{**files, "bundle.json": json.dumps(info).encode()}.items()]
        return _repack_manifest(reply, rename)

    def absolute_name(reply):
        return _repack_manifest(reply, lambda f: [*f.items(), ("/tmp/escaped.pth", b"x")])

    return {"site name": site_name, "file name": file_name, "run id": run_id, "absolute file name": absolute_name}


@pytest.mark.parametrize("case", sorted(_traversal_cases()))
def test_traversal_in_a_manifest_reply_is_refused_with_nothing_written(sites, tmp_path_factory, case):
    base = tmp_path_factory.getbasetemp()
    before = _files_under(base)
    tamper = _traversal_cases()[case]
    fake = sites.transport(tamper=lambda node, kind, reply: tamper(reply) if node == 102 and kind == P.MSG_MANIFEST else reply)
    pool = tmp_path_factory.mktemp("pool")
    report = pool_bundles(fake, pool, sites.verify, _settings())
    assert report.rejected == ["beta"] and report.complete == ["alpha", "gamma"]
    assert _asked(fake, "beta") == []
    new = _files_under(base) - before
    pool_rel = pool.relative_to(base).as_posix()
    site_side = {n for n in new if "/work/" in n and ("audit_trail" in n or "federation/requests.log" in n)}
    coordinator_side = new - site_side
    assert all(n.startswith(f"{pool_rel}/") for n in coordinator_side), coordinator_side
    assert not any("escaped" in n for n in new)
    assert not (pool / "staging" / "beta").exists() and not (pool / "bundles" / "beta").exists()
    assert not any("beta" in n for n in coordinator_side if not n.endswith(("pool.parquet", "pool_state.json")))


def test_a_chunk_reply_with_a_foreign_name_is_refused_as_a_whole(sites, tmp_path):
    def tamper(node, kind, reply):
        if node == 101 and kind == P.MSG_CHUNK and not tamper.done:
            tamper.done = True
            items, missing = P.records_to_files(reply)
            P.packed_to_records(P.pack_files([*items, ("../../escaped.png", b"\x89PNG")]), reply, missing=missing)
        return reply
    tamper.done = False
    fake = sites.transport(tamper=tamper)
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.complete == ["alpha", "beta", "gamma"]
    asked = _asked(fake, "alpha")
    assert len(asked) == 20 and len(set(asked)) == 10  # every tile of the refused reply was asked again
    assert not any("escaped" in p.name for p in tmp_path.rglob("*"))


def test_reply_with_another_protocol_version_is_refused(sites, tmp_path):
    def tamper(node, kind, reply):
        if kind == P.MSG_MANIFEST:
            reply[P.KEY_SITE]["protocol"] = 1
        return reply
    report = pool_bundles(sites.transport(tamper=tamper), tmp_path / "pool", sites.verify, _settings())
    assert report.rejected == ["alpha", "beta", "gamma"] and "protocol version" in report.sites["alpha"].reason


def test_site_that_refuses_is_reported_with_its_code_only(sites, tmp_path):
    fake = FakeTransport(sites={1: sites.by_name["alpha"].settings(bundle_dir=tmp_path / "no-bundle")})
    report = pool_bundles(fake, tmp_path / "pool", sites.verify, _settings())
    assert report.missing == ["alpha"] and report.sites["alpha"].reason == "no manifest: the site refused (unavailable)"
    assert str(tmp_path) not in json.dumps(report.to_dict())


def test_pool_rows_and_staging_survive_a_second_run_of_the_same_bundles(sites, tmp_path):
    pool = tmp_path / "pool"
    pool_bundles(sites.transport(), pool, sites.verify, _settings())
    again = sites.transport()
    report = pool_bundles(again, pool, sites.verify, _settings())
    assert report.complete == ["alpha", "beta", "gamma"] and report.n_pooled == 24
    assert not any(again.chunk_requests.values())  # the pooled tiles were the signed ones: nothing travelled twice
    shutil.rmtree(pool / "bundles" / "gamma")
    third = sites.transport()
    assert pool_bundles(third, pool, sites.verify, _settings()).n_pooled == 24
    assert {s for s, asked in third.chunk_requests.items() if asked} == {"gamma"}


# ------------------------------------------------------------------------ the consortium's conditioning requirement

@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """One site per kind of signed conditioning claim: exact (none stated), dp with a per-slide epsilon of 20.9
    (4 per tile over 16 tiles), dp with 2.12 (1 per tile over 4 tiles)."""
    from pixcell_fed.privacy.conditioning import dp_claim

    def dp(epsilon: float, slide_tiles: int):
        return dp_claim(epsilon=epsilon, delta=1e-6, clip_norm=2.0, vectors_per_tile=1, slide_tiles=slide_tiles,
                        slide_tiles_capped=True)

    return make_site_bundles(tmp_path_factory.mktemp("conditioned"), {"exact": 5, "loose": 6, "tight": 7},
                             tile_size=48, conditioning={"loose": dp(4.0, 16), "tight": dp(1.0, 4)})


def test_bundles_below_the_conditioning_requirement_are_refused_before_any_tile(conditioned, tmp_path):
    from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement
    from pixcell_fed.federation.report import render_html

    fake = conditioned.transport()
    requirement = ConditioningRequirement(min_mode="dp", max_slide_epsilon=8)
    report = pool_bundles(fake, tmp_path / "pool", conditioned.verify, _settings(conditioning=requirement))
    assert report.complete == ["tight"] and report.rejected == ["exact", "loose"]
    exact, loose, tight = (report.sites[s] for s in ("exact", "loose", "tight"))
    assert exact.reason == ("bundle refused: its synthetic set was made with exact conditioning, the consortium "
                            "requires dp or stronger")
    assert loose.reason == "bundle refused: its per-slide epsilon is 20.9, above the consortium's limit of 8"
    # nothing of a refused site moved: no data request, no tile staged or pooled, its signed files discarded
    assert _asked(fake, "exact") == [] and _asked(fake, "loose") == [] and len(_asked(fake, "tight")) == 7
    assert exact.n_received == loose.n_received == 0 and exact.bytes_received == loose.bytes_received == 0
    assert not (tmp_path / "pool" / "staging" / "exact").exists() and not (tmp_path / "pool" / "bundles" / "loose").exists()
    assert set(pd.read_parquet(tmp_path / "pool" / "pool.parquet")["site"]) == {"tight"} and report.n_pooled == 7
    # the pool report carries each site's signed claim and the requirement; the consortium report shows both
    state = json.loads((tmp_path / "pool" / POOL_STATE).read_text())
    assert state["sites"]["exact"]["conditioning"]["mode"] == "exact"
    assert state["sites"]["loose"]["conditioning"]["slide_epsilon"] == pytest.approx(20.93, abs=0.01)
    assert state["sites"]["tight"]["conditioning"]["tile_epsilon"] == 1.0 and state["sites"]["tight"]["reason"] is None
    assert state["conditioning_requirement"] == "conditioning dp or stronger, per-slide epsilon <= 8"
    page = render_html({"pool": state})
    assert "above the consortium&#x27;s limit of 8" in page and "made with exact conditioning" in page
    assert "per slide epsilon 2.12 (&lt;= 4 tiles)" in page and "per-slide epsilon &lt;= 8" in page


def test_a_per_tile_bound_admits_only_dp_bundles_within_it(conditioned, tmp_path):
    from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement

    fake = conditioned.transport()
    report = pool_bundles(fake, tmp_path / "pool", conditioned.verify,
                          _settings(conditioning=ConditioningRequirement(max_tile_epsilon=2)))
    assert report.complete == ["tight"] and report.rejected == ["exact", "loose"]
    assert "per-tile epsilon is unbounded" in report.sites["exact"].reason
    assert "per-tile epsilon is 4" in report.sites["loose"].reason and _asked(fake, "loose") == []


def test_without_a_requirement_every_mode_is_pooled_and_a_tightened_one_drops_earlier_bundles(conditioned, tmp_path):
    from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement

    pool = tmp_path / "pool"
    first = pool_bundles(conditioned.transport(), pool, conditioned.verify, _settings())
    assert first.complete == ["exact", "loose", "tight"] and first.n_pooled == 18
    assert json.loads((pool / POOL_STATE).read_text())["conditioning_requirement"] is None
    # the consortium now requires dp; no site is connected: what was pooled under the old settings is re-checked
    later = pool_bundles(FakeTransport(sites={}), pool, conditioned.verify,
                         _settings(conditioning=ConditioningRequirement(min_mode="dp")))
    assert later.complete == ["loose", "tight"] and later.rejected == ["exact"]
    assert later.sites["exact"].reason.startswith("pooled in an earlier run, but now bundle refused: its synthetic set")
    assert set(pd.read_parquet(pool / "pool.parquet")["site"]) == {"loose", "tight"} and later.n_pooled == 13

"""The site's side: only approved bundles are served, every export is in the trail, evaluation stays within the
site's own limits, and refusals reach the coordinator as generic codes only.

Each attack test fails on the code before issue 11: the handlers never read the bundle's state, chunk requests
left no trail entry, any timm model with any keyword arguments was built and evaluated without limit, and error
texts (paths included) travelled back to the coordinator.
"""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import numpy as np
import pytest

from pixcell_fed.bundle import layout as L
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation import site_server
from pixcell_fed.testing.federation import TINY_VIT, make_site_bundles


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return make_site_bundles(tmp_path_factory.mktemp("sites"), {"alpha": 6}, tile_size=32, n_eval=12, n_train=2)


def _ask(site, kind, content, run=7):
    return site_server.answer(kind, content, site, flower_run=run)


def _tiles(bundle):
    return sorted(p.name for p in (bundle / L.TILES).iterdir())


def _unapproved_copy(sites, dest):
    """A copy of alpha's bundle as it was before approval (awaiting), at a site work folder of its own."""
    bundle = dest / "work" / "runs" / "run-alpha-1" / "bundle"
    shutil.copytree(sites.by_name["alpha"].bundle_dir, bundle)
    info = L.read_bundle_json(bundle)
    info["state"], info["decision"] = L.STATE_AWAITING, None
    L.write_bundle_json(bundle, info)
    (bundle / L.OFFICER_SIG).unlink()
    return bundle


# ------------------------------------------------------------------------------------- approved bundles only

@pytest.mark.parametrize("state", ["awaiting", "rejected", "rejected-with-a-leftover-approval", "forged-approval"])
def test_bundles_that_are_not_approved_are_not_served(sites, tmp_path, state):
    from pixcell_fed.bundle.approval import SiteAuthority, reject_bundle
    from pixcell_fed.keys import generate_private_key

    approved = sites.by_name["alpha"].bundle_dir
    bundle = _unapproved_copy(sites, tmp_path)
    if state.startswith("rejected"):
        officer = generate_private_key()
        reject_bundle(bundle, "not this set", officer, site=SiteAuthority("alpha", tmp_path / "work", (officer.public_key(),)))
        if state == "rejected-with-a-leftover-approval":
            shutil.copy(approved / L.OFFICER_SIG, bundle / L.OFFICER_SIG)
    elif state == "forged-approval":  # bundle.json edited to 'approved' with someone else's decision
        info = L.read_bundle_json(approved)
        info["decision"] = {**info["decision"], "time": "2030-01-01T00:00:00+00:00"}
        L.write_bundle_json(bundle, info)
        shutil.copy(approved / L.OFFICER_SIG, bundle / L.OFFICER_SIG)
    site = sites.by_name["alpha"].settings(bundle_dir=bundle)
    for kind, request in ((P.MSG_MANIFEST, P.request_record()), (P.MSG_CHUNK, P.request_record(files=_tiles(bundle)))):
        reply = _ask(site, kind, request)
        assert P.error_code(reply) == "not-approved" and P.KEY_DATA not in reply
    trail = tmp_path / "work" / "audit_trail.jsonl"
    events = [json.loads(line)["event"] for line in trail.read_text().splitlines()] if trail.exists() else []
    assert "export" not in events  # nothing exported, so nothing logged as an export


def test_site_serves_manifest_tiles_only(sites):
    site = sites.by_name["alpha"].settings()
    name = _tiles(site.bundle_dir)[0]
    reply = _ask(site, P.MSG_CHUNK, P.request_record(files=[name, "../bundle.json", "manifest.parquet", "0" * 32 + ".png"]))
    items, missing = P.records_to_files(reply)
    assert [n for n, _ in items] == [name] and missing == ["0" * 32 + ".png"]  # non-tile names: never looked up


def test_manifest_reply_carries_exactly_the_signed_files(sites):
    site = sites.by_name["alpha"].settings()
    reply = _ask(site, P.MSG_MANIFEST, P.request_record())
    items, _ = P.records_to_files(reply)
    assert [n for n, _ in items] == [L.BUNDLE_JSON, L.MANIFEST, L.AUDIT, L.SITE_SIG, L.OFFICER_SIG]
    assert reply[P.KEY_SITE]["n-tiles"] == 6 and reply[P.KEY_SITE]["protocol"] == P.PROTOCOL_VERSION


def test_every_export_is_in_the_site_trail(sites, tmp_path):
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import verify_trail
    from pixcell_fed.federation.pooling import PoolSettings, pool_bundles

    fixture = sites.by_name["alpha"]
    trail = trail_path(fixture.work_dir)
    before = verify_trail(trail).count
    fake = sites.transport(flower_run=9001)
    pool_bundles(fake, tmp_path / "pool", sites.verify, PoolSettings(message_mb=1000 / (1 << 20)))  # ~one tile a message
    entries = verify_trail(trail).entries[before:]
    assert [e["event"] for e in entries] == ["export"] * (1 + len(fake.chunk_requests["alpha"]))
    assert all(e["coordinator_run"] == "9001" and e["run_id"] == fixture.run_id and e["to"] for e in entries)
    assert entries[0]["part"] == "manifest" and L.BUNDLE_JSON in entries[0]["files"]
    exported = [n for e in entries[1:] for n in e["files"]]
    assert all(e["part"] == "tiles" for e in entries[1:]) and sorted(exported) == _tiles(fixture.bundle_dir)
    assert sum(e["bytes"] for e in entries[1:]) == sum(p.stat().st_size for p in (fixture.bundle_dir / L.TILES).iterdir())


def test_a_bundle_outside_a_site_work_folder_is_not_served(sites, tmp_path):
    loose = tmp_path / "loose"
    shutil.copytree(sites.by_name["alpha"].bundle_dir, loose)
    reply = _ask(sites.by_name["alpha"].settings(bundle_dir=loose), P.MSG_MANIFEST, P.request_record())
    assert P.error_code(reply) == "unavailable"


# ------------------------------------------------------------------------------------------ generic codes only

def test_refusals_carry_a_generic_code_and_the_detail_stays_in_the_site_log(sites, tmp_path):
    site = sites.by_name["alpha"].settings(bundle_dir=tmp_path / "secret-folder-name", eval_dir=tmp_path / "nope")
    for kind, request in ((P.MSG_MANIFEST, P.request_record()), (P.MSG_EVALUATE, _eval_request()),
                          (P.MSG_CHUNK, P.request_record(files=["x"])), ("query.other", P.request_record()),
                          (P.MSG_MANIFEST, _empty())):
        reply = _ask(site, kind, request)
        assert set(reply) == {P.KEY_ERROR} and dict(reply[P.KEY_ERROR]) == {"code": P.error_code(reply),
                                                                              "protocol": P.PROTOCOL_VERSION}
        assert "secret-folder-name" not in repr(reply) and str(tmp_path) not in repr(reply)
    log = (sites.by_name["alpha"].work_dir / site_server.REQUEST_LOG).read_text()
    assert "secret-folder-name" in log  # the reason is kept where the site's staff can read it


def test_an_unexpected_failure_is_reported_as_internal(sites, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("/very/secret/path exploded")
    monkeypatch.setattr(site_server, "handle_manifest", boom)
    reply = _ask(sites.by_name["alpha"].settings(), P.MSG_MANIFEST, P.request_record())
    assert P.error_code(reply) == "internal" and "secret" not in repr(reply)


def test_node_config_with_the_sites_own_config(sites):
    fixture = sites.by_name["alpha"]
    settings = site_server.SiteSettings.from_node_config(fixture.node_config)
    assert settings.site_name == "alpha" and settings.work_dir == fixture.work_dir
    assert settings.evaluation.min_tiles_per_class == 2
    bad = {**fixture.node_config, P.NODE_SITE_NAME: "beta"}
    assert P.error_code(site_server.answer_node(P.MSG_MANIFEST, P.request_record(), bad, flower_run=1)) == "unavailable"


# ------------------------------------------------------------------------------------------ evaluation lockdown

def _empty():
    from flwr.app import RecordDict

    return RecordDict()


def _model_and_spec():
    from pixcell_fed.training.models import ModelSpec, build_model

    spec = ModelSpec(arch=TINY_VIT["arch"], classes=("dense", "sparse"), img_size=TINY_VIT["img_size"],
                     kwargs=TINY_VIT["kwargs"])
    return build_model(spec), spec


def _eval_request(spec: dict | None = None, state: dict | None = None, **request):
    from flwr.app import ConfigRecord

    model, default_spec = _model_and_spec()
    content = P.request_record(**request)
    P.model_to_records(state or model.state_dict(), default_spec, content)
    if spec is not None:  # a spec exactly as a coordinator may write it, not through ModelSpec.to_wire
        content[P.KEY_MODEL_CONFIG] = ConfigRecord({"spec": json.dumps(spec)})
    return content


def _eval_site(sites, tmp_path, **limits):
    """alpha with its own work folder (a fresh query budget) and the given evaluation limits."""
    import dataclasses

    fixture = sites.by_name["alpha"]
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return fixture.settings(work_dir=work, evaluation=dataclasses.replace(fixture.settings().evaluation, **limits))


def test_an_allowed_model_gets_rounded_aggregate_metrics_only(sites, tmp_path):
    from pixcell_fed.federation.evaluation import model_metrics
    from pixcell_fed.training.data import labelled_folder

    site = _eval_site(sites, tmp_path, round_digits=1)
    model, spec = _model_and_spec()
    reply = _ask(site, P.MSG_EVALUATE, _eval_request(state=model.state_dict()))
    metrics = dict(reply[P.KEY_METRICS])
    assert set(reply) == {P.KEY_METRICS} and set(metrics) == {"accuracy", "balanced_accuracy", "macro_f1", "n"}
    expected = model_metrics(model, spec, labelled_folder(site.eval_dir))
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert metrics[name] == round(expected[name], 1)
    assert metrics["n"] == 12
    entries = [json.loads(line) for line in (tmp_path / "work" / "audit_trail.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "evaluate" and entries[-1]["metrics"] == metrics


def _crafted_specs():
    spec = json.loads(_model_and_spec()[1].to_wire())
    return {
        # a one-layer model: patch embedding straight into the head, whose output can single out one tile
        "one-layer model": {**spec, "kwargs": {**spec["kwargs"], "depth": 0}},
        "unknown architecture": {**spec, "arch": "resnet50"},
        "not a timm name": {**spec, "arch": "../../evil"},
        "extra keyword argument": {**spec, "kwargs": {**spec["kwargs"], "checkpoint_path": "/etc/passwd"}},
        "pretrained_cfg_overlay": {**spec, "kwargs": {**spec["kwargs"], "pretrained_cfg_overlay": {"file": "/x"}}},
        "weights file": {**spec, "pretrained_file": "/srv/coordinator/weights.safetensors"},
        "extra spec key": {**spec, "loader": "torch.load"},
        "kind the site does not run": {**spec, "kind": "detector"},
        "huge input": {**spec, "img_size": 100_000},
        "tiny std": {**spec, "std": [1e-9, 1e-9, 1e-9]},
        "string-valued kwarg": {**spec, "kwargs": {**spec["kwargs"], "depth": "2"}},
        "a single class": {**spec, "classes": ["dense"], "num_classes": 1},
    }


@pytest.mark.parametrize("case", sorted(_crafted_specs()))
def test_models_outside_the_sites_registry_are_refused_before_any_tile_is_read(sites, tmp_path, case):
    from pixcell_fed.federation.query_budget import budget_path

    site = _eval_site(sites, tmp_path)
    reply = _ask(site, P.MSG_EVALUATE, _eval_request(spec=_crafted_specs()[case]))
    assert P.error_code(reply) == "refused-model" and P.KEY_METRICS not in reply
    assert not budget_path(site.work_dir).exists()  # refused before the budget was even charged


class _Marker:
    """Unpickling this creates a file: a stand-in for code a pickle would run at the site."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _pickled_weights(kind: str, marker):
    from flwr.app import Array

    if kind == "numpy object array":
        buffer = io.BytesIO()
        np.save(buffer, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
        return Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    if kind == "object array claiming float32":
        buffer = io.BytesIO()
        np.save(buffer, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
        return Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    import pickle

    return Array(dtype="float32", shape=(1,), stype="torch.save", data=pickle.dumps({"w": _Marker(marker)}))


@pytest.mark.parametrize("kind", ["numpy object array", "object array claiming float32", "torch pickle"])
def test_pickled_weights_are_refused_and_never_unpickled(sites, tmp_path, kind):
    marker = tmp_path / "pickle-ran"
    site = _eval_site(sites, tmp_path)
    content = _eval_request()
    first = next(iter(content[P.KEY_MODEL].keys()))
    content[P.KEY_MODEL][first] = _pickled_weights(kind, marker)
    reply = _ask(site, P.MSG_EVALUATE, content)
    assert P.error_code(reply) == "refused-weights" and not marker.exists()


def test_weights_that_do_not_fit_the_model_are_refused(sites, tmp_path):
    import torch

    model, _ = _model_and_spec()
    state = model.state_dict()
    extra = {**state, "backdoor": torch.zeros(3)}
    wrong = {**state, next(iter(state)): torch.zeros(1)}
    for weights in (extra, wrong):
        assert P.error_code(_ask(_eval_site(sites, tmp_path), P.MSG_EVALUATE, _eval_request(state=weights))) == "refused-weights"


def test_classes_smaller_than_the_minimum_are_not_evaluated(sites, tmp_path):
    site = _eval_site(sites, tmp_path, min_tiles_per_class=7)  # the held-out set has 6 tiles per class
    assert P.error_code(_ask(site, P.MSG_EVALUATE, _eval_request())) == "too-few-tiles"


def test_a_request_can_only_tighten_the_sites_limits(sites, tmp_path):
    site = _eval_site(sites, tmp_path, min_tiles_per_class=2, round_digits=3)
    # asking for a larger minimum is honoured...
    assert P.error_code(_ask(site, P.MSG_EVALUATE, _eval_request(**{"min-tiles-per-class": 7}))) == "too-few-tiles"
    # ...a smaller one, or more digits, is not
    reply = _ask(site, P.MSG_EVALUATE, _eval_request(**{"min-tiles-per-class": 1, "round-digits": 6}))
    assert all(round(v, 3) == v for v in dict(reply[P.KEY_METRICS]).values())
    reply = _ask(site, P.MSG_EVALUATE, _eval_request(**{"round-digits": 0}))
    assert all(v in (0.0, 1.0) for k, v in dict(reply[P.KEY_METRICS]).items() if k != "n")
    assert P.error_code(_ask(site, P.MSG_EVALUATE, _eval_request(**{"round-digits": "2"}))) == "bad-request"


def test_query_budget_holds_across_runs_and_processes(sites, tmp_path):
    from pixcell_fed.federation.query_budget import budget_path

    def ask(run):
        site = _eval_site(sites, tmp_path, max_queries_per_run=2, max_queries_per_day=3)  # a fresh ClientApp each time
        return P.error_code(_ask(site, P.MSG_EVALUATE, _eval_request(), run=run))

    assert [ask(1), ask(1), ask(1)] == [None, None, "budget-exhausted"]  # per coordinator run
    assert [ask(2), ask(2)] == [None, "budget-exhausted"]                # per day, across runs
    ledger = json.loads(budget_path(tmp_path / "work").read_text())
    assert ledger["runs"] == {"1": 2, "2": 1} and list(ledger["days"].values()) == [3]


def test_a_damaged_budget_ledger_keeps_evaluation_closed(sites, tmp_path):
    from pixcell_fed.federation.query_budget import budget_path

    site = _eval_site(sites, tmp_path)
    budget_path(site.work_dir).parent.mkdir(parents=True)
    budget_path(site.work_dir).write_text("{not json")
    assert P.error_code(_ask(site, P.MSG_EVALUATE, _eval_request())) == "budget-exhausted"


def test_evaluation_limits_in_site_yaml_are_range_checked(tmp_path):
    from pixcell_fed.config import load_site_config
    from pixcell_fed.errors import ConfigError

    path = tmp_path / "site.yaml"
    path.write_text("federation:\n  evaluation:\n    min_tiles_per_class: 0\n")
    with pytest.raises(ConfigError, match="min_tiles_per_class"):
        load_site_config(path)
    path.write_text("federation:\n  evaluation:\n    model_kwargs:\n      depth: [4, 2]\n")
    with pytest.raises(ConfigError, match="model_kwargs"):
        load_site_config(path)


def test_the_chunk_path_imports_no_pandas(sites):
    """Every message starts a fresh ClientApp process: the chunk path stays light (no pandas)."""
    import subprocess
    import sys

    fixture = sites.by_name["alpha"]
    code = (
        "import json, sys\n"
        "from pixcell_fed.federation import protocol as P\n"
        "from pixcell_fed.federation.site_server import answer_node\n"
        f"config = json.loads({json.dumps(json.dumps(fixture.node_config))})\n"
        f"names = {_tiles(fixture.bundle_dir)[:2]!r}\n"
        "reply = answer_node(P.MSG_CHUNK, P.request_record(files=names), config, flower_run=5)\n"
        "assert P.error_code(reply) is None and len(P.records_to_files(reply)[0]) == 2\n"
        "print('pandas' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]

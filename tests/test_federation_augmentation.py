"""What the pool adds at each site (``evaluate.augmentation``): opt-in, the site's own recipe and budget, metrics
only; and what a coordinator cannot make a site do with the message.

Attacks shown to fail (each would be possible with a handler that trusted the request): asking for more epochs or
tiles than the site allows, crafted models (unlisted or oversized architecture, keyword arguments out of bounds,
a weights file to open, weights of other names, shapes or values), training on the held-out tiles, asking again
and again past the site's evaluation query budget, and getting anything but the fixed set of metrics back
(weights, error texts). Every request goes through the site's one boundary, ``site_server.answer``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pixcell_fed.federation import augmentation_value as A
from pixcell_fed.federation import protocol as P
from pixcell_fed.federation.site_server import SiteSettings, answer
from pixcell_fed.testing.federation import TINY_VIT, FakeTransport, make_site_bundles, real_labelled_tiles
from pixcell_fed.training.models import ModelSpec, build_model

RULES = {"epochs": 2, "max_tiles": 40, "batch_size": 8, "lr": 1e-3, "bootstrap": 200}
LIMITS = {"architectures": ["vit_tiny_patch16_224"], "max_img_size": 64, "round_digits": 3,
          "max_queries_per_run": 1000, "max_queries_per_day": 1000,
          "model_kwargs": {"patch_size": [4, 16], "depth": [1, 4], "embed_dim": [16, 96], "num_heads": [1, 4]}}
RUNS = iter(range(1, 1_000_000))


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return make_site_bundles(tmp_path_factory.mktemp("aug") / "sites", {"alpha": 16, "beta": 16}, tile_size=32,
                             n_eval=40, n_train=24)


def _site_yaml(site, *, allow: bool = True, rules: dict | None = None, limits: dict | None = None,
               train_dir: Path | None = None, work_dir: Path | None = None) -> Path:
    """The site's own site.yaml; the SuperNode's node config names it (as ``site-agent serve`` does)."""
    path = site.bundle_dir.parent.parent.parent.parent / f"site-{site.name}-{next(RUNS)}.yaml"
    path.write_text(yaml.safe_dump({
        "site": {"name": site.name, "work_dir": str(work_dir or site.bundle_dir.parent.parent.parent)},
        "federation": {"allow_local_training": allow, "train_dir": str(train_dir or site.train_dir),
                       "local_training": {**RULES, **(rules or {})}, "evaluation": {**LIMITS, **(limits or {})}}}))
    return path


def _settings(site, config: Path | None) -> SiteSettings:
    node = {P.NODE_SITE_NAME: site.name, P.NODE_BUNDLE_DIR: str(site.bundle_dir), P.NODE_EVAL_DIR: str(site.eval_dir),
            P.NODE_TRAIN_DIR: str(site.train_dir)}
    if config is not None:
        node[P.NODE_TRAIN_DIR] = yaml.safe_load(config.read_text())["federation"]["train_dir"]
        node[P.NODE_SITE_CONFIG] = str(config)
    return SiteSettings.from_node_config(node)


def handle_augmentation(content, site: SiteSettings, *, flower_run: int | None = None):
    """The site's answer through its one boundary, as its ClientApp gives it."""
    return answer(P.MSG_AUGMENTATION, content, site, flower_run=next(RUNS) if flower_run is None else flower_run)


def _spec(**kwargs) -> ModelSpec:
    return ModelSpec(arch=kwargs.pop("arch", TINY_VIT["arch"]), classes=("dense", "sparse"),
                     img_size=kwargs.pop("img_size", 32), kwargs={**TINY_VIT["kwargs"], **kwargs})


def _request(spec: ModelSpec | None = None, state: dict | None = None, **asked):
    spec = spec or _spec()
    torch.manual_seed(0)
    state = state if state is not None else build_model(spec).state_dict()
    return A.AugmentationRequest(**asked).to_record(state, spec)


def _info(reply) -> dict:
    """The reply's status: the answer's info, or ``{"status": "refused", "code": ...}`` for a refusal."""
    code = P.error_code(reply)
    return dict(reply[P.KEY_INFO]) if code is None else {"status": "refused", "code": code}


@pytest.fixture()
def no_tiles_read(monkeypatch):
    """Reading a labelled folder fails the test's way: a refusal with its own code proves no tile was read."""
    import pixcell_fed.training.data as data

    def forbidden(folder):
        raise AssertionError(f"a tile folder was read: {folder}")

    monkeypatch.setattr(data, "labelled_folder", forbidden)


# ------------------------------------------------------------------------------------------------------ opt-in

def test_a_site_that_does_not_allow_it_runs_nothing(sites, monkeypatch, no_tiles_read):
    import pixcell_fed.training.local_finetune as L

    monkeypatch.setattr(L, "finetune", lambda *a, **k: pytest.fail("a site that does not allow it trained"))
    alpha = sites.by_name["alpha"]
    for config in (None, _site_yaml(alpha, allow=False)):  # no site.yaml at all: not allowed (fail closed)
        reply = handle_augmentation(_request(), _settings(alpha, config))
        assert _info(reply) == {"status": "refused", "code": "not-allowed"} and set(reply.keys()) == {P.KEY_ERROR}


# ---------------------------------------------------------------------------------------- the whole round

def test_round_in_the_consortium_cycle_reports_each_site(sites, tmp_path):
    from pixcell_fed.bundle.state import trail_path
    from pixcell_fed.bundle.trail import verify_trail
    from pixcell_fed.federation.config import from_run_config
    from pixcell_fed.federation.workflow import run_consortium

    alpha, beta = sites.by_name["alpha"], sites.by_name["beta"]
    fake = FakeTransport(sites={10: _settings(alpha, _site_yaml(alpha)), 11: _settings(beta, None)})
    cfg = from_run_config({"work-dir": str(tmp_path / "work"), "trust-file": str(sites.trust_file),
                           "expected-sites": "alpha,beta", "wait-for-sites-s": 0.0, "arch": TINY_VIT["arch"],
                           "model-kwargs": json.dumps(TINY_VIT["kwargs"]), "img-size": 32, "epochs": 1,
                           "batch-size": 8, "lr": 0.001, "augmentation-epochs": 50})
    result = run_consortium(fake, cfg)
    rows = result["augmentation"]
    assert rows["beta"] == {"status": "not-allowed"}
    a = rows["alpha"]
    assert a["status"] == "done" and a["baseline"] == "random-init" and a["n"] == 40
    assert a["epochs"] == 2  # asked for 50: the site's own maximum was used
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0 <= a["pool"][m] <= 1 and 0 <= a["generic"][m] <= 1
        d = a["difference"][m]
        assert d["value"] == pytest.approx(a["pool"][m] - a["generic"][m]) and d["low"] <= d["high"]
    html = (tmp_path / "work" / "report" / "report.html").read_text()
    assert "What the pool adds at each site" in html and "does not allow local training" in html
    # what left alpha is in its audit trail, number for number, before it left
    work = alpha.bundle_dir.parent.parent.parent
    entry = [e for e in verify_trail(trail_path(work)).entries if e["event"] == A.TRAIL_EVENT][-1]
    assert entry["sent"]["pool-accuracy"] == a["pool"]["accuracy"] and entry["sent"]["epochs"] == 2.0


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """A classifier trained on other real tiles of the same slide until it separates the site's two classes."""
    from pixcell_fed.testing.federation import write_labelled_folder
    from pixcell_fed.training.classifier import ClassifierConfig, train_classifier
    from pixcell_fed.training.data import labelled_folder

    root = tmp_path_factory.mktemp("oracle")
    items = labelled_folder(write_labelled_folder(root / "tiles", real_labelled_tiles(80, size=32, seed=9)))
    result = train_classifier(items, root / "model", ClassifierConfig(
        arch=TINY_VIT["arch"], kwargs=TINY_VIT["kwargs"], img_size=32, epochs=8, batch_size=16, lr=2e-3,
        val_fraction=0))
    from pixcell_fed.training.models import load_checkpoint

    model, spec = load_checkpoint(result.checkpoint)
    return model.state_dict(), spec


def test_the_measurement_follows_where_the_fine_tune_starts(sites, oracle):
    """With a recipe that barely moves the weights (the site's tiny learning rate), a pool model that already
    separates the classes keeps its lead over the generic start, with an interval above 0; a pool model that knows
    nothing (random weights of the same backbone) adds nothing measurable."""
    alpha = sites.by_name["alpha"]
    config = _site_yaml(alpha, rules={"lr": 1e-6, "epochs": 1})
    state, spec = oracle
    good = handle_augmentation(_request(spec, state), _settings(alpha, config))
    metrics = dict(good[P.KEY_METRICS])
    assert metrics["pool-accuracy"] > 0.8 and metrics["difference-accuracy-low"] > 0.05, metrics
    torch.manual_seed(123)
    useless = handle_augmentation(_request(spec, build_model(spec).state_dict()), _settings(alpha, config))
    d = dict(useless[P.KEY_METRICS])
    assert d["difference-accuracy-low"] <= 0.0 <= d["difference-accuracy-high"] or abs(d["difference-accuracy"]) < 0.2


# ------------------------------------------------------------------------------------- what a request cannot do

def test_the_budget_can_only_be_lowered(sites, monkeypatch):
    import pixcell_fed.training.local_finetune as L

    seen = []
    real = L.finetune

    def spy(model, items, classes, spec, recipe):
        seen.append((recipe.epochs, len(items), recipe.lr, recipe.batch_size))
        return real(model, items, classes, spec, recipe)

    monkeypatch.setattr(L, "finetune", spy)
    alpha = sites.by_name["alpha"]
    config = _site_yaml(alpha, rules={"max_tiles": 10})
    reply = handle_augmentation(_request(epochs=100, max_tiles=10_000), _settings(alpha, config))
    assert dict(reply[P.KEY_METRICS])["epochs"] == 2.0
    assert seen == [(2, 10, 1e-3, 8)] * 2  # both runs: the site's epochs, tiles, learning rate and batch size
    seen.clear()
    handle_augmentation(_request(epochs=1, max_tiles=6), _settings(alpha, config))
    assert seen == [(1, 6, 1e-3, 8)] * 2  # a request may ask for less


@pytest.mark.parametrize("request_fields", [{"epochs": "100"}, {"epochs": -3}, {"max-tiles": 2.5}, {"epochs": [1, 2]}])
def test_malformed_budget_is_refused(sites, no_tiles_read, request_fields):
    alpha = sites.by_name["alpha"]
    content = _request()
    for key, value in request_fields.items():
        content[P.KEY_REQUEST][key] = value
    reply = handle_augmentation(content, _settings(alpha, _site_yaml(alpha)))
    assert _info(reply) == {"status": "refused", "code": "bad-request"}


@pytest.mark.parametrize("spec_kwargs,code", [
    ({"arch": "vit_base_patch16_224"}, "refused-model"),       # not on the site's list (and large)
    ({"depth": 12}, "refused-model"),                            # outside the site's bounds
    ({"drop_rate": 0.1}, "refused-model"),                       # not on the allow-list at all
    ({"img_size": 512}, "refused-model"),                        # input too large
])
def test_models_outside_the_sites_rules_are_refused_before_any_tile_is_read(sites, no_tiles_read, spec_kwargs, code):
    alpha = sites.by_name["alpha"]
    spec = _spec(**spec_kwargs)
    reply = handle_augmentation(_request(spec, state={"w": torch.zeros(1)}), _settings(alpha, _site_yaml(alpha)))
    assert _info(reply) == {"status": "refused", "code": code}


def test_a_spec_naming_a_weights_file_is_refused(sites, no_tiles_read):  # the evaluation policy's rule
    from flwr.app import ConfigRecord

    alpha = sites.by_name["alpha"]
    content = _request()
    wire = json.loads(str(content[P.KEY_MODEL_CONFIG]["spec"]))
    content[P.KEY_MODEL_CONFIG] = ConfigRecord({"spec": json.dumps({**wire, "pretrained_file": "/etc/passwd"})})
    reply = handle_augmentation(content, _settings(alpha, _site_yaml(alpha)))
    assert _info(reply) == {"status": "refused", "code": "refused-model"}


def _weights_variants():
    torch.manual_seed(0)
    good = build_model(_spec()).state_dict()
    extra = {**good, "smuggled": torch.zeros(3)}
    missing = {k: v for k, v in list(good.items())[1:]}
    reshaped = {**good, "head.weight": torch.zeros(3, good["head.weight"].shape[1])}
    nan = {**good, "head.bias": torch.full_like(good["head.bias"], float("nan"))}
    return [extra, missing, reshaped, nan]


@pytest.mark.parametrize("index", range(4))
def test_crafted_weights_are_refused_before_any_tile_is_read(sites, no_tiles_read, index):
    alpha = sites.by_name["alpha"]
    reply = handle_augmentation(_request(state=_weights_variants()[index]), _settings(alpha, _site_yaml(alpha)))
    assert _info(reply) == {"status": "refused", "code": "refused-weights"}


def test_oversized_weights_are_refused(sites, no_tiles_read):
    alpha = sites.by_name["alpha"]
    reply = handle_augmentation(_request(), _settings(alpha, _site_yaml(alpha, limits={"max_weights_mb": 0.01})))
    assert _info(reply) == {"status": "refused", "code": "refused-weights"}


def test_the_held_out_tiles_are_never_training_tiles(sites, tmp_path):
    import shutil

    alpha = sites.by_name["alpha"]
    same = handle_augmentation(_request(), _settings(alpha, _site_yaml(alpha, train_dir=alpha.eval_dir)))
    assert _info(same) == {"status": "refused", "code": "unavailable"}
    leaky = tmp_path / "train"
    shutil.copytree(alpha.train_dir, leaky)
    label = next(p for p in alpha.eval_dir.iterdir() if p.is_dir())
    shutil.copy(next(label.glob("*.png")), leaky / label.name / "copied-held-out.png")
    reply = handle_augmentation(_request(), _settings(alpha, _site_yaml(alpha, train_dir=leaky)))
    assert _info(reply) == {"status": "refused", "code": "unavailable"}


def test_only_the_fixed_metrics_leave(sites):
    alpha = sites.by_name["alpha"]
    reply = handle_augmentation(_request(), _settings(alpha, _site_yaml(alpha)))
    assert set(reply.keys()) == {P.KEY_METRICS, P.KEY_INFO}  # no weights, no files, no text beyond status
    assert _info(reply) == {"status": "done", "baseline": "random-init"}
    assert set(dict(reply[P.KEY_METRICS])) == set(A._metric_keys())
    assert all(round(v, 3) == v for v in dict(reply[P.KEY_METRICS]).values())  # rounded to the site's round_digits
    parsed = A.AugmentationReply.from_record(reply, max_epochs=None)
    assert parsed.row()["n"] == 40


def test_each_answer_is_charged_to_the_evaluation_query_budget(sites, tmp_path, monkeypatch):
    """A coordinator cannot use the message as an unmetered oracle on the held-out tiles: past the site's per-run
    budget it is refused before any tile is read, and evaluations and augmentation requests share the budget."""
    import pixcell_fed.training.local_finetune as L
    from pixcell_fed.federation.query_budget import budget_path

    monkeypatch.setattr(L, "finetune", lambda *a, **k: None)  # the budget, not the training, is under test
    alpha = sites.by_name["alpha"]
    work = tmp_path / "work"
    work.mkdir()
    site = _settings(alpha, _site_yaml(alpha, limits={"max_queries_per_run": 2}, work_dir=work))
    assert _info(handle_augmentation(_request(), site, flower_run=7))["status"] == "done"
    assert _info(handle_augmentation(_request(), site, flower_run=7))["status"] == "done"
    assert json.loads(budget_path(work).read_text())["runs"]["7"] == 2
    import pixcell_fed.training.data as data

    monkeypatch.setattr(data, "labelled_folder", lambda folder: pytest.fail("a tile folder was read past the budget"))
    assert _info(handle_augmentation(_request(), site, flower_run=7)) == {"status": "refused",
                                                                           "code": "budget-exhausted"}
    evaluation = P.request_record()
    P.model_to_records(build_model(_spec()).state_dict(), _spec(), evaluation)
    assert P.error_code(answer(P.MSG_EVALUATE, evaluation, site, flower_run=7)) == "budget-exhausted"


def test_too_few_held_out_tiles_of_a_class_are_refused(sites, monkeypatch):
    import pixcell_fed.training.local_finetune as L

    monkeypatch.setattr(L, "finetune", lambda *a, **k: pytest.fail("trained although the answer is refused"))
    alpha = sites.by_name["alpha"]
    reply = handle_augmentation(_request(), _settings(alpha, _site_yaml(alpha, limits={"min_tiles_per_class": 1000})))
    assert _info(reply) == {"status": "refused", "code": "too-few-tiles"}


# --------------------------------------------------------------------------------- what a reply cannot claim

def _forged(**changes):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    values = {k: 0.5 for k in A._metric_keys()}
    values.update({"n": 10.0, "epochs": 2.0, **{f"difference-{m}": 0.0 for m in ("accuracy", "balanced_accuracy",
                                                                                    "macro_f1")}})
    values.update({f"difference-{m}-low": -0.1 for m in ("accuracy", "balanced_accuracy", "macro_f1")})
    values.update({f"difference-{m}-high": 0.1 for m in ("accuracy", "balanced_accuracy", "macro_f1")})
    info = {"status": "done", "baseline": "random-init"}
    info.update(changes.pop("info", {}))
    values.update(changes)
    return RecordDict({P.KEY_METRICS: MetricRecord(values), P.KEY_INFO: ConfigRecord(info)})


def test_forged_replies_never_reach_the_report():
    assert A.AugmentationReply.from_record(_forged(), max_epochs=2).row()["status"] == "done"
    for bad in (_forged(**{"pool-accuracy": 1.5}), _forged(**{"difference-accuracy": 0.3}), _forged(epochs=5.0),
                _forged(n=2.5), _forged(info={"status": "great"}), _forged(info={"baseline": "<script>"}),
                _forged(info={"note": "my secret path /data/x"}),
                _forged(**{"extra-number": 1.0}), _forged(**{"difference-macro_f1-low": 0.2})):
        with pytest.raises(A.FederationError):
            A.AugmentationReply.from_record(bad, max_epochs=2)
    assert A.AugmentationReply.refused("internal").row() == {"status": "refused", "code": "internal"}
    assert A.AugmentationReply.refused("not-allowed").row() == {"status": "not-allowed"}

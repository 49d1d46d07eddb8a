"""The coordinator's whole cycle in process: pool -> train -> evaluate at sites -> DP fine-tune -> report.

The metric checks recompute each site's answer from the trained checkpoint and the site's own held-out tiles,
so they fail if a site answered anything else; the pooled figures are checked against the weighted mean.
"""

from __future__ import annotations

import json

import pytest

from pixcell_fed.federation.config import from_run_config
from pixcell_fed.federation.evaluation import METRIC_NAMES, classification_metrics, model_metrics
from pixcell_fed.federation.workflow import run_consortium
from pixcell_fed.testing.federation import TINY_VIT, FakeTransport, auth_key_for_tests, make_site_bundles


def test_classification_metrics_known_values():
    m = classification_metrics(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert abs(m["balanced_accuracy"] - (2 / 3 + 1) / 2) < 1e-9
    f1_a, f1_b = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 * 1 / 1.5
    assert abs(m["macro_f1"] - (f1_a + f1_b) / 2) < 1e-9


def test_run_config_is_typed_once():
    cfg = from_run_config({"work-dir": "/w", "expected-sites": "a, b", "model-kwargs": '{"depth": 2}', "pretrained-file": "",
                           "epochs": 3, "chunk-mb": 1, "poll-interval-s": 0.05, "max-bundle-age-days": 30})
    assert cfg.expected_sites == ("a", "b") and dict(cfg.model_kwargs) == {"depth": 2} and cfg.pretrained_file is None
    assert cfg.pool_dir.as_posix() == "/w/pool" and cfg.chunk_mb == 1.0
    settings = cfg.pool_settings
    assert settings.transfer.message_bytes == 1 << 20 and settings.poll_interval_s == 0.05
    assert settings.max_bundle_age_days == 30 and settings.expected_sites == ("a", "b")
    assert settings.conditioning.requires_nothing  # min-conditioning exact, no epsilon limit: the defaults


def test_run_config_conditioning_requirement():
    from pixcell_fed.errors import ConfigError

    cfg = from_run_config({"min-conditioning": "dp", "max-slide-epsilon": 8, "max-tile-epsilon": 0.0})
    requirement = cfg.pool_settings.conditioning
    assert (requirement.min_mode, requirement.max_slide_epsilon, requirement.max_tile_epsilon) == ("dp", 8.0, None)
    assert cfg.pool_settings.transfer.conditioning == requirement
    for bad in ({"min-conditioning": "strong"}, {"max-slide-epsilon": -1}, {"max-tile-epsilon": float("inf")}):
        with pytest.raises((ConfigError, ValueError)):
            from_run_config(bad)


def _expected_metrics(work, fixture, digits=2):
    """What the site must have answered: the checkpoint evaluated on its held-out tiles, rounded."""
    from pixcell_fed.training.data import labelled_folder
    from pixcell_fed.training.models import load_checkpoint

    model, spec = load_checkpoint(work / "model")
    metrics = model_metrics(model, spec, labelled_folder(fixture.eval_dir))
    return {**{k: round(metrics[k], digits) for k in METRIC_NAMES}, "n": float(metrics["n"])}


def _check_pooled(result):
    per_site = result["evaluation"]
    total = sum(m["n"] for m in per_site.values())
    for name in METRIC_NAMES:
        weighted = sum(m[name] * m["n"] for m in per_site.values()) / total
        assert result["pooled_evaluation"][name] == pytest.approx(weighted)
    assert result["pooled_evaluation"]["n"] == total


def test_full_cycle_with_dp_and_report(tmp_path):
    sites = make_site_bundles(tmp_path / "sites", {"alpha": 16, "beta": 16}, tile_size=32, n_eval=10, n_train=10)
    fake = sites.transport()
    # an impostor: registered as 'beta' with a key of its own, serving beta's approved bundle and held-out set
    fake.sites = {**fake.sites, 99: sites.by_name["beta"].settings()}
    fake.keys[99] = auth_key_for_tests("impostor")
    cfg = from_run_config({"work-dir": str(tmp_path / "work"), "trust-file": str(sites.trust_file),
                           "expected-sites": "alpha,beta,gamma", "wait-for-sites-s": 0.0, "arch": TINY_VIT["arch"],
                           "model-kwargs": json.dumps(TINY_VIT["kwargs"]), "img-size": 32, "epochs": 2, "batch-size": 8,
                           "lr": 0.001, "dp-rounds": 2, "dp-batch-size": 5, "dp-lr": 0.01})
    result = run_consortium(fake, cfg)
    assert result["pool"]["complete"] == ["alpha", "beta"] and result["pool"]["missing"] == ["gamma"]
    assert 99 not in fake.received  # the impostor got no manifest, chunk, evaluation or training request
    assert result["pool"]["ignored_nodes"][0].startswith("node 99 ")
    assert set(result["evaluation"]) == {"alpha", "beta"}
    for site in ("alpha", "beta"):
        assert result["evaluation"][site] == _expected_metrics(tmp_path / "work", sites.by_name[site])
    _check_pooled(result)
    dp = result["dp"]
    assert set(dp["privacy"]) == {"alpha", "beta"}
    for p in dp["privacy"].values():
        # each site's own delta (1/(10 N) for its 10 training tiles) and budget; its ledger persists across rounds
        assert p["status"] == "trained" and p["rounds"] == 2 and p["delta"] == 0.01 and p["examples"] == 100
        assert p["epsilon_by_round"][0] < p["epsilon_by_round"][1] == p["epsilon"]
        assert abs(p["epsilon_remaining"] - (8.0 - p["epsilon"])) < 1e-9
    assert set(dp["evaluation"]) == {"alpha", "beta"}
    report = json.loads((tmp_path / "work" / "report" / "report.json").read_text())
    assert report["pool"]["sites"]["gamma"]["reason"] == "never connected"
    html = (tmp_path / "work" / "report" / "report.html").read_text()
    for text in ("alpha", "beta", "gamma", "balanced accuracy", "macro F1", "epsilon", "<svg", "PASS", "node 99"):
        assert text in html
    assert (tmp_path / "work" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "dp_model" / "model.safetensors").is_file()


def test_full_cycle_with_the_ssl_recipe(tmp_path):
    """The self-supervised recipe through the same protocol: a SimCLR encoder trained on the pool, evaluated at each
    site by a k-NN probe on the site's own labelled tiles; no DP fine-tuning (it needs a classifier head)."""
    sites = make_site_bundles(tmp_path / "sites", {"alpha": 16, "beta": 16}, tile_size=32, n_eval=10, n_train=10)
    fake = sites.transport()
    cfg = from_run_config({"work-dir": str(tmp_path / "work"), "trust-file": str(sites.trust_file),
                           "expected-sites": "alpha,beta", "wait-for-sites-s": 0.0, "recipe": "ssl",
                           "arch": TINY_VIT["arch"], "model-kwargs": json.dumps(TINY_VIT["kwargs"]), "img-size": 32,
                           "epochs": 1, "batch-size": 8, "lr": 0.001, "dp-rounds": 2})
    result = run_consortium(fake, cfg)
    assert result["training"]["recipe"] == "ssl" and result["training"]["spec"]["kind"] == "encoder"
    assert result["training"]["history"][0]["train_loss"] > 0
    for site in ("alpha", "beta"):
        assert result["evaluation"][site] == _expected_metrics(tmp_path / "work", sites.by_name[site])
    _check_pooled(result)
    assert result["dp"] is None
    html = (tmp_path / "work" / "report" / "report.html").read_text()
    assert "ssl" in html and "alpha" in html


def test_a_site_that_refuses_evaluation_is_reported_with_its_code(tmp_path):
    """A site whose held-out classes are below its minimum answers 'too-few-tiles', and the run goes on."""
    import dataclasses

    sites = make_site_bundles(tmp_path / "sites", {"alpha": 16, "beta": 16}, tile_size=32, n_eval=6, n_train=2)
    fake = sites.transport()
    strict = dataclasses.replace(fake.sites[102].evaluation, min_tiles_per_class=4)  # beta has 3 per class
    fake.sites = {**fake.sites, 102: dataclasses.replace(fake.sites[102], evaluation=strict)}
    cfg = from_run_config({"work-dir": str(tmp_path / "work"), "trust-file": str(sites.trust_file),
                           "wait-for-sites-s": 0.0, "arch": TINY_VIT["arch"], "model-kwargs": json.dumps(TINY_VIT["kwargs"]),
                           "img-size": 32, "epochs": 1, "batch-size": 8})
    result = run_consortium(fake, cfg)
    assert result["evaluation"]["beta"] == {"error": "the site refused (too-few-tiles)"}
    assert result["evaluation"]["alpha"] == _expected_metrics(tmp_path / "work", sites.by_name["alpha"])
    assert result["pooled_evaluation"]["n"] == 6 and result["pooled_evaluation"]["sites"] == 1

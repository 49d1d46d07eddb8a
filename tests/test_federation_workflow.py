"""The coordinator's whole cycle in process: pool -> train -> evaluate at sites -> DP fine-tune -> report."""

from __future__ import annotations

import json

from pixcell_fed.federation.config import from_run_config
from pixcell_fed.federation.evaluation import classification_metrics
from pixcell_fed.federation.site_server import SiteSettings
from pixcell_fed.federation.workflow import run_consortium
from pixcell_fed.testing.federation import TINY_VIT, FakeTransport, make_site_bundles


def test_classification_metrics_known_values():
    m = classification_metrics(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert abs(m["balanced_accuracy"] - (2 / 3 + 1) / 2) < 1e-9
    f1_a, f1_b = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 * 1 / 1.5
    assert abs(m["macro_f1"] - (f1_a + f1_b) / 2) < 1e-9


def test_run_config_is_typed_once():
    cfg = from_run_config({"work-dir": "/w", "expected-sites": "a, b", "model-kwargs": '{"depth": 2}', "pretrained-file": "",
                           "epochs": 3, "chunk-mb": 1})
    assert cfg.expected_sites == ("a", "b") and dict(cfg.model_kwargs) == {"depth": 2} and cfg.pretrained_file is None
    assert cfg.pool_dir.as_posix() == "/w/pool" and cfg.chunk_mb == 1.0


def test_full_cycle_with_dp_and_report(tmp_path):
    sites = make_site_bundles(tmp_path / "sites", {"alpha": 16, "beta": 16}, tile_size=32, n_eval=10, n_train=10)
    fake = FakeTransport(sites={10 + i: SiteSettings(s.name, s.bundle_dir, s.eval_dir, s.train_dir) for i, s in enumerate(sites.sites)})
    cfg = from_run_config({"work-dir": str(tmp_path / "work"), "trust-file": str(sites.trust_file),
                           "expected-sites": "alpha,beta,gamma", "wait-for-sites-s": 0.0, "arch": TINY_VIT["arch"],
                           "model-kwargs": json.dumps(TINY_VIT["kwargs"]), "img-size": 32, "epochs": 2, "batch-size": 8,
                           "lr": 0.001, "dp-rounds": 2, "dp-batch-size": 5, "dp-lr": 0.01})
    result = run_consortium(fake, cfg)
    assert result["pool"]["complete"] == ["alpha", "beta"] and result["pool"]["missing"] == ["gamma"]
    assert set(result["evaluation"]) == {"alpha", "beta"}
    assert all(m["n"] == 10 for m in result["evaluation"].values())
    assert result["pooled_evaluation"]["n"] == 20
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
    for text in ("alpha", "beta", "gamma", "balanced accuracy", "macro F1", "epsilon", "<svg", "PASS"):
        assert text in html
    assert (tmp_path / "work" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "dp_model" / "model.safetensors").is_file()


def test_full_cycle_with_the_ssl_recipe(tmp_path):
    """The self-supervised recipe through the same protocol: a SimCLR encoder trained on the pool, evaluated at each
    site by a k-NN probe on the site's own labelled tiles; no DP fine-tuning (it needs a classifier head)."""
    sites = make_site_bundles(tmp_path / "sites", {"alpha": 16, "beta": 16}, tile_size=32, n_eval=10, n_train=10)
    fake = FakeTransport(sites={10 + i: SiteSettings(s.name, s.bundle_dir, s.eval_dir, s.train_dir)
                                for i, s in enumerate(sites.sites)})
    cfg = from_run_config({"work-dir": str(tmp_path / "work"), "trust-file": str(sites.trust_file),
                           "expected-sites": "alpha,beta", "wait-for-sites-s": 0.0, "recipe": "ssl",
                           "arch": TINY_VIT["arch"], "model-kwargs": json.dumps(TINY_VIT["kwargs"]), "img-size": 32,
                           "epochs": 1, "batch-size": 8, "lr": 0.001, "dp-rounds": 2})
    result = run_consortium(fake, cfg)
    assert result["training"]["recipe"] == "ssl" and result["training"]["spec"]["kind"] == "encoder"
    assert result["training"]["history"][0]["train_loss"] > 0
    assert set(result["evaluation"]) == {"alpha", "beta"}
    for metrics in result["evaluation"].values():
        assert metrics["n"] == 10 and 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert result["pooled_evaluation"]["n"] == 20 and result["dp"] is None
    html = (tmp_path / "work" / "report" / "report.html").read_text()
    assert "ssl" in html and "alpha" in html

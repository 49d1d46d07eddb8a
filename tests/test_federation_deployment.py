"""The deployment end to end, through the locked-down commands, with one site killed mid-transfer.

``coordinator serve`` (SuperLink on loopback behind the Fleet front, its own SuperExec), ``coordinator
register-site`` (keys bound to names by the trust file), three ``site-agent serve`` (SuperNode in process
isolation with the pinned launcher) and ``coordinator run``. Also covers the DP fine-tune over real Flower: two
rounds on the surviving sites' real tiles.

One test on purpose: Flower polls every 3 s and a dead node costs about 64 s, so each extra deployment would
cost minutes. It checks, in order: a site whose key was never registered is refused at the front; the three
registered sites connect over TLS through the front; pooling starts; one site is killed mid-transfer; the run
still completes (pool -> train -> evaluate -> report) with the other two and reports the killed one as missing;
the metrics each site reported are those of the trained model on that site's own held-out tiles; every process
is stopped by its pid.
"""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
import pytest
import yaml

from pixcell_fed.federation import deployment as D
from pixcell_fed.federation.app_bundle import app_sha256
from pixcell_fed.federation.services import start_coordinator_serve
from pixcell_fed.testing.federation import TINY_VIT, make_site_bundles

pytestmark = pytest.mark.slow

SITES = {"alpha": 12, "beta": 12, "gamma": 40}
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def _site_metrics(model_dir, eval_dir) -> dict:
    """What the site computes: the checkpoint's metrics on the site's held-out tiles, recomputed here."""
    from pixcell_fed.federation.evaluation import evaluate_model
    from pixcell_fed.training.models import load_checkpoint, state_dict_of

    model, spec = load_checkpoint(model_dir)
    return evaluate_model(state_dict_of(model), spec, eval_dir)


def test_deployment_through_the_locked_down_commands_with_a_site_killed(tmp_path):
    from pixcell_fed.bundle.trust import add_site_to_trust_file

    logs, work, certs, home = tmp_path / "logs", tmp_path / "coordinator", tmp_path / "certs", tmp_path / "flwr_home"
    env = {**D.flower_env(home), "PIXCELL_FED_NO_PROGRESS": "1"}
    bundles = make_site_bundles(tmp_path / "sites", SITES, tile_size=64, n_eval=10, n_train=8)
    entries = yaml.safe_load(bundles.trust_file.read_text())["sites"]
    keys = {s: D.make_site_auth_key(tmp_path / "keys", s) for s in [*SITES, "rogue"]}
    for site in SITES:  # what 'coordinator trust-add ... --auth-key' writes: names come from these keys
        add_site_to_trust_file(bundles.trust_file, site, signing_key=entries[site]["signing_key"],
                               officers=entries[site]["officers"], auth_key=keys[site][1].read_text())
    port, internal = D.free_port(), D.free_port()
    procs: list[D.Process] = []

    def cli(name: str, module: str, *args: str) -> D.Process:
        proc = D.Process(name, [sys.executable, "-m", module, *args], log_path=logs / f"{name}.log", env=env)
        procs.append(proc)
        return proc

    try:
        procs.append(start_coordinator_serve(certs, port=port, internal_port=internal, env=env,
                                             log_path=logs / "coordinator-serve.log"))
        for site in SITES:
            reg = cli(f"register-{site}", "coordinator.cli", "register-site", str(keys[site][1]), "--name", site,
                      "--trust", str(bundles.trust_file), "--superlink", f"127.0.0.1:{internal}", "--ca",
                      str(certs / "ca.crt"), "--flwr-home", str(home))
            assert reg.popen.wait(180) == 0, reg.log_tail()

        # a site whose key was never registered is refused (through the front, like every site)
        rogue = D.start_supernode("rogue", superlink=f"127.0.0.1:{port}", port=D.free_port(),
                                  node_config={"site-name": "rogue", "bundle-dir": str(bundles.sites[0].bundle_dir)},
                                  flwr_home=home, log_dir=logs, root_certificates=certs / "ca.crt",
                                  auth_private_key=keys["rogue"][0])
        procs.append(rogue)
        rogue.popen.wait(120)
        assert rogue.popen.returncode != 0 and f"Exit Code: {D.REGISTER_REFUSED_EXIT}" in rogue.log_tail(), rogue.log_tail()

        nodes = {}
        for s in bundles.sites:
            # 'serve' names this file in the node config (site-config): the site's own evaluation limits, its
            # held-out set having 5 tiles per class (a request could only raise the minimum)
            config = tmp_path / f"{s.name}.yaml"
            config.write_text(yaml.safe_dump({
                "site": {"name": s.name, "work_dir": str(s.bundle_dir.parents[2])},
                "federation": {"superlink": f"127.0.0.1:{port}", "root_certificates": str(certs / "ca.crt"),
                               "auth_private_key": str(keys[s.name][0]), "port": D.free_port(),
                               "eval_dir": str(s.eval_dir), "train_dir": str(s.train_dir), "app_sha256": app_sha256(),
                               "evaluation": {"min_tiles_per_class": 5}}}))
            nodes[s.name] = cli(f"site-{s.name}", "site_agent.cli", "serve", "--config", str(config))

        settings = D.write_run_config(tmp_path / "run.toml", {
            "work-dir": str(work), "trust-file": str(bundles.trust_file), "expected-sites": ",".join(SITES),
            "min-sites": 3, "wait-for-sites-s": 120.0, "chunk-mb": 0.06, "reply-timeout-s": 120.0,
            "arch": TINY_VIT["arch"], "model-kwargs": json.dumps(TINY_VIT["kwargs"]), "img-size": TINY_VIT["img_size"],
            "epochs": 2, "batch-size": 8, "lr": 0.001, "dp-rounds": 2, "dp-batch-size": 4, "dp-lr": 0.01})
        run = cli("coordinator-run", "coordinator.cli", "run", "--settings", str(settings), "--superlink",
                  f"127.0.0.1:{internal}", "--ca", str(certs / "ca.crt"), "--flwr-home", str(home))

        # kill gamma (its SuperNode, launcher and ClientApps) once some, but not all, of its tiles arrived (tiles
        # wait in the site's staging folder until its whole bundle verified)
        gamma_tiles = work / "pool" / "staging" / "gamma" / "run-gamma-1" / "tiles"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (gamma_tiles.is_dir() and any(gamma_tiles.glob("*.png"))):
            assert run.alive(), run.log_tail()
            time.sleep(0.2)
        arrived = len(list(gamma_tiles.glob("*.png")))
        assert 0 < arrived < SITES["gamma"], f"gamma tiles before the kill: {arrived}"
        nodes["gamma"].kill()

        run.popen.wait(600)
        assert run.popen.returncode == 0, run.log_tail()
        report = json.loads((work / "report" / "report.json").read_text())
        pool = report["pool"]
        assert pool["complete"] == ["alpha", "beta"] and pool["missing"] == ["gamma"]
        assert "dropped out" in pool["sites"]["gamma"]["reason"]
        assert pool["sites"]["alpha"]["audit_verdict"] == "PASS"
        table = pd.read_parquet(work / "pool" / "pool.parquet")
        assert table.groupby("site").size().to_dict() == {"alpha": 12, "beta": 12}
        assert not (work / "pool" / "bundles" / "gamma").exists() and any(gamma_tiles.glob("*.png"))  # staged only
        assert [h["epoch"] for h in report["training"]["history"]] == [1, 2]

        # each site's figures are the trained model's on that site's own held-out tiles (as reported, rounded)
        assert set(report["evaluation"]) == {"alpha", "beta"}
        for s in bundles.sites[:2]:
            reported, expected = report["evaluation"][s.name], _site_metrics(work / "model", s.eval_dir)
            assert reported["n"] == expected["n"] == 10
            for name in METRICS:
                assert reported[name] == pytest.approx(expected[name], abs=0.005), (s.name, name)
        pooled = report["pooled_evaluation"]
        assert pooled["n"] == 20
        for name in METRICS:  # weighted by the tiles each site evaluated
            assert pooled[name] == pytest.approx(sum(report["evaluation"][s][name] * 10 for s in ("alpha", "beta")) / 20)

        # DP fine-tune on the two remaining sites' real tiles: each site's privacy ledger carried epsilon across rounds
        dp = report["dp"]
        assert set(dp["privacy"]) == {"alpha", "beta"} and set(dp["evaluation"]) == {"alpha", "beta"}
        for p in dp["privacy"].values():  # delta: the site's own, 1/(10 N) for its 8 training tiles, rounded down
            assert p["status"] == "trained" and p["rounds"] == 2 and p["delta"] == 0.01
            assert p["epsilon_by_round"][0] < p["epsilon_by_round"][1]
        html = (work / "report" / "report.html").read_text()
        assert "gamma" in html and "balanced accuracy" in html

        listing = D.run_flwr(["ls", "consortium", "--format", "json"], flwr_home=home)
        assert "finished:completed" in listing.stdout, listing.stdout + listing.stderr
        assert "launching the ClientApp" in nodes["alpha"].log_tail(400_000)  # the pinned launcher ran the app
    finally:
        for proc in reversed(procs):
            proc.stop()
    for proc in procs:
        assert not proc.alive()
        # nothing of the process group survived (the serve commands supervise Flower processes that start apps)
        assert proc.group_pids() == []

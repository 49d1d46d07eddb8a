"""Item 6 end to end: SuperLink + three SuperNodes on loopback, TLS, registered site keys, one site killed.

Also covers item 5 over real Flower: two rounds of the DP fine-tune on the surviving sites' real tiles.

One test on purpose: Flower polls every 3 s and a dead node costs about 64 s, so each extra deployment would
cost minutes. It checks, in order: an unregistered site is refused; the three registered sites connect over
TLS; pooling starts; one site is killed mid-transfer; the run still completes (pool -> train -> evaluate ->
report) with the other two and reports the killed one as missing; every process is stopped by its pid.
"""

from __future__ import annotations

import json
import time

import pandas as pd

from pixcell_fed.federation import deployment as D
from pixcell_fed.testing.federation import TINY_VIT, make_site_bundles

SITES = {"alpha": 12, "beta": 12, "gamma": 40}


def test_deployment_tls_auth_pool_train_evaluate_with_a_site_killed(tmp_path):
    flwr_home = tmp_path / "flwr_home"
    logs = tmp_path / "logs"
    work = tmp_path / "coordinator"
    bundles = make_site_bundles(tmp_path / "sites", SITES, tile_size=64, n_eval=10, n_train=8)
    tls = D.make_tls(tmp_path / "certs")
    keys = {s: D.make_site_auth_key(tmp_path / "keys", s) for s in [*SITES, "rogue"]}
    procs: list[D.Process] = []
    try:
        port = D.free_port()
        link = D.start_superlink(port=port, tls=tls, node_auth=True, flwr_home=flwr_home, log_dir=logs)
        procs.append(link)
        D.write_flwr_config(flwr_home, "consortium", f"127.0.0.1:{port}", root_certificates=tls.ca_cert)
        for site in SITES:
            D.register_site(keys[site][1], "consortium", site, flwr_home=flwr_home)

        # a site whose key was never registered is refused
        rogue = D.start_supernode("rogue", superlink=f"127.0.0.1:{port}", port=D.free_port(),
                                  node_config={"site-name": "rogue", "bundle-dir": str(bundles.sites[0].bundle_dir)},
                                  flwr_home=flwr_home, log_dir=logs, root_certificates=tls.ca_cert,
                                  auth_private_key=keys["rogue"][0])
        procs.append(rogue)
        rogue.popen.wait(60)
        assert rogue.popen.returncode != 0 and f"Exit Code: {D.REGISTER_REFUSED_EXIT}" in rogue.log_tail(), rogue.log_tail()

        nodes = {}
        for s in bundles.sites:
            nodes[s.name] = D.start_supernode(
                s.name, superlink=f"127.0.0.1:{port}", port=D.free_port(),
                node_config={"site-name": s.name, "bundle-dir": str(s.bundle_dir), "eval-dir": str(s.eval_dir),
                             "train-dir": str(s.train_dir)},
                flwr_home=flwr_home, log_dir=logs, root_certificates=tls.ca_cert, auth_private_key=keys[s.name][0])
            procs.append(nodes[s.name])

        run_config = {"work-dir": str(work), "trust-file": str(bundles.trust_file), "expected-sites": ",".join(SITES),
                      "min-sites": 3, "wait-for-sites-s": 60.0, "chunk-mb": 0.06, "reply-timeout-s": 120.0,
                      "arch": TINY_VIT["arch"], "model-kwargs": json.dumps(TINY_VIT["kwargs"]),
                      "img-size": TINY_VIT["img_size"], "epochs": 2, "batch-size": 8, "lr": 0.001,
                      "dp-rounds": 2, "dp-batch-size": 4, "dp-lr": 0.01}
        run = D.Process("flwr-run", D.flwr_run_command("consortium", D.write_run_config(tmp_path / "run.toml", run_config)), log_path=logs / "flwr-run.log",
                        env=D.flower_env(flwr_home))
        procs.append(run)

        # kill gamma once some, but not all, of its tiles arrived
        gamma_tiles = work / "pool" / "bundles" / "gamma" / "run-gamma-1" / "tiles"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not (gamma_tiles.is_dir() and any(gamma_tiles.glob("*.png"))):
            assert run.alive(), run.log_tail()
            time.sleep(0.2)
        arrived = len(list(gamma_tiles.glob("*.png")))
        assert 0 < arrived < SITES["gamma"], f"gamma tiles before the kill: {arrived}"
        nodes["gamma"].kill()

        run.popen.wait(420)
        assert run.popen.returncode == 0, run.log_tail()
        report = json.loads((work / "report" / "report.json").read_text())
        pool = report["pool"]
        assert pool["complete"] == ["alpha", "beta"] and pool["missing"] == ["gamma"]
        assert "dropped out" in pool["sites"]["gamma"]["reason"]
        assert pool["sites"]["alpha"]["audit_verdict"] == "PASS"
        table = pd.read_parquet(work / "pool" / "pool.parquet")
        assert table.groupby("site").size().to_dict() == {"alpha": 12, "beta": 12}
        assert [h["epoch"] for h in report["training"]["history"]] == [1, 2]
        assert set(report["evaluation"]) == {"alpha", "beta"}
        for metrics in report["evaluation"].values():
            assert metrics["n"] == 10
            assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["balanced_accuracy"] <= 1.0
            assert 0.0 <= metrics["macro_f1"] <= 1.0
        assert report["pooled_evaluation"]["n"] == 20
        # DP fine-tune on the two remaining sites' real tiles: each site's privacy ledger carried epsilon across rounds
        dp = report["dp"]
        assert set(dp["privacy"]) == {"alpha", "beta"} and set(dp["evaluation"]) == {"alpha", "beta"}
        for p in dp["privacy"].values():  # delta: the site's own, 1/(10 N) for its 8 training tiles, rounded down
            assert p["status"] == "trained" and p["rounds"] == 2 and p["delta"] == 0.01
            assert p["epsilon_by_round"][0] < p["epsilon_by_round"][1]
        html = (work / "report" / "report.html").read_text()
        assert "gamma" in html and "balanced accuracy" in html

        listing = D.run_flwr(["ls", "consortium", "--format", "json"], flwr_home=flwr_home)
        assert "finished:completed" in listing.stdout, listing.stdout + listing.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()
    for proc in procs:
        assert not proc.alive()
        # nothing of the process group survived (SuperNodes and the SuperLink start app processes of their own)
        assert proc.group_pids() == []

"""Attacks on the locked-down deployment, with real Flower processes on loopback (issue 11, items 1 and 2).

``coordinator serve`` runs once for the module (SuperLink on loopback behind the Fleet front, its own SuperExec
holding a secret). Then:

* an outsider holding only ``ca.crt`` drives Flower's own CLI at the public port: registering its key, listing
  the nodes, listing runs and ``flwr run`` of its own app are all refused, and nothing changed on the SuperLink;
  an unauthenticated ``AcquireTask`` (claiming the coordinator's ServerApp task) is refused even on loopback;
* a foreign app bundle, run by whoever holds the Control API (the coordinator's machine), is refused by a site
  that pinned only the consortium app: its ClientApp (which would write a marker file) never runs and the site
  sends no reply, while a site that also pinned the foreign app runs it (so the marker would appear).

On the code before issue 11 every one of these succeeded (see docs/threat-model.md).
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
from pathlib import Path

import pytest
import yaml

from pixcell_fed.federation import deployment as D
from pixcell_fed.federation.app_bundle import app_sha256
from pixcell_fed.federation.services import start_coordinator_serve

pytestmark = pytest.mark.slow

FOREIGN_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    deadline = time.time() + 120
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < int(cfg["expect-nodes"]) and time.time() < deadline:
        time.sleep(1)
        nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=float(cfg["reply-timeout"])))
    sites = sorted(str(r.content["info"]["site"]) for r in replies if not r.has_error())
    errors = [str(r.error.reason) for r in replies if r.has_error()]
    Path(cfg["out-file"]).write_text(json.dumps({"nodes": len(nodes), "sites": sites, "errors": errors}))
'''

FOREIGN_CLIENT = '''
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = str(context.node_config.get("site-name", "unknown"))
    Path(context.run_config["marker-dir"], site + ".txt").write_text("foreign code ran at " + site)
    return Message(RecordDict({"info": ConfigRecord({"site": site})}), reply_to=msg)
'''

FOREIGN_PYPROJECT = '''
[project]
name = "not-pixcell"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "foreign.server:app"
clientapp = "foreign.client:app"

[tool.flwr.app.config]
out-file = "out.json"
marker-dir = "."
expect-nodes = 1
reply-timeout = 30.0
'''


def foreign_app(folder: Path) -> Path:
    (folder / "foreign").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (folder / "foreign" / "__init__.py").write_text("")
    (folder / "foreign" / "server.py").write_text(FOREIGN_SERVER)
    (folder / "foreign" / "client.py").write_text(FOREIGN_CLIENT)
    return folder


class Coordinator:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.home = root / "flwr_home"
        self.logs = root / "logs"
        self.port, self.internal = D.free_port(), D.free_port()
        self.env = {**D.flower_env(self.home), "PIXCELL_FED_NO_PROGRESS": "1"}
        self.procs: list[D.Process] = []

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def start(self) -> "Coordinator":
        self.procs.append(start_coordinator_serve(self.certs, port=self.port, internal_port=self.internal,
                                                  env=self.env, log_path=self.logs / "coordinator-serve.log"))
        D.write_flwr_config(self.home, "consortium", f"127.0.0.1:{self.internal}", root_certificates=self.ca)
        return self

    def cli(self, module: str, *args: str, timeout: float = 300):
        import subprocess

        return subprocess.run([sys.executable, "-m", module, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for proc in self.procs:
            assert proc.group_pids() == [], f"{proc.name} left processes behind"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    coord = Coordinator(tmp_path_factory.mktemp("lockdown")).start()
    try:
        yield coord
    finally:
        coord.stop()


def _post(port: int, ca: Path, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/protobuf", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _refused(proc) -> bool:
    """Whether a flwr CLI call failed (with --format json flwr exits 0 and says "success": false)."""
    try:
        return proc.returncode != 0 or json.loads(proc.stdout).get("success") is False
    except ValueError:
        return proc.returncode != 0


def _counts(coord: Coordinator) -> tuple[int, int]:
    """(registered nodes, runs), as the coordinator sees them on loopback."""
    nodes = D.run_flwr(["supernode", "list", "consortium", "--format", "json"], flwr_home=coord.home)
    runs = D.run_flwr(["ls", "consortium", "--format", "json"], flwr_home=coord.home)
    assert not _refused(nodes) and not _refused(runs), nodes.stdout + nodes.stderr + runs.stdout + runs.stderr
    return len(json.loads(nodes.stdout)["nodes"]), len(json.loads(runs.stdout)["runs"])


def test_an_outsider_with_ca_crt_is_refused_at_the_public_port(coordinator, tmp_path):
    before = _counts(coordinator)
    outsider_home = tmp_path / "outsider_home"
    D.write_flwr_config(outsider_home, "public", f"127.0.0.1:{coordinator.port}", root_certificates=coordinator.ca)
    _, public = D.make_site_auth_key(tmp_path / "keys", "rogue")
    attempts = {
        "register": ["supernode", "register", str(public), "public", "--name", "hospital-a"],
        "list nodes": ["supernode", "list", "public", "--format", "json"],
        "list runs": ["ls", "public", "--format", "json"],
        "run": ["run", str(foreign_app(tmp_path / "app")), "public"],
    }
    for what, args in attempts.items():
        proc = D.run_flwr(args, flwr_home=outsider_home, timeout=180)
        assert _refused(proc), f"the outsider could {what}: {proc.stdout[-2000:]}"
        assert "404 Not Found" in proc.stdout + proc.stderr  # refused by the front, not by a SuperLink error
    # the same requests, by hand, never reach the SuperLink's Control or runtime API
    for path in ("/v1/control/register-node", "/v1/control/list-nodes", "/v1/control/start-run",
                 "/v1/runtime/acquire-task", "/v1/fleet/../control/list-nodes"):
        assert _post(coordinator.port, coordinator.ca, path, b"\x0a\x00") == (404, b"not found\n"), path
    # the Fleet API is forwarded: the SuperLink itself answers (it refuses an unsigned call, not the front)
    status, body = _post(coordinator.port, coordinator.ca, "/v1/fleet/get-run", b"")
    assert status == 401 and body != b"not found\n"
    assert _counts(coordinator) == before  # nothing was registered, nothing was run


def test_the_coordinators_serverapp_tasks_need_the_superexec_secret(coordinator):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    claim = AcquireTaskRequest(supported_task_types=["flwr-serverapp"]).SerializeToString()
    status, _ = _post(coordinator.internal, coordinator.ca, "/v1/runtime/acquire-task", claim)
    assert status == 401  # on loopback too: only the coordinator's own flower-superexec may claim a ServerApp
    assert _post(coordinator.port, coordinator.ca, "/v1/runtime/acquire-task", claim)[0] == 404


def test_a_foreign_app_runs_no_code_and_gets_no_reply_at_a_site_that_did_not_pin_it(coordinator, tmp_path):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    from pixcell_fed.bundle.trust import add_site_to_trust_file
    from pixcell_fed.testing.federation import make_site_bundles

    app = foreign_app(tmp_path / "app")
    foreign_hash = app_sha256(app)
    pins = {"alpha": [app_sha256()], "beta": [app_sha256(), foreign_hash]}  # beta chose to run the foreign app too
    bundles = make_site_bundles(tmp_path / "sites", {"alpha": 4, "beta": 4}, tile_size=64, n_eval=2, n_train=2)
    entries = yaml.safe_load(bundles.trust_file.read_text())["sites"]
    markers = tmp_path / "markers"
    markers.mkdir()
    sites, runtime_ports = [], {}
    try:
        for fixture in bundles.sites:
            name = fixture.name
            private, public = D.make_site_auth_key(tmp_path / "keys", name)
            add_site_to_trust_file(bundles.trust_file, name, signing_key=entries[name]["signing_key"],
                                   officers=entries[name]["officers"], auth_key=public.read_text())
            reg = coordinator.cli("coordinator.cli", "register-site", str(public), "--name", name, "--trust",
                                  str(bundles.trust_file), "--superlink", f"127.0.0.1:{coordinator.internal}", "--ca",
                                  str(coordinator.ca), "--flwr-home", str(coordinator.home))
            assert reg.returncode == 0, reg.stderr
            config = tmp_path / f"{name}.yaml"
            runtime_ports[name] = D.free_port()
            config.write_text(yaml.safe_dump({
                "site": {"name": name, "work_dir": str(fixture.bundle_dir.parents[2])},
                "federation": {"superlink": f"127.0.0.1:{coordinator.port}", "root_certificates": str(coordinator.ca),
                               "auth_private_key": str(private), "port": runtime_ports[name],
                               "bundle_dir": str(fixture.bundle_dir), "eval_dir": str(fixture.eval_dir),
                               "app_sha256": pins[name]}}))
            sites.append(D.Process(f"site-{name}", [sys.executable, "-m", "site_agent.cli", "serve", "--config",
                                                    str(config)], log_path=tmp_path / f"site-{name}.log",
                                   env=coordinator.env))
        out = tmp_path / "out.json"
        run = D.run_flwr(["run", str(app), "consortium", "--stream", "--run-config",
                          f'out-file="{out}" marker-dir="{markers}" expect-nodes=2 reply-timeout=45.0'],
                         flwr_home=coordinator.home, timeout=400)
        assert out.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["nodes"] == 2
        assert result["sites"] == ["beta"]  # alpha sent nothing back
        assert sorted(p.name for p in markers.iterdir()) == ["beta.txt"]  # no foreign code ran at alpha
        alpha_log = sites[0].log_tail(200_000)
        assert "REFUSED task" in alpha_log and f"app bundle {foreign_hash} is not pinned" in alpha_log
        assert "launching the ClientApp" not in alpha_log
        assert "launching the ClientApp" in sites[1].log_tail(200_000)
        for site in sites:
            assert site.alive(), site.log_tail()
        # another local user of alpha's machine cannot claim alpha's tasks: the SuperNode wants the secret
        claim = AcquireTaskRequest(supported_task_types=["flwr-clientapp"]).SerializeToString()
        conn = http.client.HTTPConnection("127.0.0.1", runtime_ports["alpha"], timeout=30)
        conn.request("POST", "/v1/runtime/acquire-task", body=claim, headers={"content-type": "application/protobuf"})
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        for site in sites:
            site.stop()
    for site in sites:
        assert site.group_pids() == []

"""Sites run only the app they pinned (issue 11, item 2): the app folder, its hash, and the site's launcher.

The launcher is driven here against a stand-in of the SuperNode's runtime API that speaks Flower's own protobuf
over HTTP and checks the SuperExec signature with flwr's verifier; ``flwr-clientapp`` is replaced by a recorder,
so the tests show which tasks would start code. A real SuperNode refusing a foreign app bundle end to end is in
``test_federation_lockdown.py``.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest
from loopback_asgi import LoopbackASGI

from pixcell_fed.errors import ConfigError, UsageError
from pixcell_fed.federation import pinned_launcher as L
from pixcell_fed.federation.app_bundle import app_dir, app_sha256, build_app_fab

PINNED = "a" * 64
FOREIGN = "b" * 64


def test_launcher_constants_match_flwr():
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    assert L.CLIENT_APP_TASK == TaskType.CLIENT_APP.value
    assert L.CLIENT_APP_COMMAND == TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP]


def test_pins_refuse_foreign_bundles_and_other_task_types():
    pins = L.Pins.of([PINNED, "c" * 64])
    assert pins.refusal(L.CLIENT_APP_TASK, PINNED) is None
    assert "not pinned" in pins.refusal(L.CLIENT_APP_TASK, FOREIGN)
    assert "not pinned" in pins.refusal(L.CLIENT_APP_TASK, "")
    assert "not a ClientApp" in pins.refusal("flwr-agentapp", PINNED)
    assert "not a ClientApp" in pins.refusal("flwr-serverapp", PINNED)
    with pytest.raises(UsageError):
        L.Pins.of([])
    for bad in ("A" * 64, "a" * 63, "g" * 64, PINNED + "\n"):
        with pytest.raises(ConfigError):
            L.Pins.of([bad])


class RuntimeStandIn(LoopbackASGI):
    """The SuperNode's runtime API for one method, AcquireTask: hands out queued tasks to signed requests only."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.tasks: list[tuple[str, str]] = []  # (type, fab_hash), handed out in order
        self.unsigned = 0
        self.nonces: set[str] = set()
        super().__init__(self.app)

    def reserve_nonce(self, *, namespace: str, nonce: str, expires_at: float) -> bool:
        if nonce in self.nonces:
            return False
        self.nonces.add(nonce)
        return True

    async def app(self, scope, receive, send) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
        from flwr.proto.task_pb2 import Task
        from flwr.supercore.auth.superexec import derive_auth_secret, verify_superexec_request

        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        request = AcquireTaskRequest.FromString(body)
        signed = verify_superexec_request(
            request=request, method=L.ACQUIRE_TASK_METHOD, auth_secret=derive_auth_secret(self.secret),
            timestamp_raw=headers.get("flwr-superexec-ts", ""), nonce=headers.get("flwr-superexec-nonce", ""),
            body_sha256_header=headers.get("flwr-superexec-body-sha256", ""),
            signature=headers.get("flwr-superexec-signature", ""), nonce_store=self)
        if scope["path"] != "/v1/runtime/acquire-task" or not signed:
            self.unsigned += 1
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        reply = AcquireTaskResponse()
        if self.tasks and set(request.supported_task_types) == {L.CLIENT_APP_TASK}:
            kind, fab_hash = self.tasks.pop(0)
            reply = AcquireTaskResponse(task=Task(task_id=len(self.tasks) + 7, type=kind, run_id=42, fab_hash=fab_hash),
                                        token=f"token-{fab_hash[:4]}")
        out = reply.SerializeToString()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": out})

def test_launcher_signs_its_claims_and_starts_code_only_for_pinned_bundles(monkeypatch, caplog):
    started: list[list[str]] = []

    class Recorded:
        def __init__(self, cmd, *a, **k):
            started.append(list(cmd))

        def poll(self):
            return 0

    monkeypatch.setattr(L.subprocess, "Popen", Recorded)
    secret = b"s" * 32
    with RuntimeStandIn(secret) as runtime:
        runtime.tasks = [(L.CLIENT_APP_TASK, FOREIGN), (L.CLIENT_APP_TASK, PINNED), ("flwr-agentapp", PINNED),
                         (L.CLIENT_APP_TASK, "")]
        launcher = L.PinnedLauncher(f"127.0.0.1:{runtime.port}", L.Pins.of([PINNED]), secret=secret)
        with caplog.at_level("INFO", logger="pixcell_fed"):
            outcomes = [launcher.step() for _ in range(5)]
        assert outcomes == ["refused", "launched", "refused", "refused", None]
        assert runtime.unsigned == 0
        assert len(started) == 1  # the one pinned ClientApp task, nothing for the others
        cmd = started[0]
        assert cmd[0].endswith("flwr-clientapp") and cmd[cmd.index("--token") + 1] == f"token-{PINNED[:4]}"
        assert cmd[cmd.index("--runtime-api-address") + 1] == f"127.0.0.1:{runtime.port}"
        assert f"app bundle {FOREIGN} is not pinned" in caplog.text


def test_app_folder_is_minimal_and_its_hash_is_deterministic(tmp_path):
    import tomllib

    import pixcell_fed

    fab = build_app_fab()
    assert hashlib.sha256(fab).hexdigest() == app_sha256() == app_sha256()
    assert len(fab) < 10_000
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "pixcell_fed_app/__init__.py", "pixcell_fed_app/client_app.py",
                             "pixcell_fed_app/server_app.py", "pyproject.toml"]
    # the shims carry no code of their own: they import the installed package
    shims = {n: zipfile.ZipFile(io.BytesIO(fab)).read(n).decode() for n in names if n.endswith("_app.py")}
    assert "from site_agent import client_app" in shims["pixcell_fed_app/client_app.py"]
    assert "from coordinator import server_app" in shims["pixcell_fed_app/server_app.py"]
    config = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    assert config["project"]["version"] == pixcell_fed.__version__
    assert config["project"]["dependencies"] == []  # nothing is installed at run time
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "pixcell_fed_app.server_app:app",
                                                          "clientapp": "pixcell_fed_app.client_app:app"}
    # every run setting of the app maps to the coordinator's typed config
    from pixcell_fed.federation.config import from_run_config

    from_run_config(config["tool"]["flwr"]["app"]["config"])

    # a copy builds to the same hash; one changed byte, or a file added, changes it; Python caches do not count
    copy = shutil.copytree(app_dir(), tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    assert app_sha256(copy) == app_sha256()
    (copy / "pixcell_fed_app" / "__pycache__").mkdir(exist_ok=True)
    (copy / "pixcell_fed_app" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert app_sha256(copy) == app_sha256()
    (copy / "pixcell_fed_app" / "evil.py").write_text("import os\n")
    assert app_sha256(copy) != app_sha256()


def test_site_agent_app_hash_prints_the_pin(tmp_path, capsys):
    from pixcell_fed.cli_support import run_cli

    site = tmp_path / "site.yaml"
    site.write_text(f"site:\n  name: alpha\nfederation:\n  app_sha256: {app_sha256()}\n")
    assert run_cli("site-agent", "t", ("site_agent.commands.app_hash",), ["app-hash", "--config", str(site)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == app_sha256() and "pins this app" in out.err
    site.write_text(f"site:\n  name: alpha\nfederation:\n  app_sha256: [{FOREIGN}, {PINNED}]\n")
    assert run_cli("site-agent", "t", ("site_agent.commands.app_hash",), ["app-hash", "--config", str(site)]) == 0
    assert "does NOT pin this app" in capsys.readouterr().err


def test_site_config_pins_are_sha256_one_or_several(tmp_path):
    from pixcell_fed.config import load_site_config

    site = tmp_path / "site.yaml"
    site.write_text(f"site:\n  name: alpha\nfederation:\n  app_sha256: {PINNED}\n")
    assert load_site_config(site).federation.app_sha256 == (PINNED,)
    site.write_text(f"site:\n  name: alpha\nfederation:\n  app_sha256: [{PINNED}, {FOREIGN}]\n")
    assert load_site_config(site).federation.app_sha256 == (PINNED, FOREIGN)
    site.write_text("site:\n  name: alpha\nfederation:\n  app_sha256: [deadbeef]\n")
    with pytest.raises(ConfigError, match="app_sha256"):
        load_site_config(site)
    assert Path(site).exists()

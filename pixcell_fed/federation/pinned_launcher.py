"""The site's ClientApp launcher: a message is handled only by an app whose bundle hash the site pinned.

A Flower SuperNode runs whatever app bundle (FAB) the SuperLink sends, with the FAB's folder first on
``sys.path``. ``site-agent serve`` therefore starts the SuperNode with ``--isolation process``, so that the
SuperNode itself runs no app code, and starts this launcher in place of the ClientApp side of
``flower-superexec``. The launcher claims each pending ClientApp task from the SuperNode's runtime API (on
loopback, authenticated with the SuperExec secret) and

* launches ``flwr-clientapp`` for it only when the task's ``fab_hash`` is in the site's pinned list
  (``federation.app_sha256``); the SuperNode stores a FAB under the SHA-256 of its content and hands the
  ClientApp exactly the FAB of the task's run, so the pin binds the code that runs;
* otherwise runs nothing and sends nothing: the claim expires, the task goes back to pending and the
  coordinator never gets a reply. The refusal is logged once per task.

Flower 1.42 internals this relies on (pinned in pyproject.toml, see docs/federation.md): the runtime API client
``flwr.supercore.runtime.RuntimeHttpClient`` with ``AcquireTaskRequest`` (``flwr.proto.runtime_pb2``), the
``SuperExecAuthHttpInterceptor`` and ``RuntimeVersionHttpInterceptor`` of ``flwr.supercore.interceptors``,
``flwr.supercore.retry.make_simple_http_retry_invoker``, the ``Task`` fields ``type`` / ``fab_hash`` /
``task_id`` / ``run_id``, the task type ``TaskType.CLIENT_APP``, the ``flwr-clientapp`` command line
(``--runtime-api-address``, ``--token``, ``--insecure``, ``--parent-pid``), and the SuperNode's handling of an
unlaunched claim (``supercore/corestate``: a STARTING task whose claim expires returns to PENDING, no reply).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pixcell_fed.errors import UsageError
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)

CLIENT_APP_TASK = "flwr-clientapp"  # flwr.supercore.constant.TaskType.CLIENT_APP (a test checks it)
CLIENT_APP_COMMAND = "flwr-clientapp"
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"


@dataclass(frozen=True)
class Pins:
    """The app bundle hashes (lowercase hex SHA-256) this site runs."""

    hashes: frozenset[str]

    @classmethod
    def of(cls, hashes: Iterable[str]) -> Pins:
        from pixcell_fed.federation.app_bundle import check_sha256

        pins = frozenset(check_sha256(h, "pinned app hash") for h in hashes)
        if not pins:
            raise UsageError(
                "no pinned app hash", hint="set federation.app_sha256 in site.yaml ('site-agent app-hash' prints it)"
            )
        return cls(pins)

    def refusal(self, task_type: str, fab_hash: str) -> str | None:
        """Why a task must not run (``None``: it may)."""
        if task_type != CLIENT_APP_TASK:
            return f"task type {task_type!r} is not a ClientApp"
        if fab_hash not in self.hashes:
            return f"app bundle {fab_hash or '(none)'} is not pinned by this site"
        return None


def clientapp_command(runtime_api_address: str, token: str, parent_pid: int) -> list[str]:
    """The ``flwr-clientapp`` process for one claimed task (plain HTTP: the runtime API is on loopback)."""
    from pixcell_fed.federation.deployment import flower_bin

    return [
        flower_bin(CLIENT_APP_COMMAND),
        "--runtime-api-address",
        runtime_api_address,
        "--token",
        token,
        "--insecure",
        "--parent-pid",
        str(parent_pid),
    ]


def runtime_client(runtime_api_address: str, secret: bytes | None):
    """Flower's runtime API client, signing ``AcquireTask`` with the SuperExec secret when there is one."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.protobuf.client import ProtobufClientInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_TASK_METHOD}))
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


class PinnedLauncher:
    """Claims ClientApp tasks and launches the pinned ones; see the module docstring."""

    def __init__(self, runtime_api_address: str, pins: Pins, *, secret: bytes | None) -> None:
        self.address = runtime_api_address
        self.pins = pins
        self.client = runtime_client(runtime_api_address, secret)
        self.children: list[subprocess.Popen] = []
        self.refused: set[int] = set()

    def step(self) -> str | None:
        """Claim at most one task and launch or refuse it; returns ``"launched"``, ``"refused"`` or ``None``."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        self.children = [c for c in self.children if c.poll() is None]  # reap finished ClientApps
        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK]))
        if not (res.HasField("task") and res.token):
            return None
        task = res.task
        reason = self.pins.refusal(task.type, task.fab_hash)
        if reason is not None:
            if task.task_id not in self.refused:
                self.refused.add(task.task_id)
                log.warning(
                    "REFUSED task %d of run %d: %s; nothing runs and no reply is sent",
                    task.task_id,
                    task.run_id,
                    reason,
                )
            return "refused"
        log.info(
            "launching the ClientApp for task %d of run %d (app %s)", task.task_id, task.run_id, task.fab_hash[:12]
        )
        self.children.append(subprocess.Popen(clientapp_command(self.address, res.token, os.getpid())))
        return "launched"

    def run_forever(self, poll_s: float = 1.0) -> None:
        log.info(
            "pinned launcher on %s: runs only app bundle(s) %s",
            self.address,
            ", ".join(sorted(h[:12] + "..." for h in self.pins.hashes)),
        )
        try:
            while True:
                self.step()
                time.sleep(poll_s)
        finally:
            self.client.close()

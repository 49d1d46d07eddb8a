"""The locked-down deployment: what ``coordinator serve`` and ``site-agent serve`` start, and how they supervise it.

Coordinator (:func:`coordinator_services`), three processes:

1. the SuperLink on **127.0.0.1** only (TLS, SuperNode authentication, ``--isolation process`` with a SuperExec
   secret): its Control API (registration, ``flwr run``) and runtime API are reachable from this machine only;
2. ``flower-superexec`` holding the secret: the only process that may claim and run ServerApp tasks;
3. the Fleet front (:mod:`pixcell_fed.federation.fleet_front`) on the public address: only the SuperNodes'
   ``/v1/fleet/*`` routes are forwarded.

Site (:func:`site_services`), two processes:

1. the SuperNode (TLS to the coordinator, the site's registered key, ``--isolation process`` with a secret, its
   runtime API on 127.0.0.1): it runs no app code itself;
2. the pinned launcher (:mod:`pixcell_fed.federation.pinned_launcher`) holding the secret: it starts a ClientApp
   only for the app bundles pinned in ``federation.app_sha256``, and only for an approved bundle.

The secret is fresh at every start, in a private temporary folder that is removed when the services stop
(:func:`private_secret`). :func:`run_services` starts the processes in order, waits for each to be ready, and
stops them all (by pid) when one of them stops or the command is interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pixcell_fed.errors import FederationError, PrivacyGateRefused, UsageError
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)

#: Public port of the Fleet front and loopback port of the SuperLink, by default.
PUBLIC_PORT = 9092
INTERNAL_PORT = 9093
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class Service:
    """One process of a deployment and how to tell that it is ready."""

    name: str
    cmd: tuple[str, ...]
    ready_url: str | None = None  # polled until it answers (GET)
    ready_any_status: bool = False  # any HTTP answer counts (the front answers 404 to everything but Fleet calls)


def check_loopback(address: str, what: str) -> str:
    """``address`` (host:port) if its host is this machine, else :class:`UsageError`: the Control API is local."""
    host = address.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise UsageError(
            f"{what} {address} is not on this machine",
            hint=f"the SuperLink's Control API listens on 127.0.0.1 only ('coordinator serve'): use "
            f"127.0.0.1:{INTERNAL_PORT}, on the coordinator's machine",
        )
    return address


@contextmanager
def private_secret() -> Iterator[Path]:
    """A fresh SuperExec secret in a private (0700) temporary folder, removed afterwards."""
    import tempfile

    from pixcell_fed.federation.deployment import write_superexec_secret

    with tempfile.TemporaryDirectory(prefix="pixcell-fed-secret-") as folder:
        yield write_superexec_secret(folder)


def _cli(module: str, *args: str) -> tuple[str, ...]:
    """A command of this installation's CLIs (run with this interpreter)."""
    return (sys.executable, "-m", module, *args)


def coordinator_services(
    tls,
    *,
    host: str = "0.0.0.0",
    port: int = PUBLIC_PORT,
    internal_port: int = INTERNAL_PORT,
    secret: Path,
    database: Path | None = None,
    max_body_mb: int = 256,
) -> list[Service]:
    """SuperLink (loopback), SuperExec (holding ``secret``), Fleet front (``host:port``): see the module docstring."""
    from pixcell_fed.federation import deployment as D

    if port == internal_port:
        raise UsageError(f"the public port and the SuperLink's loopback port are both {port}", hint="pick two ports")
    internal = f"127.0.0.1:{internal_port}"
    superlink = D.superlink_command(
        port=internal_port, tls=tls, node_auth=True, host="127.0.0.1", superexec_secret=secret, database=database
    )
    superexec = D.superexec_command(
        runtime_api=internal, ca_cert=tls.ca_cert, superexec_secret=secret, parent_pid=os.getpid()
    )
    front = _cli(
        "coordinator.cli",
        "fleet-front",
        "--certs",
        str(tls.ca_cert.parent),
        "--host",
        host,
        "--port",
        str(port),
        "--upstream",
        internal,
        "--max-body-mb",
        str(max_body_mb),
    )
    ready_host = "127.0.0.1" if host in ("0.0.0.0", "::", *LOOPBACK_HOSTS) else host
    return [
        Service("superlink", tuple(superlink), ready_url=f"https://{internal}/health"),
        Service("superexec", tuple(superexec)),
        Service("fleet-front", front, ready_url=f"https://{ready_host}:{port}/", ready_any_status=True),
    ]


def served_bundle(cfg, bundle: str | Path | None = None) -> Path:
    """The bundle a site serves: ``bundle``, else ``federation.bundle_dir``, else the newest approved one; refused
    (exit 3) unless its ``bundle.json`` says approved (read with the bundle library's own reader)."""
    from pixcell_fed.bundle.layout import STATE_APPROVED, read_bundle_json
    from pixcell_fed.bundle.state import newest_approved_bundle

    fed = cfg.federation
    chosen = Path(bundle) if bundle else (fed.bundle_dir or newest_approved_bundle(cfg.site.work_dir))
    if chosen is None:
        raise UsageError(
            f"no approved bundle to serve (looked for {cfg.site.work_dir / 'runs/*/bundle'})",
            hint="approve a bundle first ('site-agent approve'), or pass --bundle",
        )
    state = read_bundle_json(Path(chosen))["state"]
    if state != STATE_APPROVED:
        raise PrivacyGateRefused(
            f"bundle {chosen} is {state.replace('_', ' ')}: only an approved bundle is served",
            hint="a privacy officer must approve it first ('site-agent approve'); a rejected bundle is never served",
        )
    return Path(chosen)


def site_node_config(cfg, bundle: Path, config_file: str | Path | None = None) -> dict[str, str]:
    """The node config the ClientApp reads: site name, bundle, held-out evaluation folder (default: the run's
    ``eval``), DP training folder, and ``config_file`` (the site.yaml ``cfg`` came from: the DP round reads the
    site's policy and work folder there)."""
    from pixcell_fed.federation import protocol as P

    fed = cfg.federation
    node_config = {P.NODE_SITE_NAME: cfg.site.name, P.NODE_BUNDLE_DIR: str(bundle.resolve())}
    eval_dir = fed.eval_dir
    if eval_dir is None and (bundle.parent / "eval").is_dir():
        eval_dir = bundle.parent / "eval"  # the run's real held-out tiles, by label
    if eval_dir is not None:
        node_config[P.NODE_EVAL_DIR] = str(Path(eval_dir).resolve())
    if fed.train_dir is not None:
        node_config[P.NODE_TRAIN_DIR] = str(Path(fed.train_dir).resolve())
    if config_file is not None:
        node_config[P.NODE_SITE_CONFIG] = str(Path(config_file).resolve())
    return node_config


def site_services(
    cfg, bundle: str | Path | None = None, *, secret: Path, config_file: str | Path | None = None
) -> list[Service]:
    """SuperNode (process isolation, holding ``secret``) and the pinned launcher of a site (its
    :class:`~pixcell_fed.config.SiteConfig`), serving an approved bundle: see the module docstring."""
    from pixcell_fed.federation import deployment as D

    fed = cfg.federation
    for what, path in (
        ("federation.root_certificates", fed.root_certificates),
        ("federation.auth_private_key", fed.auth_private_key),
    ):
        if path is None or not Path(path).is_file():
            raise UsageError(
                f"{what} is not set or not found ({path})",
                hint="the consortium runs with TLS and site authentication: get ca.crt from the coordinator "
                "and create a key with 'site-agent auth-key'",
            )
    if not fed.app_sha256:
        raise UsageError(
            "federation.app_sha256 is not set: the site would not know which app it may run",
            hint="run 'site-agent app-hash' and set federation.app_sha256 in site.yaml to the hash it prints",
        )
    served = served_bundle(cfg, bundle)
    supernode = D.supernode_command(
        superlink=fed.superlink,
        port=fed.port,
        node_config=site_node_config(cfg, served, config_file),
        root_certificates=fed.root_certificates,
        auth_private_key=fed.auth_private_key,
        superexec_secret=secret,
    )
    runtime = f"127.0.0.1:{fed.port}"
    launcher = _cli(
        "site_agent.cli",
        "pinned-launcher",
        "--runtime-api-address",
        runtime,
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        str(os.getpid()),
        *[arg for pin in fed.app_sha256 for arg in ("--allow-app-sha256", pin)],
    )
    return [
        Service("supernode", tuple(supernode), ready_url=f"http://{runtime}/health"),
        Service("pinned-launcher", launcher),
    ]


def run_services(
    services: Sequence[Service],
    *,
    env: Mapping[str, str],
    ca: Path | None = None,
    ready_timeout: float = 120.0,
    on_ready: str = "",
) -> int:
    """Start ``services`` in order (each ready before the next), then wait; stop every one when any stops or on
    Ctrl-C / SIGTERM. Returns 0 when stopped by a signal; raises :class:`FederationError` when a process died."""
    from pixcell_fed.federation.deployment import Process, wait_healthy

    def interrupted(signum, frame):  # SIGTERM takes the same way out as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    procs: list[Process] = []
    try:
        for svc in services:
            proc = Process(svc.name, svc.cmd, log_path=None, env=env, own_group=False)
            procs.append(proc)
            if svc.ready_url:
                wait_healthy(svc.ready_url, timeout=ready_timeout, ca=ca, process=proc, any_status=svc.ready_any_status)
        if on_ready:
            print(on_ready, file=sys.stderr, flush=True)
        while all(p.alive() for p in procs):
            time.sleep(0.5)
        dead = next(p for p in procs if not p.alive())
        raise FederationError(
            f"{dead.name} stopped (exit code {dead.popen.returncode}); stopping the others",
            hint="see its log above; start the command again once the cause is fixed",
        )
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        signal.signal(signal.SIGTERM, previous)


def start_coordinator_serve(
    certs: Path,
    *,
    port: int,
    internal_port: int,
    env: Mapping[str, str],
    log_path: Path,
    hostnames: Sequence[str] = (),
    timeout: float = 180.0,
):
    """Run ``coordinator serve`` (this installation's) as a child process on 127.0.0.1, as the demo, the tests and
    the benchmark do, and return it once its Fleet front answers (the last of its processes to start)."""
    from pixcell_fed.federation.deployment import Process, wait_healthy

    cmd = [
        *_cli(
            "coordinator.cli",
            "serve",
            "--certs",
            str(certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--internal-port",
            str(internal_port),
        )
    ]
    for name in hostnames:
        cmd += ["--hostname", name]
    proc = Process("coordinator-serve", cmd, log_path=log_path, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not (Path(certs) / "ca.crt").is_file() and time.monotonic() < deadline and proc.alive():
            time.sleep(0.2)
        wait_healthy(
            f"https://127.0.0.1:{port}/",
            timeout=max(1.0, deadline - time.monotonic()),
            ca=Path(certs) / "ca.crt",
            process=proc,
            any_status=True,
        )
    except BaseException:
        proc.stop()
        raise
    return proc

"""Run the Flower deployment without hand-written Flower commands: certificates, keys, command lines, processes.

* :func:`make_tls` writes a consortium CA and a SuperLink server certificate (SANs 127.0.0.1, localhost and the
  names given) with ``cryptography``.
* :func:`make_site_auth_key` writes a site's EC P-384 key pair in OpenSSH format (what SuperNode auth expects);
  :func:`write_superexec_secret` the secret shared by a SuperLink or SuperNode and its launcher.
* :func:`write_flwr_config` writes ``$FLWR_HOME/config.toml`` with a ``[superlink.NAME]`` connection.
* :func:`superlink_command`, :func:`superexec_command`, :func:`supernode_command` build Flower's command lines;
  :class:`Process` starts one with Flower's telemetry and update checks off, waits for ``/health`` and stops
  it by pid. :func:`register_site` runs ``flwr supernode register``; :func:`flwr_run` runs the app.

The locked-down services built from these (``coordinator serve``, ``site-agent serve``) are in
:mod:`pixcell_fed.federation.services`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pixcell_fed.atomic import write_bytes_atomic, write_text_atomic
from pixcell_fed.errors import FederationError, KeyFileError, UsageError
from pixcell_fed.runlog import get_logger

log = get_logger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # a SuperExec looks for queued work every 0.1 s instead of 1 s (pooling latency, docs/federation.md)
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}
REGISTER_REFUSED_EXIT = 305  # Flower's exit code (in the SuperNode log) when its key is not registered


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def flower_bin(name: str) -> str:
    """A Flower executable next to the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise UsageError(
            f"'{name}' not found", hint="install pixcell-fed's dependencies (flwr==1.42.0) in this environment"
        )
    return found


def flower_env(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process we start: quiet, our FLWR_HOME, and this installation first on PATH.

    Flower's own processes start further executables by name (the SuperLink starts ``flower-superexec``), so the
    folder of the running interpreter (the venv's ``bin``) must be on PATH even when the venv is not activated.
    """
    env = {**os.environ, **QUIET_ENV, **(extra or {})}
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def make_tls(folder: str | Path, *, hosts: Sequence[str] = (), days: int = 825) -> TlsFiles:
    """A CA and a server certificate signed by it, for the SuperLink (private keys written 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    now = _dt.datetime.now(_dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pixcell-fed consortium CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # key identifiers: Python 3.13's default TLS verification (X509 strict) refuses certificates without
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    write_bytes_atomic(files.ca_cert, ca_cert.public_bytes(pem))
    write_bytes_atomic(
        folder / "ca.key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600,
    )
    write_bytes_atomic(files.server_cert, cert.public_bytes(pem))
    write_bytes_atomic(
        files.server_key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600,
    )
    return files


def make_site_auth_key(folder: str | Path, site: str) -> tuple[Path, Path]:
    """A site's SuperNode auth key pair (EC P-384, OpenSSH format): ``(private, public)`` paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private = write_bytes_atomic(
        folder / f"{site}_auth",
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        mode=0o600,
    )
    public = write_bytes_atomic(
        folder / f"{site}_auth.pub",
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {site}\n".encode(),
    )
    return private, public


def write_flwr_config(flwr_home: str | Path, name: str, address: str, *, root_certificates: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (TLS when a CA is given), as default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates is not None:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    else:
        lines.append("insecure = true")
    return write_text_atomic(Path(flwr_home) / "config.toml", "\n".join(lines) + "\n")


def write_superexec_secret(folder: str | Path) -> Path:
    """A fresh random SuperExec secret in ``folder`` (file 0600): only processes holding it may claim app tasks."""
    import secrets

    return write_bytes_atomic(Path(folder) / "superexec.secret", secrets.token_hex(32).encode("ascii"), mode=0o600)


def read_superexec_secret(path: str | Path) -> bytes:
    """The secret written by :func:`write_superexec_secret` (Flower reads the file's exact bytes too)."""
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read the SuperExec secret {path}: {exc}", hint="'site-agent serve' writes it"
        ) from exc
    if not secret:
        raise UsageError(f"the SuperExec secret {path} is empty", hint="'site-agent serve' writes it")
    return secret


def superlink_command(
    *,
    port: int,
    tls: TlsFiles | None,
    node_auth: bool,
    database: Path | None = None,
    host: str = "127.0.0.1",
    superexec_secret: Path | None = None,
) -> list[str]:
    """``flower-superlink``; with ``superexec_secret`` in process isolation: it starts no SuperExec of its own, and
    only a SuperExec holding the secret may claim its ServerApp tasks (:func:`superexec_command`)."""
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if superexec_secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def superexec_command(
    *, runtime_api: str, ca_cert: Path, superexec_secret: Path, parent_pid: int | None = None
) -> list[str]:
    """The coordinator's ``flower-superexec``: runs the ServerApps of the SuperLink at ``runtime_api`` (TLS)."""
    cmd = [
        flower_bin("flower-superexec"),
        "--runtime-api-address",
        runtime_api,
        "--root-certificates",
        str(ca_cert),
        "--superexec-auth-secret-file",
        str(superexec_secret),
    ]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def node_config_arg(values: Mapping[str, str]) -> str:
    """``--node-config`` value: space-separated ``key="value"`` pairs (TOML strings)."""
    for key, value in values.items():
        if '"' in str(value) or "\\" in str(value) or " " in str(key):
            raise UsageError(
                f"node config {key}={value!r} contains quotes, backslashes or spaces",
                hint="use plain folder paths without quotes or backslashes",
            )
    return " ".join(f'{k}="{v}"' for k, v in values.items())


def supernode_command(
    *,
    superlink: str,
    port: int,
    node_config: Mapping[str, str],
    root_certificates: Path | None,
    auth_private_key: Path | None,
    superexec_secret: Path | None = None,
) -> list[str]:
    """``flower-supernode`` with its runtime API on 127.0.0.1:``port``; with ``superexec_secret`` in process
    isolation: it runs no app itself, the site's launcher (holding the secret) does."""
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config_arg(node_config),
    ]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates is not None else ["--insecure"]
    if auth_private_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_private_key)]
    if superexec_secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    return cmd


class Process:
    """A started Flower process; stopped by its pid (SIGTERM, then SIGKILL).

    By default it leads a process group of its own (so that stopping it also stops the app processes it started)
    and writes to ``log_path``. With ``own_group=False`` it stays in the caller's group, so that killing the
    caller's group kills it too (the serve commands supervise their Flower processes this way), and with no
    ``log_path`` it writes to the caller's stdout and stderr.
    """

    def __init__(
        self, name: str, cmd: Sequence[str], *, log_path: Path | None, env: Mapping[str, str], own_group: bool = True
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.own_group = own_group
        self.log_path = Path(log_path) if log_path is not None else None
        self._log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115  # held for the process's life, closed by stop()
        self.popen = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            env=dict(env),
            start_new_session=own_group,
        )
        self.pid = self.popen.pid
        log.info("started %s (pid %d): %s", name, self.pid, " ".join(self.cmd))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def group_pids(self) -> list[int]:
        """Live (non-zombie) processes of the group this process leads (its app subprocesses included)."""
        if not self.own_group:
            return [self.pid] if self.alive() else []
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == self.pid:  # state, ppid, pgrp
                pids.append(int(stat.parent.name))
        return pids

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop this process and every process of the group it leads, by pid: SIGTERM, then SIGKILL."""
        if self.popen.poll() is None:
            try:
                if self.own_group:
                    os.killpg(self.pid, signal.SIGTERM)  # the group id is our pid: start_new_session=True
                else:
                    os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10.0
        while self.group_pids() and time.monotonic() < deadline:  # stragglers (e.g. app processes) of the group
            for pid in self.group_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self.popen.poll() is None:
            self.popen.wait(5.0)
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        """Kill the process group at once (simulates a site losing power)."""
        try:
            if self.own_group:
                os.killpg(self.pid, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


def wait_healthy(
    url: str, *, timeout: float = 60.0, ca: Path | None = None, process: Process | None = None, any_status: bool = False
) -> None:
    """Poll ``url`` (``GET /health``) until it answers 200 (any HTTP answer with ``any_status``: the Fleet front
    answers everything but the Fleet API with 404), or raise with the process's log tail."""
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise FederationError(
                f"{process.name} exited with code {process.popen.returncode}",
                hint=f"see {process.log_path or 'its output above'}:\n{process.log_tail()}",
            )
        try:
            with urllib.request.urlopen(url, timeout=3, context=context) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if any_status:
                return
            last = str(exc)
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise FederationError(
        f"no healthy answer from {url} within {timeout:.0f} s ({last})",
        hint=f"see {process.log_path or 'its output above'}" if process else "check the process log",
    )


def run_flwr(
    args: Sequence[str], *, flwr_home: Path, timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_bin("flwr"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=flower_env(flwr_home),
        cwd=cwd,
        check=False,
    )


def check_site_key(trust, site: str, public_key: Path) -> None:
    """Refuse (:class:`KeyFileError`) unless ``public_key`` is the ``auth_key`` the trust file gives ``site``.

    The one gate in front of Flower's registration: a SuperNode key is admitted only under the name the
    consortium bound it to, so a site's name always comes from its key.
    """
    from pixcell_fed.bundle.trust import auth_key_der

    entry = trust.site(site)
    if entry is None:
        raise KeyFileError(
            f"site {site!r} is not in the trust file {trust.source}",
            hint="add it first: 'coordinator trust-add TRUST_FILE --site NAME ... --auth-key NAME_auth.pub'",
        )
    if entry.auth_key is None:
        raise KeyFileError(
            f"the trust file gives site {site!r} no auth_key",
            hint="add the site's SuperNode key: "
            "'coordinator trust-add TRUST_FILE --site NAME ... --auth-key NAME_auth.pub'",
        )
    if not Path(public_key).is_file():
        raise KeyFileError(f"public key file not found: {public_key}", hint="pass the site's <site>_auth.pub")
    if auth_key_der(Path(public_key).read_bytes(), source=str(public_key)) != entry.auth_key:
        owner = trust.site_with_auth_key(Path(public_key).read_bytes())
        raise KeyFileError(
            f"{public_key} is not the auth_key of site {site!r} in the trust file"
            + (f" (it is {owner!r}'s)" if owner else ""),
            hint="register each site with the key the trust file binds to its name",
        )


def register_site(
    public_key: Path,
    site: str,
    *,
    trust,
    superlink: str,
    ca_cert: Path,
    flwr_home: Path,
    connection: str = "consortium",
) -> None:
    """After :func:`check_site_key`, ``flwr supernode register KEY.pub CONNECTION --name SITE`` against the
    SuperLink at ``superlink`` (written as ``connection`` into ``$FLWR_HOME/config.toml``)."""
    check_site_key(trust, site, public_key)
    write_flwr_config(flwr_home, connection, superlink, root_certificates=ca_cert)
    proc = run_flwr(["supernode", "register", str(public_key), connection, "--name", site], flwr_home=flwr_home)
    if proc.returncode != 0:
        raise FederationError(
            f"registering site {site} failed: {(proc.stdout + proc.stderr)[-2000:]}",
            hint="check that the SuperLink runs ('coordinator serve') and the key is OpenSSH EC P-384",
        )


def flwr_run(
    connection: str, *, flwr_home: Path, run_config_file: Path | None, app: Path | None = None, timeout: float = 3600.0
) -> subprocess.CompletedProcess:
    """Run the coordinator app to completion (see :func:`flwr_run_command`)."""
    return subprocess.run(
        flwr_run_command(connection, run_config_file, app=app),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=flower_env(flwr_home),
        check=False,
    )


def free_port() -> int:
    """A free TCP port on loopback (for tests and local demos)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_superlink(
    *,
    port: int,
    tls: TlsFiles | None,
    node_auth: bool,
    flwr_home: Path,
    log_dir: Path,
    host: str = "127.0.0.1",
    database: Path | None = None,
    timeout: float = 90.0,
) -> Process:
    """Start the SuperLink and wait until ``/health`` answers."""
    proc = Process(
        "superlink",
        superlink_command(port=port, tls=tls, node_auth=node_auth, database=database, host=host),
        log_path=log_dir / "superlink.log",
        env=flower_env(flwr_home),
    )
    scheme = "https" if tls is not None else "http"
    try:
        wait_healthy(
            f"{scheme}://127.0.0.1:{port}/health", timeout=timeout, ca=tls.ca_cert if tls else None, process=proc
        )
    except BaseException:
        proc.stop()
        raise
    return proc


def resolve_flwr_home(folder: str | Path | None = None) -> Path:
    """Flower's config folder: ``folder`` if given, else ``$FLWR_HOME``, else ``~/.flwr`` (as Flower resolves it)."""
    return Path(folder or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def start_supernode(
    site: str,
    *,
    superlink: str,
    port: int,
    node_config: Mapping[str, str],
    flwr_home: Path,
    log_dir: Path,
    root_certificates: Path | None,
    auth_private_key: Path | None,
) -> Process:
    """Start one site's SuperNode (it connects to the SuperLink and waits for messages)."""
    cmd = supernode_command(
        superlink=superlink,
        port=port,
        node_config=node_config,
        root_certificates=root_certificates,
        auth_private_key=auth_private_key,
    )
    return Process(f"supernode-{site}", cmd, log_path=log_dir / f"supernode-{site}.log", env=flower_env(flwr_home))


def write_run_config(path: str | Path, run_config: Mapping[str, object]) -> Path:
    """A TOML file of run-config overrides for ``flwr run --run-config FILE`` (safe for JSON-valued keys)."""
    import tomli_w

    return write_text_atomic(path, tomli_w.dumps(dict(run_config)))


def flwr_run_command(connection: str, run_config_file: Path | None = None, *, app: Path | None = None) -> list[str]:
    """``flwr run APP CONNECTION --stream [--run-config FILE]``."""
    from pixcell_fed.federation.app_bundle import app_dir

    cmd = [flower_bin("flwr"), "run", str(app or app_dir()), connection, "--stream"]
    if run_config_file is not None:
        cmd += ["--run-config", str(run_config_file)]
    return cmd

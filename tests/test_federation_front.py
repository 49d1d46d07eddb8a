"""The coordinator's public face forwards the SuperNodes' Fleet API and nothing else (issue 11, item 1).

A recording HTTPS stand-in for the SuperLink runs on loopback; the front (``coordinator fleet-front``, a real
process) and, where nginx is installed, the documented nginx configuration sit in front of it. Every request an
outsider holding ``ca.crt`` could send is tried: only exact Fleet routes reach the stand-in, bodies larger than a
default 64 MB tile chunk stream through intact, and Control API, runtime API, health, docs, other methods, dotted,
encoded and query-string variants never reach it. The real SuperLink behind ``coordinator serve`` is attacked in
``test_federation_lockdown.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import sys
from pathlib import Path

import pytest
from loopback_asgi import LoopbackASGI

from pixcell_fed.federation import deployment as D
from pixcell_fed.federation.fleet_front import DEFAULT_MAX_BODY, FLEET_ROUTES, FleetFront, FrontSettings, nginx_config

#: Bigger than a whole default tile chunk (chunk-mb = 64) sent as one body.
LARGE_BODY = 70 * 1024 * 1024

#: (method, raw path) an outsider might send; none may reach the SuperLink.
REFUSED = [
    ("POST", "/v1/control/register-node"), ("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/list-runs"), ("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/runtime/pull-task-input"),
    ("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/fleet/pull-messages"),
    ("PUT", "/v1/fleet/push-messages"), ("POST", "/v1/fleet/../control/list-nodes"),
    ("POST", "/v1/fleet/%2e%2e/control/list-nodes"), ("POST", "/v1/fleet/get-run/../../control/start-run"),
    ("POST", "/v1/fleet/%2e%2e%2fcontrol%2flist-nodes"), ("POST", "/v1/fleet/pull-messages?next=/v1/control/list-nodes"),
    ("POST", "/v1/fleet/pull-messages/"), ("POST", "/v1/fleet/PULL-MESSAGES"), ("POST", "//v1/control/list-nodes"),
    ("POST", "/v1/fleet/unknown-route"), ("POST", "/v1/fleet/"), ("POST", "/"),
]


class Recorder(LoopbackASGI):
    """A stand-in SuperLink over HTTPS: records every request it receives and echoes its body's sha256."""

    def __init__(self, tls: D.TlsFiles) -> None:
        self.seen: list[dict] = []
        super().__init__(self.app, tls=tls)

    async def app(self, scope, receive, send) -> None:
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            body = message.get("body", b"")
            digest.update(body)
            size += len(body)
            if not message.get("more_body"):
                break
        entry = {"method": scope["method"], "path": scope["path"], "raw_path": scope["raw_path"].decode(),
                 "query": scope["query_string"].decode(), "size": size, "sha256": digest.hexdigest(),
                 "headers": {k.decode().lower(): v.decode() for k, v in scope["headers"]}}
        self.seen.append(entry)
        out = json.dumps(entry).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"x-from", b"superlink"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def _request(port: int, ca: Path, method: str, path: str, body=b"", headers=None, length: int | None = None):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)), timeout=120)
    try:
        hdrs = {"content-type": "application/protobuf", **(headers or {})}
        if length is not None:
            hdrs["content-length"] = str(length)
        conn.putrequest(method, path, skip_accept_encoding=True)  # the path is sent as written (no normalisation)
        for key, value in hdrs.items():
            conn.putheader(key, value)
        if length is None and body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders()
        if isinstance(body, (bytes, bytearray)):
            conn.send(body)
        else:
            for chunk in body:
                conn.send(chunk)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _chunks(total: int, seed: int = 1):
    """``total`` pseudo-random bytes in 1 MiB pieces, and their sha256."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pieces = [rng.integers(0, 256, min(1 << 20, total - i), dtype=np.uint8).tobytes() for i in range(0, total, 1 << 20)]
    digest = hashlib.sha256()
    for p in pieces:
        digest.update(p)
    return pieces, digest.hexdigest()


def _check_front(port: int, tls: D.TlsFiles, recorder: Recorder) -> None:
    """The behaviour both fronts must have (the Python front and the nginx configuration)."""
    auth = {"flwr-public-key": "cGs=", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00+00:00"}
    for route in sorted(FLEET_ROUTES):
        status, headers, body = _request(port, tls.ca_cert, "POST", route, body=b"\x08\x01", headers=auth)
        assert status == 200 and headers.get("x-from") == "superlink", (route, status, body[:200])
        echo = json.loads(body)
        assert echo["path"] == route and echo["raw_path"] == route and echo["method"] == "POST" and echo["query"] == ""
        assert echo["sha256"] == hashlib.sha256(b"\x08\x01").hexdigest()
        assert {k: echo["headers"][k] for k in auth} == auth  # SuperNode authentication headers pass unchanged
    assert len(recorder.seen) == len(FLEET_ROUTES)

    pieces, digest = _chunks(LARGE_BODY)
    status, _, body = _request(port, tls.ca_cert, "POST", "/v1/fleet/push-object", body=pieces, length=LARGE_BODY)
    assert status == 200, body[:200]
    assert json.loads(body)["size"] == LARGE_BODY and json.loads(body)["sha256"] == digest

    before = len(recorder.seen)
    for method, path in REFUSED:
        status, _, _ = _request(port, tls.ca_cert, method, path, body=b"\x08\x01")
        assert 400 <= status < 500, (method, path, status)
    status, _, _ = _request(port, tls.ca_cert, "POST", "/v1/fleet/push-object", body=b"", length=DEFAULT_MAX_BODY + 1)
    assert status == 413
    assert recorder.seen[before:] == [], "a refused request reached the SuperLink"


def test_fleet_routes_are_exactly_what_flwr_supernodes_call_and_the_superlink_serves():
    import flwr.supernode.fleet_http_client as client_module
    from flwr.superlink.routers.fleet.router import router

    client_paths = set(re.findall(r'path="(/v1/[^"]+)"', Path(client_module.__file__).read_text()))
    assert client_paths == FLEET_ROUTES  # a SuperNode calls nothing else, and every call is forwarded
    assert {route.path for route in router.routes} == FLEET_ROUTES
    assert all(route.methods == {"POST"} for route in router.routes)
    # the SuperNode's only network client is that one (no other module of flwr.supernode builds URLs)
    import flwr.supernode as supernode_pkg

    for path in Path(supernode_pkg.__file__).parent.rglob("*.py"):
        text = path.read_text()
        assert path.name == "fleet_http_client.py" or not re.search(r'"/v1/(control|runtime|fleet)/', text), path


def test_front_forwards_only_fleet_routes_and_streams_large_bodies(tmp_path):
    tls = D.make_tls(tmp_path / "certs")
    with Recorder(tls) as recorder:
        port = D.free_port()
        front = D.Process("fleet-front", [sys.executable, "-m", "coordinator.cli", "fleet-front", "--certs",
                                          str(tls.ca_cert.parent), "--host", "127.0.0.1", "--port", str(port),
                                          "--upstream", f"127.0.0.1:{recorder.port}"],
                          log_path=tmp_path / "front.log", env=D.flower_env(tmp_path / "home"))
        try:
            D.wait_healthy(f"https://127.0.0.1:{port}/", timeout=60, ca=tls.ca_cert, process=front, any_status=True)
            _check_front(port, tls, recorder)
        finally:
            front.stop()
        assert "refused POST b'/v1/control/list-nodes'" in front.log_tail(20000)  # refusals are logged


def test_front_refuses_a_streamed_body_past_its_limit_without_a_declared_length():
    import asyncio

    import httpx

    received: list[int] = []

    class Reply(httpx.AsyncByteStream):  # an unread stream, as from the network
        async def __aiter__(self):
            yield b"ok"

    async def upstream(request: httpx.Request) -> httpx.Response:
        received.append(len(await request.aread()))
        return httpx.Response(200, stream=Reply())

    settings = FrontSettings(listen_host="127.0.0.1", listen_port=0, upstream="127.0.0.1:1", ca_cert=Path("ca"),
                             server_cert=Path("c"), server_key=Path("k"), max_body=16 * 1024 * 1024)
    front = FleetFront(settings)
    front.client = httpx.AsyncClient(transport=httpx.MockTransport(upstream), base_url="https://127.0.0.1:1")

    async def body(n_mib: int):
        for _ in range(n_mib):
            yield b"\0" * (1 << 20)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="https://front") as client:
            small = await client.post("/v1/fleet/push-object", content=body(15))
            large = await client.post("/v1/fleet/push-object", content=body(17))
        return small.status_code, large.status_code

    assert asyncio.run(main()) == (200, 413)
    assert received == [15 * (1 << 20)]  # the oversized body never completed upstream


def _nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def test_documented_nginx_configuration_forwards_only_fleet_routes(tmp_path):
    nginx = _nginx()
    if nginx is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: CI must test the documented nginx configuration "
                        "(scripts/setup.sh installs Debian's nginx when run as root)")
        pytest.skip("nginx is not installed (Debian: apt-get install nginx); CI runs this test")
    tls = D.make_tls(tmp_path / "certs")
    with Recorder(tls) as recorder:
        port = D.free_port()
        settings = FrontSettings(listen_host="127.0.0.1", listen_port=port, upstream=f"127.0.0.1:{recorder.port}",
                                 ca_cert=tls.ca_cert, server_cert=tls.server_cert, server_key=tls.server_key)
        root = tmp_path / "nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / sub).mkdir(parents=True)
        temp = "\n    ".join(f"{name}_temp_path {root / sub};" for name, sub in (
            ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi")))
        conf = root / "nginx.conf"
        conf.write_text(f"""{'user root;' if os.geteuid() == 0 else ''}
daemon off;
worker_processes 1;
pid {root / 'nginx.pid'};
error_log {root / 'error.log'} info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {temp}
{nginx_config(settings)}
}}
""")
        proc = D.Process("nginx", [nginx, "-p", str(root), "-c", str(conf)], log_path=root / "stdout.log", env=os.environ)
        try:
            D.wait_healthy(f"https://127.0.0.1:{port}/", timeout=30, ca=tls.ca_cert, process=proc, any_status=True)
            _check_front(port, tls, recorder)
        finally:
            proc.stop()


def test_the_nginx_configuration_in_the_docs_is_the_one_the_code_writes():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "federation.md").read_text()
    block = re.search(r"```nginx\n(.*?)```", docs, re.S).group(1)
    certs = Path("/srv/consortium/certs")
    settings = FrontSettings(listen_host="0.0.0.0", listen_port=9092, upstream="127.0.0.1:9093",
                             ca_cert=certs / "ca.crt", server_cert=certs / "server.pem", server_key=certs / "server.key")
    assert block == nginx_config(settings)

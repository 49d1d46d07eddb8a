"""The coordinator's public face: a TLS front that forwards only the SuperNodes' Fleet API to the SuperLink.

In Flower 1.42 one SuperLink port serves the Control API (``/v1/control/*``: register nodes, list nodes, start
runs; no login in the open-source build), the runtime API (``/v1/runtime/*``: where ServerApp processes fetch
their tasks) and the Fleet API (``/v1/fleet/*``: all a SuperNode uses). ``coordinator serve`` binds the SuperLink
to 127.0.0.1 and puts this front on the public address. The front

* forwards ``POST`` requests for exactly the Fleet routes in :data:`FLEET_ROUTES` (the paths of flwr 1.42's
  ``supernode/fleet_http_client.py``; a test compares them with the installed flwr) to the SuperLink over TLS,
  with the SuperNode's authentication headers, streaming bodies both ways;
* answers everything else with 404 (other methods, other paths, encoded or dotted variants of a Fleet path,
  query strings) without contacting the SuperLink, and refuses request bodies over ``max_body`` bytes (413);
* speaks TLS with the SuperLink's own server certificate, so sites verify it with the same ``ca.crt``.

It is built on what Flower already brings: uvicorn (server), starlette (request and response helpers) and httpx
(the upstream client). Sites that run their own reverse proxy use the nginx configuration in
docs/federation.md instead (:func:`nginx_config` writes it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_fed.runlog import get_logger

if TYPE_CHECKING:
    import httpx

log = get_logger(__name__)

FLEET_PREFIX = "/v1/fleet/"
#: Every route a SuperNode calls (flwr 1.42, ``flwr/supernode/fleet_http_client.py``); all are POST.
FLEET_ROUTES: frozenset[str] = frozenset(
    FLEET_PREFIX + name
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
#: Default largest request body (bytes). Flower cuts arrays into 5 MiB objects and caps app bundles at 10 MB; the
#: bound also covers a whole default 64 MB tile chunk sent as one body, with room for a large manifest.
DEFAULT_MAX_BODY = 256 * 1024 * 1024
#: Headers that describe one connection, not the request (RFC 9110 section 7.6.1); never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


class BodyTooLarge(Exception):
    """A request body went past the front's limit."""


@dataclass(frozen=True)
class FrontSettings:
    """Where the front listens, where the SuperLink is, and how it verifies it."""

    listen_host: str
    listen_port: int
    upstream: str  # host:port of the SuperLink (loopback)
    ca_cert: Path  # the consortium CA: verifies the SuperLink's certificate
    server_cert: Path  # the front's own certificate (the SuperLink's server certificate)
    server_key: Path
    max_body: int = DEFAULT_MAX_BODY

    def __post_init__(self) -> None:
        if self.max_body < 16 * 1024 * 1024:
            raise ValueError(
                "the front's body limit must be at least 16 MiB (Flower sends 5 MiB objects and 10 MB app bundles)"
            )


def is_forwarded(method: str, path: str, raw_path: bytes | None, query_string: bytes) -> bool:
    """Whether a request goes to the SuperLink: a POST to one exact Fleet route, as sent (no encoding, no query)."""
    return (
        method == "POST"
        and path in FLEET_ROUTES
        and not query_string
        and (raw_path is None or raw_path == path.encode("ascii"))
    )


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request's or response's headers without the hop-by-hop ones (and without Host)."""
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in HOP_BY_HOP]


class FleetFront:
    """The ASGI application of the front (one httpx client to the SuperLink, opened at startup)."""

    def __init__(self, settings: FrontSettings) -> None:
        self.settings = settings
        self.client: httpx.AsyncClient | None = None

    def _open_client(self) -> httpx.AsyncClient:
        import ssl

        import httpx

        context = ssl.create_default_context(cafile=str(self.settings.ca_cert))
        return httpx.AsyncClient(
            base_url=f"https://{self.settings.upstream}",
            verify=context,
            timeout=httpx.Timeout(120.0, connect=10.0),
            follow_redirects=False,
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets and anything else: no answer (uvicorn closes the connection)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = self._open_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        from starlette.responses import PlainTextResponse

        client = scope.get("client") or ("?", 0)
        if not is_forwarded(scope["method"], scope["path"], scope.get("raw_path"), scope.get("query_string", b"")):
            log.info("refused %s %r from %s", scope["method"], scope.get("raw_path", scope["path"]), client[0])
            await PlainTextResponse("not found\n", status_code=404)(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body):
            await PlainTextResponse("request body too large\n", status_code=413)(scope, receive, send)
            return
        response = await self._forward(scope, receive)
        await response(scope, receive, send)

    async def _forward(self, scope, receive):
        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import PlainTextResponse, StreamingResponse

        if self.client is None:
            raise RuntimeError("the front's lifespan did not start")
        request = self.client.build_request(
            "POST", scope["path"], headers=forwarded_headers(scope["headers"]), content=self._body(receive)
        )
        try:
            upstream = await self.client.send(request, stream=True)
        except BodyTooLarge:
            return PlainTextResponse("request body too large\n", status_code=413)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s: %s", scope["path"], exc)
            return PlainTextResponse("bad gateway\n", status_code=502)
        response = StreamingResponse(
            upstream.aiter_raw(), status_code=upstream.status_code, background=BackgroundTask(upstream.aclose)
        )
        response.raw_headers = forwarded_headers(upstream.headers.raw)
        return response

    async def _body(self, receive) -> AsyncIterator[bytes]:
        """The request body as it arrives, refused once it passes the limit."""
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.settings.max_body:
                raise BodyTooLarge()
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def serve_front(settings: FrontSettings) -> None:
    """Run the front in the foreground until stopped (SIGINT or SIGTERM)."""
    import uvicorn

    config = uvicorn.Config(
        FleetFront(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        ssl_certfile=str(settings.server_cert),
        ssl_keyfile=str(settings.server_key),
        lifespan="on",
        interface="asgi3",
        access_log=False,
        server_header=False,
        log_level="warning",
        limit_concurrency=256,
        timeout_keep_alive=30,
    )
    log.info(
        "Fleet front on https://%s:%d -> https://%s (only %s*)",
        settings.listen_host,
        settings.listen_port,
        settings.upstream,
        FLEET_PREFIX,
    )
    uvicorn.Server(config).run()


def nginx_config(settings: FrontSettings, *, server_name: str = "_") -> str:
    """An nginx ``server`` block doing what the front does, for sites that run their own reverse proxy.

    Only the exact Fleet routes, POST only, are passed to the SuperLink over TLS (verified with the consortium CA);
    everything else gets 404. Bodies stream both ways (no buffering) up to ``max_body``.
    """
    routes = "|".join(sorted(r[len(FLEET_PREFIX) :] for r in FLEET_ROUTES))
    return f"""server {{
    listen {settings.listen_host}:{settings.listen_port} ssl;
    server_name {server_name};
    ssl_certificate     {settings.server_cert};
    ssl_certificate_key {settings.server_key};
    ssl_protocols       TLSv1.2 TLSv1.3;
    client_max_body_size {settings.max_body};
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    server_tokens off;

    # the SuperNodes' Fleet API only: exact paths, POST only, no query string
    location ~ ^/v1/fleet/({routes})$ {{
        limit_except POST {{ deny all; }}
        if ($args != "") {{ return 404; }}
        proxy_pass https://{settings.upstream}$uri;   # the matched route itself, never the raw request line
        proxy_ssl_trusted_certificate {settings.ca_cert};
        proxy_ssl_verify on;
        proxy_ssl_name localhost;                   # a DNS name of the SuperLink's certificate
        proxy_set_header Host $proxy_host;
        proxy_read_timeout 120s;
        proxy_send_timeout 120s;
    }}
    # the Control API, the runtime API, health and docs: never exposed
    location / {{ return 404; }}
}}
"""

"""``coordinator fleet-front``: the TLS front that exposes only the SuperNodes' Fleet API (started by ``serve``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fleet-front",
        help="the public TLS front: forwards only /v1/fleet/* to the SuperLink ('serve' starts it)",
        description="Listen on HOST:PORT with TLS (DIR/server.pem, DIR/server.key) and forward the SuperNodes' Fleet "
        "API calls (POST to the exact /v1/fleet/* routes Flower's SuperNode uses) to the SuperLink at "
        "UPSTREAM, verified with DIR/ca.crt; every other request gets 404, bodies over the limit 413. "
        "'coordinator serve' runs it; run it alone only to place the front on another process manager. "
        "With --nginx, print the equivalent nginx server block instead.",
    )
    p.add_argument("--certs", required=True, metavar="DIR", help="folder of ca.crt, server.pem, server.key")
    p.add_argument("--host", default="0.0.0.0", help="public address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, required=True, help="public port")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the SuperLink (on loopback)")
    p.add_argument("--max-body-mb", type=int, default=256, help="largest request body accepted (default 256)")
    p.add_argument("--nginx", action="store_true", help="print an nginx server block doing the same, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.errors import ConfigError
    from pixcell_fed.federation.fleet_front import FrontSettings, nginx_config, serve_front
    from pixcell_fed.federation.services import check_loopback

    certs = Path(args.certs).resolve()
    try:
        settings = FrontSettings(
            listen_host=args.host,
            listen_port=args.port,
            upstream=check_loopback(args.upstream, "--upstream"),
            ca_cert=certs / "ca.crt",
            server_cert=certs / "server.pem",
            server_key=certs / "server.key",
            max_body=args.max_body_mb * 1024 * 1024,
        )
    except ValueError as exc:
        raise ConfigError(str(exc), hint="raise --max-body-mb") from exc
    if args.nginx:
        print(nginx_config(settings), end="")
        return 0
    for path in (settings.ca_cert, settings.server_cert, settings.server_key):
        if not path.is_file():
            raise ConfigError(f"{path} not found", hint="'coordinator serve --certs DIR' creates the certificates")
    serve_front(settings)
    return 0

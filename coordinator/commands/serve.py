"""``coordinator serve``: the locked-down SuperLink and its Fleet front; ``coordinator register-site``.

``coordinator serve --certs DIR`` creates the consortium CA and the server certificate in DIR on first use
(send DIR/ca.crt to every site), then runs in the foreground: the SuperLink on 127.0.0.1 (TLS, registered sites
only, ServerApps run only by its own SuperExec holding a fresh secret) and, on the public address, a TLS front that
forwards the SuperNodes' Fleet API and nothing else. ``coordinator register-site KEY.pub --name SITE --trust
TRUST_FILE`` admits a site's SuperNode key, on loopback, only when the trust file binds that key to that name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pixcell_fed.federation.services import INTERNAL_PORT, PUBLIC_PORT


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start the consortium's Flower SuperLink: Fleet API only on the public address",
        description="Start flower-superlink on 127.0.0.1 (TLS, SuperNode authentication, process isolation), the "
        "flower-superexec that runs the coordinator's ServerApps (with a fresh secret), and a TLS front on "
        "the public address that forwards only the SuperNodes' /v1/fleet/* calls. Registration "
        "('register-site') and 'coordinator run' use the loopback port on this machine. Creates "
        "DIR/ca.crt, DIR/server.pem and DIR/server.key on first use. Runs until stopped (Ctrl-C).",
    )
    p.add_argument(
        "--certs", required=True, metavar="DIR", help="folder of ca.crt, server.pem, server.key (created if missing)"
    )
    p.add_argument("--host", default="0.0.0.0", help="public address of the Fleet front (default 0.0.0.0)")
    p.add_argument(
        "--port", type=int, default=PUBLIC_PORT, help=f"public port of the Fleet front (default {PUBLIC_PORT})"
    )
    p.add_argument(
        "--internal-port",
        type=int,
        default=INTERNAL_PORT,
        help=f"the SuperLink's port on 127.0.0.1 (default {INTERNAL_PORT})",
    )
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP the sites use to reach this machine (added to the certificate; repeatable)",
    )
    p.add_argument("--database", metavar="FILE", default=None, help="SuperLink state database (default: in memory)")
    p.add_argument("--max-body-mb", type=int, default=256, help="largest request body the front accepts (default 256)")
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the command line of each process and exit (SECRET is created at start)",
    )
    p.set_defaults(func=run)

    r = subparsers.add_parser(
        "register-site",
        help="admit a site's SuperNode public key, if the trust file binds it to that site",
        description="Check that KEY.pub is the auth_key of site NAME in the trust file ('coordinator trust-add "
        "--auth-key'), then run 'flwr supernode register' against the SuperLink on this machine's loopback "
        "port (the connection is written into FLWR_HOME/config.toml).",
    )
    r.add_argument(
        "public_key",
        metavar="KEY.pub",
        help="the site's public key file (OpenSSH, EC P-384, from 'site-agent auth-key')",
    )
    r.add_argument("--name", required=True, help="the site's name (site.name in its site.yaml)")
    r.add_argument("--trust", required=True, metavar="TRUST_FILE", help="the consortium trust file")
    r.add_argument(
        "--superlink",
        default=f"127.0.0.1:{INTERNAL_PORT}",
        help=f"the SuperLink's loopback address (default 127.0.0.1:{INTERNAL_PORT})",
    )
    r.add_argument("--ca", required=True, metavar="CA_CERT", help="the consortium CA certificate (certs/ca.crt)")
    r.add_argument(
        "--flwr-home", metavar="DIR", default=None, help="Flower's config folder (default $FLWR_HOME or ~/.flwr)"
    )
    r.set_defaults(func=run_register)


def tls_files(folder: Path, hostnames: list[str]):
    from pixcell_fed.federation.deployment import TlsFiles, make_tls

    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    if all(p.is_file() for p in (files.ca_cert, files.server_cert, files.server_key)):
        return files
    print(f"creating the consortium CA and server certificate in {folder}", file=sys.stderr)
    return make_tls(folder, hosts=hostnames)


def run(args: argparse.Namespace) -> int:
    import shlex

    from pixcell_fed.federation.deployment import flower_env
    from pixcell_fed.federation.services import coordinator_services, private_secret, run_services

    tls = tls_files(Path(args.certs).resolve(), args.hostname)
    database = Path(args.database) if args.database else None
    options = {
        "host": args.host,
        "port": args.port,
        "internal_port": args.internal_port,
        "database": database,
        "max_body_mb": args.max_body_mb,
    }
    if args.print_command:
        for svc in coordinator_services(tls, secret=Path("SECRET"), **options):
            print(f"{svc.name}: {shlex.join(svc.cmd)}")
        return 0
    with private_secret() as secret:
        services = coordinator_services(tls, secret=secret, **options)
        return run_services(
            services,
            env=flower_env(),
            ca=tls.ca_cert,
            on_ready=(
                f"coordinator ready: Fleet API on https://{args.host}:{args.port} (send {tls.ca_cert} to the sites); "
                f"registration and 'coordinator run' on 127.0.0.1:{args.internal_port}. Ctrl-C stops."
            ),
        )


def run_register(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.trust import load_trust
    from pixcell_fed.federation.deployment import register_site, resolve_flwr_home
    from pixcell_fed.federation.services import check_loopback

    register_site(
        Path(args.public_key),
        args.name,
        trust=load_trust(args.trust),
        superlink=check_loopback(args.superlink, "--superlink"),
        ca_cert=Path(args.ca),
        flwr_home=resolve_flwr_home(args.flwr_home),
    )
    print(f"registered site {args.name}")
    return 0

"""``coordinator serve``: start the SuperLink with TLS and site authentication; ``coordinator register-site``.

``coordinator serve --certs DIR`` creates the consortium CA and the server certificate in DIR on first use
(send DIR/ca.crt to every site), then runs the SuperLink in the foreground. ``coordinator register-site KEY.pub
--name SITE`` admits a site's SuperNode key; unregistered SuperNodes are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="start the consortium's Flower SuperLink (TLS + registered sites only)",
        description="Start flower-superlink with TLS and SuperNode authentication. Creates DIR/ca.crt, "
                    "DIR/server.pem and DIR/server.key on first use. Runs until stopped (Ctrl-C).")
    p.add_argument("--certs", required=True, metavar="DIR", help="folder of ca.crt, server.pem, server.key (created if missing)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    p.add_argument("--hostname", action="append", default=[], metavar="NAME",
                   help="DNS name or IP the sites use to reach this machine (added to the certificate; repeatable)")
    p.add_argument("--database", metavar="FILE", default=None, help="SuperLink state database (default: in memory)")
    p.add_argument("--print-command", action="store_true", help="print the SuperLink command line and exit")
    p.set_defaults(func=run)

    r = subparsers.add_parser(
        "register-site", help="admit a site's SuperNode public key (from 'site-agent auth-key')",
        description="Run 'flwr supernode register' against the SuperLink connection in FLWR_HOME/config.toml "
                    "(written by 'coordinator run --superlink ... --ca ...' or by --superlink/--ca here).")
    r.add_argument("public_key", metavar="KEY.pub", help="the site's public key file (OpenSSH, EC P-384)")
    r.add_argument("--name", required=True, help="the site's name (site.name in its site.yaml)")
    r.add_argument("--superlink", default="127.0.0.1:9092", help="SuperLink address (default 127.0.0.1:9092)")
    r.add_argument("--ca", required=True, metavar="CA_CERT", help="the consortium CA certificate (certs/ca.crt)")
    r.add_argument("--flwr-home", metavar="DIR", default=None, help="Flower's config folder (default $FLWR_HOME or ~/.flwr)")
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
    import subprocess

    from pixcell_fed.federation.deployment import flower_env, superlink_command

    tls = tls_files(Path(args.certs), args.hostname)
    cmd = superlink_command(port=args.port, tls=tls, node_auth=True, host=args.host,
                            database=Path(args.database) if args.database else None)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    print(f"SuperLink on {args.host}:{args.port} (TLS, registered sites only); send {tls.ca_cert} to the sites", file=sys.stderr)
    return subprocess.call(cmd, env=flower_env())


def run_register(args: argparse.Namespace) -> int:
    from pixcell_fed.federation.deployment import register_site, resolve_flwr_home, write_flwr_config

    home = resolve_flwr_home(args.flwr_home)
    write_flwr_config(home, "consortium", args.superlink, root_certificates=Path(args.ca))
    register_site(Path(args.public_key), "consortium", args.name, flwr_home=home)
    print(f"registered site {args.name}")
    return 0

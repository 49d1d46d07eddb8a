"""``site-agent serve --config site.yaml``: join the consortium; ``site-agent auth-key``: the site's SuperNode key.

``serve`` starts this site's SuperNode (TLS with the consortium CA, authenticated with the site's registered EC
P-384 key, process isolation, runtime API on 127.0.0.1) and the site's pinned launcher, which runs the ClientApp
only for the app bundles pinned in ``federation.app_sha256``. Only an approved bundle is served.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="join the consortium: start this site's SuperNode and its pinned app launcher",
        description="Start the site's Flower SuperNode in process isolation with the node config the ClientApp needs "
        "(site name, approved bundle, held-out evaluation folder), and the site's launcher, which runs the "
        "ClientApp only for the app bundles pinned in federation.app_sha256 ('site-agent app-hash'): "
        "messages of any other app run nothing and get no reply. Refuses a bundle that is not approved "
        "(exit 3). Runs in the foreground until stopped (Ctrl-C).",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    p.add_argument(
        "--bundle",
        metavar="DIR",
        default=None,
        help="approved bundle to serve (default: federation.bundle_dir, else the newest approved work/runs/*/bundle)",
    )
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the command line of each process and exit (SECRET is created at start)",
    )
    p.set_defaults(func=run)

    k = subparsers.add_parser(
        "auth-key",
        help="create this site's SuperNode key pair (EC P-384, OpenSSH) for the coordinator to register",
        description="Write KEY and KEY.pub; send KEY.pub to the coordinator ('coordinator trust-add --auth-key', then "
        "'coordinator register-site') and set federation.auth_private_key to KEY in site.yaml.",
    )
    k.add_argument("--config", required=True, metavar="FILE", help="site.yaml (for the site name)")
    k.add_argument("--out", required=True, metavar="DIR", help="folder for the key pair")
    k.set_defaults(func=run_auth_key)


def run(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from pixcell_fed.config import load_site_config
    from pixcell_fed.federation.deployment import flower_env
    from pixcell_fed.federation.services import private_secret, run_services, site_services

    cfg = load_site_config(args.config)
    if args.print_command:
        for svc in site_services(cfg, args.bundle, secret=Path("SECRET"), config_file=args.config):
            print(f"{svc.name}: {shlex.join(svc.cmd)}")
        return 0
    with private_secret() as secret:
        services = site_services(cfg, args.bundle, secret=secret, config_file=args.config)
        return run_services(
            services,
            env=flower_env(),
            on_ready=(
                f"site {cfg.site.name}: SuperNode -> {cfg.federation.superlink}; runs only app "
                f"{', '.join(h[:12] + '...' for h in cfg.federation.app_sha256)}. Ctrl-C stops."
            ),
        )


def run_auth_key(args: argparse.Namespace) -> int:
    from pixcell_fed.config import load_site_config
    from pixcell_fed.federation.deployment import make_site_auth_key

    cfg = load_site_config(args.config)
    private, public = make_site_auth_key(args.out, cfg.site.name)
    print(f"private key: {private}  (set federation.auth_private_key to it; never share it)")
    print(f"public key:  {public}  (send it to the coordinator)")
    return 0

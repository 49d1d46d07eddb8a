"""``site-agent serve --config site.yaml``: start this site's Flower SuperNode; ``site-agent auth-key``: its key.

The SuperNode connects to the coordinator's SuperLink (TLS with the consortium CA, authenticated with the
site's EC P-384 key registered there) and serves the approved bundle and the federated evaluation, nothing else.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="join the consortium: start this site's Flower SuperNode",
        description="Start the site's SuperNode with the node config the ClientApp needs (site name, approved bundle, "
                    "held-out evaluation folder). Runs in the foreground until stopped (Ctrl-C).")
    p.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    p.add_argument("--bundle", metavar="DIR", default=None,
                   help="approved bundle to serve (default: federation.bundle_dir, else the newest approved work/runs/*/bundle)")
    p.add_argument("--print-command", action="store_true", help="print the SuperNode command line and exit")
    p.set_defaults(func=run)

    k = subparsers.add_parser(
        "auth-key", help="create this site's SuperNode key pair (EC P-384, OpenSSH) for the coordinator to register",
        description="Write KEY and KEY.pub; send KEY.pub to the coordinator ('coordinator register-site') and set "
                    "federation.auth_private_key to KEY in site.yaml.")
    k.add_argument("--config", required=True, metavar="FILE", help="site.yaml (for the site name)")
    k.add_argument("--out", required=True, metavar="DIR", help="folder for the key pair")
    k.set_defaults(func=run_auth_key)


def run(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from pixcell_fed.config import load_site_config
    from pixcell_fed.federation.deployment import flower_env, site_supernode_command

    cfg = load_site_config(args.config)
    cmd = site_supernode_command(cfg, args.bundle, config_file=args.config)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    print(f"site {cfg.site.name}: starting SuperNode -> {cfg.federation.superlink} (Ctrl-C stops it)", file=sys.stderr)
    return subprocess.call(cmd, env=flower_env())


def run_auth_key(args: argparse.Namespace) -> int:
    from pixcell_fed.config import load_site_config
    from pixcell_fed.federation.deployment import make_site_auth_key

    cfg = load_site_config(args.config)
    private, public = make_site_auth_key(args.out, cfg.site.name)
    print(f"private key: {private}  (set federation.auth_private_key to it; never share it)")
    print(f"public key:  {public}  (send it to the coordinator)")
    return 0

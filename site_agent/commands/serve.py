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


def newest_approved_bundle(work_dir):
    """The newest ``work_dir/runs/*/bundle`` whose bundle.json says approved, or None."""
    import json
    from pathlib import Path

    found = []
    for info in Path(work_dir).glob("runs/*/bundle/bundle.json"):
        try:
            if json.loads(info.read_text(encoding="utf-8")).get("state") == "approved":
                found.append((info.stat().st_mtime, info.parent))
        except (OSError, ValueError):
            continue
    return max(found)[1] if found else None


def supernode_for(cfg, bundle):
    """The SuperNode command line for site config ``cfg`` serving ``bundle``."""
    from pathlib import Path

    from pixcell_fed.errors import UsageError
    from pixcell_fed.federation import deployment as D
    from pixcell_fed.federation import protocol as P

    fed = cfg.federation
    bundle = Path(bundle) if bundle else (fed.bundle_dir or newest_approved_bundle(cfg.site.work_dir))
    if bundle is None or not (Path(bundle) / "bundle.json").is_file():
        raise UsageError(f"no approved bundle to serve (looked for {bundle or cfg.site.work_dir / 'runs/*/bundle'})",
                         hint="approve a bundle first ('site-agent approve'), or pass --bundle")
    for what, path in (("federation.root_certificates", fed.root_certificates), ("federation.auth_private_key", fed.auth_private_key)):
        if path is None or not Path(path).is_file():
            raise UsageError(f"{what} is not set or not found ({path})",
                             hint="the consortium runs with TLS and site authentication: get ca.crt from the coordinator "
                                  "and create a key with 'site-agent auth-key'")
    node_config = {P.NODE_SITE_NAME: cfg.site.name, P.NODE_BUNDLE_DIR: str(Path(bundle).resolve())}
    eval_dir = fed.eval_dir
    if eval_dir is None and (Path(bundle).parent / "eval").is_dir():
        eval_dir = Path(bundle).parent / "eval"  # the run's real held-out tiles, by label
    if eval_dir is not None:
        node_config[P.NODE_EVAL_DIR] = str(Path(eval_dir).resolve())
    if fed.train_dir is not None:
        node_config[P.NODE_TRAIN_DIR] = str(Path(fed.train_dir).resolve())
    return D.supernode_command(superlink=fed.superlink, port=fed.port, node_config=node_config,
                               root_certificates=fed.root_certificates, auth_private_key=fed.auth_private_key)


def run(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from pixcell_fed.config import load_site_config
    from pixcell_fed.federation.deployment import flower_env

    cfg = load_site_config(args.config)
    cmd = supernode_for(cfg, args.bundle)
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

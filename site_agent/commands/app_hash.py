"""``site-agent app-hash``: the SHA-256 of the consortium app of this installation, the pin for site.yaml."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app-hash",
        help="print the SHA-256 of this release's Flower app (set it as federation.app_sha256)",
        description="Build the Flower app bundle of this installation exactly as 'coordinator run' sends it and print "
        "its SHA-256. Set it as federation.app_sha256 in site.yaml: 'site-agent serve' then runs the "
        "consortium's app only when the coordinator runs this same release. With --config, also say "
        "whether site.yaml pins it.",
    )
    p.add_argument("--config", metavar="FILE", default=None, help="site.yaml to compare with")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.federation.app_bundle import app_dir, app_sha256

    digest = app_sha256()
    print(digest)
    print(f"(the app in {app_dir()}; set federation.app_sha256 to this value in site.yaml)", file=sys.stderr)
    if args.config:
        from pixcell_fed.config import load_site_config

        pins = load_site_config(args.config).federation.app_sha256
        print(f"{args.config}: {'pins this app' if digest in pins else 'does NOT pin this app'}", file=sys.stderr)
    return 0

"""``site-agent approve BUNDLE --key KEY --config site.yaml`` and ``site-agent reject``: the officer's decision."""

from __future__ import annotations

import argparse
import sys


def _common(p) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle folder (work/runs/<run>/bundle)")
    p.add_argument(
        "--key",
        required=True,
        metavar="OFFICER_KEY",
        help="your officer private key file (officer.key); its public key must be in keys.officers",
    )
    p.add_argument(
        "--passphrase-env", metavar="VAR", default=None, help="environment variable holding the key's passphrase"
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="the site's site.yaml: its officers, its runs and its audit trail",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "approve",
        help="privacy officer: review a bundle's verdict and report, then sign the approval",
        description="Show the bundle's audit verdict, tile counts and report paths; check that your key is one of "
        "the site's officers (keys.officers in site.yaml), that the bundle is intact and is exactly "
        "what its run audited (the run's verdict is not FAIL, its audit and kept tiles, hash for "
        "hash); then ask for confirmation (unless --yes) and add your Ed25519 approval signature. A "
        "FAIL, rejected or foreign bundle or an unlisted key is refused (exit 3). The decision is "
        "appended to the site's audit trail with your key's fingerprint.",
    )
    _common(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (the overview is still printed)")
    p.set_defaults(func=run_approve)

    r = subparsers.add_parser(
        "reject",
        help="privacy officer: refuse a bundle, with a reason",
        description="Record your refusal in the bundle (state 'rejected', any approval removed) and in the site's "
        "audit trail, with your key's fingerprint; your key must be one of the site's officers "
        "(keys.officers in site.yaml). A rejected bundle can never be approved or verified.",
    )
    _common(r)
    r.add_argument("--reason", required=True, help="why the bundle is refused (one line)")
    r.set_defaults(func=run_reject)


def _print_overview(overview: dict) -> None:
    print(f"bundle:  {overview['bundle']}")
    print(f"site:    {overview['site']}    run: {overview['run_id']}    state: {overview['state']}")
    print(
        f"verdict: {overview['verdict']}    tiles: {overview['tiles']} ({overview['tile_size']} px)"
        + (f"    labels: {overview['labels']}" if overview["labels"] else "")
    )
    print(f"privacy: {overview['conditioning']}")
    for report in overview["reports"] or ["(no report found for this run)"]:
        print(f"report:  {report}")


def _ask(overview: dict) -> bool:
    print("Have you read the report above? Type 'approve' to sign the approval: ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip() == "approve"


def _site_and_key(args: argparse.Namespace):
    from pixcell_fed.bundle.approval import SiteAuthority
    from pixcell_fed.config import load_site_config
    from pixcell_fed.keys import load_private_key, passphrase_from_env

    site = SiteAuthority.from_config(load_site_config(args.config))
    return site, lambda: load_private_key(args.key, passphrase=passphrase_from_env(args.passphrase_env))


def run_approve(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.approval import approve_bundle, bundle_overview

    site, load_key = _site_and_key(args)
    _print_overview(bundle_overview(args.bundle, site))
    result = approve_bundle(args.bundle, load_key(), site=site, confirm=None if args.yes else _ask)
    print(f"approved: {result['bundle']} (state {result['state']}); recorded in {site.trail}")
    return 0


def run_reject(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.approval import reject_bundle

    site, load_key = _site_and_key(args)
    result = reject_bundle(args.bundle, args.reason, load_key(), site=site)
    print(f"rejected: {result['bundle']} (reason: {args.reason}); recorded in {site.trail}")
    return 0

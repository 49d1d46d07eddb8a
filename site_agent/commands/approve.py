"""``site-agent approve BUNDLE --key KEY`` and ``site-agent reject BUNDLE --reason ...``: the officer's decision."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "approve", help="privacy officer: review a bundle's verdict and report, then sign the approval",
        description="Show the bundle's audit verdict, tile counts and report paths, ask for confirmation (unless "
                    "--yes) and add the officer's Ed25519 approval signature. A FAIL or rejected bundle is refused "
                    "(exit 3). The decision is appended to the site's audit trail.")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle folder (work/runs/<run>/bundle)")
    p.add_argument("--key", required=True, metavar="OFFICER_KEY", help="the officer's private key file (officer.key)")
    p.add_argument("--passphrase-env", metavar="VAR", default=None, help="environment variable holding the key's passphrase")
    p.add_argument("--config", metavar="FILE", default=None, help="site.yaml (to find the audit trail when the bundle was moved)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (the overview is still printed)")
    p.set_defaults(func=run_approve)

    r = subparsers.add_parser(
        "reject", help="privacy officer: refuse a bundle, with a reason",
        description="Record the officer's refusal in the bundle (state 'rejected', any approval removed) and in the "
                    "site's audit trail. A rejected bundle can never be approved or verified.")
    r.add_argument("bundle", metavar="BUNDLE", help="the bundle folder (work/runs/<run>/bundle)")
    r.add_argument("--reason", required=True, help="why the bundle is refused (one line)")
    r.add_argument("--config", metavar="FILE", default=None, help="site.yaml (to find the audit trail when the bundle was moved)")
    r.set_defaults(func=run_reject)


def _print_overview(overview: dict) -> None:
    print(f"bundle:  {overview['bundle']}")
    print(f"site:    {overview['site']}    run: {overview['run_id']}    state: {overview['state']}")
    print(f"verdict: {overview['verdict']}    tiles: {overview['tiles']}"
          + (f"    labels: {overview['labels']}" if overview["labels"] else ""))
    for report in overview["reports"] or ["(no report found beside the bundle)"]:
        print(f"report:  {report}")


def run_approve(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.approval import approve_bundle, bundle_overview
    from pixcell_fed.bundle.state import resolve_trail
    from pixcell_fed.errors import BundleError, PrivacyGateRefused, UsageError
    from pixcell_fed.keys import load_private_key, passphrase_from_env

    trail = resolve_trail(args.bundle, args.config)
    overview = bundle_overview(args.bundle)
    _print_overview(overview)
    if overview["state"] == "rejected":
        raise PrivacyGateRefused("this bundle was rejected; it can never be approved",
                                 hint="run synthesize again to make a new bundle")
    if overview["state"] == "approved":
        raise BundleError("this bundle is already approved", hint="nothing to do")
    if overview["verdict"] == "FAIL":
        raise PrivacyGateRefused("the audit verdict is FAIL: this bundle cannot be approved",
                                 hint=f"reject it: site-agent reject {args.bundle} --reason 'audit FAIL'")
    key = load_private_key(args.key, passphrase=passphrase_from_env(args.passphrase_env))
    if not args.yes:
        print("Have you read the report above? Type 'approve' to sign the approval: ", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline().strip()
        if answer != "approve":
            raise UsageError("approval not confirmed; nothing was signed", hint="type 'approve' at the prompt, or pass --yes")
    result = approve_bundle(args.bundle, key, trail=trail)
    print(f"approved: {result['bundle']} (state {result['state']}); recorded in {trail}")
    return 0


def run_reject(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.approval import reject_bundle
    from pixcell_fed.bundle.state import resolve_trail

    trail = resolve_trail(args.bundle, args.config)
    result = reject_bundle(args.bundle, args.reason, trail=trail)
    print(f"rejected: {result['bundle']} (reason: {args.reason}); recorded in {trail}")
    return 0

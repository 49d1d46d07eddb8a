"""``site-agent privacy-ledger``: the site's DP spend; ``site-agent privacy-ledger-reset``: an officer's reset."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "privacy-ledger",
        help="show the privacy this site spent in DP fine-tuning, and check its ledger",
        description="Check the site's privacy ledger (work/privacy_ledger/) against the audit trail and show the DP "
        "rounds recorded, the epsilon spent over all of them (at the site's delta), the budget from "
        "site.yaml and what is left. Exit 3 when the ledger is damaged: DP training is then refused "
        "until a privacy officer resets it.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run_status)

    r = subparsers.add_parser(
        "privacy-ledger-reset",
        help="privacy officer: replace a damaged privacy ledger (signed, in the audit trail)",
        description="Move the current privacy ledger aside (kept), start a new one carrying over every DP round the "
        "audit trail recorded (a reset never forgets privacy spent), sign the reset with the officer's "
        "key and record it in the audit trail. Only a privacy officer the site lists in site.yaml "
        "(keys.officers) may reset: any other key exits 3, and nothing is changed. Refused when the "
        "audit trail itself is broken.",
    )
    r.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    r.add_argument("--key", required=True, metavar="OFFICER_KEY", help="the privacy officer's private key file")
    r.add_argument(
        "--passphrase-env", metavar="VAR", default=None, help="environment variable holding the key's passphrase"
    )
    r.add_argument("--reason", required=True, help="what happened to the ledger (one line, kept in the trail)")
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    r.set_defaults(func=run_reset)


def _status(cfg) -> dict:
    from pixcell_fed.federation.dp_ledger import ledger_status

    dp = cfg.federation.dp
    return ledger_status(cfg.site.work_dir, budget=dp.epsilon_budget, delta=dp.delta)


def run_status(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.config import load_site_config
    from pixcell_fed.errors import ExitCode

    cfg = load_site_config(args.config)
    status = _status(cfg)
    if args.format == "json":
        print(json.dumps({"site": cfg.site.name, **status}, indent=2))
    elif status["ok"]:
        print(f"site {cfg.site.name}: privacy ledger {status['ledger']} verifies; {status['rounds']} DP round(s)")
        delta = f" at delta {status['delta']:g}" if status["delta"] is not None else ""
        print(
            f"epsilon spent: {status['epsilon']:.3f}{delta}; budget {status['epsilon_budget']:g}; "
            f"left {status['epsilon_remaining']:.3f}"
        )
    else:
        print(f"site {cfg.site.name}: privacy ledger DAMAGED: {status['problem']}")
        print("DP training is refused until a privacy officer runs 'site-agent privacy-ledger-reset'")
    return int(ExitCode.OK) if status["ok"] else int(ExitCode.PRIVACY_REFUSED)


def _confirm_reset() -> bool:
    """Asked only after the key was found among the site's officers."""
    print(
        "Type 'reset' to replace the ledger (every round the audit trail recorded is carried over): ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    return sys.stdin.readline().strip() == "reset"


def run_reset(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.approval import SiteAuthority
    from pixcell_fed.config import load_site_config
    from pixcell_fed.errors import UsageError
    from pixcell_fed.federation.dp_ledger import reset_ledger
    from pixcell_fed.keys import load_private_key, load_public_key, passphrase_from_env, public_key_raw

    cfg = load_site_config(args.config)
    status = _status(cfg)
    print(f"privacy ledger: {status['ledger']}: " + ("verifies" if status["ok"] else f"DAMAGED: {status['problem']}"))
    key = load_private_key(args.key, passphrase=passphrase_from_env(args.passphrase_env))
    site_pub = cfg.keys.site_private_key.with_suffix(".pub")
    if site_pub.is_file() and public_key_raw(load_public_key(site_pub)) == public_key_raw(key.public_key()):
        raise UsageError(
            "the officer key is the site's own signing key",
            hint="the privacy officer resets with a key of their own ('site-agent officer-key')",
        )
    result = reset_ledger(
        SiteAuthority.from_config(cfg), key, reason=args.reason, confirm=None if args.yes else _confirm_reset
    )
    kept = f"; the old ledger is kept in {result['previous']}" if result["previous"] else ""
    print(f"privacy ledger reset by {result['officer']}: {result['restored_rounds']} round(s) carried over{kept}")
    return 0

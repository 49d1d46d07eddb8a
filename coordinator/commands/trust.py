"""``coordinator trust-add``: admit a site's signing key, its officers' keys and its SuperNode key to the trust file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trust-add",
        help="add (or replace) a site and its privacy officers in the consortium trust file",
        description="Add the site's signing public key (keys/site_signing.pub from 'site-agent init') and the public "
        "keys of its privacy officers ('site-agent officer-key') to TRUST_FILE, creating it if needed, and "
        "with --auth-key the site's SuperNode key (<site>_auth.pub from 'site-agent auth-key'). Bundles are "
        "accepted only when signed by that key and approved by one of those officers; 'register-site' "
        "admits only the SuperNode key given here, under this site's name.",
    )
    p.add_argument("trust_file", metavar="TRUST_FILE", help="the consortium trust file (YAML)")
    p.add_argument("--site", required=True, help="the site's name (site.name in its site.yaml)")
    p.add_argument("--signing-key", required=True, metavar="PUB", help="the site's signing public key file")
    p.add_argument(
        "--officer",
        required=True,
        action="append",
        metavar="PUB",
        help="a privacy officer's public key file (repeat for several officers)",
    )
    p.add_argument(
        "--auth-key",
        metavar="PUB",
        default=None,
        help="the site's SuperNode public key file (<site>_auth.pub); without it the site cannot be registered",
    )
    p.set_defaults(func=run)


def _key_text(path: str) -> str:
    from pixcell_fed.errors import KeyFileError

    file = Path(path)
    if not file.is_file():
        raise KeyFileError(f"public key file not found: {file}", hint="pass the .pub file the site sent you")
    return file.read_text(encoding="utf-8").strip()


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.trust import add_site_to_trust_file

    store = add_site_to_trust_file(
        args.trust_file,
        args.site,
        signing_key=_key_text(args.signing_key),
        officers=[_key_text(o) for o in args.officer],
        auth_key=_key_text(args.auth_key) if args.auth_key else None,
    )
    print(f"{args.trust_file}: {len(store.sites)} site(s): {', '.join(sorted(store.sites))}")
    if store.sites[args.site].auth_key is None:
        print(f"note: {args.site} has no SuperNode key (--auth-key): it cannot be registered", file=sys.stderr)
    return 0

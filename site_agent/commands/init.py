"""``site-agent init DIR``: a new site folder with its config, its Ed25519 signing key and officer instructions."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="create a site folder: site.yaml, the site's signing key pair, officer instructions",
        description="Create DIR with site.yaml (from the documented example, with the site name set), keys/ with "
        "the site's Ed25519 signing key pair (private key mode 0600, optionally passphrase-protected) "
        "and OFFICER.md, which tells the privacy officer how to make their own key. Prints the public "
        "key to send to the consortium for its trust file. Never overwrites an existing key.",
    )
    p.add_argument("dir", metavar="DIR", help="the site folder to create (may exist, but must not hold a site.yaml)")
    p.add_argument("--name", default=None, help="this site's name in the consortium (default: the folder's name)")
    p.add_argument(
        "--passphrase-env",
        metavar="VAR",
        default=None,
        help="encrypt the private key with the passphrase in environment variable VAR",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.site_init import init_site

    result = init_site(args.dir, name=args.name, passphrase_env=args.passphrase_env)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(f"site folder: {result['dir']}")
        print(f"config:      {result['config']}")
        print(
            f"private key: {result['private_key']} (mode 0600{', passphrase-protected' if result['encrypted'] else ''})"
        )
        print(f"public key:  {result['public_key_text']}")
        print(f"fingerprint: {result['fingerprint']}")
        print("send the public key line above to the consortium for its trust file;")
        print(f"the privacy officer makes their own key as described in {result['officer_instructions']}")
    return 0

"""``site-agent officer-key --out DIR``: the privacy officer's own Ed25519 key pair for approving bundles."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "officer-key",
        help="make a privacy officer's approval key pair",
        description="Write DIR/officer.key (private, mode 0600, optionally passphrase-protected) and DIR/officer.pub, "
        "and print the public key line to add to the site's site.yaml (keys.officers: only listed keys "
        "can approve or reject) and to the consortium's trust file (the site's officers). Never "
        "overwrites a key.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the key pair (kept by the officer)")
    p.add_argument("--name", default="officer", help="file name stem of the key pair (default: officer)")
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
    import re
    from pathlib import Path

    from pixcell_fed.errors import UsageError
    from pixcell_fed.keys import fingerprint, passphrase_from_env, public_key_text, write_key_pair

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", args.name):
        raise UsageError(f"invalid key name {args.name!r}", hint="use letters, digits, '.', '_' or '-'")
    passphrase = passphrase_from_env(args.passphrase_env)
    private, public, key = write_key_pair(Path(args.out) / f"{args.name}.key", passphrase=passphrase)
    result = {
        "private_key": str(private),
        "public_key": str(public),
        "public_key_text": public_key_text(key),
        "fingerprint": fingerprint(key),
        "encrypted": passphrase is not None,
    }
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(
            f"private key: {private} (mode 0600{', passphrase-protected' if passphrase else ''}; keep it to yourself)"
        )
        print(f"public key:  {result['public_key_text']}")
        print(f"fingerprint: {result['fingerprint']}")
        print("add this line under 'keys: officers:' in the site's site.yaml (the site administrator does), and send")
        print("the public key to the consortium for your site's 'officers:' in its trust file:")
        print(f"    - {result['public_key_text']}")
    return 0

"""``coordinator verify BUNDLE --trust TRUST_FILE``: accept an intact, approved bundle from a trusted site."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="verify a bundle against the consortium trust file",
        description="Check every byte of a bundle: files and hashes, no tile added or removed, the manifest, the "
                    "audit bound by the site's signature, the site's trusted signing key, the officer's approval "
                    "and the verdict. Exit 0 when accepted, 3 with the precise reason when rejected.")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle folder")
    p.add_argument("--trust", required=True, metavar="TRUST_FILE", help="the consortium's trust file (YAML)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.bundle.trust import load_trust
    from pixcell_fed.bundle.verify import verify_bundle

    verified = verify_bundle(args.bundle, load_trust(args.trust))
    labels = {}
    if "label" in verified.tiles.columns:
        labels = {str(k): int(v) for k, v in verified.tiles["label"].value_counts().sort_index().items()}
    result = {"accepted": True, "bundle": str(verified.path), "site": verified.site_name, "run_id": verified.run_id,
              "tiles": len(verified.tiles), "labels": labels, "verdict": verified.verdict,
              "site_key": verified.site_key_fingerprint, "officer_key": verified.officer_key_fingerprint}
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(f"accepted: site {verified.site_name}, run {verified.run_id}, {len(verified.tiles)} tiles, "
              f"verdict {verified.verdict}, approved by {verified.officer_key_fingerprint}")
    return 0

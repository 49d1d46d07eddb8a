"""``coordinator verify BUNDLE --trust TRUST_FILE``: accept an intact, approved bundle from a trusted site."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="verify a bundle against the consortium trust file",
        description="Check every byte of a bundle in three stages: the signed files (the site's trusted signing key "
                    "and signature, file hashes, manifest, the audit bound by the signature: verdict not FAIL, its "
                    "kept set exactly the tiles; an inert summary page), the officer's approval by one of the site's "
                    "officers in the trust file, and the tiles (none added or removed, each the canonical PNG of "
                    "an 8-bit RGB tile of the bundle's size). Exit 0 when accepted, 3 with the precise reason when "
                    "rejected.")
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle folder")
    p.add_argument("--trust", required=True, metavar="TRUST_FILE", help="the consortium's trust file (YAML)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.bundle.trust import load_trust
    from pixcell_fed.bundle.verify import verify_bundle

    verified = verify_bundle(args.bundle, load_trust(args.trust))
    result = {"accepted": True, "bundle": str(verified.path), "site": verified.site_name, "run_id": verified.run_id,
              "created": verified.info["created"], "tiles": len(verified.tiles), "tile_size": verified.tile_size,
              "labels": verified.info["counts"]["labels"], "verdict": verified.verdict,
              "site_key": verified.site_key_fingerprint, "officer_key": verified.officer_key_fingerprint}
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(f"accepted: site {verified.site_name}, run {verified.run_id} (built {verified.info['created']}), "
              f"{len(verified.tiles)} tiles of {verified.tile_size} px, verdict {verified.verdict}, "
              f"approved by {verified.officer_key_fingerprint}")
    return 0

"""``coordinator verify BUNDLE --trust TRUST_FILE``: accept an intact, approved bundle from a trusted site, optionally
only when its conditioning privacy meets the consortium's requirement."""

from __future__ import annotations

import argparse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def register(subparsers) -> None:
    from pixcell_fed.privacy.conditioning import MODES

    p = subparsers.add_parser(
        "verify",
        help="verify a bundle against the consortium trust file",
        description="Check every byte of a bundle in three stages: the signed files (the site's trusted signing key "
        "and signature, file hashes, manifest, the audit bound by the signature: verdict not FAIL, its "
        "kept set exactly the tiles; the conditioning claim; an inert summary page), the officer's "
        "approval by one of the site's officers in the trust file, and the tiles (none added or removed, "
        "each the canonical PNG of an 8-bit RGB tile of the bundle's size). Shows the bundle's "
        "conditioning privacy (mode and, for dp, its per-tile and per-slide guarantee) and, with "
        "--min-conditioning or an epsilon limit, refuses a bundle below it. Exit 0 when accepted, 3 with "
        "the precise reason when rejected.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="the bundle folder")
    p.add_argument("--trust", required=True, metavar="TRUST_FILE", help="the consortium's trust file (YAML)")
    p.add_argument(
        "--min-conditioning",
        choices=MODES,
        default="exact",
        help="the least conditioning privacy accepted: exact < mixed < dp (default: exact, any)",
    )
    p.add_argument(
        "--max-tile-epsilon",
        type=_positive,
        metavar="EPS",
        help="refuse unless the set is dp with at most this epsilon per real tile",
    )
    p.add_argument(
        "--max-slide-epsilon",
        type=_positive,
        metavar="EPS",
        help="refuse unless the set is dp with at most this epsilon per slide",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.bundle.conditioning_policy import ConditioningRequirement, conditioning_refusal
    from pixcell_fed.bundle.trust import load_trust
    from pixcell_fed.bundle.verify import verify_bundle
    from pixcell_fed.errors import VerificationError

    requirement = ConditioningRequirement(
        min_mode=args.min_conditioning, max_tile_epsilon=args.max_tile_epsilon, max_slide_epsilon=args.max_slide_epsilon
    )
    verified = verify_bundle(args.bundle, load_trust(args.trust))
    claim = verified.conditioning
    refusal = conditioning_refusal(claim, requirement)
    if refusal:
        raise VerificationError(
            f"bundle of site {verified.site_name}, run {verified.run_id} refused: {refusal}",
            hint=f"ask the site for a set made with {requirement.describe()} "
            "(synthesis.conditioning and synthesis.dp in its site.yaml)",
        )
    result = {
        "accepted": True,
        "bundle": str(verified.path),
        "site": verified.site_name,
        "run_id": verified.run_id,
        "created": verified.info["created"],
        "tiles": len(verified.tiles),
        "tile_size": verified.tile_size,
        "labels": verified.info["counts"]["labels"],
        "verdict": verified.verdict,
        "site_key": verified.site_key_fingerprint,
        "officer_key": verified.officer_key_fingerprint,
        "conditioning": claim.to_record(),
    }
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(
            f"accepted: site {verified.site_name}, run {verified.run_id} (built {verified.info['created']}), "
            f"{len(verified.tiles)} tiles of {verified.tile_size} px, verdict {verified.verdict}, "
            f"approved by {verified.officer_key_fingerprint}"
        )
        print(f"conditioning: {claim.statement()}")
        if claim.mode == "dp":
            print(f"not covered: {claim.to_record()['not_covered']}")
    return 0

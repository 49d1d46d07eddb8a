"""``site-agent doctor [--config site.yaml]``: check this machine and the site's set-up; print a fix per problem."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from pixcell_fed.doctor import DEFAULT_MIN_FREE_GB

    p = subparsers.add_parser(
        "doctor",
        help="check OpenSlide, the slide table, the model and encoder folders, the device, free disk and the keys",
        description="Check that this machine and the site's set-up can run the pipeline: the Python packages, "
        "the OpenSlide library, the slides and work folders (free disk), the slide table (a patient "
        "column for split.unit: patient), the PixCell, VAE and encoder folders (every file present, "
        "configs equal to the published ones, tensor names and shapes matching the architecture; "
        "weights are not loaded), the device, the site's signing key (mode 0600, loads), the privacy "
        "officers listed in site.yaml and, when given, the trust file. Tiny test models are reported as "
        "'untrained twin'. Each check prints OK, WARN or FAIL, and a one-line fix for each problem. "
        "Exit 1 when any check FAILs; WARNs alone exit 0.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="site.yaml; without it only this machine is checked (packages, OpenSlide, device, disk)",
    )
    p.add_argument(
        "--trust",
        metavar="FILE",
        default=None,
        help="the consortium's trust file: check it lists this site with its key and an officer key",
    )
    p.add_argument(
        "--min-free-gb",
        type=float,
        default=DEFAULT_MIN_FREE_GB,
        metavar="GB",
        help=f"warn when the work folder's disk has less free space (default {DEFAULT_MIN_FREE_GB:g})",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.doctor import run_doctor

    report = run_doctor(args.config, trust_path=args.trust, min_free_gb=args.min_free_gb)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render_text())
    return report.exit_code

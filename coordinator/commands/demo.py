"""``coordinator demo``: the whole consortium on this machine, with tiny untrained twins and real H&E pixels."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run a complete demo consortium on this machine (3 simulated hospitals, loopback Flower)",
        description="Three simulated hospitals synthesise, audit and bundle their slides with tiny UNTRAINED model "
                    "twins; demo officers approve; a loopback Flower deployment with TLS and registered sites pools "
                    "the bundles, trains a small classifier and evaluates it at every site. A second run reuses "
                    "what the first made. Prints where the audit reports and the consortium report are.")
    p.add_argument("--out", default="demo-output", metavar="DIR", help="folder for everything the demo makes")
    p.add_argument("--slide", default=None, metavar="PATH",
                   help="the real slide CMU-1-Small-Region.svs the hospitals' slides are written from (default: the "
                        "copy scripts/setup.sh cached; nothing is downloaded at run time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.demo.consortium import run_demo

    result = run_demo(args.out, slide=args.slide)
    print("demo consortium finished (models are tiny UNTRAINED twins: the figures show the plumbing, not quality)")
    for site, report in result.audit_reports.items():
        print(f"  {site}: audit report {report}")
        print(f"  {site}: approved bundle {result.bundles[site]}")
    print(f"consortium report: {result.consortium_report}")
    print(f"consortium report (JSON): {result.consortium_json}")
    return 0

"""``site-agent status --config site.yaml``: runs, bundles and their states, and the audit trail's health."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "status",
        help="list runs, bundles and their states; check the audit trail",
        description="List the site's runs with their bundles and states (awaiting_approval, approved, rejected, or "
        "unusable when a bundle is not what its run audited, e.g. its run was refused) and check the "
        "hash chain of the site audit trail. Exit 1 when the trail is broken.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.bundle.state import site_status
    from pixcell_fed.config import load_site_config
    from pixcell_fed.errors import ExitCode

    cfg = load_site_config(args.config)
    status = site_status(cfg.site.work_dir)
    if args.format == "json":
        print(json.dumps({"site": cfg.site.name, **status.to_dict()}, indent=2))
    else:
        print(f"site {cfg.site.name}: work folder {status.work_dir}")
        if not status.runs:
            print("no runs yet")
        for run in status.runs:
            extra = f", verdict {run.verdict}, {run.tiles} tiles" if run.verdict else ""
            if run.problem:
                extra = f" ({run.problem}; it must not leave the site)"
            print(f"  {run.run_id}: run {run.run_state}; bundle {run.bundle_state}{extra}")
        if status.trail_ok:
            head = f", head {status.trail_head}" if status.trail_head else ""
            print(f"audit trail: {status.trail_entries} entries, chain intact{head}")
        else:
            print(f"audit trail: BROKEN: {status.trail_problem}")
    return int(ExitCode.OK if status.trail_ok else ExitCode.FAILURE)

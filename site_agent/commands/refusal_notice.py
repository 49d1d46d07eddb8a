"""``site-agent refusal-notice --config site.yaml --out FILE``: tell the consortium, signed, that the audit refused a
run."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "refusal-notice",
        help="write a signed notice that this site's audit refused a run (to send to the lead)",
        description="For a run whose audit FAILED (so no bundle was built), write a refusal notice: the run's "
        "shareable audit summary (verdicts, each test's figures and sentence, thresholds, set sizes, model "
        "identities; no tile, no tile hash, no file name), the site name, run id and time, signed with "
        "the site's signing key. Send it to the consortium lead if you want the consortium report to "
        "list this site as refused by its own audit, with the audit's reasons; nothing is sent "
        "automatically. The notice is recorded in the site's audit trail. Exit 2 when no run was "
        "refused.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="site.yaml")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the notice (JSON)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="the refused run (default: the newest refused run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.bundle.refusal import make_refusal_notice
    from pixcell_fed.config import load_site_config
    from pixcell_fed.keys import load_private_key, passphrase_from_env

    cfg = load_site_config(args.config)
    key = load_private_key(cfg.keys.site_private_key, passphrase=passphrase_from_env(cfg.keys.passphrase_env))
    notice = make_refusal_notice(cfg.site.work_dir, args.out, site=cfg.site.name, site_key=key, run_id=args.run)
    print(
        f"refusal notice of run {notice.run_id} (audit {notice.audit['verdict']}, generator "
        f"{notice.generator or 'unknown'}): {args.out}"
    )
    for reason in notice.reasons():
        print(f"  {reason}")
    print("send it to the consortium lead, who puts it in the coordinator's <work-dir>/refusals/")
    return 0

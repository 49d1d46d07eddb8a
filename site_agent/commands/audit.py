"""``site-agent audit``: audit any three folders of PNG/JPEG tiles (synthetic, conditioning, held-out)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "audit",
        help="memorisation and privacy audit of a folder of synthetic tiles",
        description="Audit synthetic tiles (S) against the real tiles that conditioned them (T) with real tiles of "
        "slides never used for conditioning (H) as the null. Writes audit.json, audit.html (on-site), "
        "audit_summary.json and its inert page audit_summary.html (shareable) into --out. Without a "
        "mapping s -> t(s) the paired test is "
        "reported as not applicable. Exit 0 for PASS, WARN or INCONCLUSIVE (too few tiles to conclude; the "
        "officer decides), 3 when the gate refuses (FAIL).",
    )
    p.add_argument("--synthetic", required=True, metavar="DIR", help="folder of synthetic PNG/JPEG tiles (S)")
    p.add_argument("--reference", required=True, metavar="DIR", help="folder of the real conditioning tiles (T)")
    p.add_argument("--holdout", required=True, metavar="DIR", help="folder of real held-out tiles (H)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the reports")
    p.add_argument("--config", metavar="FILE", help="site.yaml whose 'audit' section sets the thresholds")
    p.add_argument(
        "--forbid",
        action="append",
        default=[],
        metavar="STRING",
        help="a site identifier (slide name, barcode, patient id) that must not appear in the synthetic "
        "files' names or metadata; repeatable",
    )
    p.add_argument(
        "--split-unit",
        choices=("patient", "slide"),
        default=None,
        help="how H was held out from T: whole patients, or single slides (then one patient's slides may "
        "sit on both sides); without it the report warns that the split is unknown",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="stdout format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from pixcell_fed.audit.report_html import first_page_notes
    from pixcell_fed.audit.roles import list_tiles
    from pixcell_fed.audit.run import SiteFacts, run_audit
    from pixcell_fed.config import load_site_config
    from pixcell_fed.config.schema import AuditConfig
    from pixcell_fed.errors import ExitCode, PrivacyGateRefused

    cfg = load_site_config(args.config).audit if args.config else AuditConfig()
    synthetic = list_tiles(args.synthetic, role="synthetic")
    reference = list_tiles(args.reference, role="reference")
    holdout = list_tiles(args.holdout, role="holdout")
    result = run_audit(
        synthetic,
        reference,
        holdout,
        source_of=None,
        audit_cfg=cfg,
        out_dir=args.out,
        site=SiteFacts(forbidden_strings=args.forbid, split_unit=args.split_unit),
    )
    counts = {s: sum(t.status == s for t in result.tests) for s in ("PASS", "WARN", "FAIL", "INCONCLUSIVE")}
    problems = [f"{t.title}: {t.status}" for t in result.tests if t.status in ("WARN", "FAIL")]
    if args.format == "json":
        print(
            json.dumps(
                {
                    "verdict": result.verdict,
                    "kept": len(result.kept),
                    "audited": len(synthetic),
                    "tests": {t.name: t.status for t in result.tests},
                    "report": str(result.report_path),
                    "summary": str(result.summary_path),
                    "summary_page": str(result.summary_page_path),
                },
                indent=2,
            )
        )
    else:
        print(
            f"Audit verdict {result.verdict}: {len(result.kept)} of {len(synthetic)} synthetic tiles audited in the "
            f"final round against {len(reference)} conditioning and {len(holdout)} held-out tiles; "
            f"{counts['PASS']} tests passed, {counts['WARN']} warned, {counts['FAIL']} failed, "
            f"{counts['INCONCLUSIVE']} inconclusive" + (f" ({'; '.join(problems)})" if problems else "") + ". "
            f"Report: {result.report_path} (on-site only); shareable summary: {result.summary_path} "
            f"(page: {result.summary_page_path})."
        )
        for _, note in first_page_notes(result.report):
            print(note)
    if result.verdict == "FAIL":
        raise PrivacyGateRefused(
            f"the privacy gate refused this synthetic set (verdict FAIL; see {result.report_path})",
            hint="drop the flagged tiles or regenerate, then audit again; nothing may be shipped",
        )
    return int(ExitCode.OK)

"""``site-agent synthesize --config site.yaml``: the whole site pipeline, resumable, ending awaiting approval."""

from __future__ import annotations

import argparse
import json
import sys

from pixcell_fed.errors import ExitCode


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synthesize",
        help="slides -> tiles -> embeddings -> synthetic tiles -> audit -> bundle awaiting approval",
        description="Run (or continue, after an interruption) the site pipeline described by the site config. "
                    "The same command continues where a killed run stopped. Exit 3 when the audit fails.",
    )
    p.add_argument("--config", required=True, help="the site's site.yaml")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary format on stdout")
    p.set_defaults(func=run)


def format_summary(s) -> str:
    lines = [f"run {s.run_id}: {s.run_dir}"]
    if s.models_are_twins:
        lines.append("NOTE: the models are tiny UNTRAINED twins (demo/test); the synthetic tiles are not realistic.")
    lines.append(f"slides: {len(s.slides_ok)} ok, {len(s.slides_failed)} failed")
    lines += [f"  failed: {name}: {reason}" for name, reason in s.slides_failed]
    lines.append(f"tiles: {s.tiles} ({s.conditioning_slides} conditioning slides -> {s.conditioning_tiles} conditioning "
                 f"tiles; {s.holdout_slides} held-out slides -> {s.holdout_tiles} held-out tiles)")
    if s.tiles_dropped_by_qc:
        lines.append("  dropped by tile quality control: "
                     + ", ".join(f"{n} {reason}" for reason, n in s.tiles_dropped_by_qc.items()))
    lines.append(f"synthetic tiles: {s.synthetic_tiles} generated, {s.kept_tiles} kept after the audit")
    if s.conditioning:
        lines.append(f"conditioning privacy: {s.conditioning}")
    lines.append(f"audit verdict: {s.verdict}; report: {s.report}")
    if s.bundle:
        state = s.bundle_state.replace("_", " ") if s.bundle_state else "unknown"
        lines.append(f"bundle ({state}): {s.bundle}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.config import load_site_config
    from pixcell_fed.pipeline.synthesize import synthesize

    cfg = load_site_config(args.config)
    summary = synthesize(cfg)
    print(json.dumps(summary.to_dict(), indent=2) if args.format == "json" else format_summary(summary))
    if summary.slides_failed:
        print("some slides could not be used; see the lines above and the run log", file=sys.stderr)
        return int(ExitCode.PARTIAL)
    return int(ExitCode.OK)

"""``site-agent synthesize --config site.yaml``: the whole site pipeline, resumable, ending awaiting approval."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta

from pixcell_fed.cli_support import EXIT_CODES_EPILOG
from pixcell_fed.errors import ExitCode, UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synthesize",
        help="slides -> tiles -> embeddings -> synthetic tiles -> audit -> bundle awaiting approval",
        description="Run (or continue, after an interruption) the site pipeline described by the site config. "
        "The same command continues where a killed run stopped. Exit 3 when the audit fails.",
        epilog=SHARDING_HELP + "\n\n" + EXIT_CODES_EPILOG,
    )
    p.add_argument("--config", required=True, help="the site's site.yaml")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary format on stdout")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=DEFAULT_WAIT_HOURS,
        metavar="HOURS",
        help="under torchrun: how long a rank waits for the others (rank 0 tiles and audits alone) "
        f"before it stops with an error (default: {DEFAULT_WAIT_HOURS:g})",
    )
    p.set_defaults(func=run)


DEFAULT_WAIT_HOURS = 24.0

SHARDING_HELP = """\
sharded over GPUs and machines (torchrun starts one process per GPU; rank 0 tiles, splits, audits
and builds the bundle, every rank embeds and generates its share; the tiles are the same as a
one-process run's on the same kind of GPU; a killed run is continued by the same command):
  one machine, 8 GPUs:
    torchrun --standalone --nproc_per_node 8 --no-python site-agent synthesize --config site.yaml
  2 machines (run on each; the work folder on a file system both mount at the same path):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      --rdzv-id synth1 --no-python site-agent synthesize --config site.yaml
  Slurm (one task per node):
    srun --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 torchrun --nnodes 2 --nproc_per_node 8 \\
      --rdzv-backend c10d --rdzv-endpoint $(scontrol show hostnames | head -n1):29500 \\
      --rdzv-id $SLURM_JOB_ID --no-python site-agent synthesize --config site.yaml
  docs/deployment.md has the details."""


def format_summary(s) -> str:
    lines = [f"run {s.run_id}: {s.run_dir}"]
    if s.models_are_twins:
        lines.append("NOTE: the models are tiny UNTRAINED twins (demo/test); the synthetic tiles are not realistic.")
    lines.append(f"slides: {len(s.slides_ok)} ok, {len(s.slides_failed)} failed")
    lines += [f"  failed: {name}: {reason}" for name, reason in s.slides_failed]
    lines.append(
        f"tiles: {s.tiles} ({s.conditioning_slides} conditioning slides -> {s.conditioning_tiles} conditioning "
        f"tiles; {s.holdout_slides} held-out slides -> {s.holdout_tiles} held-out tiles)"
    )
    if s.tiles_dropped_by_qc:
        lines.append(
            "  dropped by tile quality control: "
            + ", ".join(f"{n} {reason}" for reason, n in s.tiles_dropped_by_qc.items())
        )
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

    if not args.wait_timeout > 0:
        raise UsageError(
            f"--wait-timeout must be a positive number of hours (got {args.wait_timeout})",
            hint=f"leave it out for the default of {DEFAULT_WAIT_HOURS:g} hours",
        )
    cfg = load_site_config(args.config)
    summary = synthesize(cfg, wait_timeout=timedelta(hours=args.wait_timeout))
    if summary is None:  # a rank other than 0 of a sharded run: rank 0 prints the run's summary
        return int(ExitCode.OK)
    print(json.dumps(summary.to_dict(), indent=2) if args.format == "json" else format_summary(summary))
    if summary.slides_failed:
        print("some slides could not be used; see the lines above and the run log", file=sys.stderr)
        return int(ExitCode.PARTIAL)
    return int(ExitCode.OK)

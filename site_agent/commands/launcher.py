"""``site-agent pinned-launcher``: runs the ClientApp only for pinned app bundles ('site-agent serve' starts it)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pinned-launcher",
        help="the site's app launcher: runs only pinned app bundles ('serve' starts it)",
        description="Claim ClientApp tasks from the SuperNode's runtime API (with the SuperExec secret) and start "
        "flwr-clientapp only for a task whose app bundle SHA-256 is one of --allow-app-sha256; any other "
        "task runs nothing and gets no reply. 'site-agent serve' runs it next to the SuperNode.",
    )
    p.add_argument(
        "--runtime-api-address", required=True, metavar="HOST:PORT", help="the SuperNode's runtime API (loopback)"
    )
    p.add_argument(
        "--allow-app-sha256",
        required=True,
        action="append",
        metavar="SHA256",
        help="an app bundle this site runs (repeatable)",
    )
    p.add_argument(
        "--superexec-auth-secret-file",
        metavar="FILE",
        default=None,
        help="the secret shared with the SuperNode (required by a SuperNode started with one)",
    )
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="seconds between task polls (default $FLWR_SUPEREXEC_TASK_POLL_INTERVAL or 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pixcell_fed.errors import UsageError
    from pixcell_fed.federation.deployment import read_superexec_secret
    from pixcell_fed.federation.pinned_launcher import PinnedLauncher, Pins
    from pixcell_fed.federation.services import check_loopback

    secret = read_superexec_secret(args.superexec_auth_secret_file) if args.superexec_auth_secret_file else None
    poll = args.poll_interval
    if poll is None:
        try:
            poll = float(os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1"))
        except ValueError as exc:
            raise UsageError(
                f"FLWR_SUPEREXEC_TASK_POLL_INTERVAL is not a number: {exc}", hint="unset it or give seconds, e.g. 1"
            ) from exc
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    launcher = PinnedLauncher(
        check_loopback(args.runtime_api_address, "--runtime-api-address"), Pins.of(args.allow_app_sha256), secret=secret
    )
    launcher.run_forever(min(60.0, max(0.01, poll)))
    return 0

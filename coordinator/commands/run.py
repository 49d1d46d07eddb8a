"""``coordinator run``: pool the sites' bundles, train, evaluate at every site and write the consortium report.

Starts the coordinator's Flower app (the installed ``pixcell_fed/flower_app``, the app the sites pin) on the
SuperLink's loopback port with ``flwr run`` and waits for it to finish. Settings come from a TOML file of
``[tool.flwr.app.config]`` keys (see docs/federation.md); the report lands in ``<work-dir>/report/report.html``
and ``report.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pixcell_fed.federation.services import INTERNAL_PORT


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="pool -> train -> evaluate at the sites -> consortium report (runs the Flower app)",
        description="Run the coordinator's Flower app against the SuperLink and wait for it. The settings file holds "
        "keys of [tool.flwr.app.config] (work-dir, trust-file, expected-sites, arch, epochs, ...). Runs the "
        "installed release's app: sites run it only if they pinned its hash ('site-agent app-hash').",
    )
    p.add_argument(
        "--settings", required=True, metavar="TOML", help="run settings (TOML of [tool.flwr.app.config] keys)"
    )
    p.add_argument(
        "--superlink",
        default=f"127.0.0.1:{INTERNAL_PORT}",
        help=f"the SuperLink's loopback address (default 127.0.0.1:{INTERNAL_PORT}; 'coordinator serve')",
    )
    p.add_argument("--ca", required=True, metavar="CA_CERT", help="the consortium CA certificate (certs/ca.crt)")
    p.add_argument(
        "--flwr-home", metavar="DIR", default=None, help="Flower's config folder (default $FLWR_HOME or ~/.flwr)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import subprocess
    import tomllib

    from pixcell_fed.errors import ConfigError, FederationError
    from pixcell_fed.federation.config import from_run_config
    from pixcell_fed.federation.deployment import flower_env, flwr_run_command, resolve_flwr_home, write_flwr_config
    from pixcell_fed.federation.services import check_loopback

    settings = Path(args.settings)
    try:
        values = tomllib.loads(settings.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"cannot read run settings {settings}: {exc}", hint="write a TOML file of key = value lines"
        ) from exc
    cfg = from_run_config(values)  # validate here, before anything starts
    superlink = check_loopback(args.superlink, "--superlink")
    home = resolve_flwr_home(args.flwr_home)
    write_flwr_config(home, "consortium", superlink, root_certificates=Path(args.ca))
    code = subprocess.call(flwr_run_command("consortium", settings.resolve()), env=flower_env(home))
    if code != 0:
        raise FederationError(f"the Flower run failed (exit {code})", hint="see the log above and the SuperLink's log")
    report = cfg.report_dir / "report.html"
    print(f"report: {report}" if report.is_file() else "no report written (see the log)")
    return 0 if report.is_file() else 1

"""``site-agent``: the hospital-side command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pixcell_fed.cli_support import run_cli
from pixcell_fed.pipeline.distributed import end_torchrun_process, launched_by_torchrun

COMMANDS = (
    "site_agent.commands.synthesize",
    "site_agent.commands.tiles",
    "site_agent.commands.init",
    "site_agent.commands.officer_key",
    "site_agent.commands.approve",
    "site_agent.commands.status",
    "site_agent.commands.refusal_notice",
    "site_agent.commands.audit",
    "site_agent.commands.serve",
    "site_agent.commands.privacy_ledger",
    "site_agent.commands.app_hash",
    "site_agent.commands.launcher",
    "site_agent.commands.doctor",
)

#: The CLI's description (its --help, and docs/cli.md via pixcell_fed.cli_reference).
DESCRIPTION = "pixcell-fed site agent: slides -> synthetic tiles -> audit -> signed bundle."


def main(argv: Sequence[str] | None = None) -> int:
    code = run_cli("site-agent", DESCRIPTION, COMMANDS, argv)
    if argv is None and launched_by_torchrun():  # a rank of a sharded run: see end_torchrun_process
        end_torchrun_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

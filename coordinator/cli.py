"""``coordinator``: the consortium lead's command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pixcell_fed.cli_support import run_cli

COMMANDS: tuple[str, ...] = (
    "coordinator.commands.verify",
    "coordinator.commands.serve",
    "coordinator.commands.fleet_front",
    "coordinator.commands.run",
    "coordinator.commands.trust",
    "coordinator.commands.demo",
)

#: The CLI's description (its --help, and docs/cli.md via pixcell_fed.cli_reference).
DESCRIPTION = "pixcell-fed coordinator: verify bundles, pool them, train and evaluate shared models."


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("coordinator", DESCRIPTION, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())

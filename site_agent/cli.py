"""``site-agent``: the hospital-side command line."""

from __future__ import annotations

import sys
from typing import Sequence

from pixcell_fed.cli_support import run_cli

COMMANDS = (
    "site_agent.commands.tiles",
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("site-agent", "pixcell-fed site agent: slides -> synthetic tiles -> audit -> signed bundle.",
                   COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())

"""``coordinator``: the consortium lead's command line."""

from __future__ import annotations

import sys
from typing import Sequence

from pixcell_fed.cli_support import run_cli

COMMANDS: tuple[str, ...] = (
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("coordinator", "pixcell-fed coordinator: verify bundles, pool them, train and evaluate shared models.",
                   COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())

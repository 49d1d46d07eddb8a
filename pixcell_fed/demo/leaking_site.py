"""``python -m pixcell_fed.demo.leaking_site <site-agent arguments>``: the demo's leaking hospital runs site-agent.

The same ``site-agent`` (its parser, error boundary and exit codes, unchanged), started in a process that first
registers the memorising twin's pipeline (:func:`pixcell_fed.simulation.memorising_twin.register_pipeline`), so that
this site's ``models.pixcell_dir`` may point at a memorising twin folder. The installed ``site-agent`` never
registers it: pointed at such a folder, it refuses to load it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from pixcell_fed.simulation.memorising_twin import register_pipeline
    from site_agent.cli import main as site_agent_main

    register_pipeline()
    return site_agent_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""The coordinator's Flower ServerApp: thin wiring around :func:`pixcell_fed.federation.workflow.run_consortium`.

Run it with ``coordinator run`` (or ``flwr run . <connection>``); the run config is read once into a typed
:class:`~pixcell_fed.federation.config.CoordinatorConfig`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from pixcell_fed.federation.config import from_run_config
    from pixcell_fed.federation.transport import GridTransport
    from pixcell_fed.federation.workflow import run_consortium

    cfg = from_run_config(context.run_config)
    run_consortium(GridTransport(grid, poll_interval_s=cfg.poll_interval_s), cfg)

"""The coordinator's ServerApp: the installed ``coordinator.server_app``."""

from coordinator import server_app

app = server_app.app

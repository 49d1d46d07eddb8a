"""An ASGI app served by uvicorn on 127.0.0.1 in a background thread, for stand-ins of Flower's HTTP APIs."""

from __future__ import annotations

import threading
import time


class LoopbackASGI:
    """``with LoopbackASGI(app, tls=...) as server:`` serves ``app`` on ``server.port`` (HTTPS when ``tls`` is given)."""

    def __init__(self, app, *, tls=None) -> None:
        import uvicorn

        from pixcell_fed.federation.deployment import free_port

        self.port = free_port()
        ssl = {"ssl_certfile": str(tls.server_cert), "ssl_keyfile": str(tls.server_key)} if tls is not None else {}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", interface="asgi3", **ssl))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LoopbackASGI":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the stand-in server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

"""Run the serve app in a background thread of the current process.

For tests, notebooks and scripts that want a real HTTP server without a subprocess: the socket
is bound before uvicorn starts (port 0 picks a free port with no race), and leaving the `with`
block asks uvicorn to shut down and waits for its thread. torch's thread count is left alone,
since it is global to the process that embeds the server.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

from starlette.applications import Starlette

from chargpt.serve.runner import Server, uvicorn_config


class BackgroundServer:
    """`with BackgroundServer(app) as srv: urlopen(srv.url + "/health")`, for an `app` made by
    `create_app` (leaving the block stops its generations first, as `chargpt serve` does)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn_config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, lifespan="on")
        self.server = Server(config, on_shutdown=app.state.server.shutdown)
        self.startup_timeout = startup_timeout
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="chargpt-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""Test servers on 127.0.0.1: a port nothing listens on, and an ASGI app served by uvicorn."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def free_port() -> int:
    """A port that nothing listens on right now (bound once by the OS's choice, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """`app` served by uvicorn on 127.0.0.1 in a daemon thread, started on construction.

    Port 0 (the default) lets the OS choose; `url` is where it listens. A server that has not
    started within 30 s raises instead of hanging the suite. `stop()`, or leaving a `with`
    block, shuts it down. `config` goes to `uvicorn.Config` (log_level, ws_max_size, ...)."""

    def __init__(self, app: Any, port: int = 0, **config: Any) -> None:
        import uvicorn

        config.setdefault("log_level", "warning")
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        host, bound = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{bound}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServedApp:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

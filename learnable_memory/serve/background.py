"""Run an app with uvicorn in a background thread, on a port of its own (tests, notebooks, benchmarks)::

    with BackgroundServer(create_app(model)) as server:
        httpx.get(f"{server.url}/health")

The socket is bound before the server starts (port 0: any free port), so the URL is known at once;
entering returns after the app's start-up (its warm-up pass) has finished. Leaving asks uvicorn to
stop, which drains the requests in flight first.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class BackgroundServer:
    """A uvicorn server for ``app`` in a daemon thread.

    Args:
        app: An ASGI app, e.g. from ``create_app``.
        host: Address to bind (default loopback only).
        port: Port (0: a free one; see ``url``).
        start_timeout_s: Longest wait for the start-up (warm-up included).
        **config: More ``uvicorn.Config`` arguments (``log_level`` defaults to ``"warning"``).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0,
                 **config: Any):
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say
        # so, and with it on, each response waits ~40 ms for the client's delayed ACK
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", **config}))
        self.start_timeout_s = start_timeout_s
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="learnable-memory-server")

    def start(self) -> BackgroundServer:
        """Start and wait (bounded) until the server accepts requests."""
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped during start-up (see its log)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {self.start_timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the server to stop (requests in flight finish first) and wait at most ``timeout`` s."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise TimeoutError(f"the server did not stop within {timeout} s")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

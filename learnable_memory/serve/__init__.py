"""``learnable-memory serve``: one frozen backbone, many hot-loaded adapters, batched requests, every
task in one pass. Needs the ``serve`` extra (``pip install "learnable-memory[serve]"``).

- :mod:`.app`: ``create_app(model, ...)``, the FastAPI app and its endpoints.
- :mod:`.batcher`: micro-batching (bounded queue, one inference thread).
- :mod:`.inference`: one batch -> one ``forward_all`` -> each request's own top-k labels.
- :mod:`.adapter_set`: the served model, hot loading and unloading, the adapters file.
- :mod:`.payloads`, :mod:`.images`: request bodies and images under limits.
- :mod:`.metrics`: Prometheus metrics (prometheus-client, multiprocess mode for several workers).
- :mod:`.settings`: ``ServeSettings`` and ``ServeError``.
"""

from __future__ import annotations

from typing import Any

from .settings import ServeError, ServeSettings

__all__ = ["ServeError", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    """``create_app`` is imported on first use, so that the command line can read the settings without the
    serve extra (FastAPI, uvicorn, prometheus-client) installed."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

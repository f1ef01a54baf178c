"""The server's settings (:class:`ServeSettings`) and its one error type (:class:`ServeError`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Environment variable holding the API key that guards loading and unloading (``--api-key`` wins).
API_KEY_ENV = "LEARNABLE_MEMORY_API_KEY"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class ServeError(Exception):
    """A request the server refuses or can not answer: an HTTP status, a one-line message saying what is
    wrong and how to fix it, an error type (``"bad_image"``, ``"unknown_task"``, ...) and extra headers."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body of the response: ``{"error": {"code", "type", "message"}}``."""
        return {"error": {"code": self.status, "type": self.kind, "message": self.message}}


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``create_app`` can be told; the command line sets the same fields.

    Batching: requests are queued and run in batches of at most ``max_batch_size`` images; a batch waits
    at most ``max_wait_ms`` for more requests once its first one arrives. ``max_queue_images`` bounds the
    images waiting (beyond it: 503 with ``Retry-After``). ``threads``: torch's intra-op threads for the
    model (default: every core this process may use). ``request_timeout_s``: a request whose body has not
    all arrived after this long gets 408 (and its connection is closed); one still waiting for its results
    after this long gets 504. ``drain_timeout_s``: at shutdown, how long queued requests may take.

    Limits per request: ``max_images`` images, ``max_request_bytes`` bytes of body, ``max_image_pixels``
    pixels per image (413 beyond each). ``top_k``: labels per task and image when a request does not say.

    Who may change what: loading and unloading through the API are off unless ``adapter_root`` is set;
    then only folders under it load, plus ``hf-hub:`` specs with ``allow_hub``. ``api_key`` (if set) must
    come with those calls. With ``adapters_file`` the file is the only source of the adapter set (re-read
    when it changes, checked every ``poll_interval_s``) and API loading is off.

    ``per_task_forward``: run one forward per task instead of one pass for all (the one-model-per-task
    design, for ``benchmarks/serve.py`` only). ``warmup``: run one full batch before serving.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue_images: int = 512
    threads: int | None = None
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    max_images: int = 64
    max_request_bytes: int = 64 << 20
    max_image_pixels: int = 40_000_000
    top_k: int = 3
    adapter_root: Path | None = None
    allow_hub: bool = False
    api_key: str | None = None
    adapters_file: Path | None = None
    poll_interval_s: float = 2.0
    check_fingerprint: bool = True
    cache_dir: Path | None = None
    per_task_forward: bool = False
    warmup: bool = True

    def check(self) -> ServeSettings:
        """Raise ``ValueError`` naming a setting out of range; returns self."""
        positive = {"max_batch_size": self.max_batch_size, "max_queue_images": self.max_queue_images,
                    "request_timeout_s": self.request_timeout_s, "max_images": self.max_images,
                    "max_request_bytes": self.max_request_bytes, "max_image_pixels": self.max_image_pixels,
                    "top_k": self.top_k, "poll_interval_s": self.poll_interval_s}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.max_wait_ms < 0 or self.drain_timeout_s < 0:
            raise ValueError("max_wait_ms and drain_timeout_s must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_queue_images < self.max_batch_size:
            raise ValueError(f"max_queue_images ({self.max_queue_images}) must be at least max_batch_size "
                             f"({self.max_batch_size})")
        if self.adapters_file is not None and self.adapter_root is not None:
            raise ValueError("adapters_file and adapter_root exclude each other: with an adapters file, the file "
                             "is the only source of the adapter set (API loading is off)")
        if self.allow_hub and self.adapter_root is None:
            raise ValueError("allow_hub needs adapter_root: API loading is off without it")
        return self

    @property
    def api_loading(self) -> bool:
        """Whether the load and unload endpoints are on."""
        return self.adapter_root is not None

    @property
    def torch_threads(self) -> int:
        return self.threads or available_cores()

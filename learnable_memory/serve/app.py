"""The FastAPI app: ``create_app(model, ...)`` and its endpoints.

- ``POST /v1/predict``: images (multipart files or base64 JSON), optional ``tasks`` and ``top_k``;
  per image and task the top-k labels with probabilities. Requests are micro-batched
  (:mod:`.batcher`); a batch runs ONE ``forward_all`` over the union of the tasks its requests ask for,
  one per preprocessing when tasks trained with different preprocessing are asked for
  (:func:`~learnable_memory.pass_groups.pass_groups`): each task sees images prepared as in its training.
- ``GET /v1/adapters``: each loaded task's configuration and sizes (``describe_task``), and its source.
- ``POST /v1/adapters`` ``{"path", "name"}`` and ``DELETE /v1/adapters/{task}``: hot load and unload
  (off unless ``adapter_root`` is set; guarded by ``api_key`` when one is set).
- ``GET /health`` (200 once the warm-up pass has run, 503 while shutting down), ``GET /metrics``.

Every error is JSON, ``{"error": {"code", "type", "message"}}``, and leaves the server serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from torch import nn

from ..data import label_names
from ..model import MemoryViT
from ..pass_groups import PassGroup, pass_groups, preprocessing_key
from ..version import __version__
from .adapter_set import AdapterSet
from .batcher import MicroBatcher
from .images import Preprocessor, check_channels
from .inference import Chunk, forward, has_full_task, resolve_tasks, run_batch
from .metrics import Metrics, MetricsMiddleware
from .payloads import LoadJSON, PredictRequest, parse_model, parse_predict, read_body
from .settings import API_KEY_ENV, ServeError, ServeSettings, available_cores

log = logging.getLogger("learnable_memory.serve")
#: Threads that decode and preprocess request images (beside the one inference thread).
DECODE_THREADS = min(4, available_cores())


class Server:
    """What one app holds: the adapter set, the batcher, the preprocessing and the metrics.

    ``status`` is ``"starting"`` until the warm-up pass has run, ``"ok"`` while serving and
    ``"draining"`` once shutdown began (new predictions then get 503).
    """

    def __init__(self, model: MemoryViT, settings: ServeSettings, sources: Mapping[str, str] | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.adapters = AdapterSet(model, settings, sources, on_change=self._on_change)
        check_channels(model.data_config())
        self.preprocess = Preprocessor(settings.max_image_pixels)
        self.base_labels = label_names(model.base)
        self.status = "starting"
        self.batcher: MicroBatcher | None = None
        self._decode: ThreadPoolExecutor | None = None
        self._ids = itertools.count()
        self._on_change(model)

    def _on_change(self, model: MemoryViT) -> None:
        self.metrics.loaded_adapters.set(len(model.tasks))

    def _observe_batch(self, chunks: list[Chunk], seconds: float) -> None:
        self.metrics.observe_batch(chunks, seconds)
        self.metrics.queued_images.set(self.batcher.queued_images)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start: threads set, batcher running, adapters file applied, one warm-up pass. Stop: drain."""
        s = self.settings
        torch.set_num_threads(s.torch_threads)
        self.batcher = MicroBatcher(
            partial(run_batch, base_labels=self.base_labels, per_task=s.per_task_forward),
            max_batch_size=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000, max_queue_images=s.max_queue_images,
            threads=s.torch_threads, observe=self._observe_batch)
        self._decode = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="learnable-memory-decode")
        if s.api_loading and s.api_key is None:
            log.warning("!!! POST/DELETE /v1/adapters are open to every client that reaches this server, with no "
                        "API key: anyone can load adapters under %s and unload the served ones. Set --api-key (or "
                        "$%s) unless only trusted clients can connect !!!", s.adapter_root, API_KEY_ENV)
        self.batcher.start()
        watcher = None
        try:
            if s.adapters_file is not None:
                if not await self.adapters.sync_file():
                    raise RuntimeError(f"adapters file {s.adapters_file}: {self.adapters.file_error}")
                watcher = asyncio.create_task(self.adapters.watch_file(), name="learnable-memory-adapters-file")
            if s.warmup:
                await self.batcher.call(self._warmup)
            self.status = "ok"
            yield
        finally:
            self.status = "draining"
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await self.batcher.close(s.drain_timeout_s)
            self._decode.shutdown(wait=False)
            self.metrics.process_exit()

    def _warmup(self) -> None:
        """One full batch through every output, one pass per preprocessing, so the first request does not pay
        for first-call setup."""
        model = self.adapters.model
        for group in pass_groups(model, resolve_tasks(model, None)):
            images = torch.zeros(self.settings.max_batch_size, *group.data_config["input_size"])
            forward(model, images, list(group.outputs), self.settings.per_task_forward)

    # ----- endpoints -----
    def _prepare(self, req: PredictRequest, groups: list[PassGroup]) -> list[torch.Tensor]:
        """The request's images for each group, ``[n, C, H, W]`` each, prepared with the group's preprocessing."""
        configs = [g.data_config for g in groups]
        per_image = [self.preprocess(data, label, configs) for data, label in zip(req.images, req.labels, strict=True)]
        return [torch.stack([x[i] for x in per_image]) for i in range(len(groups))]

    async def predict(self, request: Request) -> JSONResponse:
        if self.status != "ok":
            raise ServeError(503, f"the server is {self.status}; retry shortly", "unavailable", {"Retry-After": "1"})
        req = await parse_predict(request, self.settings)
        model = self.adapters.model  # the request runs on the model current now, whatever is loaded later
        tasks = resolve_tasks(model, req.tasks)
        groups = pass_groups(model, tasks)
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._decode, self._prepare, req, groups)
        rid, step = next(self._ids), self.settings.max_batch_size
        starts, chunks = [], []  # the first image of each chunk, and the chunk
        for group, images in zip(groups, prepared, strict=True):
            key = preprocessing_key(group.data_config)
            for i in range(0, len(images), step):
                starts.append(i)
                chunks.append(Chunk(images[i:i + step], model, group.outputs, req.top_k, rid, loop.create_future(),
                                    key))
        self.batcher.submit(chunks)
        self.metrics.queued_images.set(self.batcher.queued_images)
        try:
            results = await asyncio.wait_for(asyncio.gather(*(c.future for c in chunks), return_exceptions=True),
                                             self.settings.request_timeout_s)
        except TimeoutError:
            self.batcher.discard(chunks)
            raise ServeError(504, f"no result within {self.settings.request_timeout_s} s; the server is busy, "
                             "retry later or send fewer images", "timeout") from None
        for r in results:
            if isinstance(r, BaseException):
                raise r
        merged: list[dict[str, Any]] = [{} for _ in req.images]  # each image's labels, from every group's pass
        for start, chunk_rows in zip(starts, results, strict=True):
            for i, row in enumerate(chunk_rows):
                merged[start + i].update(row)
        rows = [{t: labels[t] for t in tasks} for labels in merged]
        for t in tasks:
            self.metrics.task_images.labels(t).inc(len(rows))
        predictions = [{"image": i, "filename": name, "tasks": row}
                       for i, (name, row) in enumerate(zip(req.filenames, rows, strict=True))]
        return JSONResponse({"tasks": list(tasks), "predictions": predictions})

    def _authorize(self, request: Request) -> None:
        """401 unless the request carries the API key (``Authorization: Bearer KEY`` or ``X-API-Key``)."""
        key = self.settings.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ServeError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                             "unauthorized", {"WWW-Authenticate": "Bearer"})

    async def load(self, request: Request) -> dict[str, Any]:
        self.adapters.check_api()
        self._authorize(request)
        body = parse_model(LoadJSON, await read_body(request, 1 << 20, self.settings.request_timeout_s))
        added = await self.adapters.load(body.path, body.name)
        return {"loaded": added, "tasks": self.adapters.model.task_names}

    async def unload(self, request: Request, task: str) -> dict[str, Any]:
        self.adapters.check_api()
        self._authorize(request)
        await self.adapters.unload(task)
        return {"unloaded": task, "tasks": self.adapters.model.task_names}

    async def list_adapters(self) -> dict[str, Any]:
        return {**await asyncio.to_thread(self.adapters.describe), "api_loading": self.settings.api_loading}

    def health(self) -> JSONResponse:
        model = self.adapters.model
        body: dict[str, Any] = {"status": self.status, "tasks": model.task_names,
                                "base_output": not has_full_task(model),
                                "queued_images": self.batcher.queued_images if self.batcher else 0}
        if self.settings.adapters_file is not None:
            body["adapters_file"] = {"path": str(self.settings.adapters_file), "error": self.adapters.file_error,
                                     "applied_at": self.adapters.file_loaded_at}
        return JSONResponse(body, status_code=200 if self.status == "ok" else 503)

    def metrics_text(self) -> Response:
        content, content_type = self.metrics.render()
        return Response(content, media_type=content_type)


def _error(status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ServeError(status, message, kind).body(), status_code=status, headers=dict(headers or {}))


def create_app(model: MemoryViT | nn.Module, settings: ServeSettings | None = None, *,
               sources: Mapping[str, str] | None = None, **options: Any) -> FastAPI:
    """A FastAPI app serving ``model`` (a ``MemoryViT``, or a timm model for its base output alone).

    Args:
        model: What to serve, in eval mode, on its device and dtype; images are moved there.
        settings: :class:`ServeSettings` (default: its defaults).
        sources: ``task -> adapter spec`` shown by ``GET /v1/adapters`` for tasks loaded from folders.
        **options: Fields of ``ServeSettings`` overriding ``settings``, e.g. ``max_batch_size=8``.

    Run it with any ASGI server, e.g. ``uvicorn.run(app, host="127.0.0.1", port=8000)``; the first
    request is answered after the warm-up pass (``/health`` says ``"ok"``).
    """
    settings = dataclasses.replace(settings or ServeSettings(), **options).check()
    if not isinstance(model, MemoryViT):
        model = MemoryViT(model)
    server = Server(model.eval(), settings, sources)
    app = FastAPI(title="learnable-memory", version=__version__, lifespan=server.lifespan,
                  description="One frozen backbone, many hot-loaded memory adapters, every task in one pass.")
    app.state.server = server
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, "http", str(err.detail), err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return _error(422, "bad_request", f"bad request: {where}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        return _error(500, "internal", f"internal error: {type(err).__name__}: {err}")

    app.add_api_route("/v1/predict", server.predict, methods=["POST"], summary="Top-k labels per image and task")
    app.add_api_route("/v1/adapters", server.list_adapters, methods=["GET"], summary="The loaded tasks")
    app.add_api_route("/v1/adapters", server.load, methods=["POST"], summary="Load an adapter")
    app.add_api_route("/v1/adapters/{task:path}", server.unload, methods=["DELETE"], summary="Unload a task")
    app.add_api_route("/health", server.health, methods=["GET"], summary="Ready to serve?")
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"], summary="Prometheus metrics")
    return app

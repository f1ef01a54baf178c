"""Request bodies: read under the byte limit, parsed and checked into plain values (JSON or multipart).

``POST /v1/predict`` takes either

- JSON: ``{"images": [base64, ...], "tasks": [...], "top_k": 3}`` (``tasks`` and ``top_k`` optional; an
  image may carry a ``data:image/...;base64,`` prefix), or
- multipart/form-data: one file part per image (any field name, e.g. ``-F images=@cat.jpg``), ``tasks``
  fields (one task name each, repeat the field for more) and an optional ``top_k`` field.

``POST /v1/adapters`` takes JSON ``{"path": "folder or hf-hub:owner/repo", "name": "optional new name"}``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from .images import decode_base64
from .settings import ServeError, ServeSettings

M = TypeVar("M", bound=BaseModel)


class PredictJSON(BaseModel):
    """The JSON body of ``POST /v1/predict``."""

    model_config = ConfigDict(extra="forbid")
    images: list[str]
    tasks: list[str] | None = None
    top_k: int | None = Field(default=None, ge=1)


class LoadJSON(BaseModel):
    """The JSON body of ``POST /v1/adapters``."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    name: str | None = None


@dataclass
class PredictRequest:
    """A parsed predict request: image bytes with the names errors use for them, tasks, top-k."""

    images: list[bytes]
    labels: list[str]  # "image 0", "image 1 (cat.png)", ...
    filenames: list[str | None]
    tasks: list[str] | None
    top_k: int


#: The status a request gets when its client went away before the body arrived (nginx's "client closed
#: request"): no response can reach the client, but the metrics count it apart from the server's errors.
CLIENT_CLOSED = 499


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes (or says it will), with 408 when
    it has not all arrived within ``timeout_s`` seconds, and with :data:`CLIENT_CLOSED` when the client
    disconnects before the end."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"request body of {declared} bytes is over the limit of {limit} bytes; send fewer or "
                         "smaller images per request", "too_large")
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ServeError(413, f"request body is over the limit of {limit} bytes; send fewer or smaller "
                                     "images per request", "too_large")
                parts.append(chunk)
    except TimeoutError:
        raise ServeError(408, f"the request body did not arrive within {timeout_s} s ({size} bytes came); send it "
                         "whole, or raise the server's --timeout", "timeout", {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ServeError(CLIENT_CLOSED, f"the client closed the connection after {size} bytes of the body",
                         "client_closed") from None
    return b"".join(parts)


def parse_model(model: type[M], body: bytes) -> M:
    """``body`` as JSON checked against ``model``; 422 saying which field is wrong."""
    try:
        return model.model_validate(json.loads(body))
    except json.JSONDecodeError as err:
        raise ServeError(422, f"the body is not valid JSON ({err})", "bad_request") from err
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors())
        raise ServeError(422, f"bad request body: {where}", "bad_request") from err


def _check_count(n: int, settings: ServeSettings) -> None:
    if n == 0:
        raise ServeError(422, "no image in the request: send files (multipart) or base64 strings in 'images'",
                         "bad_request")
    if n > settings.max_images:
        raise ServeError(413, f"{n} images in one request, more than the {settings.max_images} allowed; split the "
                         "request", "too_large")


def _from_json(body: bytes, settings: ServeSettings) -> PredictRequest:
    req = parse_model(PredictJSON, body)
    _check_count(len(req.images), settings)
    labels = [f"image {i}" for i in range(len(req.images))]
    images = [decode_base64(text, label) for text, label in zip(req.images, labels, strict=True)]
    return PredictRequest(images, labels, [None] * len(images), req.tasks, req.top_k or settings.top_k)


async def _from_multipart(request: Request, body: bytes, settings: ServeSettings) -> PredictRequest:
    sent = False

    async def replay() -> Message:  # the body already read, for starlette's multipart parser
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=settings.max_images + 1, max_fields=1000)
    except HTTPException as err:
        status = 413 if "too many files" in str(err.detail).lower() else 400
        raise ServeError(status, f"multipart body refused: {err.detail} (at most {settings.max_images} images)",
                         "bad_request") from err
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        _check_count(len(files), settings)
        images = [await f.read() for f in files]
        fields = {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in ("tasks", "top_k")}
    finally:
        await form.close()
    top_k = settings.top_k
    if fields["top_k"]:
        text = fields["top_k"][-1]
        if not text.isdigit() or int(text) < 1:
            raise ServeError(422, f"top_k must be an integer >= 1, got {text!r}", "bad_request")
        top_k = int(text)
    labels = [f"image {i} ({f.filename})" if f.filename else f"image {i}" for i, f in enumerate(files)]
    return PredictRequest(images, labels, [f.filename for f in files], fields["tasks"] or None, top_k)


async def parse_predict(request: Request, settings: ServeSettings) -> PredictRequest:
    """Read and parse a predict request (415 for a content type other than JSON or multipart)."""
    body = await read_body(request, settings.max_request_bytes, settings.request_timeout_s)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _from_json(body, settings)
    if kind == "multipart/form-data":
        return await _from_multipart(request, body, settings)
    raise ServeError(415, f"content type {kind or 'none'!r} not supported: send application/json (base64 images) "
                     "or multipart/form-data (image files)", "bad_request")

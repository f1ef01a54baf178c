"""``learnable-memory serve``: an HTTP server for the base model and many adapters, every task in one pass.

    learnable-memory serve --adapter adapters/digits adapters/fmnist --port 8000
    learnable-memory serve --adapters-file adapters.txt --workers 4 --host 0.0.0.0

The base model options are those of ``predict`` (default: the base the first adapter was trained on).
The server itself is :func:`learnable_memory.serve.create_app`; it needs the ``serve`` extra.

Several workers (``--workers N``) are uvicorn worker processes, each with its own model; the adapter
set then comes from ``--adapters-file`` or ``--adapter`` (a load through the API would reach one
worker only, so it is refused), and metrics are summed over the workers with prometheus-client's
multiprocess mode (in ``$PROMETHEUS_MULTIPROC_DIR``, or a temporary directory). The parent builds the
model once before it starts them, so a bad adapter is a one-line error (status 2), not workers that
die and restart.

Hot loading (``--adapter-root``) without ``--api-key`` lets every client that reaches the port load and
unload adapters: it is refused on an address other than loopback unless ``--allow-unauthenticated``,
and the server logs a warning whenever it runs so.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import math
import os
import tempfile
from pathlib import Path

from .base import add_model_options
from .options import add_adapter_options, non_negative_int, positive_float, positive_int

#: Where the parent process hands the parsed options to its worker processes (``--workers`` > 1).
ARGS_ENV = "LEARNABLE_MEMORY_SERVE_ARGS"
#: ``--dtype`` choices: names of torch dtypes.
DTYPES = ("float32", "bfloat16", "float16")


def device_name(text: str) -> str:
    """A torch device, e.g. ``cpu``, ``cuda`` or ``cuda:1``."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    return text


def non_negative_float(text: str) -> float:
    """A number >= 0 (waiting times)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..serve.settings import API_KEY_ENV, ServeSettings

    d = ServeSettings()
    p = subparsers.add_parser(
        "serve", help="HTTP server: hot-loaded adapters, batched requests, every task in one pass",
        description="Serve the base model and adapters over HTTP (FastAPI + uvicorn): POST /v1/predict, "
        "GET/POST /v1/adapters, DELETE /v1/adapters/{task}, GET /health, GET /metrics. Requests that arrive "
        "together run as one forward pass over the union of the tasks they ask for. Needs the serve extra: "
        "pip install 'learnable-memory[serve]'.")
    p.add_argument("--adapter", nargs="+", default=[], metavar="ADAPTER",
                   help="adapter folders, save_pretrained folders or hf-hub:owner/repo (none: the base model alone)")
    p.add_argument("--adapters-file", type=Path, metavar="FILE",
                   help="the adapter set, one SPEC or NAME=SPEC per line (a relative path is read from FILE's "
                        "folder), re-read when it changes (for several replicas: the one source of truth); API "
                        "loading is then off")
    add_model_options(p)
    add_adapter_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    g.add_argument("--port", type=non_negative_int, default=8000, help="port (default %(default)s; 0: any free)")
    g.add_argument("--workers", type=positive_int, default=1, help="uvicorn worker processes, each with its own "
                   "model (default %(default)s)")
    g.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda when there is one, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the base model is cast to it before the adapters load (default %(default)s)")
    g.add_argument("--threads", type=positive_int, help="torch threads for inference (default: every core this "
                   "process may use)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    b = p.add_argument_group("batching and limits")
    b.add_argument("--max-batch-size", type=positive_int, default=d.max_batch_size,
                   help="images per forward pass (default %(default)s)")
    b.add_argument("--max-wait-ms", type=non_negative_float, default=d.max_wait_ms,
                   help="longest wait for more requests to join a batch (default %(default)s)")
    b.add_argument("--max-queue-images", type=positive_int, default=d.max_queue_images,
                   help="images waiting at most; beyond: 503 with Retry-After (default %(default)s)")
    b.add_argument("--timeout", type=positive_float, default=d.request_timeout_s,
                   help="seconds a request's body may take to arrive (then 408) and it may wait for its results "
                   "(then 504) (default %(default)s)")
    b.add_argument("--drain-timeout", type=non_negative_float, default=d.drain_timeout_s,
                   help="seconds requests in flight may take to finish at shutdown (default %(default)s)")
    b.add_argument("--max-images", type=positive_int, default=d.max_images,
                   help="images per request (default %(default)s)")
    b.add_argument("--max-request-mb", type=positive_float, default=d.max_request_bytes / 2**20,
                   help="MiB per request body (default %(default)s)")
    b.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels,
                   help="width x height per image (default %(default)s)")
    b.add_argument("--top-k", type=positive_int, default=d.top_k, help="labels per task and image when a request "
                   "does not say (default %(default)s)")
    a = p.add_argument_group("who may change the adapter set")
    a.add_argument("--adapter-root", type=Path, metavar="DIR",
                   help="turn on POST/DELETE /v1/adapters, for adapter folders under DIR only")
    a.add_argument("--allow-hub", action="store_true", help="with --adapter-root: also load hf-hub: specs")
    a.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"key the load and unload calls must send (default: ${API_KEY_ENV})")
    a.add_argument("--allow-unauthenticated", action="store_true",
                   help="with --adapter-root and no --api-key on a --host other than loopback: let every client "
                   "that reaches the port load and unload adapters (refused without this)")
    a.add_argument("--poll-interval", type=positive_float, default=d.poll_interval_s,
                   help="seconds between checks of --adapters-file (default %(default)s)")
    p.set_defaults(run=run)
    return p


def settings_from_args(args: argparse.Namespace):
    """The :class:`~learnable_memory.serve.ServeSettings` the options ask for (checked)."""
    from ..serve.settings import ServeSettings

    return ServeSettings(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue_images=args.max_queue_images,
        threads=args.threads, request_timeout_s=args.timeout, drain_timeout_s=args.drain_timeout,
        max_images=args.max_images, max_request_bytes=int(args.max_request_mb * 2**20),
        max_image_pixels=args.max_image_pixels, top_k=args.top_k,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None, allow_hub=args.allow_hub,
        api_key=args.api_key or None, adapters_file=Path(args.adapters_file).resolve() if args.adapters_file else None,
        poll_interval_s=args.poll_interval, check_fingerprint=not args.no_fingerprint_check,
    ).check()


def build_model(args: argparse.Namespace, settings):
    """The model to serve and the spec each task came from: the base (cast to ``--dtype``, on ``--device``)
    and the adapters of ``--adapters-file`` or ``--adapter``, each spec resolved once."""
    import torch

    from ..model import MemoryViT
    from ..serve.adapter_set import load_resolved, read_adapters_file, resolve_entries
    from .records import base_for_adapters, load_named_adapters, resolve_adapters

    check = not args.no_fingerprint_check
    if settings.adapters_file is not None:
        resolved = resolve_entries(read_adapters_file(settings.adapters_file))
        folders = [f for _, found in resolved for f in found]
    else:
        pairs = [(spec, f) for spec in args.adapter for f in resolve_adapters([spec])]
        folders = [f for _, f in pairs]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = base_for_adapters(args, folders[:1]).to(device=torch.device(device), dtype=getattr(torch, args.dtype))
    if settings.adapters_file is not None:
        return load_resolved(base, resolved, check_fingerprint=check)
    model = load_named_adapters(base, folders, check_fingerprint=check) if folders else MemoryViT(base)
    return model, dict(zip(model.task_names, [spec for spec, _ in pairs], strict=True))


def build_app(args: argparse.Namespace):
    """The app :func:`build_model`'s model is served by."""
    from ..serve import create_app

    settings = settings_from_args(args)
    model, sources = build_model(args, settings)
    return create_app(model, settings, sources=sources)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only takes connections from this machine (``localhost``, ``127.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def check_unauthenticated(args: argparse.Namespace, settings) -> None:
    """Refuse hot loading without a key on an address other than loopback, unless ``--allow-unauthenticated``."""
    if settings.api_loading and settings.api_key is None and not is_loopback(args.host) \
            and not args.allow_unauthenticated:
        raise ValueError(f"--adapter-root without --api-key on --host {args.host} would let every client that reaches "
                         "the port load and unload adapters: set --api-key KEY (or $LEARNABLE_MEMORY_API_KEY), "
                         "listen on 127.0.0.1, or pass --allow-unauthenticated if only trusted clients can connect")


def app_from_environment():
    """The app of one worker process: the parent's options from ``$LEARNABLE_MEMORY_SERVE_ARGS``
    (uvicorn's factory, for ``--workers`` > 1)."""
    return build_app(argparse.Namespace(**json.loads(os.environ[ARGS_ENV])))


def _multiprocess_metrics_dir() -> None:
    """Point prometheus-client's multiprocess mode at an empty directory before the workers start."""
    from ..serve.metrics import MULTIPROC_ENV

    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        folder = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="learnable-memory-metrics-")
    Path(folder).mkdir(parents=True, exist_ok=True)
    for f in Path(folder).glob("*.db"):  # values of an earlier run (prometheus-client wants a clean directory)
        f.unlink()


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ValueError(f"learnable-memory serve needs the serve extra ({e.name} is missing): "
                         "pip install 'learnable-memory[serve]'") from e
    if args.adapters_file and args.adapter:
        raise ValueError("give --adapter or --adapters-file, not both: with a file, the file is the adapter set")
    settings = settings_from_args(args)
    if args.workers > 1 and settings.api_loading:
        raise ValueError("--adapter-root with --workers > 1: a load or unload through the API would reach one worker "
                         "only; list the adapters in --adapters-file (re-read by every worker) instead")
    check_unauthenticated(args, settings)
    options = dict(host=args.host, port=args.port, log_level=args.log_level,
                   timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s))
    if args.workers == 1:
        uvicorn.run(build_app(args), **options)
        return 0
    build_model(args, settings)  # a bad adapter stops here, once, not in every worker that restarts
    gc.collect()
    _multiprocess_metrics_dir()
    values = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("run", "debug")}
    os.environ[ARGS_ENV] = json.dumps(values)
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=args.workers, **options)
    return 0

"""Test-only helpers: small random-weight backbones and inputs for them, and the HTTP server tests'
images, clients and references. The guarantees and the dense references the tests hold models to are
public, in :mod:`learnable_memory.testing`."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import timm
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import learnable_memory as lm
from learnable_memory.serve.background import BackgroundServer

IMG = 32

# name -> kwargs for timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
VIT_VARIANTS = {
    "cls": {},
    "cls_reg": {"reg_tokens": 4},
    "no_embed_class_layerscale": {"no_embed_class": True, "init_values": 0.5},
    "gap": {"class_token": False, "global_pool": "avg"},
    "map": {"class_token": False, "global_pool": "map"},
    "qk_norm_pre_norm": {"qk_norm": True, "pre_norm": True},
    "dynamic": {"dynamic_img_size": True},
}


def make_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A depth-2 ViT-Tiny on 32x32 images (16 patches), random weights."""
    torch.manual_seed(seed)
    args = dict(pretrained=False, depth=2, img_size=IMG, patch_size=8, num_classes=7)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def noisy_backbone(arch: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A depth-2 backbone with random weights. timm starts biases at zero and LayerScale near
    zero (1e-5 in some models), which would hide a wrong bias or attention path: every weight
    gets noise and every LayerScale is drawn around 1."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, depth=2, num_classes=7, **kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "gamma" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.add_(0.05 * noise)
    return model


def patch_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The patch embedding of a timm ViT: ``patch_embed``, NaFlexVit's ``embeds``, or an encoder's."""
    for owner in (model, getattr(model, "encoder", None)):
        embed = getattr(owner, "patch_embed", None) or getattr(owner, "embeds", None)
        if embed is not None:
            return embed
    return None


def grid_backbone(arch: str, grid: int = 3, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, int]:
    """``arch`` with random weights (eval), built for ``grid`` x ``grid`` patches, and its image size."""
    kwargs = {"pretrained": False, **kwargs}
    with torch.device("meta"):  # find the patch size cheaply
        probe = timm.create_model(arch, **kwargs)
    embed = patch_embedding(probe)
    size = grid * (embed.feat_ratio() if hasattr(embed, "feat_ratio") else max(embed.patch_size))
    torch.manual_seed(seed)
    return timm.create_model(arch, img_size=size, **kwargs).eval(), size


def images_for(size: int, batch: int = 3, seed: int = 123) -> torch.Tensor:
    """``[batch, 3, size, size]`` standard normal images, the same for the same seed."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def set_fused_attn(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    """Put every attention module on timm's fused SDPA path (True) or its explicit softmax (False)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


def assert_packs_as_split(base: torch.nn.Module, images: torch.Tensor) -> None:
    """``base`` wrapped with a randomized task packs its inference passes, and the packed pass gives the base
    output bit-identical and the task's output as a split (training-form) pass does."""
    from learnable_memory.testing import assert_outputs_close, randomize

    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    assert model.unpacked_reason is None
    randomize(model)
    with torch.no_grad():
        packed = model.forward_all(images)
        want = base(images)
    with torch.enable_grad():
        split = {k: v.detach() for k, v in model.forward_all(images).items()}
    assert torch.equal(packed["base"], want) and torch.equal(split["base"], want)
    assert_outputs_close(packed, split)


def count_packed_blocks(monkeypatch) -> list[int]:
    """Count the attention layers that run a packed pass (see ``PassContext.packed``)."""
    from learnable_memory.kinds import AttentionKind

    calls = []
    real = AttentionKind.attend_packed

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(AttentionKind, "attend_packed", counted)
    return calls


# ----- the HTTP server (tests/test_serve.py, tests/test_serve_cli.py) -----
#: Bounds on waits whose expiry is not what a test checks, wide enough for a busy machine (load 5 on
#: 2 cores makes everything 5-10x slower): ``WAIT_S`` for one wait (an HTTP call, a condition, a
#: server's start or stop), ``RUN_S`` for a whole run of concurrent clients.
WAIT_S = 300.0
RUN_S = 900.0

#: ``httpx.get/post/delete`` bounded by ``WAIT_S`` (httpx's own default is 5 s); a new connection each call.
http = SimpleNamespace(get=partial(httpx.get, timeout=WAIT_S), post=partial(httpx.post, timeout=WAIT_S),
                       delete=partial(httpx.delete, timeout=WAIT_S))


@contextmanager
def running(app: Any) -> Iterator[BackgroundServer]:
    """A live server for the ASGI ``app``, started and stopped within ``WAIT_S``."""
    server = BackgroundServer(app, start_timeout_s=WAIT_S).start()
    try:
        yield server
    finally:
        server.stop(WAIT_S)


def add_task(model: lm.MemoryViT, name: str, num_classes: int, seed: int, mode: str = "non_destructive",
             class_names: list[str] | None = None) -> None:
    """Add a task with large random parameters (so a wrong task or mask shows in the outputs)."""
    task = model.add_task(lm.TaskConfig(name=name, n_mem=2, num_classes=num_classes, mode=mode,
                                        class_names=class_names))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def image_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """An encoded ``size`` (width, height) image of random pixels, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = (torch.rand(size[1], size[0], channels, generator=g) * 255).to(torch.uint8).squeeze(-1).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


#: Request images of several sizes, modes and formats.
IMAGES = [image_bytes(0), image_bytes(1, (64, 64), "L"), image_bytes(2, (20, 50), "RGBA"),
          image_bytes(3, (33, 33), fmt="JPEG"), image_bytes(4, (32, 32))]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reference(model: lm.MemoryViT, images: list[bytes], tasks: list[str] | None,
              data_config: dict | None = None) -> dict[str, torch.Tensor]:
    """Probabilities ``task -> [n, C]`` of ``forward_all`` on the images, preprocessed with timm's transform
    for ``data_config`` (default: the backbone's own)."""
    cfg = data_config or model.data_config()
    transform = timm.data.create_transform(**cfg, is_training=False)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    x = torch.stack([transform(Image.open(io.BytesIO(b)).convert(mode)) for b in images])
    with torch.inference_mode():
        return {t: v.float().softmax(-1) for t, v in model.forward_all(x, tasks=tasks).items()}


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of ``GET /metrics`` (0 when absent)."""
    text = http.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def error_of(r: httpx.Response, status: int) -> str:
    """The message of an error response, after checking its status and JSON shape."""
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == status and body["message"]
    return body["message"]


def signal_when_written(proc: subprocess.Popen, path: Path, signum: int, timeout: float = 600.0) -> str:
    """Send ``signum`` to ``proc`` once ``path`` exists (or it has exited), then wait for it: its stderr.
    ``timeout`` bounds each wait (a loaded machine writes a first checkpoint in minutes)."""
    try:
        deadline = time.monotonic() + timeout
        while not path.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signum)
        return proc.communicate(timeout=timeout)[1]
    finally:
        proc.kill()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so a server polling it never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def assert_compiles_as_eager(model: lm.MemoryViT, images: torch.Tensor) -> None:
    """``torch.compile(forward_all, fullgraph=True)`` (dynamo's tracing on the ``eager`` backend: no
    graph break) gives the eager outputs."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(model.forward_all, fullgraph=True, backend="eager")(images)
            want = model.forward_all(images)
    finally:
        torch._dynamo.reset()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


# ----- batch prediction (learnable_memory.batch) -----
def fashion_files(folder: Path, n: int, *, size: int = 28, start: int = 0) -> list[Path]:
    """``n`` Fashion-MNIST test images (from image ``start`` on) written to ``folder``: PNG and JPEG
    alternately, gray, ``size`` px; their paths in order."""
    from learnable_memory import data as D

    images, _ = D.load_fashion_mnist("test")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"{i:05d}.{'png' if i % 2 == 0 else 'jpg'}"
        img = Image.fromarray(images[i], "L")
        (img.resize((size, size)) if size != 28 else img).save(path)
        paths.append(path)
    return paths


def demo_model() -> lm.MemoryViT:
    """The shipped demo base (28x28 gray) with two tasks of random parameters: ``shoes`` (3 named classes)
    and ``digits`` (4 classes without names)."""
    from learnable_memory import data as D

    model = lm.MemoryViT(D.load_demo_base())
    add_task(model, "shoes", 3, seed=1, class_names=["sandal", "sneaker", "boot"])
    add_task(model, "digits", 4, seed=2)
    return model.eval()


def read_dataset(folder: Path):
    """A batch prediction dataset read back with pandas, its rows sorted by ``path``."""
    import pandas as pd

    return pd.read_parquet(folder).sort_values("path", kind="stable").reset_index(drop=True)


def records(folder: Path) -> list[dict]:
    """The rows of a batch prediction dataset, sorted by path, with arrays as lists and nulls as None
    (comparable with ==)."""
    import numpy as np

    def plain(v):
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v]
        if isinstance(v, float) and v != v:  # pandas reads a null as NaN
            return None
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

    return [{k: plain(v) for k, v in r.items()} for r in read_dataset(folder).to_dict("records")]

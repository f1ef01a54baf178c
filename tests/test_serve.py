"""The HTTP server: real uvicorn servers on 127.0.0.1 (a free port each), real HTTP with httpx.

Answers are checked against ``MemoryViT.forward_all`` on the same image bytes, preprocessed here with
timm's transform (not the server's code). Every loop has a bound on its count and on its time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest
import timm
import torch
from PIL import Image

import learnable_memory as lm
from learnable_memory.serve import create_app
from learnable_memory.serve.background import BackgroundServer
from tests.helpers import (
    IMAGES,
    RUN_S,
    WAIT_S,
    add_task,
    b64,
    error_of,
    http,
    image_bytes,
    make_vit,
    metric,
    reference,
    running,
    wait_for,
    write_atomic,
)

TOL = 1e-5  # probabilities; a batch's composition moves them by ~1e-6 on CPU
#: Server settings of every test: one torch thread, and time-outs that a busy machine cannot reach (the
#: 504 test sets its own).
SERVER = {"threads": 1, "request_timeout_s": WAIT_S, "drain_timeout_s": WAIT_S}


def make_model(base: torch.nn.Module | None = None) -> lm.MemoryViT:
    """Tasks ``a`` (named classes), ``b.v1`` and ``ext`` (extension of both)."""
    model = lm.MemoryViT(base if base is not None else make_vit())
    add_task(model, "a", 3, seed=1, class_names=["cat", "dog", "eel"])
    add_task(model, "b.v1", 5, seed=2)
    add_task(model, "ext", 4, seed=3, mode="extension")
    return model.eval()


def class_names(*models: lm.MemoryViT) -> dict[str, list[str] | None]:
    """``task -> saved class names`` of the models' tasks (the base model's labels are indices)."""
    return {n: t.config.class_names for m in models for n, t in m.tasks.items()}


def check_answer(body: dict, ref: dict[str, torch.Tensor], top_k: int, names: dict[str, list[str] | None],
                 rows: list[int] | None = None) -> None:
    """Each image's labels: the top-k of the reference (same indices, names, probabilities within TOL).
    ``rows``: the reference row of each image (default: image i is row i)."""
    assert len(body["predictions"]) == len(rows if rows is not None else next(iter(ref.values())))
    for i, pred in enumerate(body["predictions"]):
        assert pred["image"] == i and list(pred["tasks"]) == body["tasks"]
        for task, labels in pred["tasks"].items():
            probs = ref[task][rows[i] if rows is not None else i]
            want = probs.topk(min(top_k, probs.numel()))
            assert [x["index"] for x in labels] == want.indices.tolist(), (task, i)
            got = torch.tensor([x["prob"] for x in labels])
            assert torch.allclose(got, want.values, atol=TOL, rtol=0), (task, i, got, want.values)
            label_names = names.get(task)
            assert [x["label"] for x in labels] == [label_names[j] if label_names else str(j)
                                                    for j in want.indices.tolist()]


def serve(model: lm.MemoryViT, **options) -> AbstractContextManager[BackgroundServer]:
    """A live server for ``model`` with the ``SERVER`` settings and ``options``, stopped on exit."""
    return running(create_app(model, **{**SERVER, **options}))


# ----- answers -----
def test_predict_agrees_with_forward_all_for_json_and_multipart():
    model = make_model()
    with serve(model, max_batch_size=4) as s:
        assert http.get(f"{s.url}/health").json()["tasks"] == ["a", "b.v1", "ext"]
        for tasks, top_k in ((None, 3), (["ext", "base"], 2), (["b.v1"], 10)):
            ref = reference(model, IMAGES, tasks)
            fields = {} if tasks is None else {"tasks": tasks}
            r = http.post(f"{s.url}/v1/predict", json={"images": [b64(b) for b in IMAGES], "top_k": top_k, **fields})
            assert r.status_code == 200, r.text
            assert r.json()["tasks"] == (["base", "a", "b.v1", "ext"] if tasks is None else tasks)
            check_answer(r.json(), ref, top_k, class_names(model))
            files = [("images", (f"img{i}.png", b, "application/octet-stream")) for i, b in enumerate(IMAGES)]
            r = http.post(f"{s.url}/v1/predict", files=files, data={"top_k": str(top_k), **fields})
            assert r.status_code == 200, r.text
            check_answer(r.json(), ref, top_k, class_names(model))
            assert [p["filename"] for p in r.json()["predictions"]] == [f"img{i}.png" for i in range(len(IMAGES))]
        # 5 images, batches of at most 4: the request was split and put back together in order
        assert metric(s.url, "learnable_memory_batch_images_bucket", le="4.0") == \
            metric(s.url, "learnable_memory_batch_images_count")


def test_full_mode_task_serves_no_base_output():
    model = lm.MemoryViT(make_vit())
    add_task(model, "solo", 4, seed=5, mode="full")
    with serve(model) as s:
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])]})
        assert r.json()["tasks"] == ["solo"]
        check_answer(r.json(), reference(model, IMAGES[:1], ["solo"]), 3, class_names(model))
        assert "full-mode" in error_of(http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])],
                                                                                "tasks": ["base"]}), 404)
        assert http.get(f"{s.url}/v1/adapters").json()["base_output"] is False


def test_base_model_alone():
    base = make_vit()
    with serve(base) as s:
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])], "top_k": 7})
        assert r.status_code == 200 and r.json()["tasks"] == ["base"]
        with torch.inference_mode():
            x = timm.data.create_transform(**lm.MemoryViT(base).data_config())(
                Image.open(io.BytesIO(IMAGES[0])).convert("RGB"))
            want = base(x[None]).softmax(-1)[0]
        got = {x["index"]: x["prob"] for x in r.json()["predictions"][0]["tasks"]["base"]}
        assert torch.allclose(torch.tensor([got[i] for i in range(7)]), want, atol=TOL, rtol=0)


async def _clients(url: str, jobs: list[dict]) -> list[httpx.Response]:
    """Send every job's JSON at once (one connection each), each call bounded by ``WAIT_S``, all by ``RUN_S``."""
    async with httpx.AsyncClient(timeout=WAIT_S, limits=httpx.Limits(max_connections=len(jobs))) as client:
        return await asyncio.wait_for(asyncio.gather(*(client.post(f"{url}/v1/predict", json=j) for j in jobs)),
                                      RUN_S)


def test_concurrent_clients_share_batches_and_get_their_own_tasks():
    model = make_model()
    choices = [None, ["a"], ["b.v1", "base"], ["ext"], ["a", "ext"], ["base"]]
    jobs = [{"images": [b64(IMAGES[i % len(IMAGES)])] * (1 + i % 2), **({"tasks": choices[i % 6]} if i % 6 else {})}
            for i in range(24)]
    with serve(model, max_batch_size=32, max_wait_ms=100) as s:
        responses = asyncio.run(_clients(s.url, jobs))
        for i, (job, r) in enumerate(zip(jobs, responses, strict=True)):
            assert r.status_code == 200, r.text
            tasks = choices[i % 6]
            assert r.json()["tasks"] == (tasks or ["base", "a", "b.v1", "ext"])
            check_answer(r.json(), reference(model, IMAGES, tasks), 3, class_names(model),
                         rows=[i % len(IMAGES)] * len(job["images"]))
        batches = metric(s.url, "learnable_memory_batch_requests_count")
        single = metric(s.url, "learnable_memory_batch_requests_bucket", le="1.0")
        assert metric(s.url, "learnable_memory_batch_requests_sum") == len(jobs)
        assert single < batches, "no batch held more than one request"


def test_bounded_load_300_requests_16_at_a_time():
    model = make_model()
    body = {"images": [b64(IMAGES[0])], "tasks": ["a", "base"]}
    ref = reference(model, IMAGES[:1], ["a", "base"])

    async def run(url: str) -> tuple[list[int], float]:
        statuses: list[int] = []
        start = time.perf_counter()
        async with httpx.AsyncClient(timeout=WAIT_S) as client:
            async def worker(n: int) -> None:
                for _ in range(n):
                    r = await client.post(f"{url}/v1/predict", json=body)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        check_answer(r.json(), ref, 3, class_names(model))
            await asyncio.wait_for(asyncio.gather(*(worker(300 // 16 + (i < 300 % 16)) for i in range(16))), RUN_S)
        return statuses, time.perf_counter() - start

    with serve(model) as s:
        statuses, seconds = asyncio.run(run(s.url))
        print(f"300 requests, 16 at a time: {seconds:.1f} s")
        assert len(statuses) == 300 and set(statuses) == {200}
        assert metric(s.url, "learnable_memory_task_images_total", task="a") == 300
        assert metric(s.url, "learnable_memory_requests_total", endpoint="/v1/predict", status="200") == 300


# ----- adapters -----
def save_adapters(base: torch.nn.Module, root: Path) -> dict[str, lm.MemoryViT]:
    """Adapter folders ``root/c`` and ``root/d`` made on ``base``; returns the model of each."""
    models = {}
    for name, classes, seed in (("c", 6, 11), ("d", 2, 12)):
        m = lm.MemoryViT(base)
        add_task(m, name, classes, seed=seed, class_names=[f"{name}{i}" for i in range(classes)])
        m.save_adapter(root / name)
        models[name] = m.eval()
    return models


def test_load_list_and_unload_adapters(tmp_path):
    model = make_model()
    made = save_adapters(model.base, tmp_path)
    with serve(model, adapter_root=tmp_path) as s:
        r = http.post(f"{s.url}/v1/adapters", json={"path": "c"})
        assert r.status_code == 200 and r.json()["loaded"] == ["c"], r.text
        r = http.post(f"{s.url}/v1/adapters", json={"path": str(tmp_path / "d"), "name": "d 2.0/x"})
        assert r.json()["tasks"] == ["a", "b.v1", "ext", "c", "d 2.0/x"]
        listed = {a["task"]: a for a in http.get(f"{s.url}/v1/adapters").json()["adapters"]}
        assert list(listed) == ["a", "b.v1", "ext", "c", "d 2.0/x"]
        saved = lm.inspect_adapter(tmp_path / "c")
        for key in ("mode", "n_mem", "num_classes", "class_names", "depends_on", "base_model", "num_params",
                    "task_fingerprint", "preprocessing"):
            assert listed["c"][key] == saved[key], key
        assert listed["c"]["source"] == "c" and listed["a"]["source"] is None
        assert listed["ext"]["depends_on"] == ["a", "b.v1"] and listed["a"]["num_classes"] == 3
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(b) for b in IMAGES], "tasks": ["c", "d 2.0/x"]})
        ref = {**reference(made["c"], IMAGES, ["c"]), "d 2.0/x": reference(made["d"], IMAGES, ["d"])["d"]}
        check_answer(r.json(), ref, 3, {"c": [f"c{i}" for i in range(6)], "d 2.0/x": ["d0", "d1"]})
        from urllib.parse import quote

        r = http.delete(f"{s.url}/v1/adapters/{quote('d 2.0/x', safe='')}")
        assert r.status_code == 200 and r.json()["tasks"] == ["a", "b.v1", "ext", "c"], r.text
        assert metric(s.url, "learnable_memory_loaded_adapters") == 4


def test_a_hot_load_reads_each_adapter_once(tmp_path, monkeypatch):
    import learnable_memory.adapters.loading as loading
    import learnable_memory.serve.adapter_set as adapter_set

    model = make_model()
    save_adapters(model.base, tmp_path)
    lm.save_pretrained(lm.load_adapters(model.base, [tmp_path / "c", tmp_path / "d"]), tmp_path / "both")
    reads: list[Path] = []
    for module in (adapter_set, loading):
        real = module.read_adapter
        monkeypatch.setattr(module, "read_adapter", lambda folder, *a, real=real, **k: reads.append(folder) or
                            real(folder, *a, **k))
    with serve(model, adapter_root=tmp_path) as s:
        r = http.post(f"{s.url}/v1/adapters", json={"path": "both"})
        assert r.status_code == 200 and r.json()["loaded"] == ["c", "d"], r.text
    assert sorted(f.name for f in reads) == ["c", "d"]


def test_hot_load_and_unload_while_requests_are_in_flight(tmp_path):
    model = make_model()
    made = save_adapters(model.base, tmp_path)
    stable = ["base", "a", "b.v1", "ext"]
    allowed = {tuple(stable), (*stable, "c"), (*stable, "d2")}
    refs = {**reference(model, IMAGES, None), "c": reference(made["c"], IMAGES, ["c"])["c"],
            "d2": reference(made["d"], IMAGES, ["d"])["d"]}
    seen: list[tuple[str, ...]] = []

    async def run(url: str) -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=WAIT_S, limits=httpx.Limits(max_connections=32)) as client:
            async def traffic(i: int) -> None:
                n = 1 + 5 * (i % 2)  # 6 images: split in two batches of 4, which must see one task set
                for _ in range(200):
                    if stop.is_set():
                        return
                    job = {"images": [b64(IMAGES[(i + k) % 5]) for k in range(n)]}
                    r = await client.post(f"{url}/v1/predict", json=job)
                    assert r.status_code == 200, r.text
                    body = r.json()
                    seen.append(tuple(body["tasks"]))
                    assert tuple(body["tasks"]) in allowed, body["tasks"]
                    check_answer(body, refs, 3, names, rows=[(i + k) % 5 for k in range(n)])

            async def changes() -> None:
                try:
                    for _ in range(4):
                        for path, name in (("c", None), ("d", "d2")):
                            r = await client.post(f"{url}/v1/adapters", json={"path": path, "name": name})
                            assert r.status_code == 200, r.text
                            r = await client.post(f"{url}/v1/predict", json={"images": [b64(IMAGES[0])]})
                            assert r.json()["tasks"] == [*stable, name or path]
                            await asyncio.sleep(0.05)
                            r = await client.delete(f"{url}/v1/adapters/{name or path}")
                            assert r.status_code == 200, r.text
                finally:
                    stop.set()

            await asyncio.wait_for(asyncio.gather(changes(), *(traffic(i) for i in range(8))), RUN_S)

    names = {**class_names(model, made["c"]), "d2": ["d0", "d1"]}
    with serve(model, adapter_root=tmp_path, max_batch_size=4, max_wait_ms=2) as s:
        asyncio.run(run(s.url))
    assert len(seen) > 8 and set(seen) <= allowed



def other_preprocessing_adapter(base: torch.nn.Module, folder: Path) -> tuple[lm.MemoryViT, dict]:
    """An adapter ``p`` on ``base`` trained, as its config records, with another mean, std and crop than the
    backbone's own; returns its model and that preprocessing."""
    from learnable_memory.adapters.fingerprint import preprocessing

    own = {**preprocessing(base), "mean": [0.2, 0.3, 0.4], "std": [0.1, 0.2, 0.3], "crop_pct": 0.75}
    m = lm.MemoryViT(base)
    task = m.add_task(lm.TaskConfig(name="p", n_mem=2, num_classes=4, data_config=own))
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for param in task.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    m.save_adapter(folder)
    return m.eval(), own


def test_a_hot_loaded_adapter_with_other_preprocessing_gets_its_own_images(tmp_path):
    model = make_model()
    made, own = other_preprocessing_adapter(model.base, tmp_path / "p")
    want = {**reference(model, IMAGES, None), "p": reference(made, IMAGES, ["p"], own)["p"]}
    wrong = reference(made, IMAGES, ["p"])["p"]  # p on the backbone's preprocessing: what a shared pass gave it
    assert (want["p"] - wrong).abs().max() > 100 * TOL
    choices = [None, ["p"], ["a", "p"], ["ext"]]
    jobs = [{"images": [b64(IMAGES[i % len(IMAGES)])], "top_k": 10, **({"tasks": choices[i % 4]} if i % 4 else {})}
            for i in range(16)]
    with serve(model, adapter_root=tmp_path, max_batch_size=8, max_wait_ms=100) as s:
        r = http.post(f"{s.url}/v1/adapters", json={"path": "p"})
        assert r.status_code == 200, r.text
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(b) for b in IMAGES], "top_k": 10})
        assert r.json()["tasks"] == ["base", "a", "b.v1", "ext", "p"]
        check_answer(r.json(), want, 10, class_names(model, made))
        batches = metric(s.url, "learnable_memory_batch_requests_count")
        for i, r in enumerate(asyncio.run(_clients(s.url, jobs))):
            assert r.status_code == 200, r.text
            check_answer(r.json(), want, 10, class_names(model, made), rows=[i % len(IMAGES)])
        batched = metric(s.url, "learnable_memory_batch_requests_count") - batches
        assert batched < len(jobs), "requests of two preprocessings were not batched together"


# ----- errors -----
def test_every_error_is_json_and_the_server_keeps_serving(tmp_path):
    model = make_model()
    save_adapters(model.base, tmp_path / "root")
    other_width = lm.MemoryViT(make_vit(embed_dim=96, num_heads=3))
    add_task(other_width, "wide", 3, seed=7)
    other_width.save_adapter(tmp_path / "root" / "wide")
    other_weights = lm.MemoryViT(make_vit(seed=9))
    add_task(other_weights, "w", 3, seed=8)
    other_weights.save_adapter(tmp_path / "root" / "w")
    damaged = tmp_path / "root" / "damaged"
    lm.load_adapters(model.base, [tmp_path / "root" / "c"]).save_adapter(damaged)
    (damaged / "adapter_model.safetensors").write_bytes((damaged / "adapter_model.safetensors").read_bytes()[:100])
    lm.load_adapters(model.base, [tmp_path / "root" / "c"]).save_adapter(tmp_path / "outside")
    key = {"Authorization": "Bearer s3cret"}
    good = {"images": [b64(IMAGES[0])], "tasks": ["a"]}
    big = image_bytes(5, (50, 50))
    with serve(model, adapter_root=tmp_path / "root", api_key="s3cret", max_images=3, max_request_bytes=20_000,
               max_image_pixels=48 * 48) as s:
        predict, adapters = f"{s.url}/v1/predict", f"{s.url}/v1/adapters"
        files = [("images", ("x.png", b"not an image", "image/png"))]
        cases = [
            (http.post(predict, files=files), 400, "x.png"),
            (http.post(predict, json={"images": ["%%%"]}), 422, "base64"),
            (http.post(predict, content=b"{", headers={"content-type": "application/json"}), 422, "JSON"),
            (http.post(predict, json={"images": [b64(IMAGES[0])], "colour": 1}), 422, "colour"),
            (http.post(predict, json={"images": [b64(IMAGES[0])], "top_k": 0}), 422, "top_k"),
            (http.post(predict, files=[("images", ("y.png", IMAGES[0], "image/png"))], data={"top_k": "x"}), 422,
             "top_k"),
            (http.post(predict, json={"images": []}), 422, "no image"),
            (http.post(predict, json={"images": [b64(IMAGES[0])], "tasks": []}), 422, "tasks"),
            (http.post(predict, content=b"abc", headers={"content-type": "text/plain"}), 415, "text/plain"),
            (http.post(predict, json={"images": [b64(IMAGES[0])], "tasks": ["a", "nope"]}), 404, "nope"),
            (http.post(predict, json={"images": [b64(big)]}), 413, "pixels"),
            (http.post(predict, json={"images": [b64(IMAGES[0])] * 4}), 413, "3 allowed"),
            (http.post(predict, files=[("images", ("z.png", IMAGES[0], "image/png"))] * 5), 413, "images"),
            (http.post(predict, json={"images": [b64(bytes(30_000))]}), 413, "bytes"),
            (http.post(adapters, json={"path": "c"}), 401, "API key"),
            (http.post(adapters, json={"path": "c"}, headers={"X-API-Key": "wrong"}), 401, "API key"),
            (http.delete(f"{adapters}/a"), 401, "API key"),
            (http.post(adapters, json={"path": str(tmp_path / "outside")}, headers=key), 403, "adapter root"),
            (http.post(adapters, json={"path": "../outside"}, headers=key), 403, "adapter root"),
            (http.post(adapters, json={"path": "hf-hub:owner/repo"}, headers=key), 403, "--allow-hub"),
            (http.post(adapters, json={"path": "missing"}, headers=key), 404, "missing"),
            (http.post(adapters, json={"pth": "c"}, headers=key), 422, "path"),
            (http.post(adapters, json={"path": "damaged"}, headers=key), 422, "safetensors"),
            (http.post(adapters, json={"path": "wide"}, headers=key), 409, "another backbone"),
            (http.post(adapters, json={"path": "w"}, headers=key), 409, "other weights"),
            (http.post(adapters, json={"path": "c", "name": "a"}, headers=key), 409,
             "'a' is loaded already: send the load again with another name in the request's 'name' field"),
            (http.post(adapters, json={"path": "c", "name": "base"}, headers=key), 409, "reserved"),
            (http.post(adapters, json={"path": "c", "name": "bad\nname"}, headers=key), 422, "not allowed"),
            (http.delete(f"{adapters}/nope", headers=key), 404, "nope"),
            (http.delete(f"{adapters}/base", headers=key), 404, "base model"),
            (http.delete(f"{adapters}/a", headers=key), 409, "'ext'"),
            (http.get(f"{s.url}/v1/nothing"), 404, "Not Found"),
        ]
        for i, (r, status, text) in enumerate(cases):
            assert text in error_of(r, status) and "rename=" not in r.text, (i, r.text)
            ok = http.post(predict, json=good)
            assert ok.status_code == 200 and ok.json()["tasks"] == ["a"], (i, ok.text)
        assert http.get(f"{s.url}/health").json()["tasks"] == ["a", "b.v1", "ext"]  # failed loads changed nothing
        assert metric(s.url, "learnable_memory_request_errors_total", endpoint="/v1/adapters", status="409") == 4
        r = http.post(adapters, json={"path": "c"}, headers=key)
        assert r.status_code == 200 and r.json()["loaded"] == ["c"]


def test_loading_is_off_without_an_adapter_root(tmp_path):
    model = make_model()
    save_adapters(model.base, tmp_path)
    with serve(model) as s:
        assert "--adapter-root" in error_of(http.post(f"{s.url}/v1/adapters", json={"path": str(tmp_path / "c")}), 403)
        assert "--adapter-root" in error_of(http.delete(f"{s.url}/v1/adapters/a"), 403)
        assert http.get(f"{s.url}/v1/adapters").json()["api_loading"] is False


def test_files_that_link_out_of_the_adapter_root_are_refused(tmp_path):
    model = make_model()
    save_adapters(model.base, tmp_path / "outside")
    root = tmp_path / "root"
    for name in ("weights", "config"):  # a folder under the root whose weights (or config) lie outside
        (root / name).mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            link = name == "weights" and f.endswith(".safetensors") or name == "config" and f.endswith(".json")
            if link:
                (root / name / f).symlink_to(tmp_path / "outside" / "c" / f)
            else:
                (root / name / f).write_bytes((tmp_path / "outside" / "c" / f).read_bytes())
    (root / "folder").symlink_to(tmp_path / "outside" / "d")  # the folder itself a link out
    save_adapters(model.base, root / "inside")
    (root / "relinked").symlink_to(root / "inside" / "c")  # a link that stays inside the root is fine
    with serve(model, adapter_root=root) as s:
        for path, why in (("weights", "a link that leads outside the adapter root"),
                          ("config", "a link that leads outside the adapter root"), ("folder", "the adapter root")):
            r = http.post(f"{s.url}/v1/adapters", json={"path": path})
            assert why in error_of(r, 403), r.text
        assert http.get(f"{s.url}/health").json()["tasks"] == ["a", "b.v1", "ext"]
        r = http.post(f"{s.url}/v1/adapters", json={"path": "relinked"})
        assert r.status_code == 200 and r.json()["loaded"] == ["c"], r.text


def test_loading_without_an_api_key_is_logged_loudly(tmp_path, caplog):
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="learnable_memory.serve"):
        with serve(model, adapter_root=tmp_path):
            pass
        warned = [r for r in caplog.records if "no API key" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING and str(tmp_path) in warned[0].getMessage()
        caplog.clear()
        with serve(model, adapter_root=tmp_path, api_key="k"), serve(model):
            pass
        assert not [r for r in caplog.records if "no API key" in r.getMessage()]


#: The head of a predict request that announces a body of 100,000 bytes.
PREDICT_HEAD = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")


def raw_request(url: str, head: bytes, body: bytes = b"", close: bool = False) -> socket.socket:
    """A connection to the server at ``url`` that sent ``head`` and ``body`` (and closed, with ``close``)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.sendall(head + body)
    if close:
        sock.close()
    return sock


def test_a_client_gone_mid_upload_is_counted_as_its_own_status_with_no_traceback(caplog):
    model = make_model()
    app = create_app(model, **SERVER)
    with caplog.at_level(logging.INFO), BackgroundServer(app, start_timeout_s=WAIT_S, log_config=None) as s:
        raw_request(s.url, PREDICT_HEAD, b'{"images": ["' + b"A" * 5000, close=True)
        wait_for(lambda: metric(s.url, "learnable_memory_requests_total", endpoint="/v1/predict") == 1,
                 "the aborted request to be counted")
        assert metric(s.url, "learnable_memory_requests_total", endpoint="/v1/predict", status="499") == 1
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])], "tasks": ["a"]})
        assert r.status_code == 200


def test_a_body_that_stops_coming_gets_408_after_the_timeout():
    model = make_model()
    with serve(model, request_timeout_s=2) as s:
        # headers, a little of the body, then nothing: the server answers 408 once --timeout passed, and closes
        sock = raw_request(s.url, PREDICT_HEAD, b'{"images": [')
        with sock:
            answer = b""
            while chunk := sock.recv(65536):  # bounded by the socket's WAIT_S time-out; ends when the server closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"did not arrive within 2" in answer
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])], "tasks": ["a"]})
        assert r.status_code == 200
        check_answer(r.json(), reference(model, IMAGES[:1], ["a"]), 3, class_names(model))


class Gate:
    """Holds every model pass of ``model`` while closed (to fill the queue, time requests out, drain);
    ``entered`` is set when a pass reaches the gate."""

    def __init__(self, model: lm.MemoryViT):
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        real = model.forward_all

        def gated(images, tasks=None):
            self.entered.set()
            assert self.open.wait(WAIT_S), "the gate stayed closed"
            return real(images, tasks)

        model.forward_all = gated

    @contextmanager
    def closed(self) -> Iterator[None]:
        """Hold every pass until the block ends (also when it fails)."""
        self.entered.clear()
        self.open.clear()
        try:
            yield
        finally:
            self.open.set()


def in_threads(fn, n: int) -> tuple[list[threading.Thread], list]:
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(fn()), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, out


def test_full_queue_answers_503_and_the_queued_requests_still_run():
    model = make_model()
    gate = Gate(model)
    good = {"images": [b64(IMAGES[0])], "tasks": ["a"]}
    with serve(model, max_batch_size=1, max_queue_images=2) as s:
        predict = lambda: http.post(f"{s.url}/v1/predict", json=good)  # noqa: E731
        with gate.closed():
            first, answers = in_threads(predict, 1)
            assert gate.entered.wait(WAIT_S), "the first request's pass did not start"
            waiting, more = in_threads(predict, 2)  # the pass is held: these two wait in the queue
            wait_for(lambda: http.get(f"{s.url}/health").json()["queued_images"] == 2, "two requests queued")
            r = predict()
            assert "queue is full" in error_of(r, 503) and r.headers["retry-after"] == "1"
        for t in first + waiting:
            t.join(WAIT_S)
        assert [a.status_code for a in answers + more] == [200] * 3, [a.text for a in answers + more]
        for a in answers + more:
            check_answer(a.json(), reference(model, IMAGES[:1], ["a"]), 3, class_names(model))


def test_a_request_without_results_in_time_gets_504_and_leaves_the_queue():
    model = make_model()
    gate = Gate(model)
    good = {"images": [b64(IMAGES[0])], "tasks": ["a"]}
    # the server's 3 s time-out is what this checks: the gate holds every pass until the requests gave
    # up, so none can finish in time, however fast or slow the machine
    app = create_app(model, **{**SERVER, "max_batch_size": 1, "request_timeout_s": 3})
    with running(app) as s:
        predict = lambda: http.post(f"{s.url}/v1/predict", json=good)  # noqa: E731
        with gate.closed():
            first, answers = in_threads(predict, 1)
            assert gate.entered.wait(WAIT_S), "the first request's pass did not start"
            waiting, more = in_threads(predict, 2)  # the pass is held: these two wait in the queue
            for t in first + waiting:
                t.join(WAIT_S)
            assert [a.status_code for a in answers + more] == [504] * 3, [a.text for a in answers + more]
            assert "3 s" in answers[0].json()["error"]["message"]
            assert http.get(f"{s.url}/health").json()["queued_images"] == 0  # the two that gave up left the queue
        # the server keeps serving; with a time-out a busy machine cannot reach, the next request's
        # answer cannot depend on how fast the held pass and its own run
        server = app.state.server
        server.settings = dataclasses.replace(server.settings, request_timeout_s=WAIT_S)
        r = predict()
        assert r.status_code == 200
        check_answer(r.json(), reference(model, IMAGES[:1], ["a"]), 3, class_names(model))


def test_a_failed_pass_fails_its_batch_and_the_next_one_runs():
    model = make_model()
    real, fail = model.forward_all, threading.Event()

    def flaky(images, tasks=None):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("out of memory, say")
        return real(images, tasks)

    model.forward_all = flaky
    good = {"images": [b64(IMAGES[2])], "tasks": ["ext"]}
    with serve(model) as s:
        fail.set()
        assert "out of memory, say" in error_of(http.post(f"{s.url}/v1/predict", json=good), 500)
        r = http.post(f"{s.url}/v1/predict", json=good)
        assert r.status_code == 200
        check_answer(r.json(), reference(model, IMAGES[2:3], ["ext"]), 3, class_names(model))


def test_shutdown_drains_requests_in_flight():
    model = make_model()
    gate = Gate(model)
    good = {"images": [b64(IMAGES[1])], "tasks": ["b.v1", "base"]}
    server = BackgroundServer(create_app(model, **{**SERVER, "max_batch_size": 1}), start_timeout_s=WAIT_S).start()
    with gate.closed():
        threads, answers = in_threads(lambda: http.post(f"{server.url}/v1/predict", json=good), 3)
        wait_for(lambda: http.get(f"{server.url}/health").json()["queued_images"] == 2, "requests in flight")
        stopper = threading.Thread(target=server.stop, args=(WAIT_S,), daemon=True)
        stopper.start()
        wait_for(lambda: server.server.should_exit, "shutdown to begin")
        time.sleep(0.3)  # shutdown is under way while the requests wait
    stopper.join(WAIT_S)
    for t in threads:
        t.join(WAIT_S)
    assert not stopper.is_alive() and [a.status_code for a in answers] == [200] * 3
    for a in answers:
        check_answer(a.json(), reference(model, IMAGES[1:2], ["b.v1", "base"]), 3, class_names(model))


def test_metrics_count_requests_errors_batches_tasks_and_adapters():
    model = make_model()
    with serve(model) as s:
        for _ in range(3):
            http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])] * 2, "tasks": ["a", "ext"]})
        http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])], "tasks": ["zzz"]})
        assert metric(s.url, "learnable_memory_requests_total", endpoint="/v1/predict", status="200") == 3
        assert metric(s.url, "learnable_memory_request_errors_total", endpoint="/v1/predict", status="404") == 1
        assert metric(s.url, "learnable_memory_request_seconds_count", endpoint="/v1/predict") == 4
        assert metric(s.url, "learnable_memory_task_images_total", task="ext") == 6
        assert metric(s.url, "learnable_memory_task_images_total", task="base") == 0
        assert metric(s.url, "learnable_memory_batch_images_sum") == 6  # the warm-up pass and the 404 are not batches
        assert metric(s.url, "learnable_memory_loaded_adapters") == 3


# ----- the adapters file -----
def test_adapters_file_is_the_adapter_set(tmp_path):
    model = make_model()
    made = save_adapters(model.base, tmp_path / "ad")
    listing = tmp_path / "adapters.txt"
    write_atomic(listing, "# the adapter set\nad/c\n")
    with serve(model, adapters_file=listing, poll_interval_s=0.05) as s:
        health = lambda: http.get(f"{s.url}/health").json()  # noqa: E731
        assert health()["tasks"] == ["c"]  # the file, not the model's own tasks
        write_atomic(listing, f"ad/c\n\nsecond = {tmp_path / 'ad' / 'd'}\n")
        wait_for(lambda: health()["tasks"] == ["c", "second"], "the new file to be applied")
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(b) for b in IMAGES], "tasks": ["second", "c"]})
        ref = {**reference(made["c"], IMAGES, ["c"]), "second": reference(made["d"], IMAGES, ["d"])["d"]}
        check_answer(r.json(), ref, 3, {"c": made["c"].tasks["c"].config.class_names, "second": ["d0", "d1"]})
        write_atomic(listing, "ad/c\nad/missing\n")
        wait_for(lambda: health()["adapters_file"]["error"] is not None, "the bad file to be reported")
        assert "missing" in health()["adapters_file"]["error"] and health()["tasks"] == ["c", "second"]
        assert http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])]}).status_code == 200
        assert "adapters file" in error_of(http.post(f"{s.url}/v1/adapters", json={"path": "ad/d"}), 403)
        write_atomic(listing, "# nothing: the base model alone\n")
        wait_for(lambda: health()["tasks"] == [] and health()["adapters_file"]["error"] is None, "an empty set")
        assert http.post(f"{s.url}/v1/predict", json={"images": [b64(IMAGES[0])]}).json()["tasks"] == ["base"]


def test_adapters_file_format(tmp_path):
    from learnable_memory.serve.adapter_set import FileEntry, read_adapters_file

    f = tmp_path / "list.txt"
    f.write_text("# comment\n\n a \nnew name = b/c\nhf-hub:owner/repo@v1\nx=hf-hub:o/r\n=d\n/abs/e\n")
    assert read_adapters_file(f) == [
        FileEntry(str(tmp_path / "a")), FileEntry(str(tmp_path / "b/c"), "new name"),
        FileEntry("hf-hub:owner/repo@v1"), FileEntry("hf-hub:o/r", "x"), FileEntry(str(tmp_path / "d")),
        FileEntry("/abs/e")]
    f.write_text("name=\n")
    with pytest.raises(ValueError, match="names no adapter"):
        read_adapters_file(f)

"""Serving over HTTP: throughput and latency of one pass for every task, against one model per task.

Server: ``learnable_memory.serve.create_app`` on ViT-S/16 at 224 px (random weights) with K
non-destructive tasks of m=10 memory tokens, served by uvicorn on 127.0.0.1 in a subprocess (this
script with ``--server``). Two designs, the same server code, batching and settings:

- ``one_pass``: each batch runs ONE ``forward_all`` over the tasks its requests ask for;
- ``per_task``: each batch runs one forward per task (``create_app(per_task_forward=True)``): the
  one-model-per-task design, K passes per batch.

The subprocess holds one app per (K, design), each on its own port, all sharing the backbone; only
the app being measured gets traffic. Client: this process, ``httpx.AsyncClient``, C clients in a closed
loop, each request one 256 px JPEG asking for all K tasks. A cell (K, C, design) starts with two
untimed requests, then sends requests until ``--requests`` have completed or ``--max-seconds`` have
passed (then the requests in flight finish and count). Throughput: task-images per second (K times
the images answered, over the cell's wall time); latency: p50 and p99 of the request times. The
designs alternate cell by cell, so a drifting machine load hits both alike. The server uses every
core (torch threads = cores) and glibc keeps freed memory (``common.keep_freed_memory``); the client
shares the cores.

    python benchmarks/serve.py            # K in {1, 8, 32} x C in {1, 8, 32}, ~10 min on 2 cores
    python benchmarks/serve.py --quick    # tiny model, a few requests per cell (smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import common
import httpx
import numpy as np
import torch
from PIL import Image

DESIGNS = ("one_pass", "per_task")
TARGET = {"k": 8, "c": 8, "min_ratio": 5.0}
M = 10


# ----- the server process -----
def serve_forever(spec: dict) -> None:
    """Build one app per (K, design), serve each on a free port, print the ports, serve until stdin closes."""
    from learnable_memory import MemoryViT, TaskConfig
    from learnable_memory.serve import create_app
    from learnable_memory.serve.background import BackgroundServer

    malloc = common.keep_freed_memory()
    vit = common.build_vit(spec["model"], spec["quick"])
    servers, ports = [], {}
    for k in spec["ks"]:
        model = MemoryViT(vit)
        for i in range(k):
            model.add_task(TaskConfig(name=f"t{i}", n_mem=M, num_classes=common.NUM_CLASSES))
        for design in DESIGNS:
            app = create_app(model, threads=spec["threads"], max_batch_size=spec["max_batch_size"],
                             max_wait_ms=spec["max_wait_ms"], per_task_forward=design == "per_task",
                             warmup=False, request_timeout_s=600, max_queue_images=4096)
            servers.append(BackgroundServer(app).start())
            ports[f"{k}/{design}"] = int(servers[-1].url.rsplit(":", 1)[1])
    print(json.dumps({"ports": ports, "malloc": "keep freed memory" if malloc else "default",
                      "torch_threads": torch.get_num_threads()}), flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    for s in servers:
        s.stop()


class ServerProcess:
    """This script with ``--server`` in a subprocess; ``ports`` once it is up."""

    def __init__(self, spec: dict, timeout: float = 600):
        self.proc = subprocess.Popen([sys.executable, __file__, "--server", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # blocks until the apps are up (or the process died)
        if not line:
            raise RuntimeError(f"the server process exited with status {self.proc.wait(timeout)}")
        self.info = json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----- the client -----
def request_body(size: int, k: int) -> bytes:
    """One JPEG (smooth random content) as base64 JSON asking for tasks t0..t{k-1}."""
    import base64

    g = torch.Generator().manual_seed(0)
    small = (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8)
    pixels = torch.nn.functional.interpolate(small[None].float(), size=(size, size), mode="bilinear")[0]
    buf = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).to(torch.uint8).numpy()).save(buf, "JPEG", quality=90)
    return json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()],
                       "tasks": [f"t{i}" for i in range(k)], "top_k": 1}).encode()


async def run_cell(url: str, body: bytes, k: int, clients: int, requests: int, max_seconds: float) -> dict:
    """C clients in a closed loop until ``requests`` are answered or ``max_seconds`` pass."""
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    failures = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        for _ in range(2):  # untimed
            r = await client.post(f"{url}/v1/predict", content=body, headers=headers)
            assert r.status_code == 200 and len(r.json()["tasks"]) == k, r.text
        start = time.perf_counter()
        deadline = start + max_seconds

        sent = 0

        async def worker() -> None:
            nonlocal failures, sent
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/predict", content=body, headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"k": k, "c": clients, "requests": len(latencies), "failures": failures, "seconds": wall,
            "task_images_per_s": k * len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


def plot(cells: list[dict], path: Path) -> Path:
    ks = sorted({c["k"] for c in cells})
    fig, axes = common.new_figure(len(ks), width=4.0, height=3.4)
    for ax, k in zip(axes, ks, strict=True):
        for design, style in zip(DESIGNS, ("o-", "s--"), strict=True):
            rows = sorted((c for c in cells if c["k"] == k and c["design"] == design), key=lambda c: c["c"])
            ax.plot([c["c"] for c in rows], [c["task_images_per_s"] for c in rows], style, label=design)
        ax.set(title=f"K={k} tasks", xlabel="concurrent clients", ylabel="task-images / s", xscale="log")
        ax.legend()
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, K in {1,2}, C in {1,4}, few requests")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cs", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--requests", type=int, default=100, help="requests per cell (fewer if --max-seconds passes)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time cap of a cell")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=common.machine_info()["cores"], help="server torch threads")
    p.add_argument("--server", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.server:
        serve_forever(json.loads(args.server))
        return 0
    if args.quick:
        args.model, args.ks, args.cs, args.requests, args.max_seconds = common.QUICK_MODEL[0], [1, 2], [1, 4], 8, 10.0
    spec = {"model": args.model, "quick": args.quick, "ks": args.ks, "threads": args.threads,
            "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average']}", flush=True)
    started = time.perf_counter()
    server = ServerProcess(spec)
    machine.update(server_malloc=server.info["malloc"], server_torch_threads=server.info["torch_threads"])
    size = 32 if args.quick else 256
    cells = []
    try:
        for k in args.ks:
            body = request_body(size, k)
            for c in args.cs:
                for design in DESIGNS:
                    url = f"http://127.0.0.1:{server.info['ports'][f'{k}/{design}']}"
                    cell = asyncio.run(run_cell(url, body, k, c, args.requests, args.max_seconds))
                    cells.append({"design": design, **cell})
                    print(f"  K={k:<3} C={c:<3} {design:<9} {cell['requests']:>4} requests in "
                          f"{cell['seconds']:5.1f} s: {cell['task_images_per_s']:8.1f} task-images/s, "
                          f"p50 {cell['p50_ms']:7.1f} ms, "
                          f"p99 {cell['p99_ms']:7.1f} ms", flush=True)
    finally:
        server.close()
    by = {(c["k"], c["c"], c["design"]): c for c in cells}
    rows, ratios = [], []
    for k in args.ks:
        for c in args.cs:
            one, sep = by[(k, c, "one_pass")], by[(k, c, "per_task")]
            ratio = one["task_images_per_s"] / sep["task_images_per_s"]
            ratios.append({"k": k, "c": c, "throughput_ratio": ratio})
            rows.append([k, c, f"{one['task_images_per_s']:.1f}", f"{sep['task_images_per_s']:.1f}", f"{ratio:.2f}x",
                         f"{one['p50_ms']:.0f} / {one['p99_ms']:.0f}", f"{sep['p50_ms']:.0f} / {sep['p99_ms']:.0f}",
                         f"{one['requests']} / {sep['requests']}"])
    targets = []
    if (TARGET["k"], TARGET["c"], "one_pass") in by:
        ratio = next(r["throughput_ratio"] for r in ratios if (r["k"], r["c"]) == (TARGET["k"], TARGET["c"]))
        stat = {"median": ratio, "q1": ratio, "q3": ratio, "n": 1}
        targets.append(common.target_row(f"K={TARGET['k']} C={TARGET['c']} one pass / per task throughput", stat,
                                         ">=", TARGET["min_ratio"]))
    result = {"command": common.command_line(), "machine": machine, "settings": {**spec, "m": M, "image_px": size,
              "requests": args.requests, "max_seconds": args.max_seconds, "cs": args.cs},
              "cells": cells, "ratios": ratios, "targets": targets,
              "seconds": time.perf_counter() - started, "load_average_end": common.load_average()}
    common.write_json(args.out / "serve.json", result)
    plot(cells, args.out / "serve.png")
    print()
    print(common.format_table(["K", "C", "one pass task-img/s", "per task task-img/s", "ratio",
                               "one pass p50 / p99 ms", "per task p50 / p99 ms", "requests"], rows))
    if targets:
        print()
        common.print_targets(targets)
    print(f"\nwrote {args.out / 'serve.json'} and {args.out / 'serve.png'} in {result['seconds']:.0f} s "
          f"(load average at the end {result['load_average_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

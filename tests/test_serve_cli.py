"""``learnable-memory serve`` on the command line: option errors, the app it builds (``--dtype``), and
end to end in subprocesses (several workers with an adapters file; the benchmark script's smoke run)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import learnable_memory as lm
from tests.helpers import (
    IMAGES,
    RUN_S,
    WAIT_S,
    add_task,
    b64,
    error_of,
    http,
    metric,
    reference,
    running,
    wait_for,
    write_atomic,
)

ROOT = Path(__file__).resolve().parent.parent


def demo_adapter(folder: Path, seed: int = 21) -> lm.MemoryViT:
    """An adapter on the shipped demo base (what the command line builds when no --model is given)."""
    from learnable_memory.data import load_demo_base

    model = lm.MemoryViT(load_demo_base())
    add_task(model, folder.name, 4, seed=seed, class_names=["w", "x", "y", "z"])
    model.save_adapter(folder)
    return model.eval()


def test_cli_refuses_bad_options_in_one_line(tmp_path, capsys):
    from learnable_memory.cli import main

    assert main(["serve", "--adapter", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err.strip()
    assert main(["serve", "--workers", "2", "--adapter-root", str(tmp_path)]) == 2
    assert "--adapters-file" in capsys.readouterr().err
    assert main(["serve", "--adapter", "x", "--adapters-file", str(tmp_path / "f")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--allow-hub"]) == 2
    assert "adapter_root" in capsys.readouterr().err
    assert main(["serve", "--adapter-root", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err
    listing = tmp_path / "adapters.txt"
    listing.write_text("missing\n")
    assert main(["serve", "--adapters-file", str(listing)]) == 2
    err = capsys.readouterr().err
    assert f"a relative path is read from the file's folder {tmp_path}" in err and "line 'missing'" in err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-wait-ms", "-1"])
    assert e.value.code == 2


def test_cli_settings_and_api_key_from_the_environment(tmp_path, monkeypatch):
    from learnable_memory.cli import build_parser
    from learnable_memory.cli.serve import settings_from_args

    monkeypatch.setenv("LEARNABLE_MEMORY_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "--adapter-root", str(tmp_path), "--max-batch-size", "4",
                                      "--max-request-mb", "0.5", "--no-fingerprint-check", "--threads", "3"])
    s = settings_from_args(args)
    assert (s.api_key, s.adapter_root, s.max_batch_size, s.max_request_bytes, s.check_fingerprint, s.threads) == \
        ("from-env", tmp_path, 4, 2**19, False, 3)
    args = build_parser().parse_args(["serve", "--api-key", "given"])
    assert settings_from_args(args).api_key == "given" and not settings_from_args(args).api_loading


def test_cli_app_casts_the_base_to_bfloat16_before_loading(tmp_path):
    from learnable_memory.cli import build_parser
    from learnable_memory.cli.serve import build_app

    model = demo_adapter(tmp_path / "gray")
    args = build_parser().parse_args(["serve", "--adapter", str(tmp_path / "gray"), "--dtype", "bfloat16",
                                      "--threads", "1", "--device", "cpu", "--timeout", str(WAIT_S)])
    app = build_app(args)
    served = app.state.server.adapters.model
    assert {p.dtype for p in served.parameters()} == {torch.bfloat16}
    with running(app) as s:
        r = http.post(f"{s.url}/v1/predict", json={"images": [b64(b) for b in IMAGES], "top_k": 4})
        assert r.json()["tasks"] == ["base", "gray"]
        listed = http.get(f"{s.url}/v1/adapters").json()["adapters"]
        assert [a["source"] for a in listed] == [str(tmp_path / "gray")]
    ref = reference(model, IMAGES, None)  # float32, images converted to the base's one channel
    for i, pred in enumerate(r.json()["predictions"]):
        for task, labels in pred["tasks"].items():
            for x in labels:
                assert abs(x["prob"] - ref[task][i, x["index"]].item()) < 0.03, (task, i, x)


def test_cli_app_resolves_each_adapter_spec_once(tmp_path, monkeypatch):
    import learnable_memory.cli.records as records
    import learnable_memory.serve.adapter_set as adapter_set
    from learnable_memory.cli import build_parser
    from learnable_memory.cli.serve import build_app

    demo_adapter(tmp_path / "one", seed=31)
    demo_adapter(tmp_path / "two", seed=32)
    (tmp_path / "adapters.txt").write_text("one\ntwo\n")
    resolved: list[str] = []
    for module in (records, adapter_set):
        real = module.adapter_folders
        monkeypatch.setattr(module, "adapter_folders", lambda spec, *a, real=real, **k: resolved.append(str(spec)) or
                            real(spec, *a, **k))
    for given in (["--adapter", str(tmp_path / "one"), str(tmp_path / "two")],
                  ["--adapters-file", str(tmp_path / "adapters.txt")]):
        resolved.clear()
        app = build_app(build_parser().parse_args(["serve", *given, "--threads", "1", "--device", "cpu"]))
        assert app.state.server.adapters.model.task_names == ["one", "two"]
        assert sorted(resolved) == [str(tmp_path / "one"), str(tmp_path / "two")], given


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_cli_two_workers_follow_the_adapters_file_and_sum_metrics(tmp_path):
    demo_adapter(tmp_path / "one", seed=31)
    demo_adapter(tmp_path / "two", seed=32)
    listing = tmp_path / "adapters.txt"
    write_atomic(listing, "one\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "learnable_memory", "serve", "--adapters-file", str(listing),
                             "--workers", "2", "--port", str(port), "--threads", "1", "--poll-interval", "0.1",
                             "--timeout", str(WAIT_S), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)

    def loaded() -> list[float]:  # loaded_adapters of each live worker
        text = http.get(f"{url}/metrics").text
        return [s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "learnable_memory_loaded_adapters"]

    def up() -> bool:
        try:
            return len(loaded()) == 2
        except httpx.TransportError:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            return False

    try:
        wait_for(up, "two workers", timeout=RUN_S)
        for _ in range(12):  # a new connection each: the workers share them
            r = http.post(f"{url}/v1/predict", json={"images": [b64(IMAGES[0])]})
            assert r.status_code == 200 and r.json()["tasks"] == ["base", "one"], r.text
        assert metric(url, "learnable_memory_requests_total", endpoint="/v1/predict", status="200") == 12
        assert metric(url, "learnable_memory_task_images_total", task="one") == 12
        assert "adapters file" in error_of(http.post(f"{url}/v1/adapters", json={"path": "two"}), 403)
        write_atomic(listing, "one\ntwo\n")
        wait_for(lambda: loaded() == [2.0, 2.0], "both workers to apply the file")
        assert http.post(f"{url}/v1/predict", json={"images": [b64(IMAGES[0])]}).json()["tasks"] == \
            ["base", "one", "two"]
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
        log.close()
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()


def serving(proc: subprocess.Popen, url: str, log: Path) -> bool:
    """Whether the server process ``proc`` answers ``/health`` with ok (it must not have stopped)."""
    try:
        return http.get(f"{url}/health").json()["status"] == "ok"
    except httpx.TransportError:
        assert proc.poll() is None, log.read_text()
        return False


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "learnable_memory", "serve", "--threads", "1", "--timeout", str(WAIT_S), *args]


@pytest.mark.integration
def test_cli_hot_loading_without_a_key_is_refused_off_loopback_and_always_logged(tmp_path):
    proc = subprocess.run(serve_command("--adapter-root", str(tmp_path), "--host", "0.0.0.0"), capture_output=True,
                          text=True, timeout=WAIT_S)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--allow-unauthenticated" in proc.stderr, \
        proc.stderr
    for host in ("127.0.0.1", "0.0.0.0"):
        port = free_port()
        log_path = tmp_path / f"server-{host}.log"
        extra = ["--allow-unauthenticated"] if host != "127.0.0.1" else []
        with log_path.open("w") as log:
            server = subprocess.Popen(serve_command("--adapter-root", str(tmp_path), "--host", host, "--port",
                                                    str(port), *extra), stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(partial(serving, server, f"http://127.0.0.1:{port}", log_path), "the server")
            finally:
                server.terminate()
                server.wait(WAIT_S)
        assert "with no API key: anyone can load adapters" in log_path.read_text(), log_path.read_text()


@pytest.mark.integration
def test_cli_several_workers_with_a_bad_adapter_stop_at_once_with_status_2(tmp_path):
    demo_adapter(tmp_path / "good")
    demo_adapter(tmp_path / "bad", seed=22)
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    listing = tmp_path / "adapters.txt"
    listing.write_text("good\nbad\n")
    proc = subprocess.run(serve_command("--adapters-file", str(listing), "--workers", "2", "--port", str(free_port())),
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("learnable-memory: error: ") and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "adapter_model.safetensors" in proc.stderr


@pytest.mark.integration
def test_benchmark_quick_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "serve.json").read_text())
    assert {"command", "machine", "settings", "cells", "ratios"} <= data.keys()
    assert {(c["k"], c["c"], c["design"]) for c in data["cells"]} == {
        (k, c, d) for k in (1, 2) for c in (1, 4) for d in ("one_pass", "per_task")}
    assert all(c["failures"] == 0 and c["requests"] == 8 and c["p99_ms"] >= c["p50_ms"] > 0 for c in data["cells"])
    assert (tmp_path / "serve.png").stat().st_size > 0 and "| K" in proc.stdout

"""The ``learnable-memory`` command line: train / eval / predict / inspect, errors, accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from learnable_memory import data as D
from learnable_memory import load_adapters
from learnable_memory.cli import build_parser, create_base, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--batch-size", "16", "--max-train", "48", "--no-progress"]


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One digits adapter, trained through the CLI on the shipped base."""
    out = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["train", "--data", "digits", "--n-mem", "2", "--task", "digits", "--out", str(out), *TINY]) == 0
    return out


def test_every_subcommand_has_help(capsys):
    for cmd, flag in [("train", "--n-mem"), ("eval", "--data"), ("predict", "--top-k"), ("inspect", "--json"),
                      ("demo", "--quick")]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert flag in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "learnable_memory", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "demo" in r.stdout


def test_train_writes_adapter_and_training_record(trained):
    info = json.loads((trained / "training.json").read_text())
    assert info["task"] == "digits" and info["data"] == "digits" and info["total_steps"] == 3
    assert info["class_names"] == D.DIGITS_CLASSES and info["settings"]["processes"] == 1
    assert len(info["history"]) == 1 and "val_accuracy" in info["history"][0]
    model = load_adapters(D.load_demo_base(), [trained])
    cfg = model.tasks["digits"].config
    assert (cfg.n_mem, cfg.num_classes, cfg.class_names) == (2, 10, D.DIGITS_CLASSES)


def test_train_with_class_subset_and_existing_out(tmp_path, capsys):
    out = tmp_path / "fm"
    code, text, _ = _run(["train", "--data", "fashion-mnist", "--class-subset", "Sandal,Bag", "--out", out,
                          "--val-fraction", "0.25", *TINY], capsys)
    assert code == 0 and "saved adapter" in text
    info = json.loads((out / "training.json").read_text())
    assert info["task"] == "fashion-mnist-Sandal_Bag" and info["class_names"] == ["Sandal", "Bag"]
    before = (out / "adapter_model.safetensors").read_bytes()
    code, _, err = _run(["train", "--data", "digits", "--out", out, *TINY], capsys)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert (out / "adapter_model.safetensors").read_bytes() == before  # nothing lost


def test_resume_continues_training(trained, tmp_path, capsys):
    out = tmp_path / "resumed"
    code, _, _ = _run(["train", "--resume", trained, "--out", out, "--steps", "2", "--batch-size", "16",
                       "--max-train", "48", "--no-val", "--no-progress"], capsys)
    assert code == 0
    info = json.loads((out / "training.json").read_text())
    assert info["total_steps"] == 5 and len(info["history"]) == 2 and info["resumed_from"] == str(trained)
    a = load_adapters(D.load_demo_base(), [trained]).tasks["digits"]
    b = load_adapters(D.load_demo_base(), [out]).tasks["digits"]
    assert not torch.equal(a.memory, b.memory) and a.config.n_mem == b.config.n_mem
    code, _, err = _run(["train", "--resume", trained, "--out", tmp_path / "x", "--n-mem", "7", *TINY], capsys)
    assert code == 2 and "--n-mem 7 differs" in err


def test_eval_reports_accuracy_and_confusion(trained, capsys):
    code, text, _ = _run(["eval", trained, "--data", "base=fashion-mnist", "--limit", "1000", "--json"], capsys)
    assert code == 0
    res = json.loads(text)
    assert set(res) == {"digits", "base"}
    digits = res["digits"]
    conf = np.array(digits["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == digits["n"] == 597
    assert digits["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    assert res["base"]["n"] == 1000 and res["base"]["accuracy"] > 0.8  # classes 0-4, by label name
    code, text, _ = _run(["eval", trained], capsys)
    assert code == 0 and "== digits: accuracy" in text and "<- predicted" in text


def test_predict_gives_topk_for_every_task_in_json(trained, tmp_path, capsys):
    x, _ = D.load_fashion_mnist("test")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(x[i]).save(paths[-1])
    code, text, _ = _run(["predict", *paths, "--adapter", trained, "--top-k", "2"], capsys)
    assert code == 0
    res = json.loads(text)
    assert res["tasks"] == ["base", "digits"] and len(res["predictions"]) == 2
    for pred in res["predictions"]:
        base, digits = pred["tasks"]["base"], pred["tasks"]["digits"]
        assert len(base) == 2 and len(digits) == 2
        assert base[0]["label"] in D.FASHION_MNIST_CLASSES[:5] and digits[0]["label"] in D.DIGITS_CLASSES
        assert base[0]["prob"] >= base[1]["prob"] and 0 < base[0]["prob"] <= 1
    # the base head's answer is the base model's own
    base_model = D.load_demo_base()
    t = D.model_transform(D.data_config(base_model))(Image.open(paths[0]).convert("L"))
    with torch.inference_mode():
        assert res["predictions"][0]["tasks"]["base"][0]["index"] == int(base_model(t[None]).argmax())


def test_inspect_prints_for_humans_and_json(trained, capsys):
    code, text, _ = _run(["inspect", trained], capsys)
    assert code == 0 and "task 'digits'" in text and "memory tokens per block" in text and "training" in text
    code, text, _ = _run(["inspect", trained, "--json"], capsys)
    info = json.loads(text)
    assert info["task"] == "digits" and info["n_mem"] == 2 and info["training"]["total_steps"] == 3


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/folder", *TINY], "not found"),
    (["train", "--data", "digits", "--model", "vit_no_such_model", *TINY], "unknown timm model"),
    (["train", "--data", "digits", "--class-subset", "11", *TINY], "out of range"),
    (["inspect", "/no/such/adapter"], "not found"),
    (["predict", "/no/such.png", "--adapter", "{trained}"], "not found"),
    (["eval", "{trained}", "--data", "nosuchtask=digits"], "unknown task"),
    (["predict", "{img}", "--adapter", "{trained}", "--model", "vit_tiny_patch16_224", "--model-kwargs",
      '{"img_size": 28, "patch_size": 7, "in_chans": 1, "depth": 4}'], "adapter"),
    (["predict", "{img}", "--adapter", "{trained}", "--model", "vit_tiny_patch16_224", "--model-kwargs", "[1]"],
     "JSON object"),
])
def test_bad_input_gives_one_line_error(argv, message, trained, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    argv = [a.replace("{trained}", str(trained)).replace("{img}", str(img)) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.startswith("learnable-memory: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        main(["inspect", "/no/such/adapter", "--debug"])


def test_create_base_from_name_checkpoint_and_folder(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(depth=1, img_size=32, patch_size=8, num_classes=4)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    base = create_base("vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"),
                       model_kwargs=dict(depth=1, img_size=32, patch_size=8))
    assert base.num_classes == 4  # read from the checkpoint's head
    for k, v in src.state_dict().items():
        assert torch.equal(base.state_dict()[k], v), k
    with pytest.raises(ValueError, match="does not fit"):
        create_base("vit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"), model_kwargs=dict(depth=1))
    with pytest.raises(ValueError, match="--checkpoint"):
        create_base(str(tmp_path / "w.safetensors"))
    assert isinstance(create_base(str(D.DEMO_BASE_DIR)), timm.models.VisionTransformer)
    assert create_base(None).num_classes == 5
    assert build_parser().parse_args(["train", "--data", "digits"]).n_mem is None


def test_train_under_accelerate_launch_with_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "learnable_memory", "train", "--data", "digits", "--n-mem", "2", "--steps", "4", "--batch-size", "16",
           "--max-train", "64", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "training.json").read_text())
    assert info["settings"]["processes"] == 2 and info["total_steps"] == 4
    assert r.stdout.count("saved adapter") == 1  # only the main process writes
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    load_adapters(D.load_demo_base(), [out])


def test_extension_task_trains_on_top_of_a_frozen_one(trained, tmp_path, capsys):
    out = tmp_path / "ext"
    code, _, _ = _run(["train", "--data", "fashion-mnist", "--class-subset", "5-6", "--mode", "extension",
                       "--extend", trained, "--task", "fm56", "--out", out, "--no-val", *TINY], capsys)
    assert code == 0
    model = load_adapters(D.load_demo_base(), [trained, out])
    assert model.tasks["fm56"].config.depends_on == ["digits"]
    before = load_adapters(D.load_demo_base(), [trained]).tasks["digits"]
    assert torch.equal(model.tasks["digits"].memory, before.memory)  # the extended task did not move
    code, text, _ = _run(["eval", trained, out, "--limit", "100", "--json"], capsys)
    assert code == 0 and set(json.loads(text)) == {"digits", "fm56"}
    code, _, err = _run(["eval", out], capsys)  # its predecessor is missing
    assert code == 2 and "digits" in err and err.count("\n") == 1

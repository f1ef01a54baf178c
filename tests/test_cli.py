"""The ``learnable-memory`` command line: train / eval / predict / inspect, the base model and the Hub,
bad input (one line, exit status 2), command discovery, accelerate launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import learnable_memory.cli as cli
from learnable_memory import data as D
from learnable_memory import load_adapters
from learnable_memory.cli import build_parser, create_base, main
from tests.helpers import signal_when_written

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "3", "--batch-size", "16", "--max-train", "48", "--no-progress"]
#: A one-block ViT on 28x28 grayscale images: random weights, built in milliseconds.
SMALL_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs",
             '{"img_size": 28, "patch_size": 7, "in_chans": 1, "depth": 1, "embed_dim": 32, "num_heads": 2}']


def _run(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)`` in this process: exit status (argparse's own errors included), stdout, stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("learnable-memory: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def gray_png(path: Path, value: int = 0, size: int = 28) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One digits adapter, trained through the CLI on the shipped base."""
    out = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["train", "--data", "digits", "--n-mem", "2", "--task", "digits", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def img(tmp_path) -> Path:
    return gray_png(tmp_path / "x.png")


def json_rows(text: str) -> list[dict]:
    """``predict``'s stdout: one JSON object per line."""
    return [json.loads(line) for line in text.splitlines()]


def outputs_of(text: str) -> list[str]:
    """The outputs (tasks and ``base``) of ``predict``'s JSON lines, in column order."""
    return [k.rsplit(".", 1)[0] for k in json_rows(text)[0] if k.endswith(".label")]


# ----- commands -----
def test_every_subcommand_has_help(capsys):
    for cmd, flag in [("train", "--n-mem"), ("eval", "--data"), ("predict", "--top-k"), ("inspect", "--json"),
                      ("demo", "--quick")]:
        code, out, _ = _run([cmd, "--help"], capsys)
        assert code == 0 and flag in out and "--debug" in out
    code, out, _ = _run(["--help"], capsys)
    section = out.split("COMMAND\n", 2)[-1].split("\n\n")[0]
    listed = [line.split()[0] for line in section.splitlines() if line.startswith("    ") and line[4] != " "]
    assert listed == ["train", "eval", "predict", "serve", "inspect", "demo"]  # HELP_ORDER


@pytest.mark.integration
def test_python_dash_m_runs_the_command_line():
    r = subprocess.run([sys.executable, "-m", "learnable_memory", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=1800)  # generous: a loaded machine must not fail it
    assert r.returncode == 0 and "train" in r.stdout and "demo" in r.stdout


def test_command_modules_are_discovered(tmp_path, monkeypatch, capsys):
    """A module dropped into ``cli/`` that defines ``add_parser`` is a command, with no edit elsewhere."""
    (tmp_path / "zz_hello.py").write_text(
        "def add_parser(subparsers):\n"
        "    p = subparsers.add_parser('hello', help='say hello')\n"
        "    p.add_argument('--name', default='world')\n"
        "    p.set_defaults(run=lambda args: print(f'hello {args.name}') or 0)\n"
        "    return p\n"
    )
    (tmp_path / "zz_helper.py").write_text("VALUE = 1\n")  # no add_parser: not a command
    (tmp_path / "zz_named.py").write_text(  # a name that is not a literal: imported to find it
        "NAME = 'named'\n"
        "def add_parser(subparsers):\n"
        "    p = subparsers.add_parser(NAME, help='a computed name')\n"
        "    p.set_defaults(run=lambda args: print('named') or 0)\n"
        "    return p\n"
    )
    monkeypatch.setattr(cli, "__path__", [*cli.__path__, str(tmp_path)])
    try:
        assert [m.__name__.rsplit(".", 1)[1] for m in cli.command_modules()][-2:] == ["zz_hello", "zz_named"]
        for name in ("zz_hello", "zz_helper", "zz_named"):
            sys.modules.pop(f"{cli.__name__}.{name}", None)
        code, out, _ = _run(["--help"], capsys)
        assert code == 0 and "say hello" in out and out.index("demo") < out.index("hello") < out.index("named")
        assert f"{cli.__name__}.zz_hello" not in sys.modules  # listed from its source, not imported
        assert _run(["hello", "--name", "memory"], capsys)[:2] == (0, "hello memory\n")
        assert _run(["named"], capsys)[:2] == (0, "named\n")
    finally:
        for name in ("zz_hello", "zz_helper", "zz_named"):
            sys.modules.pop(f"{cli.__name__}.{name}", None)


@pytest.mark.integration
def test_help_imports_no_torch():
    """``--help`` starts in a fraction of a second: neither the top-level help nor any command's imports
    torch or the libraries built on it."""
    script = ("import runpy, sys\nsys.argv = ['learnable-memory', *sys.argv[1:]]\ntry:\n"
              "    runpy.run_module('learnable_memory', run_name='__main__')\nexcept SystemExit as e:\n"
              "    assert e.code == 0, e.code\n"
              "print(sorted(m for m in ('torch', 'timm', 'peft', 'fastapi', 'uvicorn') if m in sys.modules))\n")
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"], ["inspect", "--help"],
                 ["serve", "--help"], ["demo", "--help"]):
        r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT,
                           timeout=1800)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == "[]", (argv, r.stdout[-500:])


def test_light_parser_defaults_equal_the_ones_runs_use():
    """The parsers of train and predict take their defaults from modules that import no torch: literals
    equal to those of the modules that do."""
    from learnable_memory.batch.formats import DTYPE_NAMES
    from learnable_memory.batch.pipeline import DTYPES
    from learnable_memory.cli.train_settings import FIT_DEFAULTS
    from learnable_memory.training.optim import DEFAULTS

    assert list(FIT_DEFAULTS.items()) == list(DEFAULTS.items())
    assert DTYPE_NAMES == tuple(DTYPES)


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
    assert_one_line_error(code, err, "already exists")
    assert (out / "adapter_model.safetensors").read_bytes() == before  # nothing lost


@pytest.mark.parametrize("folder, task", [("data/train", "train"), ("my.data", "my.data"),
                                          ("Vögel (2024)", "Vögel_(2024)")])
def test_image_folder_names_the_task(folder, task, tmp_path, monkeypatch, capsys):
    """The default task name is the folder's, changed only where a folder name could not hold it."""
    root = tmp_path / folder
    for label, value in (("cat", 30), ("dog", 220)):
        for i in range(4):
            gray_png(root / label / f"{i}.png", value + i)
    monkeypatch.chdir(tmp_path)
    code, text, err = _run(["train", "--data", root, "--no-val", *TINY], capsys)
    assert code == 0, err
    saved = tmp_path / "adapters" / task
    assert json.loads((saved / "training.json").read_text())["task"] == task
    code, text, err = _run(["predict", root / "cat" / "0.png", "--adapter", saved], capsys)
    assert code == 0, err
    assert outputs_of(text) == ["base", task]


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
    assert_one_line_error(code, err, "--n-mem 7 differs")


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


def test_eval_prepares_each_adapters_images_with_its_own_preprocessing(trained, tmp_path, capsys):
    from torch.utils.data import DataLoader

    from learnable_memory.train import evaluate

    model = load_adapters(D.load_demo_base(), [trained], rename={"digits": "shifted"})
    own = {**model.tasks["shifted"].config.data_config, "mean": [0.9], "std": [0.2], "crop_pct": 0.8}
    model.tasks["shifted"].config.data_config = own
    model.save_adapter(tmp_path / "shifted")
    shutil.copy(trained / "training.json", tmp_path / "shifted" / "training.json")
    code, text, err = _run(["eval", trained, tmp_path / "shifted", "--limit", "200", "--json"], capsys)
    assert code == 0, err
    res = json.loads(text)
    alone = json.loads(_run(["eval", trained, "--limit", "200", "--json"], capsys)[1])
    assert res["digits"] == alone["digits"]

    def confusion(config: dict) -> list:
        ds = D.subsample(D.load_dataset("digits", "test", config, classes=D.DIGITS_CLASSES), 200)
        return evaluate(model.set_task("shifted"), DataLoader(ds, batch_size=64))["confusion"].tolist()

    assert res["shifted"]["confusion"] == confusion(own)
    assert res["shifted"]["confusion"] != confusion(D.data_config(model))  # the shared preprocessing differs


def test_confusion_matrix_columns_stay_apart():
    from learnable_memory.cli.evaluate import format_confusion

    names = ["Ankle boot", "T-shirt/top", "Bag"]
    text = format_confusion(torch.tensor([[100000, 2, 3], [4, 5, 6], [7, 8, 9]]), names)
    header, *rows = text.splitlines()
    assert header.split("  ")[-1].strip() == "<- predicted"
    assert [c.strip() for c in header.split("  ") if c.strip()][:3] == ["Ankle boot", "T-shirt/to", "Bag"]
    assert [r.split() for r in rows][0][-3:] == ["100000", "2", "3"]
    assert len({len(line) for line in rows}) == 1 and all(len(r) <= len(header) for r in rows)


def test_predict_gives_topk_for_every_task_as_json_lines(trained, tmp_path, capsys):
    x, _ = D.load_fashion_mnist("test")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(x[i]).save(paths[-1])
    code, text, err = _run(["predict", *paths, "--adapter", trained, "--top-k", "2", "--batch-size", "2"], capsys)
    assert code == 0 and "labelled 3 images (0 could not be read)" in err
    rows = json_rows(text)
    assert outputs_of(text) == ["base", "digits"] and [r["path"] for r in rows] == list(map(str, paths))
    for row in rows:
        base, digits = row["base.topk"], row["digits.topk"]
        assert len(base) == 2 and len(digits) == 2 and row["error"] is None
        assert base[0]["label"] in D.FASHION_MNIST_CLASSES[:5] and digits[0]["label"] in D.DIGITS_CLASSES
        assert base[0]["prob"] >= base[1]["prob"] and 0 < base[0]["prob"] <= 1
        assert (row["base.label"], row["base.index"], row["base.prob"]) == tuple(base[0].values())
    # the base head's answer is the base model's own, for the image of the second batch too
    base_model = D.load_demo_base()
    transform = D.model_transform(D.data_config(base_model))
    with torch.inference_mode():
        for i in (0, 2):
            want = int(base_model(transform(Image.open(paths[i]).convert("L"))[None]).argmax())
            assert rows[i]["base.index"] == want


def test_predict_takes_the_images_after_the_adapters(trained, img, tmp_path, capsys):
    """``--adapter A B img.png`` swallowed the image as an adapter."""
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "task": "digits2"}))
    folder = tmp_path / "more"
    gray_png(folder / "a.png", 10)
    code, text, err = _run(["predict", "--adapter", trained, other, img, folder], capsys)
    assert code == 0, err
    assert outputs_of(text) == ["base", "digits", "digits2"]
    assert [r["path"] for r in json_rows(text)] == [str(img), str(folder / "a.png")]


def test_predict_takes_its_shard_under_accelerate_launch(trained, tmp_path, monkeypatch, capsys):
    paths = [gray_png(tmp_path / f"{i}.png", 30 * i) for i in range(4)]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, text, err = _run(["predict", *paths, "--adapter", trained], capsys)
    assert code == 0, err
    assert [r["path"] for r in json_rows(text)] == list(map(str, paths[2:]))
    code, text, err = _run(["predict", *paths, "--adapter", trained, "--shard", "0/4"], capsys)  # the option wins
    assert [r["path"] for r in json_rows(text)] == [str(paths[0])]


def test_predict_gives_each_task_its_own_preprocessing(tmp_path, capsys):
    """Issue: one pass gave every task the first adapter's preprocessing (a real CLI run, the adapters on disk)."""
    from tests.helpers import demo_model

    model = demo_model()
    other = {**model.data_config(), "mean": (0.5,), "std": (0.25,), "crop_pct": 0.75}
    model.tasks["shoes"].config.data_config = other
    model.save_adapter(tmp_path / "shoes", task="shoes")
    model.save_adapter(tmp_path / "digits", task="digits")
    path = gray_png(tmp_path / "x.png")
    Image.fromarray(D.load_fashion_mnist("test")[0][5]).save(path)
    for order in (["shoes", "digits"], ["digits", "shoes"]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, text, err = _run(["predict", path, "--adapter", *(tmp_path / n for n in order), "--top-k", "1"],
                                   capsys)
        assert code == 0 and "2 pass(es) per batch" in err, err
        assert not [w for w in caught if "preprocessing" in str(w.message)]  # no warning of a mix that is not made
        row = json_rows(text)[0]
        for task, config in (("shoes", other), ("digits", model.data_config())):
            x = D.model_transform(config)(D.open_image(path, "L"))[None]
            with torch.inference_mode():
                want = model.forward_all(x, tasks=[task])[task].softmax(-1).max()
            assert row[f"{task}.prob"] == pytest.approx(float(want), abs=1e-5), (order, task)


def test_predict_writes_a_resumable_dataset_and_refuses_to_mix_another(trained, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i in range(3):
        gray_png(folder / f"{i}.png", 40 * i)
    out = tmp_path / "out"
    code, text, err = _run(["predict", folder, "--adapter", trained, "--out", out, "--part-size", "2"], capsys)
    assert code == 0 and text == "" and f"wrote {out}" in err, err
    import pandas as pd

    assert sorted(pd.read_parquet(out)["path"]) == [str(folder / f"{i}.png") for i in range(3)]
    code, _, err = _run(["predict", folder, "--adapter", trained, "--out", out, "--part-size", "2", "--resume"],
                        capsys)
    assert code == 0 and "3 already done" in err, err
    gray_png(folder / "3.png")
    code, _, err = _run(["predict", folder, "--adapter", trained, "--out", out, "--part-size", "2", "--resume"],
                        capsys)
    assert_one_line_error(code, err, "holds another dataset", "the input images")


def test_inspect_prints_for_humans_and_json(trained, capsys):
    code, text, _ = _run(["inspect", trained], capsys)
    assert code == 0 and "task 'digits'" in text and "memory tokens per block" in text and "training" in text
    code, text, _ = _run(["inspect", trained, "--json"], capsys)
    info = json.loads(text)
    assert info["task"] == "digits" and info["n_mem"] == 2 and info["training"]["total_steps"] == 3


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
    assert_one_line_error(code, err, "digits")
    code, _, err = _run(["train", "--data", "digits", "--extend", trained, "--task", "digits", "--out",
                         tmp_path / "clash", *TINY], capsys)
    assert_one_line_error(code, err, "--task NAME")


# ----- adapters from the Hugging Face Hub -----
@pytest.fixture
def hub(trained, tmp_path, monkeypatch) -> str:
    """``hf-hub:owner/repo``: the trained adapter in an offline Hugging Face cache."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--owner--repo"
    shutil.copytree(trained, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "hf-hub:owner/repo"


def test_inspect_predict_and_eval_take_hub_adapters(hub, img, capsys):
    code, text, err = _run(["inspect", hub, "--json"], capsys)
    assert code == 0, err
    info = json.loads(text)
    assert info["task"] == "digits" and info["training"]["total_steps"] == 3
    code, text, err = _run(["predict", img, "--adapter", hub], capsys)
    assert code == 0, err
    assert outputs_of(text) == ["base", "digits"]
    code, text, err = _run(["eval", hub, "--limit", "50", "--json"], capsys)  # data from its training.json
    assert code == 0, err
    assert json.loads(text)["digits"]["n"] == 50
    code, _, err = _run(["inspect", "hf-hub:owner/missing"], capsys)
    assert_one_line_error(code, err, "hf-hub:owner/missing")


# ----- the base model -----
def test_train_refuses_a_base_it_can_not_rebuild(tmp_path, capsys):
    out = tmp_path / "random"
    code, _, err = _run(["train", "--data", "digits", *SMALL_VIT, "--out", out, *TINY], capsys)
    assert_one_line_error(code, err, "random weights", "--pretrained", "--checkpoint", "--save-base")
    assert not out.exists()


def test_save_base_writes_the_base_the_adapter_points_to(tmp_path, img, capsys):
    """``--save-base``: a random base is written in timm's local-dir format; eval and predict rebuild it
    from ``training.json``, and the adapter records no pretrained weights it did not have."""
    base_dir, out = tmp_path / "base", tmp_path / "adapter"
    code, _, err = _run(["train", "--data", "digits", *SMALL_VIT, "--save-base", base_dir, "--out", out, *TINY],
                        capsys)
    assert code == 0, err
    assert (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file()
    assert json.loads((out / "training.json").read_text())["base"]["model"] == str(base_dir.resolve())
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model"]
    assert recorded["architecture"] == "vit_tiny_patch16_224"
    assert recorded["tag"] is None and recorded["hf_hub_id"] is None
    code, text, err = _run(["predict", img, "--adapter", out], capsys)
    assert code == 0, err
    assert outputs_of(text) == ["base", "digits"]
    code, text, err = _run(["eval", out, "--limit", "20", "--json"], capsys)
    assert code == 0 and json.loads(text)["digits"]["n"] == 20, err
    code, _, err = _run(["train", "--data", "digits", *SMALL_VIT, "--save-base", base_dir, "--out",
                         tmp_path / "again", *TINY], capsys)
    assert_one_line_error(code, err, "already exists", "--save-base")


def test_checkpoint_base_records_no_pretrained_tag_and_fingerprint_advice_names_options(tmp_path, img, capsys):
    torch.manual_seed(0)
    kwargs = json.loads(SMALL_VIT[3])
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **kwargs)
        save_file(vit.state_dict(), str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "adapter"
    code, _, err = _run(["train", "--data", "digits", *SMALL_VIT, "--checkpoint", tmp_path / "a.safetensors",
                         "--out", out, *TINY], capsys)
    assert code == 0, err
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model"]
    assert recorded["tag"] is None and recorded["hf_hub_id"] is None
    other = [*SMALL_VIT, "--checkpoint", tmp_path / "b.safetensors"]  # same shape, other weights
    code, _, err = _run(["predict", img, "--adapter", out, *other], capsys)
    assert_one_line_error(code, err, "other weights", "--no-fingerprint-check")
    assert "check_fingerprint" not in err
    code, text, err = _run(["predict", img, "--adapter", out, *other, "--no-fingerprint-check"], capsys)
    assert code == 0, err


def test_a_base_rebuilt_from_its_checkpoint_keeps_its_preprocessing_and_label_names(trained, img, capsys):
    exported = json.loads((D.DEMO_BASE_DIR / "config.json").read_text())
    kwargs = {k: v for k, v in exported["model_args"].items() if k != "num_classes"}
    rebuilt = ["--model", exported["architecture"], "--checkpoint", D.DEMO_BASE_DIR / "model.safetensors",
               "--model-kwargs", json.dumps(kwargs)]
    code, text, err = _run(["predict", img, "--adapter", trained, "--top-k", "5", *rebuilt], capsys)
    assert code == 0, err
    code, want, err = _run(["predict", img, "--adapter", trained, "--top-k", "5"], capsys)  # the shipped base
    assert code == 0, err
    (got,), (shipped,) = json_rows(text), json_rows(want)
    assert got == shipped
    assert {x["label"] for x in got["base.topk"]} == set(exported["label_names"])


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


# ----- bad input: one line, exit status 2 -----
@pytest.mark.parametrize("argv, needles", [
    (["train", "--data", "/no/such/folder", *TINY], ["not found"]),
    (["train", "--data", "digits", "--model", "vit_no_such_model", *TINY], ["unknown timm model"]),
    (["train", "--data", "digits", "--class-subset", "11", *TINY], ["out of range"]),
    (["train", "--data", "digits", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["train", "--data", "digits", "--n-mem", "-1"], ["--n-mem", ">= 0"]),
    (["train", "--data", "digits", "--val-fraction", "1.5"], ["--val-fraction", "between 0 and 1"]),
    (["train", "--data", "digits", "--task", ""], ["--task", "empty"]),
    (["train", "--data", "digits", "--weight-decay", "-1"], ["--weight-decay", ">= 0"]),
    (["train", "--data", "digits", "--seed", "-1"], ["--seed", ">= 0"]),
    (["train", "--resume", "hf-hub:owner/repo", *TINY], ["--out DIR"]),
    (["train", "--data", "digits", *SMALL_VIT[:2], "--model-kwargs", '{"no_such_argument": 1}', "--save-base",
      "{tmp}/b", *TINY], ["--model-kwargs", "no_such_argument"]),
    (["inspect", "/no/such/adapter"], ["/no/such/adapter", "no such adapter folder"]),
    (["predict", "/no/such.png", "--adapter", "{trained}"], ["/no/such.png not found"]),
    (["predict", "{trained}", "--adapter", "{trained}"], ["no images found"]),
    (["predict", "--adapter", "{trained}", "/no/such.png"], ["image /no/such.png not found"]),
    (["predict", "{img}", "--adapter", "{trained}", "--format", "csv"], ["--format csv needs --out"]),
    (["predict", "@{tmp}/none.txt", "--adapter", "{trained}"], ["list @", "can not be read"]),
    (["predict", "{tmp}/no-path.csv", "--adapter", "{trained}"], ["no-path.csv has no 'path' column"]),
    (["predict", "{img}", "--adapter", "{trained}", "--out", "{trained}"], ["holds other files"]),
    (["predict", "{img}", "--adapter", "{trained}", "--shard", "3/3"], ["--shard", "I/N"]),
    (["predict", "{img}", "--adapter", "{trained}", "--tasks", "digits,nope"], ["unknown task", "--tasks"]),
    (["predict", "{img}", "--adapter", "{trained}", "--resume"], ["--resume needs --out"]),
    (["predict", "{img}", "--adapter", "{trained}", "--dtype", "float16"], ["float16"]),
    (["predict", "{img}", "--adapter", "{trained}", "--top-k", "-1"], ["--top-k", ">= 1"]),
    (["predict", "{img}", "--adapter", "{trained}", "--top-k", "0"], ["--top-k", ">= 1"]),
    (["predict", "{img}", "--adapter", "{trained}", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["predict", "{img}", "--adapter", "{trained}", *SMALL_VIT], ["random weights", "--pretrained"]),
    (["predict", "{img}", "--adapter", "{trained}", "--model", "vit_tiny_patch16_224", "--model-kwargs", "[1]"],
     ["--model-kwargs", "JSON object"]),
    (["predict", "{img}", "--adapter", "{trained}", "{trained}"], ["two adapters hold task 'digits'"]),
    (["eval", "{trained}", "--data", "nosuchtask=digits"], ["unknown task"]),
    (["eval", "{trained}", "--pretrained"], ["--pretrained needs --model"]),
    (["eval", "{trained}", "--limit", "0"], ["--limit", ">= 1"]),
])
def test_bad_input_gives_one_line_error(argv, needles, trained, img, tmp_path, capsys):
    (tmp_path / "no-path.csv").write_text("file,sku\nx.png,1\n")
    argv = [str(a).replace("{trained}", str(trained)).replace("{img}", str(img)).replace("{tmp}", str(tmp_path))
            for a in argv]
    assert_one_line_error(*_run(argv, capsys)[::2], *needles)


def test_unreadable_images_are_named_and_the_run_goes_on(trained, tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:400])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    code, text, err = _run(["predict", good, truncated, not_an_image, "--adapter", trained], capsys)
    assert code == 0 and "labelled 3 images (2 could not be read)" in err
    rows = json_rows(text)
    assert rows[0]["error"] is None and rows[0]["digits.label"] in D.DIGITS_CLASSES
    for row, path in zip(rows[1:], (truncated, not_an_image), strict=True):
        assert row["error"].startswith(f"image {path} can not be read") and row["digits.label"] is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 28x28 is then over twice the limit: a "bomb"
    code, text, err = _run(["predict", good, "--adapter", trained], capsys)
    assert code == 0 and "too large" in json_rows(text)[0]["error"]


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "{not json", '{"base": 5}', '{"base": {"model": 7}}',
                                     '{"base": {"weights": "x"}}', '{"data": ["digits"]}'])
def test_malformed_training_json_is_named(content, trained, img, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter)
    record = adapter / "training.json"
    record.write_text(content)
    for argv in (["inspect", adapter], ["predict", img, "--adapter", adapter], ["eval", adapter]):
        code, _, err = _run(argv, capsys)
        assert_one_line_error(code, err, str(record))


def test_unsupported_model_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys):
    base_dir = tmp_path / "base"
    code, _, err = _run(["train", "--data", "digits", "--model", "test_convnext", "--save-base", base_dir, *TINY],
                        capsys)
    assert_one_line_error(code, err, "ConvNeXt")
    assert not base_dir.exists()


def test_unexpected_errors_show_as_bugs(trained, monkeypatch):
    """Only bad input is a one-line error; a TypeError from a bug keeps its traceback."""
    import learnable_memory.adapters.folder as folder

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(folder, "inspect_adapter", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["inspect", str(trained)])


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="no such adapter folder"):
        main(["inspect", "/no/such/adapter", "--debug"])


@pytest.mark.integration
def test_train_under_accelerate_launch_with_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "learnable_memory", "train", "--data", "digits", "--n-mem", "2", "--steps", "4", "--batch-size", "16",
           "--max-train", "64", "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1800)  # loaded machine
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "training.json").read_text())
    assert info["settings"]["processes"] == 2 and info["total_steps"] == 4
    assert r.stdout.count("saved adapter") == 1  # only the main process writes
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    load_adapters(D.load_demo_base(), [out])


# ----- resuming, checkpoints, the recorded validation split -----
def test_resume_reuses_the_recorded_settings_and_never_writes_over_the_adapter(tmp_path, capsys):
    first = tmp_path / "a"
    code, _, err = _run(["train", "--data", "digits", "--n-mem", "2", "--optimizer", "adamw", "--lr", "0.01",
                         "--batch-size", "16", "--max-train", "48", "--steps", "3", "--no-val", "--no-progress",
                         "--out", first], capsys)
    assert code == 0, err
    before = (first / "adapter_model.safetensors").read_bytes()
    code, text, err = _run(["train", "--resume", first, "--steps", "2", "--no-progress"], capsys)
    assert code == 0, err
    resumed = tmp_path / "a-resumed"
    assert f"resuming {first} at step 3 of its schedule" in text and f"saved adapter {resumed}" in text
    assert (first / "adapter_model.safetensors").read_bytes() == before  # the original is kept
    info = json.loads((resumed / "training.json").read_text())
    s = info["settings"]
    assert (s["optimizer"], s["lr"], s["batch_size"], s["max_train"], s["no_val"]) == ("adamw", 0.01, 16, 48, True)
    assert info["total_steps"] == 5 and info["planned_steps"] == 5 and info["complete"]
    state = torch.load(resumed / "training_state.pt", weights_only=True)
    assert state["step"] == 5 and state["optimizer_names"] == {"digits": "adamw"}
    assert state["optimizers"]["digits"]["state"]  # Adam's moments travel with the adapter
    code, _, err = _run(["train", "--resume", resumed, "--steps", "1", "--lr", "0.02", "--no-progress"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "a-resumed-2" / "training.json").read_text())["settings"]
    assert (again["lr"], again["optimizer"], again["batch_size"]) == (0.02, "adamw", 16)
    code, _, err = _run(["train", "--resume", first, "--out", first, "--steps", "1"], capsys)
    assert_one_line_error(code, err, "is the adapter being resumed", "--overwrite")
    code, _, err = _run(["train", "--resume", first], capsys)
    assert_one_line_error(code, err, "finished its 3 steps", "--steps N")


def test_save_every_keeps_the_last_checkpoint_when_interrupted(tmp_path, monkeypatch, capsys):
    import learnable_memory.cli.train_run as train_cli

    out, calls = tmp_path / "ck", []
    save = train_cli.save_adapter_run

    def interrupt_the_second(*args, **kwargs):  # Ctrl-C while step 4 is being saved
        if calls:
            raise KeyboardInterrupt
        calls.append(save(*args, **kwargs))

    monkeypatch.setattr(train_cli, "save_adapter_run", interrupt_the_second)
    argv = ["train", "--data", "digits", "--n-mem", "2", "--steps", "6", "--batch-size", "16", "--max-train", "48",
            "--no-val", "--no-progress"]
    code, _, err = _run([*argv, "--save-every", "2", "--out", out], capsys)
    assert code == 130 and calls == [out]
    assert err == (f"learnable-memory: interrupted (Ctrl-C): the checkpoint of step 2 is in {out}; continue with: "
                   f"learnable-memory train --resume {out}\n")
    info = json.loads((out / "training.json").read_text())
    assert (info["total_steps"], info["planned_steps"], info["complete"]) == (2, 6, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no half-written folder is left
    monkeypatch.setattr(train_cli, "save_adapter_run", save)
    code, text, err = _run(["train", "--resume", out, "--no-progress"], capsys)  # the rest of the schedule
    assert code == 0, err
    assert "at step 2 of its schedule (epoch 1, after batch 2)" in text
    info = json.loads((tmp_path / "ck-resumed" / "training.json").read_text())
    assert (info["total_steps"], info["settings"]["steps"], info["complete"]) == (6, 4, True)
    code, _, err = _run([*argv, "--out", tmp_path / "straight"], capsys)  # uninterrupted: the same adapter
    assert code == 0, err
    task = info["task"]
    assert_same_adapter(tmp_path / "straight", tmp_path / "ck-resumed", task)


def test_eval_rebuilds_the_validation_split_of_a_val_fraction_adapter(trained, tmp_path, capsys):
    root = tmp_path / "pets"  # no val/test folder: only the training run's held-out images can evaluate it
    for label, value in (("cat", 30), ("dog", 220)):
        for i in range(10):
            gray_png(root / label / f"{i}.png", value + i)
    out = tmp_path / "pets-adapter"
    code, _, err = _run(["train", "--data", root, "--val-fraction", "0.25", "--max-train", "16", "--steps", "2",
                         "--batch-size", "8", "--no-progress", "--out", out, "--seed", "3"], capsys)
    assert code == 0, err
    info = json.loads((out / "training.json").read_text())
    assert info["validation"] == {"split": "held_out", "fraction": 0.25, "seed": 3, "max_train": 16}
    code, text, err = _run(["eval", out, "--split", "val", "--json"], capsys)
    assert code == 0, err
    assert json.loads(text)["pets"]["n"] == 4  # 25% of the 16 training images
    code, text, err = _run(["eval", trained, out, "--json"], capsys)  # one such adapter no longer aborts the rest
    assert code == 0, err
    results = json.loads(text)
    assert results["pets"]["n"] == 4 and results["digits"]["n"] > 0
    assert "task 'pets': " in err and "has no test split" in err


@pytest.mark.integration
def test_sigterm_keeps_the_last_checkpoint_and_exits_in_one_line(tmp_path):
    import signal

    out = tmp_path / "long"
    cmd = [sys.executable, "-m", "learnable_memory", "train", "--data", "digits", "--n-mem", "1", "--steps", "100000",
           "--save-every", "1", "--batch-size", "8", "--max-train", "32", "--no-val", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    err = signal_when_written(proc, out / "training.json", signal.SIGTERM)  # after the first checkpoint
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("learnable-memory: interrupted (SIGTERM): the checkpoint of step")
    info = json.loads((out / "training.json").read_text())
    assert not info["complete"] and f"step {info['total_steps']} is in {out}" in last
    load_adapters(D.load_demo_base(), [out])


# ----- sweeps -----
def test_sweep_trains_the_grid_in_one_run_as_each_configuration_alone(tmp_path, capsys):
    out = tmp_path / "sw"
    common = ["--data", "digits", "--steps", "3", "--batch-size", "16", "--max-train", "48", "--no-progress"]
    code, text, err = _run(["train", *common, "--sweep", "lr=0.1,0.3", "--sweep", "n-mem=1,2", "--sweep",
                            "seed=0,4", "--out", out], capsys)
    assert code == 0, err
    names = [f"lr-{lr}_n-mem-{m}_seed-{s}" for lr in (0.1, 0.3) for m in (1, 2) for s in (0, 4)]
    assert all((out / n / "adapter_config.json").is_file() for n in names)
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert [r["best"] for r in rows] == sorted((r["best"] for r in rows), reverse=True)
    assert (out / "best" / "adapter_config.json").read_text() == (out / rows[0]["name"] / "adapter_config.json"
                                                                  ).read_text()
    assert (out / "sweep.png").stat().st_size > 0 and len((out / "sweep.csv").read_text().splitlines()) == 9
    assert text.splitlines()[-10].split()[:4] == ["rank", "lr", "n-mem", "seed"]
    info = json.loads((out / names[-1] / "training.json").read_text())
    assert (info["settings"]["lr"], info["task"]) == (0.3, names[-1])
    assert (info["settings"]["seed"], info["settings"]["init_seed"]) == (0, 4)  # the data order keeps --seed
    # configurations trained alone by train with the same settings: the data order of --seed 0, the init seed
    for seed, extra in ((0, []), (4, ["--init-seed", "4"])):
        alone = tmp_path / f"alone-{seed}"
        torch.manual_seed(0)
        code, _, err = _run(["train", *common, "--lr", "0.3", "--n-mem", "2", *extra, "--out", alone], capsys)
        assert code == 0, err
        assert json.loads((alone / "training.json").read_text())["settings"]["init_seed"] == seed
        a = load_adapters(D.load_demo_base(), [alone]).tasks["digits"]
        name = f"lr-0.3_n-mem-2_seed-{seed}"
        b = load_adapters(D.load_demo_base(), [out / name]).tasks[name]
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sweep, needle", [("lr=abc", "lr='abc'"), ("foo=1", "can not sweep 'foo'"),
                                           ("lr", "KEY=V1,V2"), ("lr=0.1,0.1", "twice"),
                                           ("optimizer=lion", "not sgd or adamw"),
                                           ("seed=1,2 --sweep init-seed=3", "init-seed and seed are one option")])
def test_bad_sweeps_are_one_line_errors(sweep, needle, tmp_path, capsys):
    code, _, err = _run(["train", "--data", "digits", "--sweep", *sweep.split(), *TINY, "--out", tmp_path / "x"],
                        capsys)
    assert_one_line_error(code, err, "--sweep", needle)
    assert not (tmp_path / "x").exists()


def test_labels_file_trains_an_adapter_per_column_in_one_run(tmp_path, capsys):
    rows = ["path,shade,size"]
    for i in range(24):
        gray_png(tmp_path / "img" / f"{i}.png", 20 + 9 * i)
        rows.append(f"img/{i}.png,{'dark' if i < 12 else 'light'},{'' if i % 5 == 0 else ('s', 'm', 'l')[i % 3]}")
    (tmp_path / "attrs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "attrs"
    code, text, err = _run(["train", "--labels", tmp_path / "attrs.csv", "--n-mem", "1", "--steps", "3",
                            "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--out", out], capsys)
    assert code == 0, err
    model = load_adapters(D.load_demo_base(), [out / "shade", out / "size"])
    assert model.tasks["shade"].config.class_names == ["dark", "light"]
    assert model.tasks["size"].config.class_names == ["l", "m", "s"]
    assert "shade: 2 classes; best validation accuracy" in text
    info = json.loads((out / "size" / "training.json").read_text())
    assert info["validation"]["fraction"] == 0.25 and info["task"] == "size"
    code, _, err = _run(["train", "--labels", tmp_path / "attrs.csv", "--tasks", "size", "--steps", "1",
                         "--no-progress", "--out", tmp_path / "only"], capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "only").iterdir()) == ["size"]
    (tmp_path / "bad.csv").write_text("file,shade\nimg/0.png,dark\n")
    code, _, err = _run(["train", "--labels", tmp_path / "bad.csv", "--steps", "1"], capsys)
    assert_one_line_error(code, err, "has no 'path' column")
    code, _, err = _run(["train", "--labels", tmp_path / "attrs.csv", "--tasks", "colour", "--steps", "1"], capsys)
    assert_one_line_error(code, err, "no label column ['colour']")


def test_an_interrupted_sweep_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    import learnable_memory.cli.sweep as sweep_cli

    out, calls = tmp_path / "sw", []
    save = sweep_cli.save_configs

    def interrupt_the_second(*args, complete=True, **kwargs):  # Ctrl-C while step 4 is being saved
        if calls and not complete:
            raise KeyboardInterrupt
        calls.append(complete)
        save(*args, complete=complete, **kwargs)

    monkeypatch.setattr(sweep_cli, "save_configs", interrupt_the_second)
    argv = ["train", "--data", "digits", "--steps", "6", "--save-every", "2", "--batch-size", "16", "--max-train",
            "48", "--no-val", "--no-progress", "--optimizer", "adamw", "--lr", "0.01"]
    code, _, err = _run([*argv, "--sweep", "n-mem=1,2", "--out", out], capsys)
    assert code == 130 and "the checkpoint of step 2 is in" in err, err
    names = ["n-mem-1", "n-mem-2"]
    assert [json.loads((out / n / "training.json").read_text())["total_steps"] for n in names] == [2, 2]
    monkeypatch.setattr(sweep_cli, "save_configs", save)
    code, text, err = _run(["train", "--resume", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "from step 2" in text
    done = tmp_path / "sw-resumed"
    for n in names:
        info = json.loads((done / n / "training.json").read_text())
        assert (info["total_steps"], info["complete"], info["settings"]["optimizer"]) == (6, True, "adamw")
    assert load_adapters(D.load_demo_base(), [done / n for n in names]).task_names == names
    code, _, err = _run([*argv, "--sweep", "n-mem=1,2", "--out", tmp_path / "straight"], capsys)  # uninterrupted
    assert code == 0, err
    for n in names:
        assert_same_adapter(tmp_path / "straight" / n, done / n, n)
    code, _, err = _run(["train", "--resume", out, "--sweep", "lr=0.1"], capsys)
    assert_one_line_error(code, err, "drop --sweep")


def assert_same_adapter(a: Path, b: Path, task: str) -> None:
    """The adapter folders ``a`` and ``b`` (of task ``task``) hold equal tensors."""
    x = load_adapters(D.load_demo_base(), [a]).tasks[task].state_dict()
    y = load_adapters(D.load_demo_base(), [b]).tasks[task].state_dict()
    assert x.keys() == y.keys()
    for key, value in x.items():
        assert torch.equal(y[key], value), (a, key)


@pytest.mark.integration
def test_a_sweep_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapters(tmp_path):
    """kill -9 after the first checkpoint, then --resume OUT: every configuration ends where the sweep that
    was never stopped ends (the data position, the random states and the best validation so far are in the
    checkpoint)."""
    import signal

    argv = [sys.executable, "-m", "learnable_memory", "train", "--data", "digits", "--steps", "40", "--batch-size",
            "16", "--max-train", "48", "--val-fraction", "0.25", "--no-progress", "--sweep", "lr=0.1,0.3", "--n-mem",
            "1"]  # each configuration saved at its best validation, which may come before the kill
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    straight, out = tmp_path / "straight", tmp_path / "sw"
    r = subprocess.run([*argv, "--out", str(straight)], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen([*argv, "--save-every", "2", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    err = signal_when_written(proc, out / "sweep_state.json", signal.SIGKILL)  # after the first checkpoint
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    step = json.loads((out / "sweep_state.json").read_text())["step"]
    assert 2 <= step < 40
    r = subprocess.run([*argv[:4], "--resume", str(out), "--no-progress"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"from step {step}" in r.stdout
    for n in ("lr-0.1", "lr-0.3"):
        assert_same_adapter(straight / n, tmp_path / "sw-resumed" / n, n)

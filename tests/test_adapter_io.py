"""Adapter folders: format, round trips, concatenation, refusals, atomic saves and the Hub cache."""

from __future__ import annotations

import copy
import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import learnable_memory as lm
from learnable_memory import load_adapters
from learnable_memory import testing as lmt
from learnable_memory.adapters.fingerprint import base_fingerprint
from learnable_memory.adapters.folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    inspect_adapter,
    save_adapter,
    save_pretrained,
)
from tests.helpers import make_vit

ROOT = Path(__file__).resolve().parents[1]


def trained(name="a", n_mem=3, num_classes=5, mode="non_destructive", seed=10, base=None, **kw):
    """A task trained on its own copy of the backbone (random parameters stand in for training)."""
    model = lm.wrap_model(base if base is not None else make_vit(), n_mem=n_mem, num_classes=num_classes,
                          task=name, mode=mode, **kw)
    lmt.randomize(model, seed=seed, tasks=[name])  # this task only: earlier tasks stay as saved
    return model


def outputs(model, images):
    with torch.no_grad():
        return model.forward_all(images)


def assert_same(got, want, exact=False):
    if exact:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def edit_json(folder: Path, **changes):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


# ----- format -----
def test_layout_config_and_tensor_names(tmp_path):
    model = trained(class_names=list("vwxyz"))
    path = model.save_adapter(tmp_path / "a")
    assert path == tmp_path / "a"
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    text = (path / CONFIG_NAME).read_text()
    cfg = json.loads(text)
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    assert (cfg["format_version"], cfg["method"], cfg["task"], cfg["mode"]) == (2, "learnable_memory", "a",
                                                                                "non_destructive")
    assert (cfg["n_mem"], cfg["num_classes"], cfg["class_names"], cfg["depends_on"]) == (3, 5, list("vwxyz"), [])
    base = cfg["base_model"]
    assert (base["architecture"], base["class"], base["embed_dim"], base["depth"], base["num_prefix_tokens"]) == (
        "vit_tiny_patch16_224", "VisionTransformer", 192, 2, 1)
    assert base["fingerprint"] == base_fingerprint(model.base)
    pre = cfg["preprocessing"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == [0.5] * 3 and pre["interpolation"] == "bicubic"
    tensors = safetensors.torch.load_file(path / WEIGHTS_NAME)
    task = model.tasks["a"]
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        "memory": [2, 3, 192], "class_token": [192], "head.weight": [5, 192], "head.bias": [5]}
    assert torch.equal(tensors["memory"], task.memory) and torch.equal(tensors["head.bias"], task.head.bias)
    # the recorded architecture and arguments rebuild the backbone (same seed: same weights)
    torch.manual_seed(0)
    rebuilt = timm.create_model(base["architecture"], pretrained=False, **base["model_args"])
    assert base_fingerprint(rebuilt) == base["fingerprint"]


def test_inspect_adapter(tmp_path):
    path = trained(n_mem=4, num_classes=3, class_names=["x", "y", "z"]).save_adapter(tmp_path / "a")
    info = inspect_adapter(path)
    assert (info["task"], info["mode"], info["n_mem"], info["num_classes"]) == ("a", "non_destructive", 4, 3)
    assert info["class_names"] == ["x", "y", "z"]
    assert info["base_model"]["architecture"] == "vit_tiny_patch16_224"
    assert info["num_params"] == 2 * 4 * 192 + 192 + 3 * 192 + 3
    assert info["file_size"] == (path / CONFIG_NAME).stat().st_size + (path / WEIGHTS_NAME).stat().st_size


def test_vit_base_adapter_is_well_under_1mb(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    model = lm.wrap_model(vit, n_mem=10, num_classes=100)
    info = inspect_adapter(model.save_adapter(tmp_path / "b16"))
    assert info["num_params"] == 12 * 10 * 768 + 768 + 100 * 768 + 100
    assert info["file_size"] < 0.75e6, info["file_size"]


# ----- round trips and concatenation -----
def test_round_trip_on_fresh_backbone(tmp_path, images):
    model = trained(class_names=list("abcde"))
    save_adapter(model, tmp_path / "a")
    loaded = load_adapters(make_vit(), [tmp_path / "a"])
    got, want = outputs(loaded, images), outputs(model, images)
    assert got.keys() == want.keys() == {"base", "a"}
    for k in want:
        assert_same(got[k], want[k], exact=True)
    assert loaded.tasks["a"].config.class_names == list("abcde")
    assert loaded.tasks["a"].config.data_config["input_size"] == [3, 32, 32]  # the preprocessing it was trained with
    assert loaded.active_task == "a"
    assert not any(p.requires_grad for p in loaded.parameters())
    resumed = load_adapters(make_vit(), tmp_path / "a", trainable=True)
    assert all(p.requires_grad for t in resumed.tasks.values() for p in t.parameters())
    assert not any(p.requires_grad for p in resumed.base.parameters())


def test_full_mode_round_trip(tmp_path, images):
    model = trained(mode="full", n_mem=4)
    want = outputs(model, images)
    model.save_adapter(tmp_path / "full")
    got = outputs(load_adapters(make_vit(), [tmp_path / "full"]), images)
    assert got.keys() == want.keys() == {"a"}
    assert_same(got["a"], want["a"], exact=True)


def test_three_adapters_one_pass(tmp_path, images):
    alone = {}
    for i, (name, n_mem) in enumerate([("a", 3), ("b", 5), ("c", 0)]):
        m = trained(name, n_mem=n_mem, num_classes=4 + i, seed=20 + i)
        alone[name] = outputs(m, images)[name]
        save_adapter(m, tmp_path / name)
    vit = make_vit()
    with torch.no_grad():
        base_out = vit(images)
    merged = load_adapters(vit, [tmp_path / n for n in "abc"])
    got = outputs(merged, images)
    assert list(got) == ["base", "a", "b", "c"]
    assert torch.equal(got["base"], base_out)
    for name in "abc":
        assert_same(got[name], alone[name])


def test_preprocessing_kept_and_conflicts_warned(tmp_path):
    trained("a", seed=1).save_adapter(tmp_path / "a")
    edit_json(tmp_path / "a", preprocessing={"input_size": [3, 32, 32], "mean": [0.2] * 3, "std": [0.3] * 3,
                                             "interpolation": "bilinear"})
    loaded = load_adapters(make_vit(), tmp_path / "a")
    loaded.save_adapter(tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["preprocessing"]["mean"] == [0.2] * 3
    trained("b", seed=2).save_adapter(tmp_path / "b")
    with pytest.warns(UserWarning, match=r"different preprocessing.*\[\['a'\], \['b'\]\]"):
        load_adapters(loaded, tmp_path / "b")


def test_load_onto_memory_vit_and_save_pretrained(tmp_path, images):
    b = trained("b", seed=2)
    b.save_adapter(tmp_path / "b")
    a = trained("a", base=b.base, seed=1)  # a task in memory, sharing the backbone
    before = outputs(a, images)
    both = load_adapters(a, [tmp_path / "b"])
    assert both is not a and a.task_names == ["a"] and both.task_names == ["a", "b"]
    got = outputs(both, images)
    assert_same(got["a"], before["a"])
    assert_same(got["b"], outputs(b, images)["b"])
    both.save_pretrained(tmp_path / "both")
    assert json.loads((tmp_path / "both" / "adapters.json").read_text())["adapters"] == [
        {"task": "a", "folder": "a"}, {"task": "b", "folder": "b"}]
    again = load_adapters(make_vit(), tmp_path / "both")
    assert again.task_names == ["a", "b"]
    for k, v in outputs(again, images).items():
        assert_same(v, got[k], exact=True)
    with pytest.raises(ValueError, match="adapter folder"):
        save_pretrained(both, tmp_path / "b")


def extension_chain(tmp_path):
    """a (non-destructive), b extends a, c extends a and b; saved separately and together."""
    a = trained("a", seed=1)
    b = trained("b", mode="extension", base=a, seed=2)
    c = trained("c", mode="extension", base=b, seed=3)
    assert c.tasks["c"].config.depends_on == ["a", "b"]
    for name in "abc":
        c.save_adapter(tmp_path / name, task=name)
    return c


def test_extension_round_trip_and_dependencies(tmp_path, images):
    c = extension_chain(tmp_path)
    want = outputs(c, images)
    got = outputs(load_adapters(make_vit(), [tmp_path / n for n in "abc"]), images)
    for k in want:
        assert_same(got[k], want[k], exact=True)
    cfg = json.loads((tmp_path / "c" / CONFIG_NAME).read_text())
    assert [d["name"] for d in cfg["depends_on"]] == ["a", "b"]
    with pytest.raises(ValueError, match=r"c/adapter_config.json: extension task 'c' .*later: \['b'\]"):
        load_adapters(make_vit(), [tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match=r"b/adapter_config.json: .*later: \['a'\].*load the adapters of the"):
        load_adapters(make_vit(), [tmp_path / "b"])
    # z extends x and y, two independent tasks: they must come in the order z was trained with
    trained("x", seed=4).save_adapter(tmp_path / "x")
    trained("y", seed=5).save_adapter(tmp_path / "y")
    xy = load_adapters(make_vit(), [tmp_path / "x", tmp_path / "y"])
    z = trained("z", mode="extension", base=xy, seed=6)
    z.save_adapter(tmp_path / "z")
    with pytest.raises(ValueError, match=r"z/adapter_config.json.*order \['x', 'y'\].*as \['y', 'x'\]"):
        load_adapters(make_vit(), [tmp_path / n for n in "yxz"])
    interleaved = load_adapters(make_vit(), [tmp_path / n for n in "xayz"])  # an unrelated task between is fine
    assert interleaved.task_names == list("xayz")
    assert_same(outputs(interleaved, images)["z"], outputs(z, images)["z"])
    # another task named "a" is not the one b was trained on
    trained("a", seed=99).save_adapter(tmp_path / "other_a")
    with pytest.raises(ValueError, match=r"task 'a' here is not the one extension task 'b'"):
        load_adapters(make_vit(), [tmp_path / "other_a", tmp_path / "b"])
    # renaming a predecessor renames the dependency too
    renamed = load_adapters(make_vit(), [tmp_path / n for n in "abc"], rename={"a": "first"})
    assert renamed.task_names == ["first", "b", "c"]
    assert renamed.tasks["c"].config.depends_on == ["first", "b"]
    assert_same(outputs(renamed, images)["c"], want["c"], exact=True)


# ----- refusals -----
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"embed_dim": 96, "num_heads": 3}, r"width \(embed_dim\) 192 vs 96"),
    ({"depth": 3}, "depth 2 vs 3"),
    ({"seed": 5}, "same shape but other weights"),
])
def test_refuses_other_backbone(tmp_path, kwargs, match):
    trained().save_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match=match) as err:
        load_adapters(make_vit(**kwargs), tmp_path / "a")
    assert str(tmp_path / "a" / CONFIG_NAME) in str(err.value)


def test_fingerprint_override_and_base_head(tmp_path, images):
    model = trained()
    model.save_adapter(tmp_path / "a")
    other = make_vit(seed=5)
    assert not any(p.requires_grad for p in load_adapters(other, tmp_path / "a", check_fingerprint=False).parameters())
    # the base classifier is no part of the fingerprint: same backbone, other head
    vit = make_vit()
    vit.reset_classifier(3)
    loaded = load_adapters(vit, tmp_path / "a")
    assert_same(outputs(loaded, images)["a"], outputs(model, images)["a"], exact=True)


def test_fingerprint_leaves_out_both_distilled_heads():
    a = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2, num_classes=10)
    b = copy.deepcopy(a)
    b.reset_classifier(3)  # replaces head and head_dist
    assert base_fingerprint(a) == base_fingerprint(b)
    with torch.no_grad():
        b.blocks[0].attn.qkv.weight.add_(1e-3)
    assert base_fingerprint(a) != base_fingerprint(b)


def test_refuses_full_mode_with_others(tmp_path):
    trained("f", mode="full").save_adapter(tmp_path / "f")
    trained("a").save_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match=r"f/adapter_config.json: task\(s\) \['f'\] use mode 'full'"):
        load_adapters(make_vit(), [tmp_path / "a", tmp_path / "f"])
    with pytest.raises(ValueError, match="mode 'full'"):
        load_adapters(load_adapters(make_vit(), tmp_path / "f"), tmp_path / "a")


def test_same_names_and_rename(tmp_path, images):
    one, two = trained("default", seed=1), trained("default", seed=2)
    one.save_adapter(tmp_path / "one")
    two.save_adapter(tmp_path / "two")
    with pytest.raises(ValueError, match=r"two/adapter_config.json: duplicate task name 'default'.*one/.*rename"):
        load_adapters(make_vit(), [tmp_path / "one", tmp_path / "two"])
    merged = load_adapters(make_vit(), [tmp_path / "one", tmp_path / "two"], rename=[None, "second"])
    assert merged.task_names == ["default", "second"]
    got = outputs(merged, images)
    assert_same(got["second"], outputs(two, images)["default"])
    assert_same(got["default"], outputs(one, images)["default"])
    with pytest.raises(ValueError, match="duplicate task name 'default'.*the other is already in the model"):
        load_adapters(one, tmp_path / "two")
    assert load_adapters(one, tmp_path / "two", rename={"default": "b"}).task_names == ["default", "b"]
    with pytest.raises(ValueError, match=r"rename has \['typo'\]"):
        load_adapters(make_vit(), tmp_path / "one", rename={"typo": "x"})
    with pytest.raises(ValueError, match="reserved"):
        load_adapters(make_vit(), tmp_path / "one", rename={"default": "base"})


def _drop_head_bias(folder: Path):
    tensors = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    del tensors["head.bias"]
    safetensors.torch.save_file(tensors, folder / WEIGHTS_NAME)


def _no_metadata(weights: Path) -> bytes:
    """The tensor file without the config it carries (a file that is not one of our saves)."""
    return safetensors.torch.save(safetensors.torch.load_file(weights))


CORRUPTIONS = {
    "missing config, tensors without their config": (
        lambda f: ((f / CONFIG_NAME).unlink(), (f / WEIGHTS_NAME).write_bytes(_no_metadata(f / WEIGHTS_NAME))),
        CONFIG_NAME, "missing"),
    "missing tensors": (lambda f: (f / WEIGHTS_NAME).unlink(), WEIGHTS_NAME, "missing"),
    "truncated tensors": (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:-100]),
                          WEIGHTS_NAME, "truncated"),
    "truncated config": (lambda f: (f / CONFIG_NAME).write_text((f / CONFIG_NAME).read_text()[:50]),
                         CONFIG_NAME, "not valid JSON"),
    "wrong method": (lambda f: edit_json(f, method="lora"), CONFIG_NAME, "not a learnable-memory adapter"),
    "unknown version": (lambda f: edit_json(f, format_version=7), CONFIG_NAME, "unknown format_version 7"),
    "shapes vs config": (lambda f: edit_json(f, n_mem=5), WEIGHTS_NAME, r"'memory' has shape \[2, 3, 192\]"),
    "missing tensor name": (_drop_head_bias, WEIGHTS_NAME, r"missing \['head.bias'\]"),
    "missing field": (lambda f: edit_json(f, base_model=None), CONFIG_NAME, "'base_model' is null, expected an object"),
    "bad mode": (lambda f: edit_json(f, mode="sideways"), CONFIG_NAME, "unknown mode"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_refuses_damaged_files(tmp_path, case):
    spoil, file, match = CORRUPTIONS[case]
    folder = trained().save_adapter(tmp_path / "a")
    spoil(folder)
    with pytest.raises(AdapterError, match=match) as err:
        load_adapters(make_vit(), folder)
    assert str(folder / file) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_refuses_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no such adapter folder"):
        load_adapters(make_vit(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither"):
        inspect_adapter(tmp_path / "empty")


# ----- atomic saves -----
def test_interrupted_pair_loads_the_new_adapter(tmp_path, images):
    """New tensor file, old JSON (a save killed between its two renames) loads the new adapter."""
    old, new = trained(seed=1), trained(seed=2)
    old.save_adapter(tmp_path / "a")
    new.save_adapter(tmp_path / "new")
    shutil.copy(tmp_path / "new" / WEIGHTS_NAME, tmp_path / "a" / WEIGHTS_NAME)
    with pytest.warns(UserWarning, match="interrupted save"):
        loaded = load_adapters(make_vit(), tmp_path / "a")
    assert_same(outputs(loaded, images)["a"], outputs(new, images)["a"], exact=True)


def test_failed_write_keeps_the_old_adapter(tmp_path, monkeypatch, images):
    model = trained(seed=1)
    model.save_adapter(tmp_path / "a")
    want = outputs(model, images)["a"]
    lmt.randomize(model, seed=2)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        model.save_adapter(tmp_path / "a")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp left
    assert_same(outputs(load_adapters(make_vit(), tmp_path / "a"), images)["a"], want, exact=True)


KILLED_SAVER = textwrap.dedent("""
    import os, sys, time
    import torch
    import learnable_memory as lm
    from tests.helpers import make_vit

    folder, hang_on = sys.argv[1], sys.argv[2]
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="t")

    def save(version):
        with torch.no_grad():
            for p in model.tasks["t"].parameters():
                p.fill_(version)
        model.tasks["t"].config.class_names = [f"v{version}"] * 3
        model.save_adapter(folder)

    save(0)
    real_fsync = os.fsync

    def slow_fsync(fd):  # a writer that stalls mid-save, once the temporary file holds its data
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith("." + hang_on) and name.endswith(".tmp"):
            print("HANG", name, flush=True)
            time.sleep(3600)  # killed long before: the test kills it as soon as it reads HANG
        real_fsync(fd)

    os.fsync = slow_fsync
    save(1)
    print("DONE", flush=True)
""")


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` prints, or ``""`` if it prints none within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@pytest.mark.integration
def test_killed_save_leaves_old_or_new_adapter(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(KILLED_SAVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = {WEIGHTS_NAME: 0, CONFIG_NAME: 1}  # killed while writing this file -> version that loads
    procs = {}
    try:
        for file in cases:
            folder = tmp_path / file.split(".")[0]
            procs[file] = (folder, subprocess.Popen([sys.executable, str(script), str(folder), file], cwd=ROOT,
                                                    env=env, stdout=subprocess.PIPE, text=True))
        lines = {file: first_line(proc, timeout=1800) for file, (_, proc) in procs.items()}
    finally:
        for _, proc in procs.values():
            proc.kill()
            proc.wait()
    for file, version in cases.items():
        folder, _ = procs[file]
        line = lines[file]
        assert line.startswith("HANG"), f"the saver did not reach {file}: {line!r}"
        assert any(p.name.endswith(".tmp") for p in folder.iterdir())  # really killed mid-save
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_adapters(make_vit(), folder)
        assert any("interrupted save" in str(w.message) for w in caught) == (version == 1)
        task = loaded.tasks["t"]
        assert task.config.class_names == [f"v{version}"] * 3
        for p in task.parameters():
            assert torch.equal(p, torch.full_like(p, version)), f"torn adapter after a kill while writing {file}"


# ----- Hugging Face Hub cache -----
def test_hub_offline_cache(tmp_path, monkeypatch, images):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    a, b = trained("a", seed=1), trained("b", seed=2)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--owner--repo"
    snapshot = repo / "snapshots" / commit
    merged = load_adapters(a, [b.save_adapter(tmp_path / "b")])
    merged.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(commit)
    cache = tmp_path / "hub"
    got = load_adapters(make_vit(), ["hf-hub:owner/repo"], cache_dir=cache)
    assert got.task_names == ["a", "b"]
    for k, v in outputs(merged, images).items():
        assert_same(outputs(got, images)[k], v, exact=True)
    only_b = load_adapters(make_vit(), "hf-hub:owner/repo/b@v1", cache_dir=cache)
    assert only_b.task_names == ["b"]
    assert inspect_adapter("hf-hub:owner/repo/a", cache_dir=cache)["task"] == "a"
    with pytest.raises(ValueError, match="hf-hub:owner/missing.*could not get it"):
        load_adapters(make_vit(), "hf-hub:owner/missing", cache_dir=cache)

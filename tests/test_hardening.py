"""What demanding users tried and what must hold (issue list of the hardening pass): task names,
non-finite values, resuming extension tasks, half precision, interrupted saves, caller's objects."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import learnable_memory as lm
from learnable_memory.adapters.folder import CONFIG_NAME, WEIGHTS_NAME
from learnable_memory.memory import task_key, task_name
from learnable_memory.train import NonFiniteError, fit
from tests.helpers import make_vit

NAMES = ["v1.0", "my.data", "train", "keys", "update", "training", "50%.x", "a b", "ünï", "x/y", "%2E"]


def two_tasks(vit, names=("a", "b"), seed=3):
    torch.manual_seed(seed)
    model = vit
    for n in names:
        model = lm.wrap_model(model, n_mem=2, num_classes=3, task=n)
    return model


# ----- task names -----
def test_task_key_round_trips_and_has_no_dots():
    for name in NAMES + ["%25", "%%..", "."]:
        assert "." not in task_key(name) and task_name(task_key(name)) == name


def test_any_reasonable_name_works_everywhere(tmp_path, images):
    vit = make_vit()
    model = two_tasks(vit, NAMES)
    assert model.task_names == NAMES
    with torch.no_grad():
        out = model.forward_all(images)
        sub = model.forward_all(images, tasks=["train", "base"])
    assert list(out) == ["base", *NAMES] and list(sub) == ["train", "base"]
    torch.testing.assert_close(sub["train"], out["train"], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "all")
    loaded = lm.load_adapters(make_vit(), tmp_path / "all", rename={"keys": "k.2"})
    assert loaded.task_names == [n if n != "keys" else "k.2" for n in NAMES]
    state = model.state_dict()
    assert "tasks.v1%2E0.memory" in state and "tasks.train.memory" in state
    fresh = two_tasks(make_vit(), NAMES, seed=9)
    fresh.load_state_dict(state)
    with torch.no_grad():
        again = fresh.forward_all(images)
    for k in out:
        assert torch.equal(again[k], out[k])
    for n in ("train", "keys"):
        model.save_adapter(tmp_path / n, task=n)
        assert lm.load_adapters(make_vit(), tmp_path / n).task_names == [n]


@pytest.mark.parametrize("bad", ["", "a\nb", "tab\there", "x" * 201])
def test_unusable_names_are_refused_up_front(bad):
    with pytest.raises(ValueError, match="task name"):
        lm.TaskConfig(name=bad, n_mem=1, num_classes=2)


# ----- task subsets and removal -----
def test_forward_all_subset_pulls_in_predecessors_and_refuses_unknown(images):
    vit = make_vit()
    model = lm.wrap_model(vit, n_mem=2, num_classes=3, task="a")
    model = lm.wrap_model(model, n_mem=2, num_classes=4, task="e", mode="extension")
    model = lm.wrap_model(model, n_mem=1, num_classes=5, task="c")
    with torch.no_grad():
        model.tasks["a"].memory.normal_()
        full = model.forward_all(images)
        sub = model.forward_all(images, tasks=["e"])
    assert list(sub) == ["e"]
    torch.testing.assert_close(sub["e"], full["e"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['zz'\]"):
        model.forward_all(images, tasks=["zz"])
    full_mode = lm.wrap_model(vit, n_mem=1, num_classes=2, task="f", mode="full")
    with pytest.raises(ValueError, match="full-mode task 'f' changes the original tokens, so this model has no 'base'"):
        full_mode.forward_all(images, tasks=["base", "f"])
    assert list(full_mode.forward_all(images)) == ["f"]


def test_remove_task_and_its_refusal(images):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model = lm.wrap_model(model, n_mem=2, num_classes=3, task="e", mode="extension")
    with pytest.raises(ValueError, match=r"task 'a' can not be removed: extension task\(s\) \['e'\]"):
        model.remove_task("a")
    assert model.task_names == ["a", "e"]
    removed = model.remove_task("e")
    assert removed.name == "e" and model.task_names == ["a"] and model.active_task == "a"
    with torch.no_grad():
        assert list(model.forward_all(images)) == ["base", "a"]
    model.remove_task("a")
    assert model.active_task is None and model.task_names == []
    with pytest.raises(ValueError, match="unknown task"):
        model.remove_task("a")


# ----- non-finite values -----
def poison(model, name, tensor="memory", value=float("nan")):
    with torch.no_grad():
        getattr(model.tasks[name], tensor).view(-1)[0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_and_writes_nothing(tmp_path, value):
    model = two_tasks(make_vit())
    poison(model, "b", "class_token", value)
    with pytest.raises(ValueError, match=r"task 'b' holds NaN or Inf in 'class_token' \(1 of 192 values\)"):
        model.save_adapter(tmp_path / "b", task="b")
    with pytest.raises(ValueError, match="task 'b' holds NaN or Inf"):
        model.save_pretrained(tmp_path / "all")
    assert not (tmp_path / "b").exists() and not (tmp_path / "all").exists()


def test_load_refuses_and_inspect_reports_non_finite(tmp_path):
    import safetensors.torch

    model = two_tasks(make_vit())
    model.save_adapter(tmp_path / "a", task="a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    with open(weights, "rb") as f:
        meta = safetensors.safe_open(f.name, "pt").metadata()
    tensors = safetensors.torch.load_file(weights)
    tensors["memory"][0, 0, :3] = float("inf")
    safetensors.torch.save_file(tensors, weights, metadata=meta)  # a file that says it is this adapter
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    from learnable_memory.adapters.fingerprint import tensors_fingerprint

    cfg["task_fingerprint"] = tensors_fingerprint(tensors)
    import hashlib

    cfg["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(lm.AdapterError, match=r"tensors \['memory'\] hold NaN or Inf \(3 values\)"):
        lm.load_adapters(make_vit(), tmp_path / "a")
    assert lm.inspect_adapter(tmp_path / "a")["non_finite"] == {"memory": 3}


def tiny_loader(n=32, classes=3):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % classes), batch_size=8)


def test_fit_stops_at_a_non_finite_loss_or_parameter():
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3)
    with pytest.raises(NonFiniteError, match="training diverged at step 1: the loss is nan"):
        poison(model, "default", "class_token")
        fit(model, tiny_loader(), steps=3, progress=False)
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3)
    model.tasks["default"].memory.register_hook(lambda g: g * float("nan"))  # a finite loss, a NaN step
    with pytest.raises(NonFiniteError, match=r"training diverged at step 1: \['tasks.default.memory'\] hold NaN"):
        fit(model, tiny_loader(), steps=4, clip=None, progress=False)
    assert issubclass(NonFiniteError, ValueError)  # the command line reports it in one line


# ----- resuming an extension task -----
def test_trainable_resumes_only_tasks_nothing_extends(tmp_path):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model = lm.wrap_model(model, n_mem=2, num_classes=3, task="e", mode="extension")
    model.save_pretrained(tmp_path / "ae")
    loaded = lm.load_adapters(make_vit(), tmp_path / "ae", trainable=True)
    assert not any(p.requires_grad for p in loaded.tasks["a"].parameters())
    assert all(p.requires_grad for p in loaded.tasks["e"].parameters())
    before = {k: v.clone() for k, v in loaded.tasks["a"].state_dict().items()}
    fit(loaded.set_task("e"), tiny_loader(), steps=2, progress=False)
    assert all(torch.equal(v, loaded.tasks["a"].state_dict()[k]) for k, v in before.items())
    loaded.save_adapter(tmp_path / "e2", task="e")
    again = lm.load_adapters(make_vit(), [tmp_path / "ae" / "a", tmp_path / "e2"])  # still pairs with a
    assert again.task_names == ["a", "e"]
    named = lm.load_adapters(make_vit(), tmp_path / "ae", trainable=["e"])
    assert all(p.requires_grad for p in named.tasks["e"].parameters())
    with pytest.raises(ValueError, match=r"task\(s\) \['a'\] can not be trained: other loaded tasks extend"):
        lm.load_adapters(make_vit(), tmp_path / "ae", trainable=["a"])
    with pytest.raises(ValueError, match="not among the tasks loaded"):
        lm.load_adapters(make_vit(), tmp_path / "ae", trainable=["zz"])


# ----- half precision -----
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_moves_between_float32_and_half_precision(tmp_path, dtype):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model = lm.wrap_model(model, n_mem=2, num_classes=3, task="e", mode="extension")
    model.save_pretrained(tmp_path / "fp32")
    half = make_vit().to(dtype)
    loaded = lm.load_adapters(half, tmp_path / "fp32")
    assert loaded.tasks["e"].memory.dtype == dtype
    loaded.save_pretrained(tmp_path / "half")
    assert lm.load_adapters(make_vit(), tmp_path / "half").task_names == ["a", "e"]  # and back
    step_by_step = lm.load_adapters(make_vit().to(dtype), tmp_path / "fp32" / "a")
    assert lm.load_adapters(step_by_step, tmp_path / "fp32" / "e").task_names == ["a", "e"]
    with pytest.raises(lm.AdapterError, match=rf"same shape but other weights .*compared in {str(dtype)[6:]}"):
        lm.load_adapters(make_vit(seed=5).to(dtype), tmp_path / "fp32")


def test_format_1_adapter_on_half_precision_loads_with_a_warning(tmp_path):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model.save_adapter(tmp_path / "a")
    cfg_path = tmp_path / "a" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    for key in ("dtype", "fingerprints_by_dtype"):
        del cfg["base_model"][key]  # as written before these were recorded
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="can not be checked in torch.bfloat16"):
        lm.load_adapters(make_vit().to(torch.bfloat16), tmp_path / "a")
    with pytest.raises(lm.AdapterError, match="other weights"):  # in float32 the old hash still decides
        lm.load_adapters(make_vit(seed=5), tmp_path / "a")


# ----- interrupted saves -----
def test_next_save_removes_the_temp_files_of_killed_saves(tmp_path):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    folder = tmp_path / "a"
    model.save_adapter(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = folder / f".{WEIGHTS_NAME}.{pid}.deadbeef.tmp"
    live = folder / f".{CONFIG_NAME}.{os.getppid()}.cafe0000.tmp"  # a writer still running: kept
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"{}")
    model.save_adapter(folder)
    assert not stale.exists() and live.exists()


def test_first_save_killed_between_renames_loads_from_the_tensor_file(tmp_path, images):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model.save_adapter(tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).unlink()  # the tensor file was renamed in, the JSON not yet
    with pytest.warns(UserWarning, match=f"{CONFIG_NAME} is missing, as after an interrupted save"):
        loaded = lm.load_adapters(make_vit(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded.forward_all(images)["a"], model.forward_all(images)["a"])


# ----- the caller's objects -----
def test_add_task_leaves_the_callers_config_alone():
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    cfg = lm.TaskConfig(name="e", n_mem=1, num_classes=2, mode="extension")
    snapshot = dataclasses.replace(cfg)
    task = model.add_task(cfg)
    assert cfg == snapshot and task.config.depends_on == ["a"]
    bad = lm.TaskConfig(name="f", n_mem=1, num_classes=2, mode="full")
    with pytest.raises(ValueError, match="can not share a model"):
        model.add_task(bad)
    assert bad == lm.TaskConfig(name="f", n_mem=1, num_classes=2, mode="full")


def test_wrapping_a_memory_vit_shares_and_freezes_its_tasks():
    """Documented: wrap_model(memory_vit, ...) shares the task objects (no copy), so the earlier
    tasks are frozen for both models."""
    first = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    second = lm.wrap_model(first, n_mem=2, num_classes=3, task="b")
    assert second.tasks["a"] is first.tasks["a"]
    assert not any(p.requires_grad for p in first.tasks["a"].parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.tasks["a"].requires_grad_(True)  # how to train it again

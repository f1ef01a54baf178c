"""Hardening, round 2, for outputs, adapters and the peft bridge: one rule for which outputs a pass
returns, reserved and odd names in every entry point, malformed adapter files, and the peft bridge's edges."""

from __future__ import annotations

import json

import pytest
import torch

import learnable_memory as lm
from learnable_memory.config import UnknownTaskError
from learnable_memory.memory import TaskMemory
from learnable_memory.serve.inference import resolve_tasks
from learnable_memory.serve.settings import ServeError
from tests.helpers import images_for, make_vit


def small(names=("a", "b"), **kwargs) -> lm.MemoryViT:
    model = make_vit(depth=1)
    for n in names:
        model = lm.wrap_model(model, n_mem=1, num_classes=3, task=n, **kwargs)
    return model


# ----- which outputs a pass returns: one rule -----
def test_resolve_outputs_is_the_one_rule():
    model = small()
    assert model.resolve_outputs(None) == (["base", "a", "b"], ("a", "b"))
    assert model.resolve_outputs("b") == (["b"], ("b",))
    assert model.resolve_outputs(["b", "base", "b"]) == (["b", "base"], ("b",))
    ext = lm.wrap_model(model, n_mem=1, num_classes=2, task="e", mode="extension")
    assert ext.resolve_outputs(["e"]) == (["e"], ("a", "b", "e"))
    full = small(["f"], mode="full")
    assert full.resolve_outputs(None) == (["f"], ("f",))
    with pytest.raises(UnknownTaskError, match="no 'base' output") as err:
        full.resolve_outputs(["base"])
    assert err.value.names == ["base"]


def test_an_empty_task_list_is_the_same_error_everywhere(tmp_path):
    """``tasks=[]`` used to give ``{}`` from forward_all but an error from export and the server."""
    model = small()
    x = images_for(32)
    with torch.no_grad(), pytest.raises(ValueError, match="tasks is empty"):
        model.forward_all(x, tasks=[])
    with pytest.raises(ValueError, match="tasks is empty"):
        model.forward_features(x, tasks=[])
    with pytest.raises(ValueError, match="can not export tasks=\\[\\]: tasks is empty"):
        lm.export_model(model, tmp_path / "m.pt2", tasks=[], format="pt2")
    with pytest.raises(ServeError, match="tasks is empty") as err:
        resolve_tasks(model, [])
    assert err.value.status == 422


MALFORMED = "tasks must (list|be a list of) output names"


@pytest.mark.parametrize("bad", [[["a"]], [{"a"}], [("a",)], [1], ["a", None], 5])
def test_nested_or_unhashable_task_entries_are_a_clear_error(tmp_path, bad):
    model = small()
    with torch.no_grad(), pytest.raises(ValueError, match=MALFORMED):
        model.forward_all(images_for(32), tasks=bad)
    with pytest.raises(ValueError, match=f"can not export .*{MALFORMED}"):
        lm.export_model(model, tmp_path / "m.pt2", tasks=bad, format="pt2")
    with pytest.raises(ServeError, match=MALFORMED) as err:
        resolve_tasks(model, bad)
    assert err.value.status == 422


def test_unknown_outputs_are_404_in_the_server_and_named_by_export(tmp_path):
    model, full = small(), small(["f"], mode="full")
    for m, name in ((model, "zz"), (full, "base")):
        with pytest.raises(ServeError) as err:
            resolve_tasks(m, [name])
        assert err.value.status == 404 and repr(name) in str(err.value)
        with pytest.raises(ValueError, match=f"can not export '{name}'"):
            lm.export_model(m, tmp_path / "m.pt2", tasks=[name], format="pt2")


# ----- one list of tensor names, one tensor check, each adapter read once -----
def test_named_tensors_is_the_one_list_of_a_tasks_tensors():
    from learnable_memory.adapters import fingerprint, peft_format
    from learnable_memory.memory import TENSOR_NAMES

    task = small(["a"]).tasks["a"]
    named = task.named_tensors()
    assert tuple(named) == TENSOR_NAMES == ("memory", "class_token", "head.weight", "head.bias")
    assert named["head.weight"] is task.head.weight and named["memory"] is task.memory
    assert peft_format.TENSOR_NAMES is TENSOR_NAMES
    assert tuple(fingerprint.task_tensors(task)) == tuple(fingerprint.own_tensors(task)) == TENSOR_NAMES
    assert not hasattr(fingerprint, "task_fingerprint")  # it had no callers


def test_the_command_line_reads_each_adapter_once(tmp_path, monkeypatch):
    import safetensors.torch

    from learnable_memory.cli.records import load_named_adapters

    model = small(["a", "b"])
    model.save_pretrained(tmp_path / "m")
    model.save_adapter(tmp_path / "again", task="a")
    reads: list[int] = []
    load = safetensors.torch.load
    monkeypatch.setattr(safetensors.torch, "load", lambda data: reads.append(1) or load(data))
    folders = [tmp_path / "m" / "a", tmp_path / "m" / "b"]
    assert load_named_adapters(make_vit(depth=1), folders).task_names == ["a", "b"]
    assert len(reads) == 2
    with pytest.raises(lm.AdapterError, match="two adapters hold task 'a'.*give one of them at a time"):
        load_named_adapters(make_vit(depth=1), [*folders, tmp_path / "again"])


def test_the_loader_refuses_by_check_task_order_and_names_the_file(tmp_path):
    from learnable_memory.mask import TaskOrderError

    small(["a"]).save_adapter(tmp_path / "a")
    small(["b"], mode="full").save_adapter(tmp_path / "f")
    cases = [([tmp_path / "a", tmp_path / "a"], None, "duplicate"), ([tmp_path / "a"], {"a": "base"}, "reserved"),
             ([tmp_path / "a", tmp_path / "f"], None, "full")]
    for paths, rename, rule in cases:
        with pytest.raises(lm.AdapterError) as err:
            lm.load_adapters(make_vit(depth=1), paths, rename=rename)
        assert isinstance(err.value.__cause__, TaskOrderError) and err.value.__cause__.rule == rule
        assert str(err.value).startswith(str(paths[-1])) and str(err.value.__cause__) in str(err.value)


def test_trainable_policy_is_apart_from_loading():
    from learnable_memory.adapters.loading import trainable_tasks

    model = lm.wrap_model(small(["a"]), n_mem=1, num_classes=2, task="e", mode="extension")
    a, e = model.tasks["a"], model.tasks["e"]
    assert trainable_tasks(True, [a, e], []) == {"e"} and trainable_tasks(False, [a, e], []) == set()
    assert trainable_tasks("e", [e], [a]) == {"e"}
    with pytest.raises(ValueError, match=r"\['a'\] can not be trained"):
        trainable_tasks(["a"], [a, e], [])
    with pytest.raises(ValueError, match="not among the tasks loaded"):
        trainable_tasks(["zz"], [a, e], [])


def test_task_names_are_unescaped_once_not_on_every_access(monkeypatch):
    import learnable_memory.memory as memory

    model = small(["v1.0", "b", "50%"])
    calls: list[str] = []
    unescape = memory.task_name
    monkeypatch.setattr(memory, "task_name", lambda key: calls.append(key) or unescape(key))
    for _ in range(10):
        assert model.task_names == ["v1.0", "b", "50%"]
        assert [n for n, _ in model.tasks.items()] == ["v1.0", "b", "50%"]
    assert len(calls) <= 3
    model.remove_task("b")
    model.add_task(lm.TaskConfig("c.d", 1, 2))
    assert model.task_names == ["v1.0", "50%", "c.d"] and list(model.tasks) == ["v1.0", "50%", "c.d"]
    names = model.task_names
    names.append("mutated")  # the cache hands out copies
    assert model.task_names == ["v1.0", "50%", "c.d"]


# ----- extension tasks on other predecessors; reserved names -----
def test_add_task_refuses_an_extension_task_on_other_predecessors():
    first = small(["A"])
    ext = lm.wrap_model(first, n_mem=1, num_classes=2, task="E", mode="extension").tasks["E"]
    same = lm.MemoryViT(first.base)
    same.add_task(first.tasks["A"])
    same.add_task(ext)  # the very task it was trained on: fine
    other = lm.MemoryViT(first.base)
    other.add_task(lm.TaskConfig("A", 1, 3))  # another "A": other weights
    with pytest.raises(lm.AdapterError, match="task 'A' here is not the one extension task 'E' was trained on"):
        other.add_task(ext)
    assert other.task_names == ["A"]  # nothing changed
    by_hand = TaskMemory(ext.config, 1, 192, torch.zeros(192))
    with pytest.warns(UserWarning, match="built by hand, so add_task can not check"):
        again = lm.MemoryViT(first.base)
        again.add_task(first.tasks["A"])
        again.add_task(by_hand)


@pytest.mark.parametrize("name", ["base", "__base__"])
def test_reserved_names_are_refused_in_every_entry_point(tmp_path, name):
    import peft

    from learnable_memory.config import RESERVED_NAMES
    from learnable_memory.peft import LearnableMemoryConfig

    assert name in RESERVED_NAMES
    with pytest.raises(ValueError, match=f"task name '{name}' is reserved"):
        small([name])
    small(["a"]).save_adapter(tmp_path / "a")
    with pytest.raises(lm.AdapterError, match=f"task name '{name}' is reserved"):
        lm.load_adapters(make_vit(depth=1), tmp_path / "a", rename={"a": name})
    model = peft.get_peft_model(make_vit(depth=1), LearnableMemoryConfig(n_mem=1, num_classes=2), adapter_name="a")
    with pytest.raises(ValueError, match=f"task name '{name}' is reserved"):
        model.add_adapter(name, LearnableMemoryConfig(n_mem=1, num_classes=2))
    assert list(model.peft_config) == ["a"]
    with pytest.raises(ValueError, match=f"task name '{name}' is reserved"):
        peft.get_peft_model(make_vit(depth=1), LearnableMemoryConfig(n_mem=1, num_classes=2), adapter_name=name)


# ----- save_pretrained folders -----
@pytest.mark.parametrize("names", [["task_1", "é"], ["é", "task_0"], ["A", "a"], ["é", "task_0", "ü", "task_0_1"]])
def test_save_pretrained_gives_every_task_its_own_folder(tmp_path, names):
    torch.manual_seed(0)
    model = small(names)
    model.save_pretrained(tmp_path / "m")
    folders = [e["folder"] for e in json.loads((tmp_path / "m" / "adapters.json").read_text())["adapters"]]
    assert len({f.lower() for f in folders}) == len(names)
    loaded = lm.load_adapters(make_vit(depth=1), tmp_path / "m")
    x = images_for(32)
    with torch.no_grad():
        want, got = model.forward_all(x), loaded.forward_all(x)
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k])


# ----- malformed files -----
def edit_json(path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


INDEX_DAMAGE = [lambda o: o.update(adapters=5), lambda o: o.update(adapters="ab"), lambda o: o.update(adapters=[5]),
                lambda o: o.update(adapters={"a": 1}), lambda o: o.update(adapters=[{"folder": 3}])]
CONFIG_DAMAGE = {
    "class_names a number": lambda c: c.update(class_names=5),
    "class_names of numbers": lambda c: c.update(class_names=[1, 2, 3]),
    "base_model a string": lambda c: c.update(base_model="vit"),
    "depends_on a string": lambda c: c.update(depends_on="a"),
    "depends_on of numbers": lambda c: c.update(depends_on=[5]),
    "preprocessing a list": lambda c: c.update(preprocessing=[1]),
    "init_std a string": lambda c: c.update(init_std="small"),
    "dtype a number": lambda c: c["base_model"].update(dtype=3),
    "fingerprints_by_dtype a list": lambda c: c["base_model"].update(fingerprints_by_dtype=[1]),
    "fingerprints_by_dtype of numbers": lambda c: c["base_model"].update(fingerprints_by_dtype={"float16": 1}),
}


@pytest.mark.parametrize("damage", range(len(INDEX_DAMAGE)))
def test_malformed_adapters_json_is_an_adapter_error(tmp_path, damage):
    small(["a"]).save_pretrained(tmp_path / "m")
    edit_json(tmp_path / "m" / "adapters.json", INDEX_DAMAGE[damage])
    with pytest.raises(lm.AdapterError, match="adapters.json: 'adapters' must list the task folders"):
        lm.load_adapters(make_vit(depth=1), tmp_path / "m")


@pytest.mark.parametrize("case", sorted(CONFIG_DAMAGE))
def test_config_fields_of_the_wrong_type_are_an_adapter_error(tmp_path, case):
    """Raw TypeErrors before (``len(5)``, ``5["name"]``, ``str < 0`` ...); both loaders read the same fields."""
    import peft

    import learnable_memory.peft  # noqa: F401  (registers the method with peft)

    small(["a"]).save_adapter(tmp_path / "a")
    edit_json(tmp_path / "a" / "adapter_config.json", CONFIG_DAMAGE[case])
    with pytest.raises(lm.AdapterError, match="adapter_config.json: '.*' (is|must)"):
        lm.load_adapters(make_vit(depth=1), tmp_path / "a")
    if case.startswith("depends_on"):
        return  # peft refuses any depends_on (no extension tasks through peft)
    with pytest.raises(lm.AdapterError, match="adapter config of task 'a': '.*' (is|must)"):
        peft.PeftModel.from_pretrained(make_vit(depth=1), tmp_path / "a")


# ----- the peft bridge's edges -----
def peft_pair():
    import peft

    from learnable_memory.peft import LearnableMemoryConfig

    model = peft.get_peft_model(make_vit(depth=1), LearnableMemoryConfig(n_mem=1, num_classes=3), adapter_name="a")
    model.add_adapter("b", LearnableMemoryConfig(n_mem=1, num_classes=3))
    return model


def test_peft_set_adapter_with_a_list_is_a_clear_error():
    model = peft_pair()
    for names in (["a", "b"], ["a"]):
        with pytest.raises(ValueError, match=r"one adapter name at a time, got \[.*forward_all"):
            model.set_adapter(names)  # a raw TypeError (unhashable list) from peft before
    assert model.active_adapters == ["a"]


def test_peft_disable_adapter_leaves_only_the_base_output():
    import peft

    from learnable_memory.peft import LearnableMemoryConfig

    model = peft_pair()
    x = images_for(32)
    with torch.no_grad():
        with model.disable_adapter():
            out = model.forward_all(x)
            assert list(out) == ["base"] and torch.equal(out["base"], model.base_model.model.base(x))
            with pytest.raises(UnknownTaskError, match=r"adapters are disabled.*\['a'\]"):
                model.forward_all(x, tasks=["a", "base"])
        assert list(model.forward_all(x)) == ["base", "a", "b"]
        full = peft.get_peft_model(make_vit(depth=1), LearnableMemoryConfig(n_mem=1, num_classes=3, mode="full"))
        with full.disable_adapter():  # a full-mode adapter changes the base output, but not while disabled
            assert torch.equal(full.forward_all(x, tasks=["base"])["base"], full.base_model.model.base(x))
            with pytest.raises(UnknownTaskError, match=r"adapters are disabled.*\['default'\]"):
                full.forward_all(x, tasks=["base", "default"])
        with pytest.raises(UnknownTaskError, match="no 'base' output"):
            full.forward_all(x, tasks=["base"])


def test_peft_keeps_its_last_adapter_with_a_clear_error():
    model = peft_pair()
    model.delete_adapter("a")
    with pytest.raises(ValueError, match="'b' is the last one.*unload"):
        model.delete_adapter("b")  # deleting it left peft's forward with a raw KeyError
    assert list(model.peft_config) == ["b"]
    with torch.no_grad():
        assert model(images_for(32)).shape == (3, 3)


def test_the_root_of_a_peft_save_names_its_adapter_subfolders(tmp_path):
    import peft

    from learnable_memory.peft import LearnableMemoryConfig

    model = peft_pair()
    model.delete_adapter("a")
    model.add_adapter("c", LearnableMemoryConfig(n_mem=1, num_classes=2))
    model.save_pretrained(tmp_path)  # named adapters go to subfolders b/ and c/
    subfolders = r"it holds the adapter folders \['b', 'c'\].*subfolder="
    with pytest.raises(lm.AdapterError, match=f"holds neither adapter_config.json.*{subfolders}"):
        lm.load_adapters(make_vit(depth=1), tmp_path)
    with pytest.raises(lm.AdapterError, match=f"holds no adapter_config.json.*{subfolders}"):
        peft.PeftModel.from_pretrained(make_vit(depth=1), tmp_path)
    assert lm.load_adapters(make_vit(depth=1), [tmp_path / "b", tmp_path / "c"]).task_names == ["b", "c"]


def test_unchecked_extension_load_binds_to_the_predecessors_it_was_given(tmp_path):
    """``check_fingerprint=False`` accepts other predecessor weights; add_task (which load_adapters calls)
    then checks against those, so the load goes through, and moving the task elsewhere is checked again."""
    chain = lm.wrap_model(small(["a"]), n_mem=1, num_classes=2, task="e", mode="extension")
    chain.save_pretrained(tmp_path / "chain")
    other = small(["a"])
    with torch.no_grad():
        other.tasks["a"].memory.add_(1)
    other.save_adapter(tmp_path / "other_a")
    paths = [tmp_path / "other_a", tmp_path / "chain" / "e"]
    with pytest.raises(lm.AdapterError, match="task 'a' here is not the one extension task 'e' was trained on"):
        lm.load_adapters(make_vit(depth=1), paths)
    loose = lm.load_adapters(make_vit(depth=1), paths, check_fingerprint=False)
    assert loose.task_names == ["a", "e"]
    with pytest.raises(lm.AdapterError, match="task 'a' here is not the one extension task 'e'"):
        moved = lm.MemoryViT(chain.base)
        moved.add_task(chain.tasks["a"])
        moved.add_task(loose.tasks["e"])


def test_both_loaders_run_one_tensor_check(tmp_path):
    """A tensor of an integer dtype: refused by load_adapters, and by peft's loader, which checked names,
    shapes and NaN on its own before and let the dtype through."""
    import peft
    import safetensors.torch

    import learnable_memory.peft  # noqa: F401  (registers the method with peft)

    folder = small(["a"]).save_adapter(tmp_path / "a")
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    tensors["head.bias"] = tensors["head.bias"].to(torch.int64)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.pop("weights_sha256")  # as peft writes it: no pairing hash, so the tensors are checked as they are
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(tensors, folder / "adapter_model.safetensors")
    for load in (lambda: lm.load_adapters(make_vit(depth=1), folder),
                 lambda: peft.PeftModel.from_pretrained(make_vit(depth=1), folder)):
        with pytest.raises(lm.AdapterError, match="tensor 'head.bias' has dtype torch.int64, expected float32"):
            load()

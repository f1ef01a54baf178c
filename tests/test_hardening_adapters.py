"""Hardening, round 2, for outputs, adapters and the peft bridge: one rule for which outputs a pass
returns, reserved and odd names in every entry point, malformed adapter files, and the peft bridge's edges."""

from __future__ import annotations

import pytest
import torch

import learnable_memory as lm
from learnable_memory.config import UnknownTaskError
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


@pytest.mark.parametrize("bad", [[["a"]], [{"a"}], [("a",)], [1], ["a", None]])
def test_nested_or_unhashable_task_entries_are_a_clear_error(tmp_path, bad):
    model = small()
    with torch.no_grad(), pytest.raises(ValueError, match="tasks must list output names"):
        model.forward_all(images_for(32), tasks=bad)
    with pytest.raises(ValueError, match="can not export .*tasks must list output names"):
        lm.export_model(model, tmp_path / "m.pt2", tasks=bad, format="pt2")
    with pytest.raises(ServeError, match="tasks must list output names") as err:
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

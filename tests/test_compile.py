"""``torch.compile(fullgraph=True)`` of ``forward`` and ``forward_all``: no graph break, no recompile
on a repeated call, one compile per task with ``set_task`` and none when switching back. On the
``eager`` backend: dynamo's tracing is what is under test, not code generation."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import learnable_memory as lm
from learnable_memory.testing import randomize
from tests.helpers import images_for, make_vit


@pytest.fixture
def model() -> lm.MemoryViT:
    torch._dynamo.reset()
    counters.clear()
    m = make_vit(depth=1)
    for name, mode in (("a", "non_destructive"), ("b", "extension"), ("c", "non_destructive")):
        m = lm.wrap_model(m, n_mem=2, num_classes=3, task=name, mode=mode)
    randomize(m)
    yield m
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_forward_all_compiles_once_before_any_eager_call(model):
    x = images_for(32)
    compiled = torch.compile(model.forward_all, fullgraph=True, backend="eager")
    with torch.no_grad():
        first = compiled(x)
        assert graphs() == 1
        again = compiled(x)
        sub = torch.compile(model.forward_all, fullgraph=True, backend="eager")(x, tasks=["b"])
        eager = model.forward_all(x)
    assert graphs() == 2, "a repeated call compiled again"  # the second compile is the tasks=["b"] call
    for k in eager:
        torch.testing.assert_close(first[k], eager[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(again[k], first[k])
    torch.testing.assert_close(sub["b"], eager["b"], atol=1e-5, rtol=1e-5)


def test_each_task_compiles_once_and_switching_back_is_free(model):
    x = images_for(32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    seen = []
    with torch.no_grad():
        for name in ("a", "b", "a", "c", "b", "a"):
            model.set_task(name)
            out = compiled(x)
            seen.append(graphs())
            torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert seen == [1, 2, 2, 3, 3, 3]


def test_the_cache_is_not_a_guard(model):
    """The memory key/value cache fills in eager passes; a compiled pass neither reads nor fills it."""
    x = images_for(32)
    with torch.no_grad():
        model.forward_all(x)  # eager: fills the cache
        assert model.kv_cache.nbytes > 0
        compiled = torch.compile(model.forward_all, fullgraph=True, backend="eager")
        compiled(x)
        model.clear_kv_cache()
        compiled(x)
        model.forward_all(x)
        compiled(x)
    assert graphs() == 1

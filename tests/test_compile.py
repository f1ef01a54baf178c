"""``torch.compile(fullgraph=True)`` of ``forward`` and ``forward_all``: no graph break, no recompile
on a repeated call, one compile per task with ``set_task`` and none when switching back. On the
``eager`` backend: dynamo's tracing is what is under test, not code generation."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import learnable_memory as lm
from learnable_memory.compiled import compile_model
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


@pytest.mark.integration
def test_a_raw_compile_reports_the_models_error_inside_dynamos(model):
    """Documented: under a raw torch.compile(fullgraph=True) the error arrives as dynamo's Unsupported."""
    compiled = torch.compile(model.forward_all, fullgraph=True, backend="eager")
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported, match=r"UnknownTaskError\(\"unknown task"):
        compiled(images_for(32), tasks=["zz"])


@pytest.mark.integration
def test_compile_model_raises_the_models_own_errors(model):
    compiled = compile_model(model, backend="eager")
    x = images_for(32)
    with torch.no_grad():
        first = compiled.forward_all(x)
        for call, error, match in [
            (lambda: compiled.forward_all(x, tasks=["a", "zz"]), ValueError, r"unknown task\(s\) \['zz'\]"),
            (lambda: compiled.forward_all(images_for(48)), ValueError, "images are 48x48 but this model takes 32x32"),
            (lambda: compiled(images_for(48)), ValueError, "images are 48x48"),
        ]:
            with pytest.raises(error, match=match) as caught:
                call()
            assert not isinstance(caught.value, torch._dynamo.exc.TorchDynamoException)
        again = compiled.forward_all(x)
        model.set_task("b")
        out = compiled(x)
        eager, eager_b = model.forward_all(x), model(x)
    for k in eager:
        torch.testing.assert_close(first[k], eager[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(again[k], first[k])
    torch.testing.assert_close(out, eager_b, atol=1e-5, rtol=1e-5)
    assert graphs() == 2, "forward_all compiled once and forward once: no error left a graph or a recompile"
    empty = lm.MemoryViT(model.base)
    with torch.no_grad(), pytest.raises(RuntimeError, match="this MemoryViT has no task"):
        compile_model(empty, backend="eager")(x)
    with pytest.raises(TypeError, match="takes a MemoryViT"):
        compile_model(model.base)

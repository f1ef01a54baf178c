"""Faults stay in their task: NaN, Inf or a huge value in one task's parameters leaves every other
task's output, and the base output, as they were, in inference and training passes, in a family of
every attention kind. Only an extension task may be reached by the tasks it extends (by design)."""

from __future__ import annotations

import pytest
import torch

import learnable_memory as lm
from learnable_memory.testing import randomize
from tests.helpers import grid_backbone, images_for, make_vit
from tests.test_families import depth_kwargs, grid_of, representatives

NARROW = {"depth": 2, "embed_dim": 64, "num_heads": 4}
#: One architecture of the families' SAMPLE per backbone, block and attention kind, built narrow.
FAMILIES = sorted(set(representatives(("backbone", "block", "attention")).values()))
PLAIN = representatives(("attention",))["attention:attention.Attention"]  # timm's Attention
FAULTS = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}


def model_with_tasks(family: str) -> tuple[lm.MemoryViT, torch.Tensor]:
    """Tasks a, b (non-destructive), e (extends a and b) and c, with random parameters."""
    base, size = grid_backbone(family, grid_of(family), **NARROW, **depth_kwargs(family))
    model = base
    for name, mode in (("a", "non_destructive"), ("b", "non_destructive"), ("e", "extension"),
                       ("c", "non_destructive")):
        model = lm.wrap_model(model, n_mem=2, num_classes=3, task=name, mode=mode)
    randomize(model, scale=0.3)
    return model, images_for(size, batch=2)


def spoil(model: lm.MemoryViT, task: str, value: float) -> None:
    with torch.no_grad():
        t = model.tasks[task]
        t.memory[:, 0, :5] = value
        t.class_token[:3] = value


def outputs(model: lm.MemoryViT, images: torch.Tensor, grad: bool) -> dict[str, torch.Tensor]:
    """``forward_all`` in an inference pass, or in a training pass (autograd on, tasks trainable)."""
    if not grad:
        with torch.inference_mode():
            return model.forward_all(images)
    for t in model.tasks.values():
        t.requires_grad_(True)
    try:
        return {k: v.detach() for k, v in model.forward_all(images).items()}
    finally:
        for t in model.tasks.values():
            t.requires_grad_(False)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.isfinite(got).all(), f"{what} turned non-finite"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_spoiled_task_touches_no_other(family, grad):
    model, x = model_with_tasks(family)
    clean = outputs(model, x, grad)
    for fault, value in FAULTS.items():
        spoil(model, "b", value)
        got = outputs(model, x, grad)
        for name in ("base", "a", "c"):
            assert_same(got[name], clean[name], f"{family}, {fault} in task b: output {name!r}")
        randomize(model, scale=0.3)  # the same parameters again (seeded)


def test_an_extension_task_is_reached_by_what_it_extends_only():
    model, x = model_with_tasks(PLAIN)
    clean = outputs(model, x, grad=False)
    spoil(model, "a", float("nan"))
    got = outputs(model, x, grad=False)
    assert torch.isnan(got["e"]).any(), "e attends to a's class token and memory"
    for name in ("base", "b", "c"):
        assert_same(got[name], clean[name], f"output {name!r}")


def test_training_gradients_of_a_task_stay_finite_next_to_a_spoiled_one():
    model, x = model_with_tasks(PLAIN)
    spoil(model, "b", float("inf"))
    model.tasks["c"].requires_grad_(True)
    model.forward_all(x, tasks=["b", "c"])["c"].sum().backward()
    for name, p in model.tasks["c"].named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"gradient of c.{name}"


def test_the_new_class_tokens_see_what_table_1_says_and_no_more():
    """Per-task gathering, checked against the dense masked formulation for a mix of memory sizes
    (the gathered, padded path) and an extension chain."""
    from learnable_memory.testing import assert_outputs_close, dense_forward_all

    base = make_vit()
    model = base
    for name, m, mode in (("a", 3, "non_destructive"), ("b", 1, "extension"), ("c", 0, "non_destructive"),
                          ("d", 4, "extension")):
        model = lm.wrap_model(model, n_mem=m, num_classes=4, task=name, mode=mode)
    randomize(model)
    x = images_for(32)
    with torch.no_grad():
        assert_outputs_close(model.forward_all(x), dense_forward_all(model, x))
        for t in model.tasks.values():
            t.requires_grad_(True)
    assert_outputs_close({k: v.detach() for k, v in model.forward_all(x).items()}, dense_forward_all(model, x))

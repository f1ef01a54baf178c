"""The paper's guarantees as checks to run on any timm backbone, each raising ``AssertionError``
with a message that says what broke.

1. :func:`check_base_unchanged`: with tasks added, the base output is bit-identical to the
   backbone's own, at inference and in a training pass.
2. :func:`check_concatenation`: tasks made separately on one backbone, then served by one model,
   each give the output they give alone.
3. :func:`check_training`: a training step gives gradients to the new task's memory (every block),
   class token and head, and to nothing else: not the backbone, not the tasks added before it.
   After the step the base output and the earlier tasks are as they were.
4. :func:`check_save_load`: ``save_pretrained`` then ``load_adapters`` onto a fresh copy of the
   backbone gives the same outputs, bit for bit.

5. :func:`check_new_tokens`: what the new class tokens compute, block by block. The checks above
   look at outputs, and none of them sees a new class token computed with a formula that is wrong
   the same way for every task (e.g. a relative position bias row of the wrong token). This one runs
   a split pass (autograd on, as in training) and holds every block's output for each new class
   token to its block kind's :meth:`~learnable_memory.kinds.BlockKind.reference`: the kind's unfused
   formula for one new class token against the original tokens and its own memory, on the same
   inputs. It then holds the packed pass (inference) to the split one.

:func:`check_dense_reference` holds ``forward_all`` to a dense reference in every layout. Random
task parameters (:func:`randomize`) stand in for training: large enough that a wrong mask or a wrong
path shows in the outputs. The checks use the package's public API only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MODES
from ..context import PassContext
from ..kinds import BlockKind
from ..model import MemoryViT, load_adapters
from ..registry import block_kind
from ..typing import Tensor
from ..wrapping import wrap_model

#: ``(task name, n_mem, mode)`` in model order.
Layout = Sequence[tuple[str, int, str]]

#: Task layouts that cover every mode: three concatenated tasks (one with no memory), a chain of
#: extension tasks, and a full-mode task alone.
LAYOUTS: dict[str, Layout] = {
    "concat": [("a", 3, "non_destructive"), ("b", 2, "non_destructive"), ("c", 0, "non_destructive")],
    "extension": [("a", 3, "non_destructive"), ("b", 2, "extension"), ("c", 1, "extension")],
    "full": [("a", 4, "full")],
}


@dataclass(frozen=True)
class Tolerance:
    """How close two float32 outputs must be (``torch.testing.assert_close``'s ``atol``, ``rtol``).

    With ``scaled``, ``atol`` is relative to the largest magnitude of the expected output (at least
    1): float32 rounding grows with the scale of the logits (wide models, random heads).
    """

    atol: float = 1e-5
    rtol: float = 1e-5
    scaled: bool = False

    def atol_for(self, want: Tensor) -> float:
        return self.atol * max(1.0, want.abs().max().item()) if self.scaled and want.numel() else self.atol


def build(base: nn.Module | MemoryViT, layout: str | Layout, num_classes: int = 5,
          seed: int | None = None) -> MemoryViT:
    """``base`` with the tasks of ``layout`` (a :data:`LAYOUTS` key or a list), added in order; with a
    ``seed``, the tasks get random parameters (:func:`randomize`)."""
    model = base
    for name, n_mem, mode in LAYOUTS[layout] if isinstance(layout, str) else layout:
        model = wrap_model(model, n_mem=n_mem, num_classes=num_classes, task=name, mode=mode)
    if seed is not None:
        randomize(model, seed)
    return model


def randomize(model: MemoryViT, seed: int = 1, scale: float = 0.5, tasks: Iterable[str] | None = None) -> None:
    """Give the tasks (default: all) random parameters N(0, ``scale``²), so that a wrong mask or
    path shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.task_names if tasks is None else tasks:
            for p in model.tasks[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * scale)


def assert_outputs_close(got: Mapping[str, Tensor], want: Mapping[str, Tensor], tol: Tolerance = Tolerance(),
                         what: str = "output") -> None:
    """The same keys, and every output close (``forward_all`` dicts)."""
    assert list(got) == list(want), f"{what}: keys {list(got)} but expected {list(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=tol.atol_for(want[k]), rtol=tol.rtol,
                                   msg=lambda m, k=k: f"{what} {k!r} differs: {m}")


def assert_equal(got: Tensor, want: Tensor, what: str) -> None:
    """Bit-identical, or an ``AssertionError`` naming ``what`` and the largest difference."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} but expected {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what} is not bit-identical: max difference {(got - want).abs().max().item():.3g}"


def check_base_unchanged(base: nn.Module, images: object, layout: str | Layout = "extension") -> None:
    """Wrapping ``base`` with the tasks of ``layout`` (random parameters) leaves its output
    bit-identical: ``forward_all(images)["base"]`` at inference and in a training pass (autograd on,
    tasks in training mode), and ``base(images)`` itself.

    Args:
        base: A timm model in eval mode (frozen in place by wrapping).
        images: What ``base`` takes, e.g. ``[B, C, H, W]``.
        layout: Tasks without a full-mode one (full mode changes the base output by design).
    """
    with torch.no_grad():
        want = base(images)
    model = build(base, layout, seed=1)
    with torch.no_grad():
        assert_equal(model.forward_all(images)["base"], want, "base output at inference")
    model.train()
    got = model.forward_all(images)["base"]
    model.eval()
    assert_equal(got.detach(), want, "base output in a training pass")
    with torch.no_grad():
        assert_equal(base(images), want, "the backbone's own output after wrapping")


def check_concatenation(base: nn.Module, images: object, n_mem: Sequence[int] = (3, 2),
                        tol: Tolerance = Tolerance()) -> None:
    """Tasks made separately on ``base`` (one per entry of ``n_mem``, random parameters), then
    served by one model: each task's output, from ``forward_all`` and from ``forward``, equals its
    output alone, and the base output is bit-identical to ``base``'s own."""
    with torch.no_grad():
        want_base = base(images)
    alone = {}
    for i, m in enumerate(n_mem):
        name = f"task{i}"
        alone[name] = wrap_model(base, n_mem=m, num_classes=4 + i, task=name)  # trained separately
        randomize(alone[name], seed=10 + i)
    merged = MemoryViT(base)
    for model in alone.values():
        merged.add_task(model.tasks[model.active_task])
    with torch.no_grad():
        want = {"base": want_base, **{n: model(images) for n, model in alone.items()}}
        got = merged.forward_all(images)
        assert_equal(got["base"], want_base, "base output of the concatenated model")
        assert_outputs_close(got, want, tol, "concatenated forward_all vs each task alone:")
        served = {"base": want_base, **{n: merged.set_task(n)(images) for n in alone}}
        assert_outputs_close(served, want, tol, "concatenated forward vs each task alone:")


def check_training(base: nn.Module, images: object, mode: str = "non_destructive",
                   tol: Tolerance = Tolerance()) -> None:
    """One SGD step of a new task in ``mode`` (on top of a frozen earlier task, unless in full mode,
    which stands alone): gradients reach its memory in every block, its class token and its head,
    and nothing else; the backbone stays frozen and in eval mode; after the step the base output and
    the earlier task are unchanged, and the new task's output moved."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "full":
        model = wrap_model(base, n_mem=2, num_classes=5, task="new", mode=mode)
    else:
        earlier = wrap_model(base, n_mem=3, num_classes=5, task="earlier")
        randomize(earlier)
        model = wrap_model(earlier, n_mem=2, num_classes=5, task="new", mode=mode)
    task = model.tasks["new"]
    with torch.no_grad():
        before = model.forward_all(images)
    model.train()
    assert model.training and not base.training, "model.train() must leave the frozen backbone in eval mode"
    logits = model(images)
    F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device) % logits.shape[-1]).backward()
    assert task.memory.grad is not None, "no gradient reaches the new task's memory"
    for layer in range(task.memory.shape[0]):
        assert task.memory.grad[layer].abs().sum() > 0, f"no gradient reaches block {layer}'s memory"
    for name in ("class_token", "head.weight", "head.bias"):
        grad = task.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches the new task's {name}"
    leaked = [n for n, p in base.named_parameters() if p.grad is not None or p.requires_grad]
    assert not leaked, f"the backbone is not frozen: {leaked[:5]} got gradients or require them"
    for name in model.task_names[:-1]:
        leaked = [n for n, p in model.tasks[name].named_parameters() if p.grad is not None or p.requires_grad]
        assert not leaked, f"earlier task {name!r} is not frozen: {leaked} got gradients or require them"
    torch.optim.SGD(task.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        after = model.forward_all(images)
    if "base" in before:
        assert_equal(after["base"], before["base"], "base output after training a task")
    for name in model.task_names[:-1]:
        assert_outputs_close({name: after[name]}, {name: before[name]}, tol, "after training a new task, output")
    assert not torch.equal(after["new"], before["new"]), "the training step did not change the new task's output"


def check_save_load(base: nn.Module, fresh_base: nn.Module, images: object, folder: str | Path,
                    layout: str | Layout = "extension") -> None:
    """The tasks of ``layout`` (random parameters) on ``base``, saved with ``save_pretrained`` to
    ``folder`` and loaded with ``load_adapters`` onto ``fresh_base`` (another copy of the backbone,
    e.g. ``copy.deepcopy(base)`` or the same checkpoint loaded again): the same tasks, in order,
    with the same modes, and outputs bit-identical to the saved model's."""
    if fresh_base is base:
        raise ValueError("fresh_base must be another copy of the backbone (e.g. copy.deepcopy(base)), not base itself")
    model = build(base, layout, seed=1)
    model.save_pretrained(folder)
    loaded = load_adapters(fresh_base, [folder])
    assert loaded.task_names == model.task_names, f"loaded tasks {loaded.task_names}, saved {model.task_names}"
    modes = {n: (loaded.tasks[n].mode, loaded.tasks[n].config.depends_on) for n in loaded.task_names}
    assert modes == {n: (model.tasks[n].mode, model.tasks[n].config.depends_on) for n in model.task_names}, modes
    with torch.no_grad():
        want, got = model.forward_all(images), loaded.forward_all(images)
    assert list(got) == list(want), f"outputs {list(got)} after loading, {list(want)} before saving"
    for k in want:
        assert_equal(got[k], want[k], f"output {k!r} after save and load")


def check_dense_reference(base: nn.Module, images: object,
                          reference: Callable[[MemoryViT, object], Mapping[str, Tensor]],
                          layouts: Iterable[str | Layout] = tuple(LAYOUTS), tol: Tolerance = Tolerance(),
                          exact_base: bool = True) -> None:
    """For each layout (random task parameters), ``forward_all`` equals ``reference(model, images)``,
    e.g. :func:`~learnable_memory.testing.dense_forward_all`; with ``exact_base`` the base output is
    also bit-identical to ``base``'s own."""
    with torch.no_grad():
        want_base = base(images)
    for layout in layouts:
        model = build(base, layout, seed=1)
        with torch.no_grad():
            got = model.forward_all(images)
            assert_outputs_close(got, reference(model, images), tol, f"layout {layout}: forward_all vs reference,")
        if exact_base and "base" in got:
            assert_equal(got["base"], want_base, f"layout {layout}: base output")


#: ``(block, x, c, ctx, c after the block)`` of one block call in a split pass.
Call = tuple[nn.Module, Tensor, Tensor, PassContext, Tensor]


@contextmanager
def recorded_blocks(model: MemoryViT) -> Iterator[list[Call]]:
    """Record every block call of the passes run inside: the block, its inputs ``x`` ``[B, N, D]`` and
    ``c`` ``[B, K, D]``, the pass's context and the block's new ``c``."""
    calls: list[Call] = []
    kinds: dict[int, BlockKind] = {id(k): k for k in map(block_kind, model.backbone.blocks(model.base))}

    def recorder(kind: BlockKind):
        run = type(kind).forward

        def forward(blk, x, c, kv, ctx):
            x_out, c_out = run(kind, blk, x, c, kv, ctx)
            calls.append((blk, x.detach(), c.detach(), ctx, c_out.detach()))
            return x_out, c_out

        return forward

    for kind in kinds.values():
        kind.forward = recorder(kind)
    try:
        yield calls
    finally:
        for kind in kinds.values():
            del kind.forward


def check_new_tokens(base: nn.Module, images: object, tol: Tolerance = Tolerance()) -> None:
    """Three non-destructive tasks (memory 3, 2 and 0, random parameters) on ``base``: in a split pass,
    each block's new class token of each task equals its block kind's dense reference
    (:meth:`~learnable_memory.kinds.BlockKind.reference`) on that block's inputs; and the packed pass's
    outputs equal the split pass's."""
    model = build(base, "concat", seed=1)
    blocks = model.backbone.blocks(model.base)
    layer = {blk: i for i, blk in enumerate(blocks)}
    tasks = [model.tasks[n] for n in model.task_names]
    with recorded_blocks(model) as calls, torch.enable_grad():
        split = {k: v.detach() for k, v in model.forward_all(images).items()}
    assert len(calls) == len(blocks), f"the split pass ran {len(calls)} block calls for {len(blocks)} blocks"
    for blk, x, c, ctx, c_out in calls:
        i = layer[blk]
        kind = block_kind(blk)
        assert not ctx.packed, "check_new_tokens needs a split pass (autograd on)"
        with torch.no_grad():
            for j, task in enumerate(tasks):
                want = kind.reference(blk, x, c[:, j : j + 1], task.memory[i], ctx)
                assert_outputs_close({task.name: c_out[:, j : j + 1]}, {task.name: want}, tol,
                                     f"block {i} ({type(blk).__name__}, {type(kind).__name__}): new class token vs "
                                     "the kind's dense reference,")
    with torch.no_grad():
        assert_outputs_close(model.forward_all(images), split, tol, "packed (inference) vs split (training) pass:")


def check_all(base: nn.Module, images: object, folder: str | Path, fresh_base: nn.Module | None = None,
              modes: Iterable[str] = MODES, tol: Tolerance = Tolerance()) -> None:
    """Every guarantee of this module on ``base``: base unchanged, the new class tokens against their
    kinds' dense references (:func:`check_new_tokens`), concatenation, a
    training step in each of ``modes``, and a save/load round trip into ``folder`` (onto
    ``fresh_base``, default a deep copy of ``base``). Wide models with large logits may need
    ``Tolerance(scaled=True)``."""
    fresh = copy.deepcopy(base) if fresh_base is None else fresh_base
    check_base_unchanged(base, images)
    check_new_tokens(base, images, tol)
    check_concatenation(base, images, tol=tol)
    for mode in modes:
        check_training(base, images, mode, tol)
    check_save_load(base, fresh, images, folder)

"""One batch of requests -> one model pass -> each request's own top-k labels.

A :class:`Chunk` is up to ``max_batch_size`` images of one request, prepared with one preprocessing,
with the tasks of that request that expect it (one :class:`~learnable_memory.pass_groups.PassGroup`),
resolved against the model that was current when the request was admitted (the chunk holds that model).
:func:`run_batch` runs chunks of one model in ONE ``forward_all`` per preprocessing (in the common case
one in all) over the union of their tasks, and hands each chunk only its own tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import mask
from ..config import BASE_KEY, UnknownTaskError
from ..model import MemoryViT
from .settings import ServeError

#: One label of a prediction: ``{"label": name, "index": class index, "prob": probability}``.
Label = dict[str, object]


@dataclass(eq=False)
class Chunk:
    """Images of one request (all of them, or one slice of a request larger than a batch).

    Attributes:
        images: ``[n, C, H, W]`` preprocessed, float32, on the CPU.
        model: The model the request was admitted on; it runs on this one even if another is loaded since.
        tasks: Outputs wanted (task names and/or ``"base"``), checked against ``model``, all expecting the
            images prepared as ``images`` are.
        top_k: Labels per task and image.
        request: Id of the request the chunk belongs to (a request larger than a batch has several chunks).
        future: Receives the chunk's :func:`run_batch` result.
        preprocessing: The key of the preprocessing ``images`` went through: chunks with the same key
            share a pass.
    """

    images: torch.Tensor
    model: MemoryViT
    tasks: tuple[str, ...]
    top_k: int
    request: int
    future: asyncio.Future = field(repr=False)
    preprocessing: str = ""

    @property
    def n(self) -> int:
        return self.images.shape[0]


def has_full_task(model: MemoryViT) -> bool:
    """Whether ``model`` holds a full-mode task (it then serves no ``"base"`` output)."""
    return mask.has_full_task(model.tasks.values())


def resolve_tasks(model: MemoryViT, tasks: Sequence[str] | None) -> tuple[str, ...]:
    """The outputs a request gets, by :meth:`MemoryViT.resolve_outputs`'s rule: ``tasks`` without repeats,
    or by default every task plus ``"base"`` (no ``"base"`` while a full-mode task is loaded). 404 for
    a name the model has no output for, 422 for an empty or malformed list."""
    try:
        wanted, _ = model.resolve_outputs(tasks)
    except UnknownTaskError as err:
        raise ServeError(404, f"{err} (this server serves {list(model.resolve_outputs(None)[0])})",
                         "unknown_task") from err
    except ValueError as err:
        raise ServeError(422, f"{err} (leave tasks out of the request for every output)", "bad_request") from err
    return tuple(wanted)


def union_tasks(model: MemoryViT, chunks: Sequence[Chunk]) -> list[str]:
    """Every output the chunks ask for: ``"base"`` first, then tasks in model order."""
    wanted = {t for c in chunks for t in c.tasks}
    return [n for n in [BASE_KEY, *model.task_names] if n in wanted]


def forward(model: MemoryViT, images: torch.Tensor, tasks: list[str],
            per_task: bool = False) -> dict[str, torch.Tensor]:
    """Logits ``name -> [B, classes]`` of ``tasks``: one ``forward_all`` pass, or with ``per_task`` one pass
    per task (the one-model-per-task design that ``benchmarks/serve.py`` compares against)."""
    param = next(model.base.parameters())
    x = images.to(param.device, param.dtype, non_blocking=True)
    with torch.inference_mode():
        if not per_task:
            return model.forward_all(x, tasks=tasks)
        return {t: model.forward_all(x, tasks=[t])[t] for t in tasks}


def class_labels(model: MemoryViT, base_labels: Sequence[str] | None) -> dict[str, Sequence[str] | None]:
    """Label names per output: the saved class names of each task, the base model's own for ``"base"``."""
    return {BASE_KEY: base_labels, **{n: t.config.class_names for n, t in model.tasks.items()}}


def top_labels(probs: torch.Tensor, k: int, names: Sequence[str] | None) -> list[list[Label]]:
    """``probs`` ``[n, C]`` -> per image the ``k`` most probable labels, most probable first."""
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[{"label": names[j] if names else str(j), "index": j, "prob": p} for p, j in zip(ps, js, strict=True)]
            for ps, js in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def run_batch(chunks: Sequence[Chunk], base_labels: Sequence[str] | None,
              per_task: bool = False) -> list[list[dict[str, list[Label]]]]:
    """Run chunks of one model, one pass per preprocessing among them. Returns, per chunk, per image,
    ``task -> top-k labels`` for the chunk's own tasks only."""
    model = chunks[0].model
    if any(c.model is not model for c in chunks):
        raise ValueError("a batch runs on one model; the batcher groups chunks by model")
    labels = class_labels(model, base_labels)
    by_preprocessing: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_preprocessing.setdefault(c.preprocessing, []).append(i)
    out: dict[int, list[dict[str, list[Label]]]] = {}
    for indices in by_preprocessing.values():
        group = [chunks[i] for i in indices]
        logits = forward(model, torch.cat([c.images for c in group]), union_tasks(model, group), per_task)
        probs = {t: v.float().softmax(-1).cpu() for t, v in logits.items()}
        start = 0
        for i, c in zip(indices, group, strict=True):
            per_task_labels = {t: top_labels(probs[t][start:start + c.n], c.top_k, labels[t]) for t in c.tasks}
            out[i] = [{t: per_task_labels[t][j] for t in c.tasks} for j in range(c.n)]
            start += c.n
    return [out[i] for i in range(len(chunks))]

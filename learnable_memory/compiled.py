"""``torch.compile`` of a ``MemoryViT`` that raises the library's own errors: :func:`compile_model`.

Under ``torch.compile(..., fullgraph=True)``, an error the model raises inside the compiled region (an
unknown task, images of the wrong size, ``forward`` without a task) reaches the caller as
``torch._dynamo.exc.Unsupported`` ("Observed exception"), its own message only inside that text
("Developer debug context: raised exception ValueError(...)"). With a raw ``torch.compile``, catch
``torch._dynamo.exc.Unsupported`` and read that line, or call the model eagerly to see the error.

:func:`compile_model` compiles ``forward`` and ``forward_all`` and runs them behind a small eager
wrapper: it checks the input with the backbone's own check before the compiled region, and when
dynamo still stops at an exception (a task name the model does not have, say), it calls the model
eagerly, which raises the library's own exception in its checks before any block runs. Should the
eager call pass, dynamo's error is raised as it was. Valid calls go straight to the compiled code.

    compiled = compile_model(model)                 # fullgraph=True unless told otherwise
    compiled.forward_all(images, tasks=["a", "base"])
    compiled(images)                                # the active task, as model(images)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._dynamo

from .model import MemoryViT


class CompiledMemoryViT:
    """A ``MemoryViT``'s compiled ``forward`` (``__call__``) and ``forward_all``, raising the model's own
    errors (see the module docstring).

    Attributes:
        model: The eager model (its tasks, ``set_task``, its cache: all as before).
    """

    def __init__(self, model: MemoryViT, **options: Any):
        if not isinstance(model, MemoryViT):
            raise TypeError(f"compile_model takes a MemoryViT, got {type(model).__name__}")
        self.model = model
        self._forward = torch.compile(model, **options)
        self._forward_all = torch.compile(model.forward_all, **options)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of the active task (as ``model(images)``)."""
        return self._run(self._forward, self.model, images)

    def forward_all(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """As :meth:`MemoryViT.forward_all`, compiled."""
        return self._run(self._forward_all, self.model.forward_all, images, tasks)

    def _run(self, compiled: Callable[..., Any], eager: Callable[..., Any], images: torch.Tensor, *args: Any) -> Any:
        self.model.backbone.check_input(self.model.base, images)
        try:
            return compiled(images, *args)
        except torch._dynamo.exc.Unsupported:
            eager(images, *args)  # the model's own checks raise its own error here
            raise


def compile_model(model: MemoryViT, *, fullgraph: bool = True, **options: Any) -> CompiledMemoryViT:
    """``torch.compile`` ``model``'s ``forward`` and ``forward_all`` (``options`` go to ``torch.compile``),
    behind a wrapper that raises the model's own errors instead of dynamo's ``Unsupported``."""
    return CompiledMemoryViT(model, fullgraph=fullgraph, **options)

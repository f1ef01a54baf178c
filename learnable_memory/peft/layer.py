"""What peft's tuner holds: a :class:`~learnable_memory.MemoryViT` whose tasks are the adapters.

peft finds its adapters through modules of one tuner-layer class (``BaseTunerLayer``): to disable
them, report their status, list them. Here that is :class:`MemoryTasks`, the model's task store,
one module for every adapter (adapter name = task name). No timm module is replaced or wrapped:
:class:`PeftMemoryViT` runs the backbone through the kinds of :mod:`learnable_memory.kinds`, so the
arithmetic is the core's, unchanged (see :mod:`learnable_memory.peft.tuner` for why peft's
module replacement is not used).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config import BASE_KEY, PEFT_BASE, UnknownTaskError
from ..memory import TaskStore
from ..model import MemoryViT

MERGE_ERROR = (
    "learnable memory can not be merged into the backbone's weights: a task is extra key/value tokens in "
    "every block (its memory), its own class token and its own head, not a change of any weight, so there is "
    "nothing to fold in and no merged model that computes the same outputs. Serve the PeftModel as it is "
    "(forward_all runs the base model and every adapter in one pass), or call unload() to get the untouched "
    "timm model back."
)


class MemoryTasks(TaskStore, BaseTunerLayer):
    """The tasks of a :class:`PeftMemoryViT` as peft's one tuner layer: every adapter lives here.

    It keeps what peft asks of a tuner layer: whether adapters are disabled
    (``PeftModel.disable_adapter()``), the active adapter, the available ones. Merging is refused
    (:data:`MERGE_ERROR`); nothing is ever merged, so unmerging does nothing.
    """

    def _get_available_adapters(self) -> set[str]:
        return set(self.keys())

    def enable_adapters(self, enabled: bool) -> None:
        """Serve the adapters (True) or the base model alone (False); trainability is left as it is."""
        self._disable_adapters = not enabled

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing to undo: nothing is ever merged."""

    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError("MemoryTasks holds memory tokens, class tokens and heads, no weight of the backbone")

    @property
    def bias(self) -> torch.Tensor:
        raise AttributeError("MemoryTasks holds memory tokens, class tokens and heads, no bias of the backbone")


class PeftMemoryViT(MemoryViT):
    """The ``MemoryViT`` peft's tuner holds (``peft_model.base_model.model``; ``.base`` is the timm model).

    ``forward(images)`` ``[B, C, H, W]`` -> logits ``[B, num_classes]`` of the active adapter; the timm
    model's own output while adapters are disabled; with ``adapter_names`` set (peft's mixed batches,
    one adapter name or ``"__base__"`` per image) the row of each image's adapter, all adapters in one
    pass. ``forward_all`` is the core's; while adapters are disabled (``disable_adapter()``) its only
    output is ``"base"`` (see :meth:`resolve_outputs`).
    """

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.tasks = MemoryTasks()
        #: One adapter name per image for the next forward (set by the tuner during peft's forward).
        self.adapter_names: list[str] | None = None

    def resolve_outputs(self, tasks: str | Iterable[str] | None = None) -> tuple[list[str], tuple[str, ...]]:
        """``MemoryViT.resolve_outputs``, except that while adapters are disabled the model has one output,
        ``"base"``: by default only it, and asking for an adapter is an ``UnknownTaskError``."""
        if not self.tasks.disable_adapters:
            return super().resolve_outputs(tasks)
        if tasks is None:
            return [BASE_KEY], ()
        try:
            wanted, _ = super().resolve_outputs(tasks)
        except UnknownTaskError as err:  # a full-mode adapter has no base output, but it is disabled
            if err.names != [BASE_KEY]:
                raise
            wanted = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
        adapters = [n for n in wanted if n != BASE_KEY]
        if adapters:
            raise UnknownTaskError(f"adapters are disabled (inside disable_adapter()), so {adapters} give no output; "
                                   f"ask for {BASE_KEY!r}, or leave the disable_adapter() block", adapters)
        return wanted, ()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.tasks.disable_adapters:
            return self.base(images)
        if self.adapter_names is not None:
            return self.mixed_forward(images, self.adapter_names)
        return super().forward(images)

    def mixed_forward(self, images: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """Row ``i`` of the output of adapter ``adapter_names[i]`` (``"__base__"``: the base model's), every
        adapter named computed in one ``forward_all`` pass over the whole batch -> ``[B, C]``. The adapters
        named must have the same number of classes (use ``forward_all`` otherwise)."""
        wanted = [BASE_KEY if n == PEFT_BASE else n for n in dict.fromkeys(adapter_names)]
        out = self.forward_all(images, wanted)
        sizes = {n: o.shape[-1] for n, o in out.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"adapter_names mixes adapters with different numbers of classes {sizes}, which can not "
                             "share one output tensor; call forward_all(images, tasks=[...]) to get each adapter's "
                             "logits in one pass")
        stacked = torch.stack([out[n] for n in wanted])  # [U, B, C]
        if len(adapter_names) != stacked.shape[1]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {stacked.shape[1]}: "
                             "give one adapter name (or '__base__') per image")
        which = torch.tensor([wanted.index(BASE_KEY if n == PEFT_BASE else n) for n in adapter_names],
                             device=stacked.device)
        return stacked[which, torch.arange(stacked.shape[1], device=stacked.device)]

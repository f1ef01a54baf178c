""":class:`LearnableMemoryModel`: peft's tuner for learnable memory.

Structure (``peft_model = peft.get_peft_model(vit, LearnableMemoryConfig(...))``)::

    PeftModel
      base_model: LearnableMemoryModel            the tuner
        model: PeftMemoryViT                      a MemoryViT over the timm model
          base: the timm model                    frozen, untouched, always in eval mode
          tasks: MemoryTasks                      adapter name -> TaskMemory (peft's one tuner layer)

``PeftModel.forward`` calls ``peft_model.base_model.model``, the ``PeftMemoryViT``: the active
adapter's logits. peft hands attributes it does not have to the tuner and the tuner to its model,
so ``peft_model.forward_all(images)`` is the core's one pass over the base model and every adapter.

Why no module replacement: peft's usual tuner swaps target modules for wrappers
(``_create_and_replace``). Learnable memory changes what enters attention in every block, adds
class tokens before the first block and a head per task after the last, so it would have to wrap
the blocks, the embedding and the head with one another's state, and a second implementation of
the block arithmetic that the core keeps in :mod:`learnable_memory.kinds`. Two traps showed in a
try: ``_replace_module`` calls ``next(child.parameters())`` and raises a bare ``StopIteration`` on
modules without parameters (timm's ``norm_pre``), and ``set_adapter`` visits only modules of the
tuner's one layer class, so a head wrapper of another class kept the old adapter. Here the whole
state is one module (``MemoryTasks``) and the backbone's modules are never touched.

State dict keys. In the model a task's tensors are ``base_model.model.tasks.<task>.memory``,
``.class_token``, ``.head.weight``, ``.head.bias`` (``<task>`` is the adapter name, with ``.`` and
``%`` escaped). peft saves them without the adapter name, ``base_model.model.tasks.memory`` and so
on; loading maps those names, and our own (``memory`` ...), back onto the adapter being loaded, after
the check ``load_adapters`` runs too (:func:`~learnable_memory.adapters.tensors.check_tensors`: names,
shapes, dtype, finiteness and, for folders our ``save_adapter`` wrote, the task fingerprint).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..adapters.fingerprint import base_identity, base_state, preprocessing
from ..adapters.loading import check_backbone
from ..adapters.peft_format import PEFT_TASKS_PATH, our_names
from ..adapters.tensors import AdapterError, check_tensors
from ..memory import TENSOR_NAMES, task_key
from ..model import MemoryViT
from .config import LearnableMemoryConfig
from .layer import MERGE_ERROR, PEFT_BASE, MemoryTasks, PeftMemoryViT

Tensors = dict[str, torch.Tensor]


def _find_tasks(model: nn.Module) -> tuple[str, MemoryTasks]:
    """The state dict prefix of the tasks in ``model`` (a PeftModel, a tuner or a PeftMemoryViT;
    ``base_model.model.tasks.`` in a PeftModel), and the tasks."""
    for path, module in model.named_modules():
        if isinstance(module, MemoryTasks):
            return (f"{path}." if path else ""), module
    raise TypeError(f"{type(model).__name__} holds no learnable-memory adapters (no MemoryTasks inside)")


def _tasks_prefix(model: nn.Module) -> str:
    return _find_tasks(model)[0]


class AdapterConfigs(dict):
    """The tuner's ``peft_config`` (adapter name -> config): a dict whose ``in`` says what is wrong with a
    name that is not a string. peft's ``PeftModel.set_adapter`` asks ``name in peft_config`` first, which
    for a list (``set_adapter(["a", "b"])``) would be a raw ``TypeError: unhashable type``."""

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, Hashable):
            raise ValueError(f"one adapter name at a time, got {name!r}: set_adapter('name') serves one adapter; "
                             "for several in one pass use forward_all(images, tasks=[...]) or "
                             "forward(images, adapter_names=[...])")
        return super().__contains__(name)


class LearnableMemoryModel(BaseTuner):
    """Learnable memory as a peft tuner (experimental): ``peft.get_peft_model(vit, LearnableMemoryConfig(...))``.

    Adapters are tasks of one :class:`~learnable_memory.peft.layer.PeftMemoryViT`: ``add_adapter`` adds
    a task (new adapters start frozen and inactive, as in peft), ``set_adapter`` picks the task
    ``forward`` serves, ``delete_adapter`` removes it, ``disable_adapter()`` serves the timm model's own
    output. Each adapter has its own head and number of classes. Adapter weights keep the backbone's
    dtype (the memory joins the backbone's tokens), so ``autocast_adapter_dtype`` has no effect.
    ``merge_and_unload`` is refused (see :data:`~learnable_memory.peft.layer.MERGE_ERROR`); ``unload``
    returns the timm model.
    """

    #: peft warns when an adapter name is part of the method's prefix (tuners that find their weights by it
    #: would mix them up). This tuner finds them by module path, so the prefix is a control character, which
    #: no adapter name holds: peft never warns (nor reports missing keys by it: loading checks them itself).
    prefix: str = "\x1f"
    tuner_layer_cls = MemoryTasks
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, low_cpu_mem_usage: bool = False,
                 state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        if isinstance(model, MemoryViT):
            raise TypeError("get_peft_model takes the timm model; a MemoryViT already holds tasks: add them with "
                            "add_task/load_adapters, or pass its .base")
        self._identity: dict[str, Any] | None = None
        super().__init__(PeftMemoryViT(model), peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                         state_dict=state_dict)
        self.peft_config = AdapterConfigs(self.peft_config)

    # ----- adapters -----
    def inject_adapter(self, model: PeftMemoryViT, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Mapping[str, torch.Tensor] | None = None,
                       **kwargs: Any) -> None:
        """Add the task of ``peft_config[adapter_name]``: checked against the backbone it was saved for,
        trainable only when it is the active adapter and the config is not in inference mode; the
        trainability of the other adapters and the active adapter stay as they were."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, LearnableMemoryConfig):
            raise TypeError(f"adapter {adapter_name!r}: expected a LearnableMemoryConfig, got {type(config).__name__}")
        base = model.base
        if config.base_model is None:  # a new adapter: record the backbone (hashed once per tuner: it is frozen)
            if self._identity is None:
                self._identity = base_identity(base)
            config.base_model = dict(self._identity)
        else:
            check_backbone(config.base_model, adapter_name, f"adapter config of {adapter_name!r}", base,
                           base_state(base))
        if config.preprocessing is None:
            config.preprocessing = preprocessing(base)
        config.task = adapter_name
        active = model.active_task
        trainable = [(p, p.requires_grad) for p in model.tasks.parameters()]
        task = model.add_task(config.task_config(adapter_name))  # makes it active and freezes the others
        for p, flag in trainable:
            p.requires_grad_(flag)
        self._activate(active if active is not None else adapter_name)
        task.requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)

    def _activate(self, name: str) -> None:
        self.model.set_task(name)
        self.model.tasks._active_adapter = [name]
        self.active_adapter = name

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Serve adapter ``adapter_name`` (one at a time; several at once: ``forward_all`` or ``adapter_names=``).
        It becomes trainable unless ``inference_mode``; the other adapters are frozen (as in peft)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"one active adapter at a time, got {names}; for several in one pass use "
                             "forward_all(images, tasks=[...]) or forward(images, adapter_names=[...])")
        name = names[0]
        if name not in self.model.tasks:
            raise ValueError(f"Adapter {name!r} not found; adapters: {self.model.task_names}")
        for n, task in self.model.tasks.items():
            task.requires_grad_(n == name and not inference_mode)
        self._activate(name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``; if it was active, the last adapter left becomes active. The last
        adapter is not removed (``ValueError``): peft's forward looks the active adapter up."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if len(self.peft_config) == 1:
            raise ValueError(f"adapter {adapter_name!r} is the last one, and a PeftModel needs an adapter (its forward "
                             "looks the active one up): add another adapter first, or call unload() to get the timm "
                             "model back")
        self.model.remove_task(adapter_name)
        del self.peft_config[adapter_name]
        if self.model.active_task is None:
            self.model.tasks._active_adapter = []
            self.active_adapter = []
        else:
            self._activate(self.model.active_task)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.model.tasks[name].requires_grad_(requires_grad)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Nothing to do: a task's tensors keep the backbone's dtype, which the memory's attention needs."""

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's mixed batches: ``peft_model(images, adapter_names=[name or "__base__", ...])``, one pass."""
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        unknown = sorted(set(names) - set(self.model.task_names) - {PEFT_BASE})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        self.model.adapter_names = list(names)
        try:
            yield
        finally:
            self.model.adapter_names = None

    # ----- merging -----
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        """``merge_and_unload``: refused. ``unload``: the timm model, which was never changed (frozen, eval)."""
        if merge:
            raise ValueError(MERGE_ERROR)
        return self.model.base

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("LearnableMemoryModel replaces no module (see learnable_memory.peft.tuner)")

    # ----- peft's state dict hooks -----
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: Any, adapter_name: str, state_dict: Tensors,
                                unwanted_adapter_names: list[str]) -> Tensors:
        """The adapter's four tensors, under their model keys."""
        prefix = _tasks_prefix(model) + task_key(adapter_name) + "."
        found = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if len(found) < len(TENSOR_NAMES):  # peft left out keys that hold another adapter's name ("head", ...)
            found = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
        return found

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...tasks.<adapter>.head.weight`` -> ``...tasks.head.weight``."""
        head, sep, tail = key.rpartition(f"{PEFT_TASKS_PATH}.{task_key(adapter_name)}.")
        if sep and tail in TENSOR_NAMES and (not head or head.endswith(".")):
            return f"{head}{PEFT_TASKS_PATH}.{tail}"
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: Any, adapter_name: str,
                                           state_dict: Tensors) -> Tensors:
        """Saved tensors (peft's names or ours) -> the model keys of adapter ``adapter_name``, checked."""
        path, tasks = _find_tasks(model)
        prefix = path + task_key(adapter_name) + "."
        where = f"adapter {adapter_name!r}"
        try:
            named = our_names(state_dict)
        except ValueError as err:
            raise AdapterError(f"{where}: {err}") from err
        shapes = {k: list(v.shape) for k, v in tasks[adapter_name].named_tensors().items()}
        check_tensors(named, shapes, where, f"this adapter (n_mem={config.n_mem}, num_classes={config.num_classes})",
                      fingerprint=config.task_fingerprint)  # a folder our save_adapter wrote: the pair must match
        config.task_fingerprint = None  # it describes the file just loaded, not the adapter from now on
        return {prefix + k: v for k, v in named.items()}

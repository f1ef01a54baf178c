""":class:`LearnableMemoryConfig`: a learnable-memory task as a peft config, and as adapter format 2.

The config's fields are the fields of ``adapter_config.json`` in adapter format 2 (see
:mod:`learnable_memory.adapters.peft_format`), so that peft reads our folders and writes folders our
loader reads, with no field peft would warn about.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig

from ..adapters.folder import CONFIG_NAME, FORMAT_VERSION, METHOD, AdapterError, created_with, subfolders_hint
from ..adapters.peft_format import PEFT_TYPE
from ..adapters.schema import check_config_fields
from ..config import TaskConfig


@dataclass
class LearnableMemoryConfig(PeftConfig):
    """A learnable-memory adapter (Sandler et al., CVPR 2022) for peft: per-block memory tokens, a
    class token and a linear head, on a frozen timm ViT. Experimental.

    Args:
        n_mem: Memory tokens per block (0 gives "head + class token").
        num_classes: Classes of the adapter's own head (default: ``len(class_names)``); adapters of one
            model may differ.
        mode: ``"non_destructive"`` (the base output and the other adapters stay unchanged) or ``"full"``
            (every token attends to the memory; such an adapter is alone in its model). ``"extension"``
            needs tasks in a fixed order, which peft's adapters do not have: use
            :func:`learnable_memory.load_adapters` for it.
        init_std: Standard deviation of the memory's normal init (paper: 0.02).
        class_names: Optional label names, saved with the adapter.

    Filled in by the tuner, or read from a saved adapter; leave them unset:
    ``task`` (the adapter's name), ``base_model`` (the backbone's identity, checked when an adapter
    is loaded onto a backbone: shape and weight fingerprint; set it to None to skip the check),
    ``preprocessing``, ``depends_on``, ``format_version``, ``method``, ``created_with``, and
    ``task_fingerprint`` / ``weights_sha256`` (read from folders our ``save_adapter`` wrote; peft's
    saves leave them out, since they describe one file). ``base_model_name_or_path`` stays None: the
    backbone is recorded in ``base_model``, and with a name set peft looks the backbone's
    ``config.json`` up on the Hub at every save.
    """

    n_mem: int = field(default=10, metadata={"help": "Memory tokens per block"})
    num_classes: int | None = field(default=None, metadata={"help": "Classes of the adapter's head"})
    mode: str = field(default="non_destructive", metadata={"help": "'non_destructive' or 'full'"})
    init_std: float = field(default=0.02, metadata={"help": "Std of the memory's normal init"})
    class_names: list[str] | None = field(default=None, metadata={"help": "Label names"})
    task: str | None = None
    base_model: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    depends_on: list[Any] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    method: str = METHOD
    created_with: str = field(default_factory=created_with)
    task_fingerprint: str | None = None
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.method != METHOD:
            raise ValueError(f"method is {self.method!r}: not a learnable-memory adapter config")
        if self.num_classes is None and self.class_names is not None:
            self.num_classes = len(self.class_names)
        if self.num_classes is None:
            raise ValueError("LearnableMemoryConfig needs num_classes (or class_names): the size of the adapter's head")
        if self.mode == "extension" or self.depends_on:
            raise ValueError("mode 'extension' is not available through peft: an extension task needs the tasks it "
                             "extends, in their order, which peft's adapters do not keep; load it with "
                             "learnable_memory.load_adapters, or train it with learnable_memory.wrap_model")
        self.task_config(self.task or "adapter")  # check the fields now, with TaskConfig's messages

    def task_config(self, name: str) -> TaskConfig:
        """The :class:`~learnable_memory.TaskConfig` of the adapter named ``name``."""
        return TaskConfig(name=name, n_mem=self.n_mem, num_classes=self.num_classes, mode=self.mode,
                          init_std=self.init_std, class_names=list(self.class_names) if self.class_names else None,
                          data_config=dict(self.preprocessing) if self.preprocessing is not None else None)

    def to_dict(self) -> dict[str, Any]:
        """The fields peft saves: all but ``task_fingerprint`` and ``weights_sha256``, which describe one file."""
        d = super().to_dict()
        for key in ("task_fingerprint", "weights_sha256"):
            d.pop(key)
        return d

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """A saved config as peft reads it: its fields' JSON types checked as ``load_adapters`` checks them
        (:class:`AdapterError`), ``base_model_name_or_path`` dropped (see the class docstring)."""
        check_config_fields(kwargs, f"adapter config of task {kwargs.get('task')!r}", skip_none=True)
        kwargs.pop("base_model_name_or_path", None)
        return kwargs


def explain_peft_type(get_peft_type: Callable[..., str]) -> Callable[..., str]:
    """peft's ``PeftConfig._get_peft_type(model_id, subfolder=...)`` (the ``peft_type`` of a folder's
    ``adapter_config.json``), with an :class:`AdapterError` saying what to do where it fails on a local
    folder of ours: a format-1 adapter (no ``peft_type``: raw ``KeyError``), or the root of a peft save
    whose named adapters sit in subfolders (no ``adapter_config.json``)."""

    @functools.wraps(get_peft_type)
    def wrapped(cls: type, model_id: str, **kwargs: Any) -> str:
        try:
            return get_peft_type(cls, model_id, **kwargs)
        except (KeyError, ValueError) as err:
            folder = Path(str(model_id)) / (kwargs.get("subfolder") or "")
            try:
                cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cfg = None
            if isinstance(cfg, dict) and cfg.get("method") == METHOD and "peft_type" not in cfg:
                raise AdapterError(f"{folder / CONFIG_NAME}: a learnable-memory adapter of format_version "
                                   f"{cfg.get('format_version')!r}, which peft can not read (it needs format 2): load "
                                   "it with learnable_memory.load_adapters, or save it again with "
                                   "load_adapters(...).save_adapter(path) to get format 2") from err
            hint = subfolders_hint(folder) if cfg is None else ""
            if hint:
                raise AdapterError(f"{folder}: holds no {CONFIG_NAME}{hint}") from err
            raise

    return wrapped

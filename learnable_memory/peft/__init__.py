"""Learnable memory as a peft method (experimental).

``import learnable_memory.peft`` registers :class:`LearnableMemoryConfig` and its tuner with peft under
the ``peft_type`` ``"LEARNABLE_MEMORY"`` (a string key in peft's mapping tables: peft's
``register_peft_method`` accepts only members of its closed ``PeftType`` enum). Then, on a timm ViT::

    import peft, learnable_memory.peft
    from learnable_memory.peft import LearnableMemoryConfig

    model = peft.get_peft_model(vit, LearnableMemoryConfig(n_mem=10, num_classes=100), adapter_name="cifar100")
    ...                                                   # train model(images) as any peft model
    model.add_adapter("pets", LearnableMemoryConfig(n_mem=10, num_classes=37))
    model.set_adapter("pets")
    model.forward_all(images)   # {"base": ..., "cifar100": [B, 100], "pets": [B, 37]}, ONE pass
    model.save_pretrained("out")                          # adapter format 2: load_adapters reads it
    peft.PeftModel.from_pretrained(vit, "out")            # also our save_adapter folders, and the Hub

Needs peft >= 0.21 (its tuner state-dict hooks; earlier versions refuse a ``peft_type`` outside
the enum when saving). Inside this package ``import peft`` is the peft library (absolute imports).
"""

from __future__ import annotations

import re

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from ..adapters.peft_format import PEFT_TYPE
from .config import LearnableMemoryConfig, explain_peft_type
from .layer import MERGE_ERROR, MemoryTasks, PeftMemoryViT
from .tuner import LearnableMemoryModel

#: The peft versions this package is tested with: the floor is the first with the tuner state-dict hooks.
PEFT_MIN = "0.21.0"

def _release(version: str) -> tuple[int, ...]:
    """``"0.21.2.dev0"`` -> ``(0, 21, 2)``."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


if _release(peft.__version__) < _release(PEFT_MIN):
    raise ImportError(f"learnable_memory.peft needs peft>={PEFT_MIN} (found {peft.__version__}): "
                      f"pip install 'peft>={PEFT_MIN}'")


def register() -> None:
    """Put the config class, tuner and prefix in peft's mapping tables under ``PEFT_TYPE``, and let peft's
    lookup of a folder's ``peft_type`` explain our folders it can not read (done on import; calling it
    again is harmless)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LearnableMemoryConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = LearnableMemoryModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = LearnableMemoryModel.prefix
    if not hasattr(peft.PeftConfig._get_peft_type, "__wrapped__"):
        peft.PeftConfig._get_peft_type = classmethod(explain_peft_type(peft.PeftConfig._get_peft_type.__func__))


register()

__all__ = [
    "MERGE_ERROR",
    "PEFT_MIN",
    "PEFT_TYPE",
    "LearnableMemoryConfig",
    "LearnableMemoryModel",
    "MemoryTasks",
    "PeftMemoryViT",
    "register",
]

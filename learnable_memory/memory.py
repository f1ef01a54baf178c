"""The trainable part of one task: per-block memory, a class token and a head."""

from __future__ import annotations

import torch
from torch import nn

from .config import TaskConfig


class TaskMemory(nn.Module):
    """Parameters of one task.

    Attributes:
        config: The task's :class:`TaskConfig`.
        memory: ``[depth, n_mem, embed_dim]``, the memory tokens E_mem^l of every block l.
        class_token: ``[embed_dim]``, the task's class token as it enters the blocks
            (position embedding included).
        head: ``nn.Linear(embed_dim, num_classes)`` on the task's feature.
    """

    def __init__(self, config: TaskConfig, depth: int, embed_dim: int, class_token_init: torch.Tensor):
        super().__init__()
        self.config = config
        self.memory = nn.Parameter(torch.empty(depth, config.n_mem, embed_dim))
        nn.init.normal_(self.memory, std=config.init_std)
        self.class_token = nn.Parameter(class_token_init.detach().clone().reshape(embed_dim))
        self.head = nn.Linear(embed_dim, config.num_classes)  # PyTorch's default init, as timm's reset_classifier

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def n_mem(self) -> int:
        return self.config.n_mem

    def extra_repr(self) -> str:
        c = self.config
        return f"name={c.name!r}, mode={c.mode}, n_mem={c.n_mem}, num_classes={c.num_classes}"

"""Table 1 of the paper: who attends to whom.

Token order (queries and keys alike), the order timm uses for its own tokens::

    [ prefix (class/register/distillation tokens) ; patches ; C_1 ... C_k ; M_1 ... M_k ]

``build_attention_mask`` is the single source of truth for the attention pattern. It draws the
cells of :func:`table1_cells`; the forward pass reads what each new class token sees off the same
cells (:class:`~learnable_memory.layout.NewTokenIndex`), the tests check that index against this mask
(:func:`new_token_mask`), and the model against a dense reference that uses the mask as ``attn_mask``.
:func:`check_task_order` says whether tasks can share a model in a given order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import MODES, TaskConfig

TaskLike = TaskConfig | tuple[int, str]


def _as_configs(tasks: Sequence[TaskLike]) -> list[TaskConfig]:
    """Accept TaskConfigs or ``(n_mem, mode)`` pairs; an extension pair extends all earlier tasks."""
    configs: list[TaskConfig] = []
    for i, t in enumerate(tasks):
        if isinstance(t, TaskConfig):
            configs.append(t)
            continue
        n_mem, mode = t
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        deps = [c.name for c in configs] if mode == "extension" else []
        configs.append(TaskConfig(name=f"task{i + 1}", n_mem=n_mem, num_classes=1, mode=mode, depends_on=deps))
    return configs


def check_task_order(tasks: Sequence[TaskConfig]) -> None:
    """Raise ``ValueError`` if these tasks can not share one model, in this order: unique names, a
    full-mode task alone, every extension task after the tasks it extends, in their order."""
    names = [t.name for t in tasks]
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise ValueError(f"duplicate task name {t.name!r}: every task in a model needs its own name")
        seen.add(t.name)
    if len(tasks) > 1 and any(t.mode == "full" for t in tasks):
        full = [t.name for t in tasks if t.mode == "full"]
        raise ValueError(
            f"task(s) {full} use mode 'full', whose memory changes the shared tokens, so they can not "
            f"share a model with other tasks (here: {names}). Train them with mode='non_destructive' or "
            "'extension' to concatenate, or serve the full-mode task in a model of its own."
        )
    for i, t in enumerate(tasks):
        earlier = names[:i]
        missing = [d for d in t.depends_on if d not in earlier]
        if missing:
            raise ValueError(
                f"extension task {t.name!r} attends to {t.depends_on}, which must all come before it; "
                f"missing or later: {missing} (tasks before it: {earlier})"
            )
        order = [earlier.index(d) for d in t.depends_on]
        if order != sorted(order):
            raise ValueError(
                f"extension task {t.name!r} needs its predecessors in the order {t.depends_on}, "
                f"but the model has them as {[n for n in earlier if n in t.depends_on]}"
            )


def build_attention_mask(
    tasks: Sequence[TaskLike], num_patches: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Table 1 as a boolean matrix: ``mask[q, k]`` is True where query q attends to key k.

    Args:
        tasks: The tasks in model order, as TaskConfigs or ``(n_mem, mode)`` pairs.
        num_patches: Number of patch tokens (INP).
        num_prefix_tokens: Class, register and distillation tokens of the base model (CLS).

    Returns:
        ``[T, T]`` bool, ``T = num_prefix_tokens + num_patches + k + sum(n_mem)``, in the
        token order of the module docstring. Memory rows are all False: memory makes no queries.
    """
    configs = _as_configs(tasks)
    n_orig = num_prefix_tokens + num_patches
    cells, total = table1_cells(configs, n_orig)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for rows, cols in cells:
        mask[rows, cols] = True
    return mask


Cell = tuple[slice, slice]


def table1_cells(configs: Sequence[TaskConfig], n_orig: int) -> tuple[list[Cell], int]:
    """Table 1, cell by cell: the ``(query rows, key columns)`` blocks that attend, and the token count.

    Plain Python on the configs (no tensors), so that :mod:`learnable_memory.layout` reads the same
    cells inside ``torch.compile``. ``n_orig``: original tokens (prefix + patches).
    """
    check_task_order(configs)
    k = len(configs)
    mem_start = [n_orig + k]
    for c in configs:
        mem_start.append(mem_start[-1] + c.n_mem)
    index = {c.name: i for i, c in enumerate(configs)}
    orig = slice(0, n_orig)
    cells = [(orig, orig)]  # INP/CLS -> INP/CLS: the base model itself
    for i, c in enumerate(configs):
        row = slice(n_orig + i, n_orig + i + 1)
        mem_i = slice(mem_start[i], mem_start[i + 1])
        cells += [(row, orig), (row, row), (row, mem_i)]  # C_i -> INP, CLS; C_i -> C_i; C_i -> M_i
        if c.mode == "full":
            cells.append((orig, mem_i))  # Sec. 2.1: every original token sees the memory
        for dep in c.depends_on:  # the starred cells: C_i -> C_j, M_j for the tasks it extends
            j = index[dep]
            cells += [(row, slice(n_orig + j, n_orig + j + 1)), (row, slice(mem_start[j], mem_start[j + 1]))]
    return cells, mem_start[-1]


#: The earlier name of :func:`check_task_order`, which ``model.py`` and ``adapters`` call.
check_layout = check_task_order


def new_token_mask(tasks: Sequence[TaskConfig]) -> torch.Tensor:
    """The rows of Table 1 the forward pass needs, read off :func:`build_attention_mask`.

    Every new class token sees every original token, and no original token sees a new class token
    (the first row and column of the mask built here); what remains is which class tokens and memory
    each new class token sees. Full mode's original-token rows are handled by the attention itself.

    Returns:
        ``[k, k + M]`` bool: row i is task i's class token; columns are the k class tokens, then the
        memory of every task, in model order.
    """
    mask = build_attention_mask(tasks, num_patches=0, num_prefix_tokens=1)
    k = len(tasks)
    return mask[1 : 1 + k, 1:]

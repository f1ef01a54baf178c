"""The gather form of Table 1 (``layout.py``) says exactly what ``build_attention_mask`` says."""

from __future__ import annotations

import random

import pytest
import torch

from learnable_memory import TaskConfig
from learnable_memory.layout import new_token_index
from learnable_memory.mask import new_token_mask


def random_tasks(seed: int) -> list[TaskConfig]:
    rng = random.Random(seed)
    tasks: list[TaskConfig] = []
    for i in range(rng.randint(1, 7)):
        mode = rng.choice(["non_destructive", "extension"]) if tasks else "non_destructive"
        deps = sorted(rng.sample([t.name for t in tasks], rng.randint(1, len(tasks))),
                      key=[t.name for t in tasks].index) if mode == "extension" else []
        tasks.append(TaskConfig(f"t{i}", rng.choice([0, 1, 2, 3]), 2, mode=mode, depends_on=deps))
    return tasks


def seen_by_index(tasks: list[TaskConfig]) -> torch.Tensor:
    """``[K, K + M]`` bool, rebuilt from the index."""
    index = new_token_index(tasks)
    k, m_total = len(tasks), sum(t.n_mem for t in tasks)
    out = torch.zeros(k, k + m_total, dtype=torch.bool)
    for i in range(k):
        toks = [i] if index.tok_index is None else index.tok_index[i][index.tok_valid[i]].tolist()
        if index.mem_block is not None:
            m = index.mem_block
            mems = list(range(i * m, (i + 1) * m))
        else:
            mems = index.mem_index[i][index.mem_valid[i]].tolist()
        out[i, toks] = True
        out[i, [k + r for r in mems]] = True
    return out


@pytest.mark.parametrize("seed", range(40))
def test_index_equals_table_1(seed):
    tasks = random_tasks(seed)
    assert torch.equal(seen_by_index(tasks), new_token_mask(tasks))


def test_common_case_needs_no_gather():
    index = new_token_index([TaskConfig(f"t{i}", 10, 2) for i in range(5)])
    assert index.tok_index is None and index.mem_block == 10 and index.mem_index is None
    chain = new_token_index([TaskConfig("a", 2, 2), TaskConfig("b", 2, 2, mode="extension", depends_on=["a"])])
    assert chain.tok_index.tolist() == [[0, 0], [1, 0]] and chain.tok_valid.tolist() == [[True, False], [True, True]]
    assert chain.mem_block is None


def test_earlier_names_still_import():
    from learnable_memory.layout import NewTokenIndex, NewTokenLayout, new_token_layout
    from learnable_memory.mask import check_layout, check_task_order

    assert (NewTokenLayout, new_token_layout, check_layout) == (NewTokenIndex, new_token_index, check_task_order)

"""build_attention_mask is Table 1 of the paper, cell by cell."""

from __future__ import annotations

import pytest
import torch

from learnable_memory import TaskConfig, build_attention_mask
from learnable_memory.mask import new_token_mask

# Token order: CLS, INP(2), C1, C2, C3, M1(2), M2(1), M3(1)
#   rows = queries. 1 attends, 0 masked.
CONCAT = [
    # CLS INP INP C1 C2 C3 M1 M1 M2 M3
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # CLS
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # INP
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # INP
    [1, 1, 1, 1, 0, 0, 1, 1, 0, 0],  # C1
    [1, 1, 1, 0, 1, 0, 0, 0, 1, 0],  # C2
    [1, 1, 1, 0, 0, 1, 0, 0, 0, 1],  # C3
    [0] * 10,  # memory makes no queries
    [0] * 10,
    [0] * 10,
    [0] * 10,
]
# The starred cells: C_i also sees C_j and M_j for j < i.
EXTENSION = [row[:] for row in CONCAT]
EXTENSION[4] = [1, 1, 1, 1, 1, 0, 1, 1, 1, 0]
EXTENSION[5] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_concatenation_is_table_1_without_stars():
    mask = build_attention_mask([(2, "non_destructive"), (1, "non_destructive"), (1, "non_destructive")], 2)
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == CONCAT


def test_extension_is_table_1_with_stars():
    mask = build_attention_mask([(2, "non_destructive"), (1, "extension"), (1, "extension")], 2)
    assert mask.int().tolist() == EXTENSION


def test_extension_follows_depends_on():
    tasks = [
        TaskConfig("a", 2, 3),
        TaskConfig("b", 1, 3),
        TaskConfig("c", 1, 3, mode="extension", depends_on=["b"]),
    ]
    mask = build_attention_mask(tasks, num_patches=2)
    assert mask[5].int().tolist() == [1, 1, 1, 0, 1, 1, 0, 0, 1, 1]


def test_full_mode_lets_every_original_token_see_the_memory():
    mask = build_attention_mask([(2, "full")], num_patches=3, num_prefix_tokens=2)
    # prefix(2), INP(3), C1, M1(2)
    assert mask[:5, :5].all() and mask[:5, 6:].all() and not mask[:5, 5].any()
    assert mask[5].all()
    assert not mask[6:].any()


def test_new_token_mask_is_read_off_table_1():
    tasks = [TaskConfig("a", 2, 3), TaskConfig("b", 1, 3, mode="extension", depends_on=["a"])]
    new_mask = new_token_mask(tasks)
    full = build_attention_mask(tasks, num_patches=4)
    assert torch.equal(new_mask, full[5:7, 5:])
    assert full[5:7, :5].all() and not full[:5, 5:].any()  # what new_token_mask leaves out


def test_layout_errors():
    with pytest.raises(ValueError, match="can not share a model"):
        build_attention_mask([(1, "full"), (1, "non_destructive")], 4)
    with pytest.raises(ValueError, match="unknown mode"):
        build_attention_mask([(1, "fully")], 4)
    with pytest.raises(ValueError, match="duplicate task name"):
        build_attention_mask([TaskConfig("a", 1, 2), TaskConfig("a", 1, 2)], 4)
    with pytest.raises(ValueError, match="missing or later: \\['z'\\]"):
        build_attention_mask([TaskConfig("a", 1, 2), TaskConfig("b", 1, 2, mode="extension", depends_on=["z"])], 4)
    with pytest.raises(ValueError, match="in the order \\['b', 'a'\\]"):
        build_attention_mask(
            [TaskConfig("a", 1, 2), TaskConfig("b", 1, 2),
             TaskConfig("c", 1, 2, mode="extension", depends_on=["b", "a"])], 4)


def test_check_task_order_names_the_rule_and_the_task():
    from learnable_memory.mask import TaskOrderError, check_task_order, has_full_task

    a, full = TaskConfig("a", 1, 2), TaskConfig("f", 1, 2, mode="full")
    cases = [
        ([TaskConfig("__base__", 1, 2)], "reserved", "__base__"),
        ([TaskConfig("base", 1, 2)], "reserved", "base"),
        ([a, TaskConfig("a", 2, 2)], "duplicate", "a"),
        ([a, full], "full", "f"),
        ([TaskConfig("e", 1, 2, mode="extension", depends_on=["a"]), a], "missing", "e"),
        ([a, TaskConfig("b", 1, 2), TaskConfig("e", 1, 2, mode="extension", depends_on=["b", "a"])], "order", "e"),
    ]
    for tasks, rule, task in cases:
        with pytest.raises(TaskOrderError) as err:
            check_task_order(tasks)
        assert (err.value.rule, err.value.task) == (rule, task) and isinstance(err.value, ValueError)
    assert has_full_task([a, full]) and not has_full_task([a]) and not has_full_task([])

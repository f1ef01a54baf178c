"""Outputs split by the preprocessing their tasks were trained with (learnable_memory/pass_groups.py)."""

from __future__ import annotations

import pytest

import learnable_memory as lm
from learnable_memory.pass_groups import output_preprocessing, pass_groups
from tests.helpers import make_vit


def _model_with(pre_b: dict | None) -> lm.MemoryViT:
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model.add_task(lm.TaskConfig(name="b", n_mem=2, num_classes=3, data_config=pre_b))
    return model


def test_one_group_when_all_share_the_backbones_preprocessing():
    model = _model_with(None)
    groups = pass_groups(model, ["base", "a", "b"])
    assert [g.outputs for g in groups] == [("base", "a", "b")]
    assert groups[0].data_config == output_preprocessing(model, "base")


def test_recorded_preprocessing_equal_to_the_backbones_joins_its_group():
    model = _model_with(None)
    recorded = dict(model.data_config())  # tuples here, lists once read back from JSON: the same
    model.tasks["b"].config.data_config = {**recorded, "mean": list(recorded["mean"])}
    assert [g.outputs for g in pass_groups(model, ["a", "b", "base"])] == [("a", "b", "base")]


def test_other_preprocessing_gets_its_own_pass_in_the_order_asked():
    model = _model_with(None)
    other = {**model.data_config(), "mean": (0.1, 0.2, 0.3), "interpolation": "bilinear"}
    model.tasks["b"].config.data_config = other
    groups = pass_groups(model, ["b", "base", "a"])
    assert [g.outputs for g in groups] == [("b",), ("base", "a")]
    assert groups[0].data_config["mean"] == [0.1, 0.2, 0.3]
    assert groups[0].data_config["interpolation"] == "bilinear"


def test_unknown_output_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        pass_groups(_model_with(None), ["a", "zz"])


def test_loading_a_mix_warns_with_the_groups_and_the_remedy(tmp_path):
    model = _model_with(None)
    model.tasks["b"].config.data_config = {**model.data_config(), "mean": (0.1, 0.2, 0.3)}
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"different preprocessing: \[\['a'\], \['b'\]\].*one pass per group"):
        lm.load_adapters(make_vit(), [tmp_path])


def test_callers_that_run_a_pass_per_group_are_not_warned(tmp_path, recwarn):
    from learnable_memory.pass_groups import grouped_by_caller

    model = _model_with(None)
    model.tasks["b"].config.data_config = {**model.data_config(), "mean": (0.1, 0.2, 0.3)}
    model.save_pretrained(tmp_path)
    with grouped_by_caller():
        lm.load_adapters(make_vit(), [tmp_path])
    assert not [w for w in recwarn if "preprocessing" in str(w.message)]
    lm.load_adapters(make_vit(), [tmp_path])  # and the filter ends with the block
    assert [w for w in recwarn if "preprocessing" in str(w.message)]

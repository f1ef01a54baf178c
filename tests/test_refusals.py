"""Models refused on purpose (``learnable_memory/families/refused.py``): each timm module's smallest
architecture is refused with its module, why and what would be needed; Hugging Face ``transformers``
models are refused by their module's name and pointed to the timm names that load the same weights."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import timm
from torch import nn

import learnable_memory as lm
from learnable_memory.families import refused
from learnable_memory.registry import UNSUPPORTED, UnsupportedModelError

#: timm module -> its smallest architecture, with ``depth=2`` where the model takes ``depth``.
SMALLEST = {
    "swin_transformer": ("swin_tiny_patch4_window7_224", {}),
    "hiera": ("hiera_tiny_224", {}),
    "hieradet_sam2": ("sam2_hiera_tiny", {}),
    "vision_transformer_sam": ("samvit_base_patch16_224", {"depth": 2}),
    "tiny_vit": ("tiny_vit_5m_224", {}),
    "davit": ("davit_tiny", {}),
    "gcvit": ("gcvit_xxtiny", {}),
    "mvitv2": ("mvitv2_tiny", {}),
    "xcit": ("xcit_nano_12_p8_224", {"depth": 2}),
    "coat": ("coat_tiny", {}),
    "crossvit": ("crossvit_tiny_240", {}),
    "tnt": ("tnt_s_legacy_patch16_224", {"depth": 2}),
    "pit": ("pit_ti_224", {}),
    "cait": ("cait_xxs24_224", {"depth": 2}),
    "volo": ("volo_d1_224", {}),
}


@pytest.mark.parametrize("module", sorted(SMALLEST))
def test_each_refused_module_says_which_module_why_and_what_is_needed(module):
    arch, kwargs = SMALLEST[module]
    assert arch in timm.list_models(module=module)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedModelError) as err:
        lm.wrap_model(model, n_mem=1, num_classes=2)
    msg = str(err.value)
    assert msg.startswith(f"{type(model).__name__} is not supported by learnable_memory: timm.models.{module} (")
    assert "Supporting it would need" in msg
    assert UNSUPPORTED[type(model).__name__] in msg


def test_every_refused_class_has_its_own_reason():
    assert {cls.__module__.removeprefix("timm.models.") for cls in refused.REASONS} == set(SMALLEST)
    reasons = [refused.reason(cls) for cls in refused.REASONS]
    assert len(set(reasons)) == len(reasons)


def test_a_transformers_model_is_pointed_to_the_timm_names_of_its_weights():
    class ViTModel(nn.Module):  # stands for transformers' own, which is not imported
        pass

    ViTModel.__module__ = "transformers.models.vit.modeling_vit"
    with pytest.raises(UnsupportedModelError) as err:
        lm.wrap_model(ViTModel(), n_mem=1, num_classes=2)
    msg = str(err.value)
    assert msg.startswith("ViTModel is not supported by learnable_memory: Hugging Face transformers models")
    for name in ("vit_base_patch16_224.augreg_in21k", "vit_small_patch14_dinov2", "vit_base_patch16_clip_224.openai"):
        assert f'timm.create_model("{name}", pretrained=True)' in msg
        assert timm.list_pretrained(name if "." in name else f"{name}.*"), f"timm has no weights named {name}"


def test_a_module_named_like_transformers_is_not_refused():
    class Odd(nn.Module):
        pass

    Odd.__module__ = "transformers_extras.models"
    with pytest.raises(UnsupportedModelError, match="unsupported model type Odd"):
        lm.wrap_model(Odd(), n_mem=1, num_classes=2)


def test_the_refusals_do_not_import_transformers():
    tree = ast.parse(Path(refused.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "transformers"]

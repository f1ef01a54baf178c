"""Learnable memory as a peft method (``learnable_memory.peft``) and adapter format 2: peft's API on a
timm ViT, one pass for every adapter, and adapter folders that both loaders read.

Runnable on its own (``python -m pytest tests/test_peft.py``), e.g. at the lowest peft version of
the tested range."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch

import learnable_memory as lm
import learnable_memory.peft as lmp
from learnable_memory.adapters.folder import CONFIG_NAME, WEIGHTS_NAME, inspect_adapter
from learnable_memory.peft import LearnableMemoryConfig
from learnable_memory.testing import randomize
from tests.helpers import images_for, make_vit

FORMAT1 = Path(__file__).parent / "data" / "adapter_format1"


@pytest.fixture(autouse=True)
def no_warnings():
    """peft's API on this method runs without a warning from peft or from us (peft warns about much it can
    not handle: adapter layers in an irregular state, missing keys, unknown config fields ...)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module=r"(peft|learnable_memory|tests)(\.|$)")
        yield


def two_adapters(seed: int = 1) -> peft.PeftModel:
    """A PeftModel with adapters "cifar" (5 classes, m=2) and "pets" (4 classes, m=3), random parameters."""
    model = peft.get_peft_model(make_vit(), LearnableMemoryConfig(n_mem=2, num_classes=5), adapter_name="cifar")
    model.add_adapter("pets", LearnableMemoryConfig(n_mem=3, num_classes=4, class_names=list("wxyz")))
    randomize(model.base_model.model, seed=seed)
    return model


def grads(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters() if ".tasks." in n}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: max difference {(got[k] - want[k]).abs().max()}"


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """A task alone and in a pass with others: the same arithmetic over other tensor widths."""
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def count_passes(model: torch.nn.Module) -> list[int]:
    """Count the backbone's patch embeddings (one per pass over the images)."""
    calls: list[int] = []
    model.base_model.model.base.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
def all_outputs(model, x):
    return model.forward_all(x)


# ----- registration -----
def test_import_registers_the_method_and_peft_is_the_library():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["LEARNABLE_MEMORY"] is LearnableMemoryConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["LEARNABLE_MEMORY"] is lmp.LearnableMemoryModel
    package = Path(lm.__file__).parent
    assert package not in Path(peft.__file__).parents  # `import peft` is the library, not this subpackage
    assert LearnableMemoryConfig.__mro__[1] is peft.PeftConfig


def test_config_refuses_what_it_can_not_do():
    with pytest.raises(ValueError, match="needs num_classes"):
        LearnableMemoryConfig(n_mem=2)
    assert LearnableMemoryConfig(class_names=["a", "b"]).num_classes == 2
    with pytest.raises(ValueError, match="'extension' is not available through peft"):
        LearnableMemoryConfig(num_classes=3, mode="extension")
    with pytest.raises(ValueError, match="unknown mode"):
        LearnableMemoryConfig(num_classes=3, mode="sideways")
    with pytest.raises(TypeError, match="takes the timm model"):
        peft.get_peft_model(lm.wrap_model(make_vit(), n_mem=1, num_classes=2), LearnableMemoryConfig(num_classes=3))


def test_extension_adapters_are_refused_by_peft_with_the_way_out(tmp_path):
    model = lm.wrap_model(make_vit(), n_mem=1, num_classes=2, task="a")
    model = lm.wrap_model(model, n_mem=1, num_classes=2, task="e", mode="extension")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'extension' is not available through peft.*load_adapters"):
        peft.PeftModel.from_pretrained(make_vit(), tmp_path / "e")
    assert lm.load_adapters(make_vit(), tmp_path).task_names == ["a", "e"]


# ----- peft's API -----
def test_training_reaches_only_the_active_adapter():
    model = two_adapters()
    vit_before = {k: v.clone() for k, v in model.base_model.model.base.state_dict().items()}
    assert all(grads(model)[f"base_model.model.tasks.cifar.{t}"] for t in ("memory", "class_token", "head.weight"))
    assert not any(v for k, v in grads(model).items() if ".pets." in k)  # added adapters start frozen, as in peft
    x, y = images_for(32, batch=4), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    assert not model.base_model.model.base.training  # the backbone stays in eval mode
    before = model(x).detach()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    touched = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert touched == [f"base_model.model.tasks.cifar.{t}" for t in ("class_token", "head.bias", "head.weight",
                                                                    "memory")]
    assert not torch.equal(model(x).detach(), before)
    same(model.base_model.model.base.state_dict(), vit_before)


def test_set_adapter_switches_heads_of_different_sizes():
    model = two_adapters()
    x = images_for(32)
    want = all_outputs(model, x)
    with torch.no_grad():
        close(model(x), want["cifar"])
        model.set_adapter("pets")
        assert model.active_adapters == ["pets"]
        close(model(x), want["pets"])
        assert model(x).shape == (3, 4)
    assert all(v == (".pets." in k) for k, v in grads(model).items())
    model.set_adapter("cifar", inference_mode=True)
    assert not any(grads(model).values())
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="one active adapter at a time"):
        model.base_model.set_adapter(["cifar", "pets"])


def test_forward_all_from_the_peft_model_is_one_pass():
    model = two_adapters()
    vit = model.base_model.model.base
    x = images_for(32)
    passes = count_passes(model)
    out = all_outputs(model, x)
    assert len(passes) == 1 and list(out) == ["base", "cifar", "pets"]
    assert [o.shape[-1] for o in out.values()] == [7, 5, 4]
    with torch.no_grad():
        assert torch.equal(out["base"], vit(x))  # the base model's own output, unchanged
        model.set_adapter("pets")
        close(model(x), out["pets"])
        assert list(model.forward_all(x, tasks=["pets"])) == ["pets"]


def test_mixed_batch_is_one_pass_and_checked():
    model = two_adapters()
    model.add_adapter("cars", LearnableMemoryConfig(n_mem=1, num_classes=5))
    randomize(model.base_model.model, seed=4, tasks=["cars"])
    model.eval()
    x = images_for(32, batch=4)
    want = all_outputs(model, x)
    passes = count_passes(model)
    names = ["cars", "cifar", "cars", "__base__"]
    with torch.no_grad(), pytest.raises(ValueError, match="different numbers of classes"):
        model(x, adapter_names=["cifar", "pets", "cifar", "cifar"])
    with torch.no_grad():
        mixed = model(x[:3], adapter_names=names[:3])
        assert len(passes) == 2
        for i, n in enumerate(names[:3]):
            close(mixed[i], want[n][i])
    with torch.no_grad(), pytest.raises(ValueError, match="different numbers of classes"):
        model(x, adapter_names=names)  # the base model has 7 classes
    with torch.no_grad(), pytest.raises(ValueError, match="2 entries for a batch of 4"):
        model(x, adapter_names=["cifar", "cars"])
    with torch.no_grad(), pytest.raises(ValueError, match="non-existing adapter.*nope"):
        model(x, adapter_names=["nope"] * 4)
    with torch.no_grad():
        close(model(x), want["cifar"])  # adapter_names lasts one call


def test_disable_adapter_serves_the_base_model():
    model = two_adapters()
    x = images_for(32)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(x), model.base_model.model.base(x))
        assert model(x).shape == (3, 5)
    assert model.get_model_status().enabled is True and model.get_model_status().available_adapters == ["cifar", "pets"]


def test_delete_adapter_and_full_mode():
    model = two_adapters()
    model.delete_adapter("cifar")
    assert model.active_adapters == ["pets"] and list(model.peft_config) == ["pets"]
    assert list(all_outputs(model, images_for(32))) == ["base", "pets"]
    with pytest.raises(ValueError, match="can not share a model"):
        model.add_adapter("full", LearnableMemoryConfig(n_mem=1, num_classes=3, mode="full"))
    assert list(model.peft_config) == ["pets"]  # the refused adapter left nothing behind
    full = peft.get_peft_model(make_vit(), LearnableMemoryConfig(n_mem=1, num_classes=3, mode="full"))
    assert list(all_outputs(full, images_for(32))) == ["default"]


def test_short_and_dotted_adapter_names():
    model = peft.get_peft_model(make_vit(), LearnableMemoryConfig(n_mem=1, num_classes=2), adapter_name="a")
    model.add_adapter("task", LearnableMemoryConfig(n_mem=1, num_classes=2))  # no warning about peft's prefix
    model.add_adapter("v1.0", LearnableMemoryConfig(n_mem=1, num_classes=2))
    assert list(all_outputs(model, images_for(32))) == ["base", "a", "task", "v1.0"]
    with pytest.raises(ValueError, match="reserved for the base model's output"):
        model.add_adapter("base", LearnableMemoryConfig(n_mem=1, num_classes=2))


def test_merge_and_unload_says_why_not():
    model = two_adapters()
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="can not be merged into the backbone's weights: a task is extra key"):
            call()
    vit = model.base_model.model.base
    assert model.unload() is vit


# ----- adapter format 2: both loaders read both writers -----
def test_peft_saves_load_with_load_adapters(tmp_path):
    model = two_adapters()
    for name in ("v1.0", "head"):  # a dot in the name; a name peft's key filter trips over (keys hold ".head.")
        model.add_adapter(name, LearnableMemoryConfig(n_mem=1, num_classes=2))
    randomize(model.base_model.model, seed=3, tasks=["v1.0", "head"])
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "pets" / CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["format_version"], cfg["task"], cfg["class_names"]) == (
        "LEARNABLE_MEMORY", 2, "pets", list("wxyz"))
    assert "weights_sha256" not in cfg and "task_fingerprint" not in cfg and cfg["base_model_name_or_path"] is None
    names = sorted(safetensors.torch.load_file(tmp_path / "pets" / WEIGHTS_NAME))
    assert names == ["base_model.model.tasks.class_token", "base_model.model.tasks.head.bias",
                     "base_model.model.tasks.head.weight", "base_model.model.tasks.memory"]
    x = images_for(32)
    loaded = lm.load_adapters(make_vit(), [tmp_path / n for n in ("cifar", "pets", "v1.0", "head")])
    same(all_outputs(loaded, x), all_outputs(model, x))
    again = peft.PeftModel.from_pretrained(make_vit(), tmp_path / "cifar", adapter_name="cifar")
    for name in ("pets", "v1.0", "head"):
        again.load_adapter(tmp_path / name, adapter_name=name)
    same(all_outputs(again, x), all_outputs(model, x))
    info = inspect_adapter(tmp_path / "pets")
    assert (info["task"], info["num_classes"], info["format_version"]) == ("pets", 4, 2)


def test_our_saves_load_with_peft_from_pretrained(tmp_path):
    ours = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="mine", class_names=list("abc"))
    ours = lm.wrap_model(ours, n_mem=1, num_classes=6, task="other")
    randomize(ours)
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "mine" / CONFIG_NAME).read_text())
    assert (cfg["peft_type"], cfg["format_version"], cfg["inference_mode"]) == ("LEARNABLE_MEMORY", 2, True)
    model = peft.PeftModel.from_pretrained(make_vit(), tmp_path / "ours" / "mine", adapter_name="mine")
    model.load_adapter(tmp_path / "ours", adapter_name="other", subfolder="other")
    x = images_for(32)
    same(all_outputs(model, x), all_outputs(ours, x))
    assert not any(grads(model).values())  # loaded for inference, as peft does
    assert model.peft_config["mine"].class_names == list("abc")
    trainable = peft.PeftModel.from_pretrained(make_vit(), tmp_path / "ours" / "mine", is_trainable=True)
    assert all(grads(trainable).values())
    trainable.save_pretrained(tmp_path / "again")  # and back through peft's save
    again = all_outputs(lm.load_adapters(make_vit(), tmp_path / "again"), x)
    assert list(again) == ["base", "default"] and torch.equal(again["base"], all_outputs(ours, x)["base"])
    close(again["default"], all_outputs(ours, x)["mine"])


def test_hub_for_both_writers(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = peft.get_peft_model(make_vit(), LearnableMemoryConfig(n_mem=2, num_classes=5))  # adapter "default"
    model.add_adapter("pets", LearnableMemoryConfig(n_mem=3, num_classes=4))
    randomize(model.base_model.model)
    x = images_for(32)
    want = all_outputs(model, x)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    saves = {"peftrepo": lambda path: model.save_pretrained(path, selected_adapters=["default"]),  # at the root
             "ourrepo": lambda path: model.base_model.model.save_adapter(path, task="pets")}
    for repo, save in saves.items():
        root = cache / f"models--owner--{repo}"
        save(root / "snapshots" / commit)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(commit)
    from_peft = peft.PeftModel.from_pretrained(make_vit(), "owner/peftrepo", cache_dir=cache)
    from_ours = peft.PeftModel.from_pretrained(make_vit(), "owner/ourrepo", adapter_name="pets", cache_dir=cache)
    with torch.no_grad():
        close(from_peft(x), want["default"])
        close(from_ours(x), want["pets"])
    ours = lm.load_adapters(make_vit(), ["hf-hub:owner/peftrepo", "hf-hub:owner/ourrepo"], cache_dir=cache)
    same(all_outputs(ours, x), want)


# ----- checks -----
def test_other_backbone_is_refused_by_both_loaders(tmp_path):
    model = two_adapters()
    model.save_pretrained(tmp_path)
    other = make_vit(seed=5)
    with pytest.raises(lm.AdapterError, match="same shape but other weights"):
        lm.load_adapters(other, tmp_path / "cifar")
    with pytest.raises(lm.AdapterError, match="same shape but other weights"):
        peft.PeftModel.from_pretrained(other, tmp_path / "cifar")
    with pytest.raises(lm.AdapterError, match=r"another backbone.*width \(embed_dim\) 192 vs 384"):
        peft.PeftModel.from_pretrained(make_vit(embed_dim=384, num_heads=6), tmp_path / "cifar")
    config = LearnableMemoryConfig.from_pretrained(tmp_path / "cifar")
    config.base_model = None  # the documented way to skip the check
    assert peft.PeftModel.from_pretrained(make_vit(seed=5), tmp_path / "cifar", config=config) is not None


def edit(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def test_damaged_folders_are_refused_by_both_loaders(tmp_path):
    model = two_adapters()
    model.save_pretrained(tmp_path / "peft")
    edit(tmp_path / "peft" / "cifar", num_classes=4)
    with pytest.raises(lm.AdapterError, match=r"'head.weight' has shape \[5, 192\]"):
        lm.load_adapters(make_vit(), tmp_path / "peft" / "cifar")
    with pytest.raises(lm.AdapterError, match=r"'head.weight' has shape \[5, 192\] but this adapter.*needs \[4, 192\]"):
        peft.PeftModel.from_pretrained(make_vit(), tmp_path / "peft" / "cifar")
    ours = model.base_model.model.save_adapter(tmp_path / "ours", task="pets")
    tensors = safetensors.torch.load_file(ours / WEIGHTS_NAME)
    tensors["memory"] = tensors["memory"] + 1
    safetensors.torch.save_file(tensors, ours / WEIGHTS_NAME)  # new tensors under the old config
    with pytest.raises(lm.AdapterError, match="do not belong together"):
        lm.load_adapters(make_vit(), ours)
    with pytest.raises(lm.AdapterError, match="do not belong together"):
        peft.PeftModel.from_pretrained(make_vit(), ours)
    tensors["memory"][0, 0, 0] = float("nan")
    safetensors.torch.save_file(tensors, tmp_path / "peft" / "pets" / WEIGHTS_NAME)
    with pytest.raises(lm.AdapterError, match=r"\['memory'\] hold NaN or Inf"):
        peft.PeftModel.from_pretrained(make_vit(), tmp_path / "peft" / "pets")
    with pytest.raises(lm.AdapterError, match=r"\['memory'\] hold NaN or Inf"):
        lm.load_adapters(make_vit(), tmp_path / "peft" / "pets")


def test_format_1_folders_still_load():
    """``tests/data/adapter_format1`` was written by the last format-1 version (a depth-2 ViT-Tiny, 32 px)."""
    cfg = json.loads((FORMAT1 / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1 and "peft_type" not in cfg
    model = lm.load_adapters(make_vit(), FORMAT1, check_fingerprint=False)  # timm's init may change across versions
    saved = safetensors.torch.load_file(FORMAT1 / WEIGHTS_NAME)
    task = model.tasks["old"]
    assert torch.equal(task.memory, saved["memory"]) and torch.equal(task.head.weight, saved["head.weight"])
    assert task.config.class_names == ["x", "y", "z"] and inspect_adapter(FORMAT1)["format_version"] == 1
    with pytest.raises(lm.AdapterError, match="format_version 1, which peft can not read.*save it again"):
        peft.PeftModel.from_pretrained(make_vit(), FORMAT1)  # peft needs format 2 (a raw KeyError before)

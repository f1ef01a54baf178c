"""``learnable_memory.testing``: every guarantee check passes on a sound model and raises on a model
broken in the way it guards against. The broken models are made with the package's own extension
points: block and attention kinds registered for made-up module types, and wrappers around public
methods."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.vision_transformer import Block

import learnable_memory as lm
from learnable_memory import registry
from learnable_memory import testing as lmt
from learnable_memory.blocks import PreNormBlock
from learnable_memory.families.beit import RelPosBiasAttention
from tests.helpers import make_vit, noisy_backbone


class MemoryInResidual(Block):
    """A block type whose kind lets the original tokens see the memory (breaks the base output)."""


class SeesEveryTask(Block):
    """A block type whose kind mixes every new class token into the others (breaks concatenation)."""


class DetachedMemory(Block):
    """A block type whose kind cuts the memory out of the graph (no gradient reaches it)."""


class MemoryInResidualKind(PreNormBlock):
    packable = False

    def forward(self, blk, x, c, kv, ctx):
        x, c = super().forward(blk, x, c, kv, ctx)
        values = kv[0][1]  # [H, M, hd]
        return (x + values.mean() if values.numel() else x), c


class SeesEveryTaskKind(PreNormBlock):
    packable = False

    def forward(self, blk, x, c, kv, ctx):
        x, c = super().forward(blk, x, c, kv, ctx)
        return x, c + c.mean(dim=1, keepdim=True)  # every new class token takes in the others


class DetachedMemoryKind(PreNormBlock):
    packable = False

    def memory_kv(self, blk, mem, kinds):
        return tuple((k.detach(), v.detach()) for k, v in super().memory_kv(blk, mem, kinds))


class WrongBiasRow(BeitAttention):
    """A BEiT attention type whose kind gives the new class tokens a patch's bias row."""


class WrongBiasRowKind(RelPosBiasAttention):
    """BEiT's relative position bias, but new class tokens take the first patch's row, not the class
    token's: every task is wrong the same way, so only the dense reference can tell."""

    def position_bias(self, attn, ctx, n_tokens):
        bias_x, _ = super().position_bias(attn, ctx, n_tokens)
        return bias_x, bias_x[..., 1:2, :]


BROKEN = {MemoryInResidual: MemoryInResidualKind, SeesEveryTask: SeesEveryTaskKind, DetachedMemory: DetachedMemoryKind}


@pytest.fixture(autouse=True)
def broken_kinds():
    """Register the broken kinds for this module's tests only."""
    for block, kind in BROKEN.items():
        registry.register_block(block)(kind)
    registry.register_attention(WrongBiasRow)(WrongBiasRowKind)
    yield
    for block in BROKEN:
        registry.BLOCK_KINDS.pop(block, None)
    registry.ATTENTION_KINDS.pop(WrongBiasRow, None)


def beit(attention: type[BeitAttention] = BeitAttention) -> torch.nn.Module:
    """A depth-2 BEiT (relative position bias per block, noisy weights) whose attention modules are of
    type ``attention``."""
    model = noisy_backbone("beit_base_patch16_224", {"img_size": 32, "embed_dim": 64, "num_heads": 4})
    for blk in model.blocks:
        blk.attn.__class__ = attention
    return model


def vit(block: type[Block] = Block, last_only: bool = False) -> torch.nn.Module:
    """A depth-2 ViT whose blocks (or only its last block) are of type ``block``."""
    model = make_vit(block_fn=Block if last_only else block)
    if last_only:
        model.blocks[-1].__class__ = block
    return model


def test_sound_model_passes_every_check(tmp_path, images):
    lmt.check_all(vit(), images, tmp_path)
    lmt.check_dense_reference(vit(), images, lmt.dense_forward_all)
    lmt.check_new_tokens(beit(), images)


def test_new_tokens_given_the_wrong_bias_row_fail_the_new_token_check_only(tmp_path, images):
    """The output checks can not see a formula that is wrong alike for every task; the kind's dense
    reference does."""
    lmt.check_base_unchanged(beit(WrongBiasRow), images)
    lmt.check_concatenation(beit(WrongBiasRow), images)
    lmt.check_training(beit(WrongBiasRow), images)
    lmt.check_save_load(beit(WrongBiasRow), beit(WrongBiasRow), images, tmp_path / "saved")
    with pytest.raises(AssertionError, match=r"block 0 \(Block, LayerScalePreNormBlock\): new class token vs the "
                                             "kind's dense reference, 'a' differs"):
        lmt.check_new_tokens(beit(WrongBiasRow), images)
    with pytest.raises(AssertionError, match="new class token vs the kind's dense reference"):
        lmt.check_all(beit(WrongBiasRow), images, tmp_path / "all")


def test_packed_pass_unlike_the_split_one_fails_the_new_token_check(monkeypatch, images):
    real = RelPosBiasAttention.attend_packed

    def packed_with_a_nudge(self, attn, h, kv, ctx):
        out = real(self, attn, h, kv, ctx)
        return torch.cat([out[:, : -ctx.packed], out[:, -ctx.packed :] * 1.01], dim=1)

    monkeypatch.setattr(RelPosBiasAttention, "attend_packed", packed_with_a_nudge)
    with pytest.raises(AssertionError, match=r"packed \(inference\) vs split \(training\) pass: 'a' differs"):
        lmt.check_new_tokens(beit(), images)


def test_original_tokens_seeing_memory_fail_the_base_check(images):
    with pytest.raises(AssertionError, match="base output at inference is not bit-identical"):
        lmt.check_base_unchanged(vit(MemoryInResidual), images)


def test_class_tokens_seeing_other_tasks_fail_concatenation_only(images):
    model = vit(SeesEveryTask)
    lmt.check_base_unchanged(model, images)  # the original tokens are untouched
    with pytest.raises(AssertionError, match="concatenated forward_all vs each task alone: 'task0' differs"):
        lmt.check_concatenation(model, images)
    with pytest.raises(AssertionError, match="layout concat: forward_all vs reference, 'a' differs"):
        lmt.check_dense_reference(model, images, lmt.dense_forward_all, layouts=["concat"])


def test_memory_without_gradient_fails_the_training_check(images):
    with pytest.raises(AssertionError, match="no gradient reaches block 1's memory"):
        lmt.check_training(vit(DetachedMemory, last_only=True), images)


@pytest.mark.parametrize("mode", ["non_destructive", "extension"])
def test_trainable_earlier_task_fails_the_training_check(mode, monkeypatch, images):
    real = lm.MemoryViT.add_task

    def add_task_leaving_others_trainable(self, task):
        out = real(self, task)
        for t in self.tasks.values():
            t.requires_grad_(True)
        return out

    monkeypatch.setattr(lm.MemoryViT, "add_task", add_task_leaving_others_trainable)
    with pytest.raises(AssertionError, match="earlier task 'earlier' is not frozen"):
        lmt.check_training(vit(), images, mode)


def test_gradient_to_an_earlier_task_fails_the_training_check(monkeypatch, images):
    """An extension task attends to its predecessor's memory: a gradient reaches that memory unless it
    is frozen. Here it is trainable during the backward pass only, so only the gradient can tell."""
    real = lm.MemoryViT.add_task
    leaked = []

    def refreeze(p: torch.Tensor) -> None:
        leaked.append(p.grad.abs().sum().item())
        p.requires_grad_(False)

    def add_task_leaving_earlier_memory_trainable(self, task):
        out = real(self, task)
        for t in list(self.tasks.values())[:-1]:
            t.memory.requires_grad_(True)
            t.memory.register_post_accumulate_grad_hook(refreeze)
        return out

    monkeypatch.setattr(lm.MemoryViT, "add_task", add_task_leaving_earlier_memory_trainable)
    with pytest.raises(AssertionError, match=r"earlier task 'earlier' is not frozen: \['memory'\]"):
        lmt.check_training(vit(), images, "extension")
    assert leaked and leaked[0] > 0, "no gradient reached the earlier task's memory"


def test_trainable_backbone_fails_the_training_check(monkeypatch, images):
    real = lm.MemoryViT.add_task

    def add_task_unfreezing_the_backbone(self, task):
        out = real(self, task)
        self.base.blocks[0].norm1.requires_grad_(True)
        return out

    monkeypatch.setattr(lm.MemoryViT, "add_task", add_task_unfreezing_the_backbone)
    with pytest.raises(AssertionError, match=r"the backbone is not frozen: \['blocks.0.norm1.weight'"):
        lmt.check_training(vit(), images, "full")


def test_lossy_save_fails_the_save_load_check(tmp_path, monkeypatch, images):
    real = lm.MemoryViT.save_pretrained

    def save_with_a_rounded_head(self, path):
        head = self.tasks[self.task_names[-1]].head
        with torch.no_grad():
            saved = head.bias.clone()
            head.bias.copy_(head.bias.half().float())
            out = real(self, path)
            head.bias.copy_(saved)
        return out

    monkeypatch.setattr(lm.MemoryViT, "save_pretrained", save_with_a_rounded_head)
    with pytest.raises(AssertionError, match="output 'c' after save and load is not bit-identical"):
        lmt.check_save_load(vit(), vit(), images, tmp_path)


def test_save_load_needs_a_second_backbone(tmp_path, images):
    base = vit()
    with pytest.raises(ValueError, match="fresh_base must be another copy of the backbone"):
        lmt.check_save_load(base, base, images, tmp_path)


def test_unknown_mode_is_refused(images):
    with pytest.raises(ValueError, match="unknown mode 'partial'"):
        lmt.check_training(vit(), images, "partial")


def test_outputs_close_keys_and_scaled_tolerance():
    want = {"base": torch.tensor([10.0, 0.0]), "a": torch.tensor([1.0])}
    with pytest.raises(AssertionError, match=r"keys \['a', 'base'\] but expected \['base', 'a'\]"):
        lmt.assert_outputs_close({"a": want["a"], "base": want["base"]}, want)
    off = {"base": want["base"] + torch.tensor([0.0, 5e-5]), "a": want["a"]}
    lmt.assert_outputs_close(off, want, lmt.Tolerance(scaled=True))  # 5e-5 < 1e-5 * 10
    with pytest.raises(AssertionError, match="output 'base' differs"):
        lmt.assert_outputs_close(off, want)


def test_build_and_randomize():
    base = vit()
    model = lmt.build(base, "extension")
    assert model.task_names == ["a", "b", "c"] and model.tasks["c"].config.depends_on == ["a", "b"]
    before = {n: model.tasks[n].memory.clone() for n in model.task_names}
    lmt.randomize(model, tasks=["b"])
    assert torch.equal(model.tasks["a"].memory, before["a"]) and torch.equal(model.tasks["c"].memory, before["c"])
    assert model.tasks["b"].memory.std() > 0.3
    assert lmt.build(base, [("x", 1, "full")]).task_names == ["x"]


def test_timm_model_with_pretrained_style_layerscale_passes(tmp_path, images):
    """The checks need no test scaffolding: a plain timm model straight from ``create_model``."""
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=16,
                             init_values=1e-5).eval()
    lmt.check_all(base, images[:2], tmp_path, modes=["non_destructive"])

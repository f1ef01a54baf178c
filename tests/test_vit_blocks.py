"""The block and attention kinds of ``families/vit.py`` and ``families/vit_parallel.py`` against the
dense reference (every token and all memory as one sequence through timm's own blocks, with the
Table 1 mask as ``attn_mask``), in every mode and on both of timm's attention paths (fused SDPA and
the explicit softmax). Narrow random-weight models; LayerScale at 0.5 so the blocks matter.
"""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock

import learnable_memory as lm
from tests.conftest import randomize
from tests.dense_reference import dense_forward_all

NARROW = {"embed_dim": 64, "num_heads": 4}

# name -> (architecture, kwargs for timm.create_model at depth 2); all at a 3x3 patch grid
VARIANTS = {
    "res_post_block": ("vit_base_patch16_rpn_224", {**NARROW, "init_values": 0.5}),
    # qk_norm (RmsNorm), mlp_bias, separate attention / MLP output projections
    "parallel_scaling": ("vit_base_patch16_xp_224", {**NARROW, "init_values": 0.5}),
    # qkv bias (no mlp_bias), one fused output projection
    "parallel_scaling_fused_out": (
        "vit_pwee_patch16_reg1_gap_256",
        {**NARROW, "init_values": 0.5, "block_fn": partial(ParallelScalingBlock, fuse_out_proj=True)},
    ),
    "diff_parallel_scaling": ("vit_dpwee_patch16_reg1_gap_256", {**NARROW, "init_values": 0.5, "qk_norm": True}),
    "diff_parallel_dual_lambda": (
        "vit_dpwee_patch16_reg1_gap_256",
        {**NARROW, "init_values": 0.5, "block_fn": partial(DiffParallelScalingBlock, dual_lambda=True)},
    ),
    # DiffAttention in a Block, with q/k norm and scale norm
    "diff_attention": (
        "vit_dwee_patch16_reg1_gap_256",
        {**NARROW, "init_values": 0.5, "qk_norm": True, "scale_attn_norm": True},
    ),
    "parallel_things": ("vit_small_patch16_18x2_224", {**NARROW, "init_values": 0.5}),
    "parallel_things_3": ("vit_small_patch16_18x2_224", {**NARROW, "block_fn": partial(
        timm.models.vision_transformer.ParallelThingsBlock, num_parallel=3)}),
    "attention_scale_norm": ("beit3_base_patch16_224", NARROW),
    "distilled": ("deit_tiny_distilled_patch16_224", NARROW),
    "hybrid": ("vit_tiny_r_s16_p8_224", {}),
}

LAYOUTS = {
    "non_destructive": [("a", 3, "non_destructive"), ("b", 2, "non_destructive"), ("c", 0, "non_destructive")],
    "extension": [("a", 3, "non_destructive"), ("b", 2, "extension"), ("c", 1, "extension")],
    "full": [("a", 4, "full")],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(variant: str, fused: bool = True, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The variant's depth-2 model (eval) and three images for it."""
    arch, kwargs = VARIANTS[variant]
    args = {"pretrained": False, "depth": 2, "num_classes": 7, **kwargs}
    with torch.device("meta"):
        embed = timm.create_model(arch, **args).patch_embed
    size = 3 * embed.feat_ratio()
    torch.manual_seed(seed)
    model = timm.create_model(arch, img_size=size, **args).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model, torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))


def build(base, layout, num_classes=5):
    model = base
    for name, n_mem, mode in layout:
        model = lm.wrap_model(model, n_mem=n_mem, num_classes=num_classes, task=name, mode=mode)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_dense_reference(variant, layout, fused):
    base, x = make(variant, fused)
    with torch.no_grad():
        want_base = base(x)
        model = build(base, LAYOUTS[layout])
        randomize(model)
        got, want = model.forward_all(x), dense_forward_all(model, x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"output {k!r}: {m}")
    if layout != "full":  # the original tokens run exactly the base model's computation
        assert torch.equal(got["base"], want_base), (got["base"] - want_base).abs().max()


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_memory_class_token_and_head_only(variant, mode):
    base, x = make(variant)
    model = lm.wrap_model(base, n_mem=3, num_classes=5, task="a")
    if mode != "full":  # a second task, frozen, under the one that trains
        model = lm.wrap_model(model, n_mem=2, num_classes=5, task="t", mode=mode)
    else:
        model = lm.wrap_model(base, n_mem=2, num_classes=5, task="t", mode=mode)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    task = model.tasks["t"]
    for layer in range(model.depth):
        assert task.memory.grad[layer].abs().sum() > 0, f"no gradient reaches block {layer}'s memory"
    assert task.class_token.grad.abs().sum() > 0
    assert task.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.base.parameters())
    assert all(p.grad is None for n in model.task_names if n != "t" for p in model.tasks[n].parameters())


# Modules that only the original tokens and the new class tokens may reach: memory has no MLP,
# output projection, residual or LayerScale. (Through a fused ``qkv`` linear, the memory's query
# rows are computed once per pass and dropped; the fused blocks slice out the k/v rows instead.)
TOKEN_ONLY = ("mlp", "ffns", "mlp_act", "mlp_out_proj", "out_proj", "attn_out_proj", "proj", "ls", "ls1", "ls2",
              "sub_norm", "norm2", "in_proj")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_memory_goes_only_through_norm_and_key_value(variant):
    base, x = make(variant)
    model = lm.wrap_model(base, n_mem=5, num_classes=5)
    batches = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: batches.append((name, i[0].shape[0])))
        for name, m in base.blocks.named_modules()
        if name.split(".")[-1] in TOKEN_ONLY
    ]
    with torch.no_grad():
        model.forward_all(x)
    for h in hooks:
        h.remove()
    assert batches, "no hooks fired"
    wrong = sorted({name for name, b in batches if b != x.shape[0]})
    assert not wrong, f"memory reached {wrong}"


def test_distilled_keeps_both_heads_and_starts_from_the_class_token():
    base, x = make("distilled")
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    assert model.num_prefix_tokens == 2
    want = (base.cls_token + base.pos_embed[:, :1]).reshape(-1)
    assert torch.equal(model.tasks["default"].class_token, want)
    with torch.no_grad():
        feats = base.forward_features(x)  # after the final norm
        mean_of_heads = (base.head(feats[:, 0]) + base.head_dist(feats[:, 1])) / 2
        assert torch.equal(model.forward_all(x)["base"], mean_of_heads)


def test_hybrid_rejects_wrong_image_size():
    base, x = make("hybrid")
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    h = x.shape[-1]
    with pytest.raises(ValueError, match=f"images are {2 * h}x{2 * h} but this model takes {h}x{h}"):
        model(torch.randn(1, 3, 2 * h, 2 * h))


def test_dynamic_size_other_resolution_and_bad_size():
    base = timm.create_model("test_vit", pretrained=False, depth=2).eval()  # dynamic_img_size, patch 16
    model = build(base, LAYOUTS["non_destructive"])
    randomize(model)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(model.forward_all(x)["base"], base(x))
        torch.testing.assert_close(model.forward_all(x)["a"], dense_forward_all(model, x)["a"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="images are 50x48, not a multiple of the patch size 16x16"):
        model(torch.randn(1, 3, 50, 48))

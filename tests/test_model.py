"""MemoryViT against the paper's guarantees and a dense masked reference."""

from __future__ import annotations

import pytest
import timm
import torch

import learnable_memory as lm
from learnable_memory import testing as lmt
from tests.helpers import VIT_VARIANTS, count_packed_blocks, grid_backbone, images_for, make_vit


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
@pytest.mark.parametrize("layout", sorted(lmt.LAYOUTS))
def test_matches_dense_reference(variant, layout, images):
    lmt.check_dense_reference(make_vit(**VIT_VARIANTS[variant]), images, lmt.dense_forward_all, layouts=[layout])


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
def test_base_output_unchanged_and_concatenation(variant, images):
    vit = make_vit(**VIT_VARIANTS[variant])
    lmt.check_base_unchanged(vit, images)
    lmt.check_concatenation(vit, images, n_mem=(3, 5, 1))


def test_dynamic_img_size_other_resolution():
    lmt.check_dense_reference(make_vit(**VIT_VARIANTS["dynamic"]), torch.randn(2, 3, 48, 40), lmt.dense_forward_all,
                          layouts=["concat"])


def test_set_input_size_before_wrapping():
    vit = make_vit()
    vit.set_input_size(img_size=(48, 48))
    lmt.check_dense_reference(vit, torch.randn(2, 3, 48, 48), lmt.dense_forward_all, layouts=["concat"])


def test_extension_leaves_earlier_tasks_unchanged(images):
    vit = make_vit()
    m1 = lmt.build(vit, "concat", seed=1)
    with torch.no_grad():
        before = m1.forward_all(images)
    m2 = lm.wrap_model(m1, n_mem=4, num_classes=3, task="ext", mode="extension")
    with torch.no_grad():
        m2.tasks["ext"].memory.normal_(std=1.0)
        after = m2.forward_all(images)
    assert m2.tasks["ext"].config.depends_on == ["a", "b", "c"]
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-5, rtol=1e-5)
    # and the extension task really uses its predecessors' memory
    with torch.no_grad():
        m2.tasks["a"].memory.normal_(std=1.0)
        changed = m2.forward_all(images)
    assert not torch.allclose(changed["ext"], after["ext"], atol=1e-4)


def test_forward_serves_active_task_and_skips_others(images):
    vit = make_vit()
    model = lmt.build(vit, "extension", seed=1)
    with torch.no_grad():
        all_out = model.forward_all(images)
        for name in ("a", "b", "c"):
            torch.testing.assert_close(model.set_task(name)(images), all_out[name], atol=1e-5, rtol=1e-5)
        feats = model.forward_features(images, ["b"])
    assert list(feats) == ["b"] and feats["b"].shape == (3, vit.embed_dim)
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        model.set_task("zz")


def mlp_outputs(model):
    """Record the outputs of every block's MLP during a pass."""
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.base.blocks]
    return seen, hooks


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
def test_gradients_reach_memory_class_token_and_head_only(mode, images):
    lmt.check_training(make_vit(), images, mode)


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
def test_original_tokens_keep_a_graph_only_in_full_mode(mode, images):
    """Non-destructive and extension training keep no autograd graph for the original tokens."""
    model = lm.wrap_model(make_vit(), n_mem=3, num_classes=5, task="t", mode=mode)
    model.train()
    seen, hooks = mlp_outputs(model)
    model(images).sum().backward()
    for h in hooks:
        h.remove()
    orig = [o for o in seen if o.shape[1] > 1]
    assert len(orig) == model.depth
    assert all(o.requires_grad == (mode == "full") for o in orig)


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
@pytest.mark.parametrize("layout", ["concat", "extension"])
def test_packed_pass_equals_split_pass(variant, layout, images, monkeypatch):
    """Inference packs the new class tokens behind the original tokens; training keeps them apart
    (no graph through the backbone). Both give the same outputs, and the base output stays
    bit-identical to the base model's."""
    vit = make_vit(**VIT_VARIANTS[variant])
    model = lmt.build(vit, layout, seed=1)
    for t in model.tasks.values():
        t.requires_grad_(True)
    calls = count_packed_blocks(monkeypatch)
    with torch.no_grad():
        packed = model.forward_all(images)
        want_base = vit(images)
    assert len(calls) == model.depth, "inference did not run packed"
    split = {k: v.detach() for k, v in model.forward_all(images).items()}  # grad on: split
    assert len(calls) == model.depth, "a training pass ran packed"
    assert torch.equal(packed["base"], want_base) and torch.equal(split["base"], want_base)
    lmt.assert_outputs_close(packed, split)


def test_blocks_with_unaligned_widths_keep_the_split_layout(monkeypatch):
    """An MLP width that is not a multiple of 64 (EVA-02-L's SwiGLU: 2730) would move the original
    tokens' last elements out of the elementwise kernels' tail: such blocks do not pack."""
    base, size = grid_backbone("eva02_tiny_patch14_224", 3, depth=2, embed_dim=64, num_heads=4)  # SwiGLU 170
    model = lmt.build(base, "concat", seed=1)
    calls = count_packed_blocks(monkeypatch)
    x = images_for(size, batch=2)
    with torch.no_grad():
        assert torch.equal(model.forward_all(x)["base"], base(x))
    assert not calls


def test_packed_base_output_bit_identical_at_full_size():
    """The packed pass at a real size (ViT-S/16, 224 px, 12 blocks), where the kernels that run the
    original tokens' rows differ from the tiny models' ones."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    model = lmt.build(vit, [(f"t{i}", 10, "non_destructive") for i in range(4)])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model.forward_all(x)["base"], vit(x))


def test_full_mode_training_runs_split_with_the_dense_gradients(images, monkeypatch):
    """Training never packs (a full-mode step measured slower packed); the full-mode gradients
    are those of the dense masked formulation."""
    vit = make_vit()
    model = lmt.build(vit, "full", seed=1)
    task = model.tasks["a"]
    task.requires_grad_(True)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))
    calls = count_packed_blocks(monkeypatch)
    grads = []
    for forward in (model.forward_all, lambda x: lmt.dense_forward_all(model, x)):
        task.zero_grad()
        (forward(images)["a"] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in task.named_parameters()})
    assert not calls, "a training pass ran packed"
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=f"gradient of {n}")
    with torch.no_grad():  # and the packed inference pass agrees with the dense one
        lmt.assert_outputs_close(model.forward_all(images), lmt.dense_forward_all(model, images))
    assert len(calls) == model.depth


@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "vit_small_patch16_rope_mixed_ape_224",
                                  "beit_base_patch16_224", "vit_dwee_patch16_reg1_gap_256"])
def test_rotary_and_biased_attention_pack_like_the_rest(arch, monkeypatch):
    """Rotary tables (one for all blocks, or one per block) and relative position biases apply in the
    packed pass exactly as in the split one: the packed outputs equal the split ones and the base
    output stays bit-identical. Only a kind with arithmetic of its own (differential attention) keeps
    the split layout."""
    width = 192 if arch.startswith("eva02") else 64  # EVA-02: SwiGLU 192 * 4 * 2/3 = 512, packable widths
    base, size = grid_backbone(arch, 3, depth=2, embed_dim=width, num_heads=4)
    model = lmt.build(base, "extension", seed=1)
    for t in model.tasks.values():
        t.requires_grad_(True)
    x = images_for(size, batch=2)
    calls = count_packed_blocks(monkeypatch)
    with torch.no_grad():
        packed, want_base = model.forward_all(x), base(x)
    expect = 0 if arch.startswith("vit_dwee") else model.depth
    assert len(calls) == expect, f"{len(calls)} packed attention layers, expected {expect}"
    split = {k: v.detach() for k, v in model.forward_all(x).items()}  # autograd on: split
    assert len(calls) == expect
    assert torch.equal(packed["base"], want_base) and torch.equal(split["base"], want_base)
    lmt.assert_outputs_close(packed, split)


def test_adding_a_task_freezes_earlier_ones():
    vit = make_vit()
    m1 = lm.wrap_model(vit, n_mem=2, num_classes=3, task="a")
    assert all(p.requires_grad for p in m1.tasks["a"].parameters())
    m2 = lm.wrap_model(m1, n_mem=2, num_classes=3, task="b")
    assert not any(p.requires_grad for p in m2.tasks["a"].parameters())
    assert all(p.requires_grad for p in m2.tasks["b"].parameters())
    assert m2.base is vit and m2.active_task == "b" and m1.task_names == ["a"]
    trainable = sum(p.numel() for p in m2.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 192 + 192 + 3 * 192 + 3


def test_new_class_token_starts_from_the_original():
    vit = make_vit(**VIT_VARIANTS["no_embed_class_layerscale"])
    model = lm.wrap_model(vit, n_mem=0, num_classes=3)
    assert torch.equal(model.tasks["default"].class_token, vit.cls_token.reshape(-1))
    vit = make_vit()
    model = lm.wrap_model(vit, n_mem=0, num_classes=3)
    assert torch.equal(model.tasks["default"].class_token, (vit.cls_token + vit.pos_embed[:, :1]).reshape(-1))
    vit = make_vit(**VIT_VARIANTS["gap"])
    model = lm.wrap_model(vit, n_mem=0, num_classes=3)
    assert torch.equal(model.tasks["default"].class_token, vit.pos_embed[0].mean(0))


@pytest.mark.integration  # inductor compiles C++ in worker subprocesses: tens of seconds on a busy machine
def test_compile_matches_eager(images):
    vit = make_vit()
    model = lmt.build(vit, "extension", seed=1)
    with torch.no_grad():
        eager = model.forward_all(images)
        compiled = torch.compile(model.forward_all)(images)
    lmt.assert_outputs_close(compiled, eager)


def test_bf16_autocast(images):
    vit = make_vit()
    model = lmt.build(vit, "concat")
    lmt.randomize(model, scale=0.1)
    with torch.no_grad():
        want = model.forward_all(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.forward_all(images)
    for k in want:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].float(), want[k], atol=0.1, rtol=0.05)


# ----- bad input -----
def test_rejects_negative_n_mem():
    with pytest.raises(ValueError, match="n_mem must be an integer >= 0"):
        lm.wrap_model(make_vit(), n_mem=-1, num_classes=3)


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'partial'.*non_destructive, extension, full"):
        lm.wrap_model(make_vit(), n_mem=1, num_classes=3, mode="partial")


def test_rejects_duplicate_and_reserved_names():
    m = lm.wrap_model(make_vit(), n_mem=1, num_classes=3, task="a")
    with pytest.raises(ValueError, match="a task named 'a' already exists"):
        lm.wrap_model(m, n_mem=1, num_classes=3, task="a")
    with pytest.raises(ValueError, match="reserved"):
        lm.wrap_model(m, n_mem=1, num_classes=3, task="base")


def test_rejects_full_mode_with_other_tasks():
    vit = make_vit()
    m = lm.wrap_model(vit, n_mem=1, num_classes=3, task="a")
    with pytest.raises(ValueError, match="mode 'full'.*can not share a model"):
        lm.wrap_model(m, n_mem=1, num_classes=3, task="f", mode="full")
    f = lm.wrap_model(vit, n_mem=1, num_classes=3, task="f", mode="full")
    with pytest.raises(ValueError, match="mode 'full'.*can not share a model"):
        lm.wrap_model(f, n_mem=1, num_classes=3, task="b")


def test_full_mode_has_no_base_output(images):
    m = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task="f", mode="full")
    with torch.no_grad():
        assert list(m.forward_all(images)) == ["f"]


def test_rejects_unsupported_model():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(TypeError, match="unsupported model type ResNet.*VisionTransformer"):
        lm.wrap_model(resnet, n_mem=1, num_classes=3)


def test_rejects_wrong_image_size():
    m = lm.wrap_model(make_vit(), n_mem=1, num_classes=3)
    with pytest.raises(ValueError, match="images are 48x48 but this model takes 32x32.*dynamic_img_size"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="1 channels but the model takes 3"):
        m(torch.randn(1, 1, 32, 32))


def test_requires_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        lm.wrap_model(make_vit(), n_mem=1)
    m = lm.wrap_model(make_vit(), n_mem=1, class_names=["x", "y"])
    assert m.tasks["default"].head.out_features == 2


def test_model_without_tasks_serves_the_base(images):
    vit = make_vit()
    model = lm.MemoryViT(vit)
    with torch.no_grad():
        out = model.forward_all(images)
        assert list(out) == ["base"] and torch.equal(out["base"], vit(images))
    with pytest.raises(RuntimeError, match="no task"):
        model(images)


@pytest.mark.parametrize("name", ["training", "_modules", "forward"])
def test_a_task_named_like_a_module_attribute_trains_evaluates_and_saves(name, images, tmp_path):
    model = lm.wrap_model(make_vit(), n_mem=2, num_classes=3, task=name)
    model.train()
    assert model.tasks[name].training and model.training
    model.eval()
    assert not model.tasks[name].training and not model.tasks.training
    assert set(model.forward_all(images)) == {"base", name}
    assert f"tasks.{name}.memory" in model.state_dict()
    model.save_adapter(tmp_path / "a")
    loaded = lm.load_adapters(make_vit(), [tmp_path / "a"])
    with torch.no_grad():
        assert torch.equal(loaded.forward_all(images)[name], model.forward_all(images)[name])

"""The family sweep: every architecture of timm's ViT modules, built at ``depth=2`` with random weights.

Each architecture is built with a 3x3 patch grid where it allows ``img_size`` (all of them do),
with its LayerScale-like constants (``init_values`` ~1e-5, which would hide every difference
between blocks) set to 1, and then held to the guarantees:

1. wrapping leaves the base output bit-identical (``forward_all(x)["base"]`` vs ``base(x)``, at
   inference and in a training pass), and every block's new class tokens equal its kind's dense
   reference (``testing.check_new_tokens``);
2. two tasks made separately on the backbone (random parameters stand in for training), then
   concatenated, each give the output they give alone;
3. a training step, in each mode, gives gradients to the new task's memory (every block), class
   token and head, to nothing else, and leaves the base output and the earlier task as they were;
4. ``save_pretrained`` then ``load_adapters`` onto a fresh copy of the backbone gives the same outputs.

The checks are :func:`learnable_memory.testing.check_all`'s, which users can run on their own backbones.

An architecture may fail to wrap only with the ``TypeError`` of a matching entry of
``learnable_memory.registry.UNSUPPORTED``, and every such entry must really refuse.

The default run checks :data:`SAMPLE`, one architecture per family and per block, attention,
embedding and backbone kind (and the features listed there). ``-m slow`` checks every
architecture and that the sample has each of its kinds. ``benchmarks/family_sweep.py`` runs the
slow sweep and writes the README's table from the properties recorded here.

:data:`SAMPLE` is the one list of families: ``tests/test_isolation.py`` and ``tests/test_export.py``
take theirs from it (:func:`representatives`), so a new family needs one entry here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import pytest
import timm
import torch

import learnable_memory as lm
from learnable_memory import testing as lmt
from learnable_memory.kinds import AttentionKind
from learnable_memory.registry import ATTENTION_KINDS, BACKBONE_KINDS, BLOCK_KINDS, UNSUPPORTED, load_families
from tests.helpers import grid_backbone, images_for, patch_embedding

MODULES = (
    "vision_transformer", "deit", "vision_transformer_hybrid", "eva", "beit", "naflexvit", "vitamin", "qwen3_vit",
    "vision_transformer_relpos", "deepseek_vit", "convit", "gemma4_vit",
)
MODULE_OF = {arch: module for module in MODULES for arch in timm.list_models(module=module)}
GRID = 3  # patches per side
#: Modules that need another grid: Qwen3's projector merges 2x2 patches.
GRID_OF_MODULE = {"qwen3_vit": 4}
BATCH = 2

# timm can not build these at depth=2 as registered (their num_kv_heads has one entry per block of
# the full depth): built with one full-attention block and one grouped-query block, as the full model has.
DEPTH2_KWARGS = {
    "vit_base_patch16_sapiens2": {"num_kv_heads": (12, 6)},
    "vit_large_patch16_sapiens2": {"num_kv_heads": (16, 8)},
    "vit_huge_patch16_sapiens2": {"num_kv_heads": (16, 8)},
    "vit_giant_patch16_sapiens2": {"num_kv_heads": (24, 12)},
    "vit_5b_patch16_sapiens2": {"num_kv_heads": (32, 16)},
}

# The default run: architecture -> what it stands for.
SAMPLE = {
    # vision_transformer
    "test_vit": "Block + Attention, class token, dynamic_img_size",
    "test_vit3": "attention pooling (map), LayerScale",
    "vit_xsmall_patch16_clip_224": "CLIP: pre-norm (norm_pre)",
    "vit_small_patch14_reg4_dinov2": "4 register tokens, no_embed_class, LayerScale",
    "beit3_base_patch16_224": "Attention with scale_norm",
    "vit_base_patch16_rpn_224": "ResPostBlock (post-norm), no class token, avg pooling",
    "vit_pwee_patch16_reg1_gap_256": "ParallelScalingBlock with qkv bias, separate out projections, gap",
    "vit_base_patch16_xp_224": "ParallelScalingBlock with qk_norm and mlp_bias",
    "vit_dpwee_patch16_reg1_gap_256": "DiffParallelScalingBlock (differential attention, fused out_proj)",
    "vit_dwee_patch16_reg1_gap_256": "Block + DiffAttention",
    "vit_small_patch16_18x2_224": "ParallelThingsBlock (two attention and two MLP branches)",
    # deit
    "deit_tiny_distilled_patch16_224": "VisionTransformerDistilled: distillation token and head",
    "deit3_small_patch16_224": "DeiT III: no_embed_class, LayerScale",
    # vision_transformer_hybrid
    "vit_tiny_r_s16_p8_224": "HybridEmbed (ResNet stem)",
    # eva
    "eva02_tiny_patch14_224": "Eva + EvaBlock + EvaAttention, RoPE",
    "vit_pe_core_tiny_patch16_384": "Eva + AttentionRope, map pooling",
    "eva02_enormous_patch14_clip_224": "EvaBlockPostNorm",
    "vit_base_patch16_sapiens2": "grouped-query attention (num_kv_heads)",
    # beit
    "beit_base_patch16_224": "Beit: relative position bias",
    # naflexvit
    "naflexvit_base_patch16_gap": "NaFlexVit + NaFlexEmbeds",
    # vitamin
    "vitamin_small_224": "ViTamin: MbConv stages as HybridEmbed, GeGluMlp, no class token, avg pooling",
    # qwen3_vit
    "qwen3_vit_88m": "Qwen3VitClassifier: no class token, rotary EvaBlocks, mean pooling and final norm",
    "qwen3_vit_88m_enc": "Qwen3VitEncoder: the VLM projector (2x2 patch merge) as base output",
    # vision_transformer_relpos
    "vit_relpos_medium_patch16_cls_224": "RelPosBlock + RelPosAttention (MLP bias), class token, token pooling",
    "vit_srelpos_small_patch16_224": "shared relative position bias, no class token, avg pooling",
    "vit_relpos_small_patch16_rpn_224": "ResPostRelPosBlock (post-norm)",
    # deepseek_vit
    "deepseek_vit_412m": "DeepseekVitClassifier: DeepseekVitBlock (no LayerScale), RMSNorm, no class token",
    "deepseek_vit_412m_enc": "DeepseekVitEncoder: the 3x3 aligner as base output",
    # convit
    "convit_tiny": "ConVit: GPSA blocks as embedding, the class token and memory from the MHSA blocks",
    # gemma4_vit
    "gemma4_vit_167m": "Gemma4VitClassifier: sandwich-norm Gemma4Block, Gemma4Attention (scale 1, 2D RoPE)",
    "gemma4_vit_167m_enc": "Gemma4VitEncoder: soft-token pooling (3x3 cells) as base output",
}
# Sample architectures the default run builds narrower than registered (same kinds; the slow sweep builds
# them as registered): a 1792-wide EVA would take most of the default run's time, VLM towers seconds each.
_NARROW = {"embed_dim": 64, "num_heads": 4}
SAMPLE_KWARGS = {
    "eva02_enormous_patch14_clip_224": _NARROW,
    **dict.fromkeys(["qwen3_vit_88m", "qwen3_vit_88m_enc", "deepseek_vit_412m", "deepseek_vit_412m_enc"], _NARROW),
    **dict.fromkeys(["gemma4_vit_167m", "gemma4_vit_167m_enc"], {**_NARROW, "head_dim": 16, "intermediate_size": 128}),
}


def depth_kwargs(arch: str, depth: int = 2) -> dict:
    """What timm needs besides ``depth`` to build ``arch`` with ``depth`` blocks: :data:`DEPTH2_KWARGS`;
    ConViT: its GPSA blocks, then one MHSA block (where the class token joins)."""
    if MODULE_OF.get(arch) == "convit":
        return {"local_up_to_layer": depth - 1}
    return DEPTH2_KWARGS.get(arch, {}) if depth == 2 else {}


def grid_of(arch: str) -> int:
    """Patches per side for ``arch``: :data:`GRID`, or its module's (:data:`GRID_OF_MODULE`)."""
    return GRID_OF_MODULE.get(MODULE_OF.get(arch), GRID)


def build(arch: str, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    """``arch`` at depth 2 with random weights and a small input, and images for it."""
    model, size = grid_backbone(arch, grid_of(arch), seed, depth=2, **depth_kwargs(arch), **kwargs)
    with torch.no_grad():
        for p in model.parameters():  # LayerScale gammas and post-norm weights made with init_values
            v = p.reshape(-1)[0]
            if p.numel() > 1 and 0 < abs(v) < 0.1 and bool((p == v).all()):
                p.fill_(1.0)
    return model, images_for(size, BATCH, seed + 1)


def kind_name(obj: object) -> str:
    """``type(obj)`` as ``"<timm module>.<class>"``, e.g. ``"beit.Block"`` or ``"attention.Attention"``."""
    cls = type(obj)
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def kinds(model: torch.nn.Module) -> set[str]:
    """Backbone, embedding, block and attention types of ``model``, as ``"<group>:<kind_name>"``."""
    out = {f"backbone:{kind_name(model)}"}
    embed = patch_embedding(model)
    if embed is not None:
        out.add(f"embed:{kind_name(embed)}")
    load_families()
    backbone = BACKBONE_KINDS.get(type(model))
    for blk in model.blocks if backbone is None else backbone.blocks(model):
        out.add(f"block:{kind_name(blk)}")
        kind = BLOCK_KINDS.get(type(blk))
        if kind is not None:
            out.update(f"attention:{kind_name(a)}" for a in kind.attentions(blk))
    return out


@cache
def sample_kinds_of(arch: str) -> frozenset[str]:
    """:func:`kinds` of a SAMPLE architecture (types only: built on the meta device)."""
    with torch.device("meta"):
        return frozenset(kinds(timm.create_model(arch, pretrained=False, depth=2, **depth_kwargs(arch))))


def representatives(groups: Sequence[str]) -> dict[str, str]:
    """``{kind: architecture}`` for every kind of ``groups`` (``"backbone"``, ``"block"``, ``"attention"``,
    ``"embed"``) in the SAMPLE: the first SAMPLE architecture, in its order, that has the kind."""
    out: dict[str, str] = {}
    for arch in SAMPLE:
        for kind in sorted(sample_kinds_of(arch)):
            if kind.split(":", 1)[0] in groups:
                out.setdefault(kind, arch)
    return out


def unsupported_reasons(arch: str, model: torch.nn.Module) -> list[str]:
    """The UNSUPPORTED entries that match ``arch`` or a module class in ``model``."""
    names = {arch} | {type(m).__name__ for m in model.modules()}
    return [reason for key, reason in UNSUPPORTED.items() if key in names]


def check_architecture(arch: str, tmp_path, record_property, **kwargs) -> set[str]:
    """The four guarantees (module docstring) for one architecture, or its documented refusal.
    ``kwargs`` go to ``timm.create_model``. Returns the architecture's :func:`kinds`."""
    base, x = build(arch, **kwargs)
    found = kinds(base)
    record_property("module", MODULE_OF[arch])
    record_property("kinds", ",".join(sorted(found)))
    reasons = unsupported_reasons(arch, base)
    try:
        lm.MemoryViT(base)
    except TypeError as e:
        assert reasons, f"{arch} is refused but not documented in UNSUPPORTED: {e}"
        assert any(r in str(e) for r in reasons), f"{arch}: {e} does not give the documented reason {reasons}"
        record_property("status", f"unsupported: {reasons[0]}")
        return found
    assert not reasons, f"{arch} is listed in UNSUPPORTED ({reasons}) but wraps"
    record_property("status", "supported")
    # float32 rounding grows with the logits of wide models with random heads: 1e-5 of the largest logit
    lmt.check_all(base, x, tmp_path / "adapters", tol=lmt.Tolerance(scaled=True))
    return found


@pytest.mark.parametrize("arch", sorted(SAMPLE))
def test_sample_architecture(arch, tmp_path, record_property):
    check_architecture(arch, tmp_path, record_property, **SAMPLE_KWARGS.get(arch, {}))


def test_sample_spans_every_family():
    assert {MODULE_OF[a] for a in SAMPLE} == set(MODULES)


@pytest.fixture(scope="module")
def sample_kinds() -> set[str]:
    """The kinds the default sample checks."""
    return set().union(*map(sample_kinds_of, SAMPLE))


def test_representatives_cover_the_sample_kinds():
    groups = ("backbone", "block", "attention")
    reps = representatives(groups)
    assert set(reps) == {k for a in SAMPLE for k in sample_kinds_of(a) if k.split(":")[0] in groups}
    assert reps["backbone:vision_transformer.VisionTransformer"] == "test_vit"
    assert reps["attention:beit.Attention"] == "beit_base_patch16_224"


def test_kinds_with_a_position_bias_state_the_new_tokens_bias_for_their_reference():
    """The dense reference states the new class tokens' bias on its own (``reference_bias``), so that a
    wrong row in ``position_bias`` shows (``tests/test_testing.py`` has such a kind)."""
    load_families()
    for t, kind in ATTENTION_KINDS.items():
        if type(kind).position_bias is not AttentionKind.position_bias:
            assert type(kind).reference_bias is not AttentionKind.reference_bias, (
                f"{type(kind).__name__} (for {t.__name__}) overrides position_bias but not reference_bias")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MODULE_OF))
def test_every_architecture(arch, tmp_path, record_property, sample_kinds):
    missing = check_architecture(arch, tmp_path, record_property) - sample_kinds
    assert not missing, f"{arch} has kinds the default sample does not check: {sorted(missing)}; add it to SAMPLE"


def test_refused_kinds_raise_documented_type_error():
    """The refusal mechanism itself, on a block type and a backbone type made up for the test."""
    from timm.models.vision_transformer import Block, VisionTransformer

    from learnable_memory.registry import _REFUSED, refuse

    class OddBlock(Block):
        pass

    class OddViT(VisionTransformer):
        pass

    try:
        refuse(OddBlock, "odd blocks change the tokens in ways memory can not follow")
        refuse(OddViT, "odd backbones mix the tokens before the blocks")
        vit = timm.create_model("test_vit", pretrained=False, depth=2, block_fn=OddBlock)
        with pytest.raises(TypeError, match="OddBlock is not supported by learnable_memory: odd blocks change"):
            lm.wrap_model(vit, n_mem=1, num_classes=2)
        assert unsupported_reasons("test_vit", vit) == [UNSUPPORTED["OddBlock"]]
        odd = OddViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
        with pytest.raises(TypeError, match="OddViT is not supported by learnable_memory: odd backbones mix"):
            lm.wrap_model(odd, n_mem=1, num_classes=2)
    finally:
        for cls in (OddBlock, OddViT):
            _REFUSED.pop(cls, None)
            UNSUPPORTED.pop(cls.__name__, None)

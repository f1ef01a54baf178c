"""timm models refused on purpose, each with why and what would lift the refusal; and Hugging Face
``transformers`` models, pointed to the timm names that load the same weights.

Learnable memory needs global token attention: every block lets a new class token attend to all
original tokens and to its memory, at one width, while the original tokens' arithmetic stays as it
is. The modules below attend in windows or local neighbourhoods, pool tokens between stages of
different widths, attend across channels (cross-covariance) or factorise the softmax, or add the
class token only in their last blocks. Wrapping one raises
:class:`~learnable_memory.registry.UnsupportedModelError` with the reason (also listed in
``registry.UNSUPPORTED`` and the README's family table).

``transformers`` is never imported: its models are recognised by their class's module name.
"""

from __future__ import annotations

from timm.models.cait import Cait
from timm.models.coat import CoaT
from timm.models.crossvit import CrossVit
from timm.models.davit import DaVit
from timm.models.gcvit import GlobalContextVit
from timm.models.hiera import Hiera
from timm.models.hieradet_sam2 import HieraDet
from timm.models.mvitv2 import MultiScaleVit
from timm.models.pit import PoolingVisionTransformer
from timm.models.swin_transformer import SwinTransformer
from timm.models.tiny_vit import TinyVit
from timm.models.tnt import TNT
from timm.models.vision_transformer_sam import VisionTransformerSAM
from timm.models.volo import VOLO
from timm.models.xcit import Xcit

from ..registry import refuse, refuse_module

#: One width per task: a task's memory is ``[depth, n_mem, D]`` and its class token ``[D]``.
_ONE_WIDTH = "a task's memory and class token have one width"

#: timm model class -> (why the guarantees can not hold, what supporting it would need).
REASONS: dict[type, tuple[str, str]] = {
    SwinTransformer: (
        "attention runs within (shifted) local windows, and patch merging between stages makes fewer, "
        f"wider tokens; there is no class token, and {_ONE_WIDTH}",
        "a rule for what a new class token attends to in windowed attention (e.g. every window's keys), "
        "memory per stage width, and new class tokens carried through patch merging",
    ),
    Hiera: (
        "the early stages attend within mask units (local windows) and the stages pool their queries "
        f"between widths; there is no class token, and {_ONE_WIDTH}",
        "new class tokens that attend across mask units, memory per stage width, and new class tokens "
        "carried through the query pooling",
    ),
    HieraDet: (
        "SAM 2's Hiera image encoder: windowed attention in most blocks, query pooling between stages of "
        f"different widths, no class token and a feature-map output; {_ONE_WIDTH}",
        "as timm.models.hiera: new class tokens across windows, memory per stage width and new class "
        "tokens carried through the pooling",
    ),
    VisionTransformerSAM: (
        "SAM's image encoder: most blocks attend within windows with decomposed relative-position biases "
        "of the token grid, only a few attend globally, there is no class token and the output is a neck "
        "feature map, not logits",
        "a rule for new class tokens in the windowed blocks, a relative-position bias for tokens that have "
        "no grid position, and a base output to keep bit-identical",
    ),
    TinyVit: (
        "convolutional stages, then attention within local windows with per-window attention biases, in "
        f"stages of different widths; {_ONE_WIDTH}",
        "new class tokens in windowed attention with a bias for tokens without a position, and memory per "
        "stage width",
    ),
    DaVit: (
        "blocks alternate window attention and channel-group attention (a channel-by-channel map computed "
        "from every token, so an added token changes every original token's output), in stages of "
        f"different widths; {_ONE_WIDTH}",
        "a channel attention in which added tokens leave the original tokens' output unchanged, a rule for "
        "new class tokens in windows, and memory per stage width",
    ),
    GlobalContextVit: (
        "window attention whose global queries are pooled from the feature map, in stages of different "
        f"widths joined by downsampling; {_ONE_WIDTH}",
        "a rule for new class tokens in windowed attention, memory per stage width and new class tokens "
        "carried through the downsampling",
    ),
    MultiScaleVit: (
        "pooling attention: queries, keys and values are pooled by strided convolutions over the token "
        "grid, with relative-position terms, in stages that change width and token count; memory and new "
        f"class tokens have no place in that grid, and {_ONE_WIDTH}",
        "key/value pooling that leaves added tokens out, memory per stage width, and new class tokens "
        "carried through the query pooling as the *_cls models carry theirs",
    ),
    Xcit: (
        "its main blocks use cross-covariance attention (a channel-by-channel map normalised over all "
        "tokens, so an added token changes every original token's output) and convolve the patch grid "
        "(local patch interaction), so memory can not enter them. Its last two class-attention blocks, "
        "where the class token queries [class token ; patches], could take memory and new class tokens "
        "(the XCA blocks run as embedding, as ConViT's GPSA layers do), adapting 2 of the model's blocks; "
        "that block kind is not written yet",
        "a block kind for ClassAttentionBlock in which the class token is the only original query and the "
        "patches pass as timm passes them, with the XCA blocks run as part of the embedding",
    ),
    CoaT: (
        "factorised attention: a softmax over the keys along the tokens, then one k^T v map shared by every "
        "query, so memory among the keys would change every original token's output; convolutional "
        "relative-position encoding over the patch grid; serial and parallel blocks at several scales and "
        "widths",
        "a factorised form with a key softmax of its own for new class tokens, memory per scale width, and a "
        "rule for the cross-scale parallel blocks",
    ),
    CrossVit: (
        "two branches of different patch sizes and widths, each with its own class token, exchange "
        "information only through their class tokens (cross-attention of one branch's class token over the "
        f"other's patches, projected between the widths); {_ONE_WIDTH}",
        "a new class token and memory per branch, and the cross-attention's projections between branches "
        "defined for new class tokens",
    ),
    TNT: (
        "Transformer in Transformer: each block first runs a local inner attention among the pixel tokens of "
        "each patch and adds them into the patch tokens; that second token stream goes from block to block, "
        "and a block kind carries only the original and the new class tokens",
        "a block kind whose state includes the pixel-token stream; the outer attention could then take "
        "memory as a ViT's does",
    ),
    PoolingVisionTransformer: (
        "stages of different widths, joined by a depthwise-convolution pooling of the patch tokens and a "
        f"linear map of the class (and distillation) tokens; {_ONE_WIDTH}",
        "memory per stage width and new class tokens carried through each stage's class-token linear map",
    ),
    Cait: (
        "the class token joins only in the last two blocks (class attention), and the self-attention blocks "
        "before them use talking-heads attention (scores mixed across heads before and after the softmax), "
        "which the core's per-head split of a new class token's softmax can not follow",
        "either a talking-heads attention kind with its own arithmetic, or the self-attention blocks run as "
        "embedding with memory and new class tokens in the class-attention blocks only (as for "
        "timm.models.xcit), and a block kind for LayerScaleBlockClassAttn",
    ),
    VOLO: (
        "outlooker blocks (outlook attention over local 3x3 neighbourhoods of the token grid), then global "
        "self-attention blocks without a class token, which joins only in the last two class-attention "
        "blocks; the base head adds a token-labelling term over the patches",
        "the outlookers run as embedding, new class tokens that join the global blocks as for backbones "
        "without a class token, and a block kind for the class-attention blocks (ClassBlock)",
    ),
}

#: Hugging Face models: the timm names that load the same weights.
TRANSFORMERS_REASON = (
    "Hugging Face transformers models are not wrapped; learnable_memory runs timm's modules. timm loads the "
    "same weights: ViT: timm.create_model(\"vit_base_patch16_224.augreg_in21k\", pretrained=True) "
    "(\".orig_in21k\" for the original paper's release; other sizes likewise); Dinov2: "
    "timm.create_model(\"vit_small_patch14_dinov2\", pretrained=True) (also vit_base/large/giant_patch14_dinov2); "
    "CLIP's image tower: timm.create_model(\"vit_base_patch16_clip_224.openai\", pretrained=True) for OpenAI's "
    "openai/clip-vit-base-patch16 (other tags of vit_base_patch16_clip_224 for other CLIP trainings)"
)


def reason(cls: type) -> str:
    """The refusal message of ``cls``: its timm module, why, and what supporting it would need."""
    why, need = REASONS[cls]
    return f"{cls.__module__} ({cls.__name__}): {why}. Supporting it would need {need}."


for _cls in REASONS:
    refuse(_cls, reason(_cls))
refuse_module("transformers", TRANSFORMERS_REASON)

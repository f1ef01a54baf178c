"""The package's layout holds its promises: no import cycles, every family module registers kinds."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from torch import nn

import learnable_memory
from learnable_memory import registry

PACKAGE = Path(learnable_memory.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its code (lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names]
                # "from pkg import sub" imports the submodule; "from pkg import name" the package itself
                candidates = subs + ([target] if any(c not in modules for c in subs) else [])
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package importing its own submodules
    (``pkg`` -> ``pkg.sub``) is not a cycle unless the submodule imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    # the top-level package re-exports its modules; nothing inside may import it back
    importers = sorted(m for m, deps in graph.items() if "learnable_memory" in deps)
    assert not importers, f"{importers} import the top-level package; import the module that defines the name"
    graph["learnable_memory"] = set()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_family_modules_are_discovered(tmp_path, monkeypatch):
    """A module dropped into ``families/`` registers its kinds with no import anywhere else."""
    from learnable_memory import families

    (tmp_path / "zz_made_up_family.py").write_text(
        "from torch import nn\n"
        "from learnable_memory.blocks import PreNormBlock\n"
        "from learnable_memory.registry import register_block\n"
        "class MadeUpBlock(nn.Module):\n    pass\n"
        "register_block(MadeUpBlock)(PreNormBlock)\n"
    )
    registry.load_families()
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_FAMILIES_LOADED", False)
    before = set(registry.BLOCK_KINDS)
    try:
        registry.load_families()
        new = {t.__name__ for t in set(registry.BLOCK_KINDS) - before}
        assert new == {"MadeUpBlock"}
    finally:
        for t in set(registry.BLOCK_KINDS) - before:
            del registry.BLOCK_KINDS[t]
        sys.modules.pop(f"{families.__name__}.zz_made_up_family", None)


def test_unregistered_type_fails_loudly_naming_the_kinds():
    class Odd(nn.Module):
        pass

    with pytest.raises(registry.UnsupportedModelError, match=(
            r"unsupported block type Odd \(module tests.test_structure\): learnable_memory has no block kind for it.*"
            r"supported block types: ")):
        registry.block_kind(Odd())
    assert issubclass(registry.UnsupportedModelError, TypeError)


def test_a_second_kind_for_a_type_is_refused_unless_overriding():
    from timm.models.vision_transformer import Block

    from learnable_memory.blocks import PostNormBlock, PreNormBlock

    registry.load_families()
    with pytest.raises(ValueError, match=r"timm.models.vision_transformer.Block already run\(s\) with PreNormBlock: "
                                         "registering PostNormBlock too would replace it; pass override=True"):
        registry.register_block(Block)(PostNormBlock)
    assert type(registry.BLOCK_KINDS[Block]) is PreNormBlock

    class Made(nn.Module):
        pass

    try:
        registry.register_block(Made)(PreNormBlock)
        registry.register_block(Made, override=True)(PostNormBlock)
        assert type(registry.BLOCK_KINDS[Made]) is PostNormBlock
    finally:
        registry.BLOCK_KINDS.pop(Made, None)


def test_supported_types_lists_every_registered_type():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    types = registry.supported_types()
    assert list(types) == ["backbone", "block", "attention"]
    assert VisionTransformer in types["backbone"] and Block in types["block"] and Attention in types["attention"]
    assert set(types["block"]) == set(registry.BLOCK_KINDS)


def test_an_unsupported_timm_model_is_told_its_module_and_why():
    import timm
    import torch

    with torch.device("meta"):
        resnet = timm.create_model("resnet18", pretrained=False)  # neither supported nor refused on purpose
    want = r"unsupported model type ResNet \(module timm.models.resnet\): learnable_memory has no model kind for it"
    with pytest.raises(registry.UnsupportedModelError, match=want) as e:
        registry.backbone_kind(resnet)
    assert "timm.create_model('vit_" not in str(e.value)


def test_attention_kinds_are_resolved_when_wrapping(monkeypatch):
    """A pass reads the kinds resolved at wrap time from its context, not the registry."""
    from timm.layers import Attention

    from learnable_memory.blocks import kind_of
    from learnable_memory.context import PassContext
    from learnable_memory.token_index import new_token_index
    from tests.helpers import make_vit

    model = learnable_memory.MemoryViT(make_vit())
    attn = model.base.blocks[0].attn
    resolved = model._attention_kinds[attn]
    assert resolved is registry.ATTENTION_KINDS[Attention]
    monkeypatch.setitem(registry.ATTENTION_KINDS, Attention, object())  # a later registration
    ctx = PassContext(index=new_token_index([]), full=False, orig_grad=False, attention_kinds=model._attention_kinds)
    assert kind_of(attn, ctx) is resolved
    assert kind_of(attn, PassContext(index=ctx.index, full=False, orig_grad=False)) is not resolved


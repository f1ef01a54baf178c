"""``learnable_memory.export_model``: ONNX (onnxruntime) and ``torch.export`` programs equal the eager
model on several tasks, for one architecture of the families' SAMPLE per backbone kind (ViT, DeiT
distilled, EVA with rotary tables, BEiT, NaFlexVit), at any batch size; outputs named
after the tasks; the inference layout traced whatever the caller's autograd mode; clear refusals.

Each (family, format) is exported once per session (depth-1 tiny models). ONNX exports take about
10 s each, so they are ``integration`` tests."""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import learnable_memory as lm
from learnable_memory.export import ExportCheckError, _check, _pt2_runner, sidecar_path
from learnable_memory.kinds import AttentionKind
from learnable_memory.kv_cache import MemoryKVCache
from learnable_memory.testing import randomize
from tests.helpers import grid_backbone, images_for, make_vit
from tests.test_families import MODULE_OF, depth_kwargs, grid_of, representatives

#: One SAMPLE architecture per backbone kind, exported at depth 1 and width 64 with random weights.
FAMILIES = sorted(set(representatives(("backbone",)).values()))
#: Families whose ONNX graph, as torch.onnx writes it, onnxruntime can not load (README: Limitations).
ONNX_REFUSED = {f for f in FAMILIES if f.startswith("gemma4_vit")}
VIT = representatives(("backbone",))["backbone:vision_transformer.VisionTransformer"]
OUTPUTS = ["base", "cifar", "v1.0", "pets"]


@dataclass
class Export:
    model: lm.MemoryViT
    size: int
    path: Path
    sidecar: dict
    packed_in_trace: int  # attention layers that ran packed while torch.export traced
    packed_in_eager: int  # attention layers that run packed in one eager inference pass
    cache_reads_in_trace: int  # key/value cache lookups while tracing (must be none)


def build(family: str) -> tuple[lm.MemoryViT, int]:
    """The family's model with three tasks, and the image size it is exported at (its preprocessing's).
    VLM towers take any size and keep their pretrained one (768 px) in their preprocessing: theirs is
    set to the size they are built for here, so that they export in seconds."""
    base, size = grid_backbone(family, grid=grid_of(family), depth=1, embed_dim=64, num_heads=4,
                               **depth_kwargs(family, 1))
    if MODULE_OF[family] in ("qwen3_vit", "deepseek_vit", "gemma4_vit"):
        base.pretrained_cfg = {**base.pretrained_cfg, "input_size": (3, size, size)}
    model = lm.wrap_model(base, n_mem=2, num_classes=5, task="cifar", class_names=list("abcde"))
    model = lm.wrap_model(model, n_mem=1, num_classes=3, task="v1.0", mode="extension")
    model = lm.wrap_model(model, n_mem=3, num_classes=4, task="pets")
    randomize(model, seed=7)
    return model, model.data_config()["input_size"][-1]


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """``get(family, format)``: the export of that family's model, made on first use (once per session)."""
    done: dict[tuple[str, str], Export] = {}

    def get(family: str, fmt: str) -> Export:
        if (family, fmt) not in done:
            model, size = build(family)
            path = tmp_path_factory.mktemp(f"{family}_{fmt}") / f"model.{fmt}"
            packed, reads = [], []
            real_packed, real_lookup = AttentionKind.attend_packed, MemoryKVCache.lookup

            def attend_packed(*args, **kwargs):
                packed.append(torch.compiler.is_compiling())
                return real_packed(*args, **kwargs)

            def lookup(*args, **kwargs):
                reads.append(torch.compiler.is_compiling())
                return real_lookup(*args, **kwargs)

            with pytest.MonkeyPatch.context() as mp, torch.enable_grad():
                mp.setattr(AttentionKind, "attend_packed", attend_packed)
                mp.setattr(MemoryKVCache, "lookup", lookup)
                model.train()  # a caller in the middle of training: the export still traces the inference pass
                lm.export_model(model, path, format=fmt)
                assert model.training  # restored
                model.eval()
                in_trace, packed[:] = sum(packed), []
                with torch.no_grad():
                    model.forward_all(images_for(size))
            done[family, fmt] = Export(model, size, path, json.loads(sidecar_path(path).read_text()),
                                       in_trace, len(packed), sum(reads))
        return done[family, fmt]

    return get


def run_exported(e: Export, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the exported file as a user would, independently of export_model's own check."""
    if e.path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(e.path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outs = session.run(None, {e.sidecar["input"]["name"]: images.numpy()})
        return {n: torch.from_numpy(o) for n, o in zip(names, outs, strict=True)}
    with torch.no_grad():
        return torch.export.load(str(e.path)).module()(images)


def assert_matches_eager(e: Export) -> None:
    for batch in (1, 4):  # neither is a batch size the export was traced or checked at
        images = images_for(e.size, batch=batch, seed=100 + batch)
        got = run_exported(e, images)
        with torch.no_grad():
            want = e.model.forward_all(images)
        assert list(got) == OUTPUTS == list(want)
        for name in OUTPUTS:
            assert got[name].shape == want[name].shape
            torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)


def assert_sidecar(e: Export) -> None:
    s = e.sidecar
    assert [o["name"] for o in s["outputs"]] == OUTPUTS
    assert [o["num_classes"] for o in s["outputs"][1:]] == [5, 3, 4]
    assert s["outputs"][1]["class_names"] == list("abcde") and s["outputs"][2]["depends_on"] == ["cifar"]
    assert s["input"]["shape"] == ["batch", 3, e.size, e.size]
    assert s["preprocessing"]["input_size"] == [3, e.size, e.size] and "mean" in s["preprocessing"]
    assert set(s["check"]["max_abs_diff"]) == set(OUTPUTS) and s["check"]["batch_sizes"] == [2, 3]


def assert_traced_inference_pass(e: Export, family: str) -> None:
    """The trace packs exactly as eager inference does (training passes never pack), and reads no cache."""
    assert e.packed_in_trace == e.packed_in_eager and (e.packed_in_eager > 0 or family != VIT)
    assert e.cache_reads_in_trace == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pt2_program_equals_eager(exports, family):
    e = exports(family, "pt2")
    assert_matches_eager(e)
    assert_sidecar(e)
    assert_traced_inference_pass(e, family)


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_equals_eager(exports, family, tmp_path):
    import onnx

    if family in ONNX_REFUSED:  # the check refuses what torch.onnx writes, with onnxruntime's reason
        with pytest.raises(ExportCheckError, match="onnxruntime can not load the exported model"):
            lm.export_model(build(family)[0], tmp_path / "model.onnx", format="onnx")
        return
    e = exports(family, "onnx")
    graph = onnx.load(str(e.path)).graph
    assert [o.name for o in graph.output] == OUTPUTS and [i.name for i in graph.input] == ["images"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch
    assert_matches_eager(e)
    assert_sidecar(e)
    assert_traced_inference_pass(e, family)


def test_the_check_catches_a_model_that_differs(exports):
    e = exports(VIT, "pt2")
    changed = copy.deepcopy(e.model)
    randomize(changed, seed=8, tasks=["pets"])
    with pytest.raises(ExportCheckError, match="output 'pets' differs from the eager model"):
        _check(changed, OUTPUTS, _pt2_runner(e.path), (2,), e.path)
    _check(e.model, OUTPUTS, _pt2_runner(e.path), (2,), e.path)  # and passes the model it was made from


def test_static_batch_and_chosen_outputs(tmp_path):
    model, size = build(VIT)
    path = lm.export_model(model, tmp_path / "one.pt2", tasks=["pets", "base"], format="pt2", dynamic_batch=False)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["input"]["shape"] == [1, 3, size, size] and sidecar["check"]["batch_sizes"] == [1]
    program = torch.export.load(str(path)).module()
    images = images_for(size, batch=1)
    with torch.no_grad():
        got, want = program(images), model.forward_all(images, ["pets", "base"])
    assert list(got) == ["pets", "base"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError, match=r"images.size\(\)\[0\] == 1"):  # torch.export's guard
        program(images_for(size, batch=2))


def test_what_can_not_be_exported_is_refused_clearly(tmp_path, monkeypatch):
    model = lm.wrap_model(make_vit(depth=1), n_mem=1, num_classes=3, task="a")
    cases = [
        (lambda: lm.export_model(model.base, tmp_path / "m.onnx"), TypeError, "takes a MemoryViT"),
        (lambda: lm.export_model(model, tmp_path / "m.tflite", format="tflite"), ValueError, "unknown format"),
        (lambda: lm.export_model(model, tmp_path / "m.onnx", format="pt2"), ValueError, r"ending in \.pt2"),
        (lambda: lm.export_model(model, tmp_path / "m.pt2", tasks=["a", "zz"], format="pt2"), ValueError,
         r"unknown task\(s\) \['zz'\]"),
        (lambda: lm.export_model(model, tmp_path / "m.pt2", tasks=[], format="pt2"), ValueError, "tasks is empty"),
    ]
    full = lm.wrap_model(make_vit(depth=1), n_mem=1, num_classes=3, task="f", mode="full")
    cases.append((lambda: lm.export_model(full, tmp_path / "f.pt2", tasks=["base", "f"], format="pt2"), ValueError,
                  "can not export 'base': full-mode task 'f' changes the original tokens"))
    half = lm.wrap_model(make_vit(depth=1).to(torch.bfloat16), n_mem=1, num_classes=3, task="h")
    cases.append((lambda: lm.export_model(half, tmp_path / "h.onnx"), ValueError, "bfloat16"))
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    with pytest.raises(ImportError, match=r"missing: onnxruntime.*pip install 'learnable-memory\[export\]'"):
        lm.export_model(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # every refusal comes before anything is written


#: Task names that are attributes of the modules holding the tasks (methods of ``nn.Module`` and
#: ``TaskStore``, and its internals), which ``torch.export`` would look a task's tensors up through.
ATTRIBUTE_NAMES = ["train", "keys", "add", "to", "values", "items", "forward", "eval", "remove", "state_dict",
                   "_modules", "__class__"]
INPUT_LIKE_NAMES = ["images", "pixel_values", "input_images"]


def export_named(tmp_path: Path, names: list[str], fmt: str) -> tuple[lm.MemoryViT, Path]:
    model = lm.MemoryViT(make_vit(depth=1))
    for i, name in enumerate(names):
        model.add_task(lm.TaskConfig(name, 1, 2 + i % 3))
    randomize(model, seed=3)
    return model, lm.export_model(model, tmp_path / f"m.{fmt}", format=fmt)


def assert_named_outputs(model: lm.MemoryViT, e: Export) -> None:
    assert [o["name"] for o in e.sidecar["outputs"]] == ["base", *model.task_names]
    got, images = run_exported(e, images_for(32, batch=2)), images_for(32, batch=2)
    with torch.no_grad():
        want = model.forward_all(images)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)


def named_export(tmp_path: Path, names: list[str], fmt: str) -> tuple[lm.MemoryViT, Export]:
    model, path = export_named(tmp_path, names, fmt)
    return model, Export(model, 32, path, json.loads(sidecar_path(path).read_text()), 0, 0, 0)


@pytest.mark.parametrize("names", [ATTRIBUTE_NAMES, INPUT_LIKE_NAMES], ids=["attribute_names", "input_names"])
def test_any_valid_task_name_exports_pt2(tmp_path, names):
    model, e = named_export(tmp_path, names, "pt2")
    assert_named_outputs(model, e)


@pytest.mark.integration
@pytest.mark.parametrize("names", [ATTRIBUTE_NAMES, INPUT_LIKE_NAMES], ids=["attribute_names", "input_names"])
def test_any_valid_task_name_exports_onnx(tmp_path, names):
    import onnx

    model, e = named_export(tmp_path, names, "onnx")
    graph = onnx.load(str(e.path)).graph
    input_name = "images_1" if names == INPUT_LIKE_NAMES else "images"
    assert [i.name for i in graph.input] == [input_name] == [e.sidecar["input"]["name"]]
    assert [o.name for o in graph.output] == ["base", *names]
    assert_named_outputs(model, e)


def test_two_exports_in_one_folder_keep_their_own_sidecars(tmp_path):
    """The README's two export lines: ``model.onnx`` and ``model.pt2`` side by side."""
    model, _ = build(VIT)
    names = [f"c{i}" for i in range(model.base.num_classes)]
    model.base.pretrained_cfg = {**model.base.pretrained_cfg, "label_names": names}
    lm.export_model(model, tmp_path / "model.pt2", format="pt2", tasks=["pets", "base"], dynamic_batch=False)
    lm.export_model(model, tmp_path / "other.pt2", format="pt2", tasks=["cifar"], dynamic_batch=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "model.pt2.json", "other.pt2",
                                                          "other.pt2.json"]
    first, second = (json.loads((tmp_path / f"{n}.pt2.json").read_text()) for n in ("model", "other"))
    assert first["file"] == "model.pt2" and [o["name"] for o in first["outputs"]] == ["pets", "base"]
    assert second["file"] == "other.pt2" and [o["name"] for o in second["outputs"]] == ["cifar"]
    assert first["outputs"][1]["class_names"] == names  # the base output's label names
    model.base.pretrained_cfg["label_names"] = ["too", "few"]  # not this head's: left out
    lm.export_model(model, tmp_path / "model.pt2", format="pt2", tasks=["base"], dynamic_batch=False)
    assert json.loads((tmp_path / "model.pt2.json").read_text())["outputs"][0]["class_names"] is None
    assert sidecar_path(tmp_path / "model.onnx") == tmp_path / "model.onnx.json"

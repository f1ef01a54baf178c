"""Export a ``MemoryViT``'s one-pass inference (the base model and any tasks) to ONNX or to a
``torch.export`` program (``.pt2``), with outputs named after the tasks.

What is traced: ``forward_all(images, tasks)`` under ``torch.no_grad``, the inference layout (new
class tokens packed behind the original tokens where the family packs), never the training layout,
whatever the caller's autograd mode. The memory's keys and values are computed inside the graph:
the key/value cache is bypassed while tracing (``torch.compiler.is_compiling()`` is true under
``torch.export``). The image size is fixed at the backbone's ``data_config()["input_size"]``; the
batch size is dynamic unless ``dynamic_batch=False`` (then 1).

Files: ``path`` (``.onnx`` or ``.pt2``) and beside it :func:`sidecar_path`, the file's name plus
``.json`` (``model.onnx.json``): the input (name, shape, dtype), the outputs in order (task, mode,
number of classes, class names, the base output's included when the backbone's ``pretrained_cfg``
has them, the preprocessing each task was trained with), the backbone's preprocessing and identity,
and the check's result.

Any valid task name exports (``train``, ``keys``, ``to``, ...: see :class:`TaskOutputs`).

- ONNX: one graph input (``images``; ``pixel_values``, ``input_images``, ``images_1``, ... when tasks
  are called that), one graph output per task, named after it (``base``, ``cifar100``, ...). Graph
  values that would clash with those names are renamed. Needs the ``export`` extra (onnx,
  onnxscript, onnxruntime).
- pt2: ``torch.export.load(path).module()(images)`` returns ``{task: logits}`` in the same order
  (the program's output spec holds the names).

Before it returns, :func:`export_model` runs the exported file (onnxruntime, or the loaded program)
and the eager model on random images, at two batch sizes when the batch is dynamic, and raises
:class:`ExportCheckError` if an output differs by more than the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters.fingerprint import base_identity, preprocessing
from .bases import label_names
from .config import BASE_KEY, UnknownTaskError
from .model import MemoryViT
from .version import __version__

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
#: Largest allowed ``max |exported - eager|``, relative to ``max(1, max |eager|)`` of each output.
TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAMES = ("images", "pixel_values", "input_images")
Run = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class ExportCheckError(RuntimeError):
    """The exported model could not be run, or its outputs differ from the eager model's."""


class TaskOutputs(nn.Module):
    """What is exported: ``images`` ``[B, C, H, W]`` -> ``{name: logits [B, C_name]}``, in the order of ``names``.

    The model's submodules are registered here under names that are always plain attributes: the
    backbone as ``base`` and the tasks as ``tasks.0``, ``tasks.1``, ... (``torch.export`` reaches every
    tensor by attribute lookups along its name, and a task called ``train``, ``keys`` or ``to`` would
    name a method). The ``MemoryViT`` itself, whose forward runs, shares those modules and is kept out
    of the module tree."""

    def __init__(self, model: MemoryViT, names: Sequence[str]):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, nn.ModuleList(model.tasks.values()) if child is model.tasks else child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.__dict__["model"] = model  # not a submodule: its tensors are registered above
        self.names = list(names)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.forward_all(images, self.names)
        return {n: out[n] for n in self.names}


def _output_names(model: MemoryViT, tasks: Sequence[str] | None) -> list[str]:
    """The outputs to export, as ``forward_all`` would return them (``MemoryViT.resolve_outputs``)."""
    try:
        return model.resolve_outputs(tasks)[0]
    except UnknownTaskError as err:
        raise ValueError(f"can not export {', '.join(map(repr, err.names))}: {err}") from err
    except ValueError as err:
        raise ValueError(f"can not export tasks={tasks!r}: {err}") from err


def _require_onnx() -> None:
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(ONNX_PACKAGES)} (missing: {', '.join(missing)}): "
                          "pip install 'learnable-memory[export]'")


@contextlib.contextmanager
def _quiet_onnx_folding() -> Iterator[None]:
    """onnxscript logs a warning for every LayerNormalization (multiple outputs) it does not constant-fold:
    here the memory's norm, which the graph then computes; nothing the user can act on."""
    log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _images(model: MemoryViT, batch: int, seed: int) -> torch.Tensor:
    """Standard normal images ``[batch, C, H, W]`` at the backbone's input size, dtype and device."""
    like = next(model.base.parameters())
    shape = (batch, *model.data_config()["input_size"])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(like.device, like.dtype)


def _name_onnx_values(graph: Any, input_name: str, names: Sequence[str]) -> None:
    """Name the graph's input ``input_name`` and its outputs ``names``; other values holding one of those
    names are renamed first (ONNX needs every name once)."""
    wanted = {input_name, *names}
    ends = [*graph.inputs, *graph.outputs]
    used = {v.name for v in graph.initializers.values()} | {v.name for node in graph for v in node.outputs}
    used |= {v.name for v in ends}
    for value in [*graph.initializers.values(), *(v for node in graph for v in node.outputs)]:
        if value.name in wanted and not any(value is e for e in ends):
            k = 1
            while f"{value.name}_{k}" in used | wanted:
                k += 1
            used.add(f"{value.name}_{k}")
            value.name = f"{value.name}_{k}"
    for i, value in enumerate(ends):  # through unique placeholders: an end may hold another end's name
        value.name = f"\0end{i}"
    for value, name in zip(ends, [input_name, *names], strict=True):
        value.name = name


def _onnx_runner(path: Path, input_name: str, names: Sequence[str]) -> Run:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ExportCheckError(f"{path}: onnxruntime can not load the exported model ({err})") from err
    got = [o.name for o in session.get_outputs()]
    if got != list(names):
        raise ExportCheckError(f"{path}: the ONNX outputs are {got}, expected {list(names)}")

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            outs = session.run(None, {input_name: images.detach().cpu().numpy()})
        except Exception as err:
            raise ExportCheckError(f"{path}: onnxruntime can not run the exported model ({err})") from err
        return {n: torch.from_numpy(o) for n, o in zip(names, outs, strict=True)}

    return run


def _pt2_runner(path: Path) -> Run:
    module = torch.export.load(str(path)).module()

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return module(images)

    return run


def _check(model: MemoryViT, names: Sequence[str], run: Run, batches: Sequence[int],
           path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Exported and eager outputs on random images at each batch size; ``ExportCheckError`` past the tolerance.
    Returns the check's record and each output's size."""
    dtype = next(model.base.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, 1e-4)
    worst = dict.fromkeys(names, 0.0)
    for batch in batches:
        images = _images(model, batch, seed=batch)
        with torch.no_grad():
            want = model.forward_all(images, list(names))
        got = run(images)
        for n in names:
            w, g = want[n].detach().cpu().float(), got[n].detach().cpu().float()
            if g.shape != w.shape:
                raise ExportCheckError(f"{path}: output {n!r} has shape {list(g.shape)} for a batch of {batch}, "
                                       f"eager {list(w.shape)}")
            diff = float((g - w).abs().max()) if w.numel() else 0.0
            if not diff <= tolerance * max(1.0, float(w.abs().max())):
                raise ExportCheckError(f"{path}: output {n!r} differs from the eager model by up to {diff:.3g} (batch "
                                       f"{batch}, tolerance {tolerance:g} x max(1, |logits|)); the file is kept for "
                                       "inspection, no sidecar was written: do not use it")
            worst[n] = max(worst[n], diff)
    sizes = {n: int(w.shape[-1]) for n, w in want.items()}
    return {"batch_sizes": list(batches), "max_abs_diff": worst, "tolerance": tolerance}, sizes


def _outputs(model: MemoryViT, names: Sequence[str], sizes: dict[str, int]) -> list[dict[str, Any]]:
    base_pre = preprocessing(model.base)
    out = []
    for n in names:
        if n == BASE_KEY:
            labels = label_names(model.base)  # the backbone's pretrained_cfg, when they fit its head
            out.append({"name": n, "task": None, "num_classes": sizes[n],
                        "class_names": labels if labels is not None and len(labels) == sizes[n] else None,
                        "preprocessing": base_pre})
            continue
        c = model.tasks[n].config
        out.append({"name": n, "task": n, "mode": c.mode, "n_mem": c.n_mem, "num_classes": c.num_classes,
                    "class_names": c.class_names, "depends_on": list(c.depends_on),
                    "preprocessing": c.data_config or base_pre})
    return out


def sidecar_path(path: str | Path) -> Path:
    """The sidecar JSON of the exported file ``path``: its name plus ``.json`` (``model.onnx.json``), so
    that an ONNX and a pt2 export in one folder each keep their own."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def export_model(model: MemoryViT, path: str | Path, *, tasks: Sequence[str] | None = None, format: str = "onnx",
                 dynamic_batch: bool = True) -> Path:
    """Export the one-pass inference of ``model`` (the base output and tasks) and check it against eager.

    Args:
        model: A ``MemoryViT`` (for a peft model: ``peft_model.base_model.model``).
        path: The file to write, ending in ``.onnx`` or ``.pt2`` as ``format`` says; the sidecar
            :func:`sidecar_path` (``model.onnx.json`` for ``model.onnx``) is written beside it.
        tasks: The outputs, task names and/or ``"base"``, in order (default: as ``forward_all``).
        format: ``"onnx"`` (needs the ``export`` extra) or ``"pt2"`` (``torch.export``).
        dynamic_batch: Any batch size (checked at two); False: batch 1 only.

    Returns:
        ``path``. Raises ``TypeError`` / ``ValueError`` for what can not be exported (see the module
        docstring), ``ImportError`` when the ONNX packages are missing, :class:`ExportCheckError` when
        the exported file does not match the eager model.
    """
    path = _checked_request(model, path, format)
    names = _output_names(model, tasks)
    input_name = _input_name(names) if format == "onnx" else "images"
    batches = (2, 3) if dynamic_batch else (1,)
    example = _images(model, batches[0], seed=0)
    with _eval_mode(model):
        program = _trace(model, names, example, dynamic_batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        run = _write(program, path, format, input_name, names)
        check, sizes = _check(model, names, run, batches, path)
    sidecar = {
        "format": format, "file": path.name, "created_with": f"learnable_memory {__version__}",
        "torch": torch.__version__,
        "input": {"name": input_name, "shape": ["batch" if dynamic_batch else 1, *model.data_config()["input_size"]],
                  "dtype": str(example.dtype).removeprefix("torch.")},
        "outputs": _outputs(model, names, sizes), "preprocessing": preprocessing(model.base),
        "base_model": _base_model(model), "check": check,
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def _checked_request(model: MemoryViT, path: str | Path, format: str) -> Path:
    """``path`` as a ``Path``, once the model, format and file name can be exported (else the error)."""
    if not isinstance(model, MemoryViT):
        raise TypeError(f"export_model takes a MemoryViT (for a peft model: peft_model.base_model.model), got "
                        f"{type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}: choose 'onnx' or 'pt2'")
    path = Path(path).expanduser()
    if path.suffix != FORMATS[format]:
        raise ValueError(f"{path}: a {format} export is written to a file ending in {FORMATS[format]}")
    if format == "onnx":
        _require_onnx()
        if next(model.base.parameters()).dtype == torch.bfloat16:
            raise ValueError("ONNX export of a bfloat16 model can not be checked with onnxruntime on CPU: export "
                             "model.float() (or use format='pt2')")
    return path


def _input_name(names: Sequence[str]) -> str:
    """The ONNX graph input's name: the first of :data:`INPUT_NAMES`, then ``images_1``, ``images_2``, ...
    that no output is called."""
    taken = set(names)
    return next(n for n in itertools.chain(INPUT_NAMES, (f"images_{i}" for i in itertools.count(1)))
                if n not in taken)


@contextlib.contextmanager
def _eval_mode(model: MemoryViT) -> Iterator[None]:
    """``model`` in eval mode, its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _trace(model: MemoryViT, names: Sequence[str], example: torch.Tensor,
           dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`TaskOutputs`, the inference layout whatever the caller's autograd mode."""
    dynamic = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(TaskOutputs(model, names), (example,), dynamic_shapes=dynamic)


def _write(program: torch.export.ExportedProgram, path: Path, format: str, input_name: str,
           names: Sequence[str]) -> Run:
    """Write ``program`` to ``path`` in ``format``; returns a runner of the written file."""
    if format == "onnx":
        with _quiet_onnx_folding():
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
        _name_onnx_values(onnx_program.model.graph, input_name, names)
        onnx_program.save(str(path))
        return _onnx_runner(path, input_name, names)
    torch.export.save(program, str(path))
    return _pt2_runner(path)


def _base_model(model: MemoryViT) -> dict[str, Any]:
    base = base_identity(model.base)
    return {k: base[k] for k in ("class", "architecture", "tag", "hf_hub_id", "fingerprint")}

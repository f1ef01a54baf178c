"""The base model named on the command line: its options, its spec, building it, and saving it.

A base model spec (:func:`base_spec`) is what ``train`` records in ``training.json`` (``base``), so
``eval`` and ``predict`` rebuild the same base without being told again. A spec must therefore
name weights that can be loaded again: the shipped base, a timm export directory, ``hf-hub:`` /
``local-dir:``, a timm name with ``--pretrained``, or a timm name with ``--checkpoint FILE``. A timm
name alone means fresh random weights, which no adapter fits; ``train`` takes it only with
``--save-base DIR`` (:func:`save_base`), which writes those weights for the adapter to point to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .options import json_object

if TYPE_CHECKING:
    from torch import nn


def add_model_options(p: argparse.ArgumentParser, title: str = "base model (default: the one the adapter was "
                      "trained on, else the shipped Fashion-MNIST ViT)") -> None:
    """The ``--model``, ``--pretrained``, ``--checkpoint`` and ``--model-kwargs`` options that
    :func:`base_spec` reads."""
    g = p.add_argument_group(title)
    g.add_argument("--model", help="timm model name, hf-hub:/local-dir: spec, or a timm export directory")
    g.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    g.add_argument("--checkpoint", help="local weights file (.safetensors/.pth) for --model")
    g.add_argument("--model-kwargs", type=json_object, metavar="JSON",
                   help="JSON object of extra timm.create_model arguments, e.g. '{\"img_size\": 96}'")


def base_spec(args: argparse.Namespace) -> dict:
    """The model options of ``args`` as a dict of :func:`create_base` arguments (paths made absolute)."""
    model = args.model
    if model is not None and Path(model).is_dir():
        model = str(Path(model).resolve())
    return dict(model=model, pretrained=bool(args.pretrained),
                checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                model_kwargs=dict(args.model_kwargs or {}))


def has_random_weights(spec: dict) -> bool:
    """Whether ``spec`` is a timm model name with neither pretrained weights nor a checkpoint."""
    import timm

    model = spec.get("model")
    if model is None or spec.get("pretrained") or spec.get("checkpoint") or Path(model).exists():
        return False
    return timm.is_model(model)


def refuse_random_weights(spec: dict) -> None:
    """A one-line error for a base with random weights, which no saved adapter can be rebuilt on."""
    if has_random_weights(spec):
        raise ValueError(f"--model {spec['model']} alone has random weights, which eval and predict can not "
                         "rebuild: add --pretrained (timm's weights) or --checkpoint FILE (your own), or with train "
                         "--save-base DIR to save these random weights beside the adapter")


def create_base(model: str | None = None, *, pretrained: bool = False, checkpoint: str | None = None,
                model_kwargs: dict | None = None) -> nn.Module:
    """Build the frozen base from a model spec.

    Args:
        model: None (the shipped demo base), a directory in timm's ``local-dir`` export format
            (``config.json`` + weights), ``hf-hub:...``/``local-dir:...``, or a timm model name.
        pretrained: Load the timm name's pretrained weights (from the Hugging Face cache or hub).
        checkpoint: A local state dict (``.safetensors``/``.pth``) for the timm name; its head size is
            read from the file.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``img_size``, ``in_chans``).

    The model's ``pretrained_cfg`` says what was loaded: for random weights or a checkpoint its
    pretrained ``tag`` and ``hf_hub_id`` are cleared, so a saved adapter does not claim timm's weights.
    """
    import timm

    from .. import data as D

    kwargs = dict(model_kwargs or {})
    if model is None:
        if checkpoint is not None:
            raise ValueError("--checkpoint needs --model NAME, the timm architecture of the checkpoint")
        if kwargs or pretrained:
            raise ValueError(f"{'--model-kwargs' if kwargs else '--pretrained'} needs --model NAME; without "
                             "--model the base is the shipped Fashion-MNIST ViT")
        return D.load_demo_base()
    if Path(model).is_dir():
        return _build(f"local-dir:{Path(model).resolve()}", True, kwargs) if kwargs else D.load_demo_base(model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return _build(model, True, kwargs)
    if Path(model).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(model).is_file():
        raise ValueError(f"{model} is a file: give the architecture and the file, --model NAME --checkpoint {model}")
    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; list names with "
                         "python -c \"import timm; print(timm.list_models('vit*'))\"")
    if checkpoint is not None:
        return _create_from_checkpoint(model, Path(checkpoint), kwargs)
    if pretrained:
        return _build(model, True, kwargs)
    return _forget_pretrained_source(_build(model, False, kwargs))


def _build(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model``, its failures told in terms of the options that caused them."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the model does not take
        if not kwargs:
            raise
        raise ValueError(f"--model-kwargs {kwargs} do not fit {name}: {e}") from e
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load pretrained weights for {name} ({first}); offline, use weights already "
                         "in the Hugging Face cache (HF_HUB_OFFLINE=1 skips the network), or a local file with "
                         "--checkpoint FILE") from e


def _create_from_checkpoint(name: str, path: Path, kwargs: dict) -> nn.Module:
    from timm.models import get_pretrained_cfg, load_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = load_state_dict(str(path))
    cfg = get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) or "head"
    head = state.get(f"{classifier}.weight")
    if head is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = head.shape[0]
    model = _build(name, False, kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"checkpoint {path} does not fit timm model {name!r}: {detail} "
                         "(pass the architecture's arguments with --model-kwargs)") from e
    return _keep_exported_preprocessing(_forget_pretrained_source(model, file=str(path)), path, name)


#: The ``pretrained_cfg`` fields of a timm export that say how its images were prepared and what its classes are.
EXPORTED_FIELDS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def _keep_exported_preprocessing(model: nn.Module, checkpoint: Path, name: str) -> nn.Module:
    """When ``checkpoint`` lies in a timm export folder of the same architecture (``config.json`` beside it,
    as ``save_base`` and the shipped bases write), the model keeps the export's preprocessing and label
    names: timm's registry gives a name its default mean, crop and interpolation, which are not the ones
    these weights were trained with."""
    config_file = checkpoint.parent / "config.json"
    try:
        exported = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return model
    if not isinstance(exported, dict) or not isinstance(exported.get("pretrained_cfg"), dict) \
            or str(exported.get("architecture", "")).split(".")[0] != name.split(".")[0]:
        return model
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in exported["pretrained_cfg"].items()
            if k in EXPORTED_FIELDS}
    if "label_names" in exported:
        kept["label_names"] = exported["label_names"]
    cfg = {**model.pretrained_cfg, **kept}
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _forget_pretrained_source(model: nn.Module, file: str | None = None) -> nn.Module:
    """Clear the pretrained tag and hub id timm's registry gave a model whose weights did not come
    from there (random, or ``file``), so the identity an adapter records is what was loaded."""
    cfg = {**model.pretrained_cfg, "tag": None, "hf_hub_id": None, "file": file}
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def save_base(base: nn.Module, spec: dict, folder: str | Path, overwrite: bool = False) -> dict:
    """Write ``base`` (built from ``spec``) to ``folder`` in timm's ``local-dir`` format (``config.json``
    + ``model.safetensors``); returns :func:`saved_base_spec`."""
    from timm.models import save_for_hf

    folder = Path(folder).resolve()
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} already exists; choose another --save-base or pass --overwrite")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(base, str(folder), model_args=spec.get("model_kwargs") or None, safe_serialization=True)
    return saved_base_spec(folder)


def saved_base_spec(folder: str | Path) -> dict:
    """The spec of a base written by :func:`save_base` to ``folder``."""
    return dict(model=str(Path(folder).resolve()), pretrained=False, checkpoint=None, model_kwargs={})


def make_accelerator():
    """accelerate's ``Accelerator``; on a machine without GPUs, one that runs distributed on CPU (gloo)
    when started by ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``."""
    import torch
    from accelerate import Accelerator

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    return Accelerator(cpu=launched and not torch.cuda.is_available())

"""The base model and the adapters named on the command line, and the ``training.json`` record.

A base model spec is what ``train`` records in ``training.json`` (``base``), so ``eval`` and ``predict``
rebuild the same base without being told again.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import data as D

#: Written by ``train`` into the adapter folder: how the adapter was made (data, base model, settings).
TRAINING_FILE = "training.json"


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
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if model is None and checkpoint is None:
        return D.load_demo_base()
    if model is None:
        raise ValueError("--checkpoint needs --model NAME, the timm architecture of the checkpoint")
    if Path(model).is_dir():
        return D.load_demo_base(model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return _create_pretrained(model, kwargs)
    if Path(model).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(model).is_file():
        raise ValueError(f"{model} is a file: give the architecture and the file, --model NAME --checkpoint {model}")
    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; list names with "
                         "python -c \"import timm; print(timm.list_models('vit*'))\"")
    if checkpoint is not None:
        return _create_from_checkpoint(model, Path(checkpoint), kwargs)
    if pretrained:
        return _create_pretrained(model, kwargs)
    return timm.create_model(model, pretrained=False, **kwargs)


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load pretrained weights for {name} ({first}); offline, use weights already "
                         "in the Hugging Face cache (HF_HUB_OFFLINE=1 skips the network), or a local file with "
                         "--checkpoint FILE") from e


def _create_from_checkpoint(name: str, path: Path, kwargs: dict) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg, load_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = load_state_dict(str(path))
    cfg = get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) or "head"
    head = state.get(f"{classifier}.weight")
    if head is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = head.shape[0]
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"checkpoint {path} does not fit timm model {name!r}: {detail} "
                         "(pass the architecture's arguments with --model-kwargs)") from e
    return model


def add_model_options(p: argparse.ArgumentParser, title: str = "base model (default: the one the adapter was "
                      "trained on, else the shipped Fashion-MNIST ViT)") -> None:
    """The ``--model``, ``--pretrained``, ``--checkpoint`` and ``--model-kwargs`` options that
    :func:`base_spec` reads."""
    g = p.add_argument_group(title)
    g.add_argument("--model", help="timm model name, hf-hub:/local-dir: spec, or a timm export directory")
    g.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    g.add_argument("--checkpoint", help="local weights file (.safetensors/.pth) for --model")
    g.add_argument("--model-kwargs", help="JSON object of extra timm.create_model arguments")


def base_spec(args: argparse.Namespace) -> dict:
    """The model options of ``args`` as a dict (paths made absolute)."""
    model = args.model
    if model is not None and Path(model).is_dir():
        model = str(Path(model).resolve())
    return dict(model=model, pretrained=bool(args.pretrained),
                checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                model_kwargs=_json_arg(args.model_kwargs))


def _json_arg(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs must be a JSON object, e.g. '{{\"img_size\": 28}}': {e}") from e
    if not isinstance(value, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 28}'")
    return value


def read_training_info(adapter: str | Path) -> dict:
    """The ``training.json`` that ``train`` wrote into an adapter folder ({} when absent)."""
    f = Path(adapter) / TRAINING_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def base_for_adapters(args: argparse.Namespace, adapters: Sequence[str]) -> nn.Module:
    """The base given on the command line, else the one the first adapter was trained on, else the demo base."""
    for a in adapters:
        if not Path(a).exists():
            raise FileNotFoundError(f"adapter {a} not found")
    if args.model is not None or args.checkpoint is not None:
        return create_base(**base_spec(args))
    info = read_training_info(adapters[0]) if adapters else {}
    return create_base(**info.get("base", {}))


def make_accelerator():
    """accelerate's ``Accelerator``; on a machine without GPUs, one that runs distributed on CPU (gloo)
    when started by ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``."""
    from accelerate import Accelerator

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    return Accelerator(cpu=launched and not torch.cuda.is_available())

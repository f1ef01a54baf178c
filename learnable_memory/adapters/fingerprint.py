"""What an adapter records about where it came from: weight fingerprints, the base model's
identity and the preprocessing it was trained with.

Fingerprint of a set of named tensors (the same rule for a backbone and for a task)::

    "sha256:" + hex(sha256( for each tensor, sorted by name:
                                "<name>|<dtype>|<shape>\\n" (UTF-8) + the tensor's raw bytes ))

The raw bytes are the contiguous CPU tensor in C order, in the machine's byte order (little
endian everywhere PyTorch runs in practice). Names, dtypes and shapes are part of the hash, so
the same values in another dtype or layout give another fingerprint.

- Backbone: every entry of ``base.state_dict()`` except the base classifier's
  (``base.get_classifier()``), which no task uses: a backbone built with another
  ``num_classes`` still serves the same adapters. ViT-B/16 (86M parameters) hashes in well
  under a second; nothing is cached, since weights may change between two calls.
- Task: its four tensors, ``memory``, ``class_token``, ``head.weight``, ``head.bias``, as
  float32, exactly as they are written to ``adapter_model.safetensors``.

The hash is exact, so the same checkpoint cast to bfloat16 or float16 hashes differently, and
bfloat16 rounds differently from float16. So an adapter also records the hash of the weights cast
to each serving dtype (:func:`fingerprints`); casting is deterministic (round to nearest even), so
the same checkpoint served in any of them is recognised exactly, and another checkpoint is refused
unless it equals this one after rounding to the dtype it is served in. :func:`same_weights` picks
the hash to compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..memory import TaskMemory
from ..registry import backbone_kind


def tensors_fingerprint(named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """``"sha256:<hex>"`` of named tensors (see the module docstring for the exact rule)."""
    items = named.items() if isinstance(named, Mapping) else named
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


#: Serving dtypes, finest first; an adapter records the hash of its weights cast to each.
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_PRECISION = {dt: i for i, dt in enumerate(DTYPES)}  # higher = coarser


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cast(named: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in named.items()}


def fingerprints(named: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{dtype name: fingerprint}`` of the tensors cast (floating ones) to bfloat16 and to float16."""
    return {_dtype_name(dt): tensors_fingerprint(_cast(named, dt)) for dt in (torch.bfloat16, torch.float16)}


def coarsest_dtype(named: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The coarsest floating dtype among the tensors (None without floating tensors)."""
    found = [v.dtype for v in named.values() if v.is_floating_point() and v.dtype in _PRECISION]
    return max(found, key=_PRECISION.__getitem__) if found else None


def same_weights(
    fingerprint: str, dtype: str, by_dtype: Mapping[str, str], named: Mapping[str, torch.Tensor]
) -> bool | None:
    """Whether ``named`` are the tensors an adapter recorded as ``fingerprint`` (in ``dtype``) and
    ``by_dtype`` (cast to other dtypes, see :func:`fingerprints`), served in their present dtype.

    The tensors here are compared, cast to their coarsest floating dtype ``d``, with the record for
    ``d``; a finer ``d`` than the recorded dtype (weights cast up) is compared with the record in
    its own dtype. None when there is no record to compare with (an adapter saved before
    ``by_dtype`` was recorded, served in another dtype): the identity can not be checked.
    """
    here = coarsest_dtype(named)
    if here is None or _dtype_name(here) == dtype:
        return tensors_fingerprint(named) == fingerprint
    recorded = {**by_dtype, dtype: fingerprint}
    if _dtype_name(here) in recorded:
        return tensors_fingerprint(_cast(named, here)) == recorded[_dtype_name(here)]
    saved = getattr(torch, dtype, None)
    if saved in _PRECISION and _PRECISION[saved] > _PRECISION.get(here, -1):  # cast up here: cast back down
        return tensors_fingerprint(_cast(named, saved)) == fingerprint
    return None


def _classifier_prefixes(base: nn.Module) -> list[str]:
    """Module paths of the base classifier(s) (``["head"]`` for a ViT; DeiT distilled has two)."""
    get = getattr(base, "get_classifier", None)
    clf = get() if callable(get) else None
    heads = [c for c in (clf if isinstance(clf, tuple | list) else (clf,)) if isinstance(c, nn.Module)]
    return [name for name, mod in base.named_modules() if name and any(mod is h for h in heads)]


def base_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's ``state_dict`` without its classifier(s): what its identity covers."""
    prefixes = tuple(p + "." for p in _classifier_prefixes(base))
    return {k: v for k, v in base.state_dict().items() if not (prefixes and k.startswith(prefixes))}


def base_fingerprint(base: nn.Module) -> str:
    """Fingerprint of the backbone's weights, its classifier(s) left out."""
    return tensors_fingerprint(base_state(base))


def task_tensors(task: TaskMemory) -> dict[str, torch.Tensor]:
    """The tensors of a task as saved: ``memory`` ``[depth, n_mem, D]``, ``class_token`` ``[D]``,
    ``head.weight`` ``[num_classes, D]``, ``head.bias`` ``[num_classes]``; float32, CPU, contiguous."""
    named = {
        "memory": task.memory,
        "class_token": task.class_token,
        "head.weight": task.head.weight,
        "head.bias": task.head.bias,
    }
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in named.items()}


def own_tensors(task: TaskMemory) -> dict[str, torch.Tensor]:
    """The task's four tensors in the dtype the model holds them (detached, CPU)."""
    named = {"memory": task.memory, "class_token": task.class_token, "head.weight": task.head.weight,
             "head.bias": task.head.bias}
    return {k: v.detach().to("cpu").contiguous() for k, v in named.items()}


def task_fingerprint(task: TaskMemory) -> str:
    """Fingerprint of a task's four tensors, as saved."""
    return tensors_fingerprint(task_tensors(task))


def backbone_shape(base: nn.Module) -> dict[str, int]:
    """``embed_dim``, ``depth`` and ``num_prefix_tokens`` of a supported timm model (``TypeError`` if
    unsupported). Reads the model only: nothing is frozen or wrapped."""
    kind = backbone_kind(base)
    return {
        "embed_dim": int(kind.width(base)),
        "depth": len(kind.blocks(base)),
        "num_prefix_tokens": int(kind.num_prefix_tokens(base)),
    }


def _jsonable(value: Any) -> tuple[bool, Any]:
    """``(ok, value)`` with tuples turned into lists; ``ok`` is False for what JSON can not hold."""
    if value is None or isinstance(value, bool | int | float | str):
        return True, value
    if isinstance(value, list | tuple):
        out = [_jsonable(v) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        out_d = {k: _jsonable(v) for k, v in value.items()}
        return all(ok for ok, _ in out_d.values()), {k: v for k, (_, v) in out_d.items()}
    return False, None


def base_identity(base: nn.Module) -> dict[str, Any]:
    """What the adapter config records about the backbone (see :mod:`learnable_memory.adapters.folder`)."""
    cfg = dict(getattr(base, "pretrained_cfg", None) or {})
    state = base_state(base)
    dtype = coarsest_dtype(state)
    args, dropped = {}, []
    for k, v in sorted((getattr(base, "_model_args", None) or {}).items()):
        ok, jv = _jsonable(v)
        if ok:
            args[k] = jv
        else:
            dropped.append(k)
    return {
        "class": type(base).__name__,
        "architecture": cfg.get("architecture"),
        "tag": cfg.get("tag"),
        "hf_hub_id": cfg.get("hf_hub_id"),
        "model_args": args,
        "model_args_not_saved": dropped,  # kwargs JSON can not hold (e.g. layer classes)
        **backbone_shape(base),
        "fingerprint": tensors_fingerprint(state),
        "dtype": _dtype_name(dtype or torch.float32),
        "fingerprints_by_dtype": fingerprints(state),
    }


def preprocessing(base: nn.Module) -> dict[str, Any]:
    """The input the backbone takes, from timm's ``resolve_input_data_config`` (which follows the
    model's current input size and channels): ``input_size`` ``[C, H, W]``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``, ``crop_mode``."""
    from timm.data import resolve_input_data_config

    cfg = resolve_input_data_config(base)
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return {k: _jsonable(cfg[k])[1] for k in keys if k in cfg}

"""Training and evaluation on Hugging Face ``accelerate``.

:func:`fit` trains the tasks of a ``MemoryViT`` that have trainable parameters (or a plain model's
trainable parameters) with a linear warm-up and a cosine decay, gradient clipping and optional bf16
autocast. Several tasks train in ONE ``forward_all`` per batch, each with its own optimizer, schedule,
clipping and result, and each ends exactly where it would have alone. The same code runs on one CPU, one
GPU, or several processes under ``accelerate launch``. :func:`evaluate` gives accuracy and a confusion
matrix with torchmetrics.

Modules: :mod:`.optim` (parameters, optimizers, schedule, :class:`TaskSettings`), :mod:`.trainees` (which
tasks train, and each one's state), :mod:`.step` (one step), :mod:`.metrics` (evaluation), :mod:`.results`
(:class:`FitResult`, :class:`FitState`), :mod:`.position` (the data position and random states a resumed
fit continues from) and :mod:`.loop` (:func:`fit`).
"""

from .loop import fit
from .metrics import IGNORE_INDEX, evaluate, evaluate_tasks
from .optim import (
    DEFAULTS,
    TaskSettings,
    count_trainable,
    make_optimizer,
    parameter_groups,
    trainable_parameters,
    warmup_cosine,
)
from .results import FitResult, FitState
from .step import NonFiniteError, NonFiniteInputError

__all__ = [
    "DEFAULTS", "IGNORE_INDEX", "FitResult", "FitState", "NonFiniteError", "NonFiniteInputError", "TaskSettings",
    "count_trainable", "evaluate", "evaluate_tasks", "fit", "make_optimizer", "parameter_groups",
    "trainable_parameters", "warmup_cosine",
]

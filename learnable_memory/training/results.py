"""What a fit returns (:class:`FitResult`, one per task) and what it can resume from (:class:`FitState`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class FitState:
    """Where a fit stands, to resume it: pass it back as ``fit(..., resume=state)``.

    Attributes:
        step: Optimizer steps taken since the schedule began.
        total: The step at which the schedule ends (the warm-up + cosine decay's horizon).
        optimizers: Task name (``""`` for a model without tasks) -> the task's optimizer ``state_dict``.
        optimizer_names: Task name -> "sgd" or "adamw" (a state is only loaded into the same optimizer).
        epoch: The epoch the data position is in (1 for the first; 0: no position, a resumed fit begins a
            fresh epoch).
        batches: Batches of that epoch already trained on (a resumed fit skips them).
        epoch_batches: The loader's length (batches per epoch) the position is for.
        epoch_rng: What ordered that epoch when it began: torch's global random state (``"torch"``) and
            the loader's generators' states (``"generators"``), see :mod:`.position`.
        rng: The global random states at this point (``"torch"``, ``"numpy"``, ``"python"``, ``"cuda"``).
        progress: Task name -> what its result carries on: ``best_step``, ``best_metric``, ``best`` (the
            parameters of the best validation, with ``restore_best``) and ``stopped`` (a task stopped stays
            stopped).
    """

    step: int = 0
    total: int = 0
    optimizers: dict[str, dict] = field(default_factory=dict)
    optimizer_names: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    batches: int = 0
    epoch_batches: int = 0
    epoch_rng: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    progress: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain containers and tensors, for ``torch.save`` (and ``torch.load(weights_only=True)``)."""
        return {"step": self.step, "total": self.total, "optimizers": self.optimizers,
                "optimizer_names": self.optimizer_names, "epoch": self.epoch, "batches": self.batches,
                "epoch_batches": self.epoch_batches, "epoch_rng": self.epoch_rng, "rng": self.rng,
                "progress": self.progress}

    def of_task(self, name: str) -> FitState:
        """The state of task ``name`` alone (its optimizer; the schedule and data position every task shares)."""
        return dataclasses.replace(self, optimizers={name: self.optimizers[name]},
                                   optimizer_names={name: self.optimizer_names[name]},
                                   progress={k: v for k, v in self.progress.items() if k == name})

    @classmethod
    def merged(cls, states: list[FitState]) -> FitState:
        """One state of the tasks of ``states`` (saved at the same step of one fit, one folder per task)."""
        steps = sorted({s.step for s in states})
        if len(steps) > 1:
            raise ValueError(f"the saved tasks are at different steps {steps}: the fit was stopped while its "
                             "checkpoint was being put in place; resume each from its own folder or train again")
        out = dataclasses.replace(states[0], optimizers={}, optimizer_names={}, progress={})
        for s in states:
            out.optimizers.update(s.optimizers)
            out.optimizer_names.update(s.optimizer_names)
            out.progress.update(s.progress)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> FitState:
        """The state ``as_dict`` gave; one saved before the data position was kept has none (epoch 0)."""
        return cls(int(d["step"]), int(d["total"]), dict(d["optimizers"]), dict(d["optimizer_names"]),
                   int(d.get("epoch", 0)), int(d.get("batches", 0)), int(d.get("epoch_batches", 0)),
                   dict(d.get("epoch_rng", {})), dict(d.get("rng", {})), dict(d.get("progress", {})))


@dataclass
class FitResult:
    """What :func:`~learnable_memory.training.fit` did, for one task or for the whole fit.

    Attributes:
        history: One row per epoch (or per validation with ``val_every``): ``epoch``, ``step``,
            ``train_loss``, ``lr`` and, with a validation loader, ``val_accuracy`` and ``val_loss``.
        steps: Optimizer steps taken (by this task: fewer when it was stopped).
        seconds: Wall time of the training loop (validation included).
        val: The last validation result of :func:`~learnable_memory.training.evaluate` (empty without a
            validation loader).
        best_step, best_metric: The step of the best validation accuracy, and that accuracy (None without
            validation).
        stopped: Why the task was stopped (its loss or parameters turned NaN or Inf), or None. A stopped
            task keeps its parameters of the step before.
        tasks: Task name -> the task's own result. A fit of one task gives that task's result at the top
            level as well; a fit of several gives only ``steps``, ``seconds`` and ``tasks`` there.
        state: The optimizers and schedule position at the end, for ``fit(..., resume=state)``.
    """

    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    val: dict = field(default_factory=dict)
    best_step: int | None = None
    best_metric: float | None = None
    stopped: str | None = None
    tasks: dict[str, FitResult] = field(default_factory=dict, repr=False)
    state: FitState | None = field(default=None, repr=False)

    def record_val(self, val: dict, step: int) -> bool:
        """Keep ``val`` as the last validation; True when its accuracy is the best so far."""
        self.val = val
        if self.best_metric is not None and val["accuracy"] <= self.best_metric:
            return False
        self.best_step, self.best_metric = step, val["accuracy"]
        return True

"""Configuration of one fine-tuned task: what a memory adapter is made of."""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field

#: The attention regimes of the paper.
#: - "non_destructive" (Sec. 2.2, Table 1 without the starred cells): the original tokens never
#:   see anything new, so the base output is unchanged and tasks can be concatenated.
#: - "extension" (Table 1 with the starred cells): like non_destructive, but the task's class
#:   token may also attend to the class tokens and memory of the tasks it extends.
#: - "full" (Sec. 2.1): every token attends to the memory. Changes the base output, so a full
#:   task can not share a model with any other task.
MODES = ("non_destructive", "extension", "full")

#: The key of the base model's own output in ``MemoryViT.forward_all``; no task may take this name.
BASE_KEY = "base"
#: peft's name, in ``adapter_names``, for the rows that get the base model's own output.
PEFT_BASE = "__base__"
#: Names no task may take, in any entry point (``add_task``, ``load_adapters``, peft, the server): they
#: stand for the base model's output.
RESERVED_NAMES = (BASE_KEY, PEFT_BASE)
#: Task names: any printable string up to this length (they key outputs, folders, URLs and files).
MAX_NAME_LENGTH = 200


class UnknownTaskError(ValueError):
    """An output was asked for that the model does not have: an unknown task, or ``"base"`` while a
    full-mode task is loaded (see ``MemoryViT.resolve_outputs``).

    Attributes:
        names: The outputs asked for that the model does not have.
    """

    # Raised as UnknownTaskError(message, names) with no __init__ of its own: torch.compile's dynamo can not
    # trace one, and would report a graph break about it instead of this message (see tests/test_compile.py).
    @property
    def names(self) -> list[str]:
        return list(self.args[1]) if len(self.args) > 1 else []

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class TaskConfig:
    """One task: ``n_mem`` memory tokens per block, a class token and a linear head.

    Attributes:
        name: Task name, unique inside a model (the key of ``forward_all``): any printable string of
            at most ``MAX_NAME_LENGTH`` characters, dots, spaces and words like ``"train"`` included.
        n_mem: Memory tokens per block (m in the paper). 0 gives "head + class token".
        num_classes: Output size of the task's head.
        mode: One of :data:`MODES`.
        init_std: Standard deviation of the normal init of the memory (paper: 0.02).
        class_names: Optional label names, saved with the adapter.
        depends_on: For ``extension`` tasks, the ordered names of the tasks whose class tokens
            and memory this task attends to (the tasks present when it was created).
        data_config: The preprocessing the task was trained with (timm data config: input_size,
            mean, std, interpolation, ...), recorded in saved adapters; None = the backbone's own.
    """

    name: str
    n_mem: int
    num_classes: int
    mode: str = "non_destructive"
    init_std: float = 0.02
    class_names: list[str] | None = None
    depends_on: list[str] = field(default_factory=list)
    data_config: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and how to fix it."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if len(self.name) > MAX_NAME_LENGTH or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in self.name):
            raise ValueError(f"task name {self.name!r} is not allowed: use at most {MAX_NAME_LENGTH} printable "
                             "characters (any letters, digits, spaces, dots, dashes ...; no control characters)")
        if not isinstance(self.n_mem, int) or isinstance(self.n_mem, bool) or self.n_mem < 0:
            raise ValueError(f"n_mem must be an integer >= 0 (memory tokens per block), got {self.n_mem!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        if self.depends_on and self.mode != "extension":
            raise ValueError(f"only extension tasks depend on other tasks; task {self.name!r} is {self.mode}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskConfig:
        known = {k: d[k] for k in ("name", "n_mem", "num_classes", "mode", "init_std", "class_names",
                                   "depends_on", "data_config") if k in d}
        return cls(**known)

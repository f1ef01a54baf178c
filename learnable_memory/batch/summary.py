"""What the user sees of a job: the progress bar (images/s and the ETA) and the summary at the end."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any

#: Seconds between progress updates when stderr is not a terminal (a log file).
LOG_INTERVAL = 60.0


@dataclass
class Summary:
    """What a job did.

    Attributes:
        images: Rows written by this run (parts finished before a resume not counted).
        errors: Of them, images that could not be read.
        skipped: Images of parts a resumed run found finished.
        wall_s: Seconds from start to end.
        decode_s: Seconds spent reading and preparing images, summed over the processes doing it (None: not
            timed, the Ray engine's stages run in other processes).
        model_s: Seconds in the model's passes (None: not timed).
        passes_per_batch: ``forward_all`` calls per batch (one per preprocessing).
        out: The output folder (None: rows went to a stream).
    """

    images: int = 0
    errors: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    decode_s: float | None = 0.0
    model_s: float | None = 0.0
    passes_per_batch: int = 1
    out: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_share(self) -> float | None:
        """Decoding's share of the work: ``decode_s / (decode_s + model_s)`` (None when not timed)."""
        if self.decode_s is None or self.model_s is None:
            return None
        total = self.decode_s + self.model_s
        return self.decode_s / total if total > 0 else 0.0

    def text(self) -> str:
        """One line for people."""
        skipped = f", {self.skipped} already done" if self.skipped else ""
        split = (f"decoding {self.decode_s:.1f} s, model {self.model_s:.1f} s ({self.decode_share:.0%} decoding, "
                 if self.decode_share is not None else "(")
        return (f"labelled {self.images} images ({self.errors} could not be read{skipped}) in {self.wall_s:.1f} s: "
                f"{self.images_per_s:.1f} images/s; {split}{self.passes_per_batch} pass(es) per batch)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s, "decode_share": self.decode_share}


def progress_bar(total: int, enabled: bool | None):
    """tqdm on stderr showing images/s and the ETA: live on a terminal, every ``LOG_INTERVAL`` s in a log,
    off with ``enabled=False``."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="img", disable=enabled is False, mininterval=0.2 if tty else LOG_INTERVAL,
                dynamic_ncols=tty, file=sys.stderr, desc="predict")

"""The shared harness of the benchmark scripts: the models they time, interleaved timing, median/IQR,
peak memory in a fresh process, machine description, JSON/PNG writing and table printing.

Start-up convention: every script runs as ``python benchmarks/NAME.py`` from an environment where the
package is installed (``pip install -e .``), imports ``learnable_memory`` like any user, and imports this
module as ``import common`` (Python puts a script's own folder first on ``sys.path``). No script edits
``sys.path`` or imports from ``tests/``.

Models: :func:`build_vit` gives a random-weight timm ViT (``QUICK_MODEL`` with ``--quick``), so the
timings need no download; tasks get ``NUM_CLASSES`` classes.

Timing: every method is warmed up, then each repetition runs every method once, in a fixed
order (A B C D, A B C D, ...), so slow drifts of a shared machine hit all methods alike. Ratios
are taken per repetition (method / reference of the same repetition) and reported as the median
with the interquartile range.

Allocator: glibc's malloc hands large freed blocks back to the system by default, so a pass may
fault fresh pages in again, by an amount that depends on the exact order of allocations, not on
the work done. :func:`keep_freed_memory` turns that off (as jemalloc or tcmalloc, which PyTorch's
CPU performance guide recommends, do); scripts record which setting a run used.

Peak memory: :func:`measure_in_subprocess` runs the script again in a fresh process with
``--measure-memory JOB`` (:func:`add_memory_child_option`); the child builds the models, then
:func:`report_memory` resets the kernel's RSS high-water mark (``/proc/self/clear_refs``), notes its
RSS, runs the method, and reads the high-water mark (``VmHWM``). The difference is what running the
method adds on top of holding the models (torch's CPU allocations are invisible to ``tracemalloc``,
but not to RSS); the absolute peak is reported too. Where the mark can not be reset, ``ru_maxrss`` is
used and the build's own peak may hide part of the method's. The child runs with glibc's mmap threshold
fixed at its 128 KiB default (``MEMORY_CHILD_ENV``): glibc otherwise raises the threshold after the first
large free, keeps a warm-up call's blocks in the heap, and a later call then adds next to nothing to the
RSS, whatever it needs. Fixed, every large tensor is mapped when made and returned when freed, so the
high-water mark over a call is that call's working set.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"
#: Classes of every task the speed benchmarks build.
NUM_CLASSES = 10
#: The model of ``--quick`` runs: a depth-2 ViT-Tiny on 32 px images (16 patches).
QUICK_MODEL = ("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8))


# ----- models -----
def build_vit(name: str, quick: bool = False) -> torch.nn.Module:
    """A random-weight timm ViT in eval mode, seeded (``QUICK_MODEL``'s arguments with ``quick``)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **(QUICK_MODEL[1] if quick else {})).eval()


def images_for(vit: torch.nn.Module, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random images ``[batch, C, H, W]`` of the model's input size (its current one, as timm's data config
    resolves it; seed 0 unless ``generator``)."""
    from learnable_memory.preprocessing import data_config

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randn(batch, *data_config(vit)["input_size"], generator=g)


# ----- timing -----
def time_call(fn: Callable[[], Any]) -> float:
    """Wall time of one call, seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(
    methods: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    reps_of: dict[str, int] | None = None,
    warmups: dict[str, Callable[[], Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time ``methods`` in interleaved repetitions.

    Args:
        methods: ``name -> fn``, run in this order within every repetition.
        reps: Repetitions.
        warmup: Untimed calls of every method before the first repetition.
        reps_of: Fewer repetitions for some (slow) methods: they run in the first ``reps_of[name]``
            repetitions only, still interleaved with the others.
        warmups: Cheaper warm-up calls for some methods (e.g. one of K identical forwards).
        progress: Called with a short line after every repetition.

    Returns:
        ``name -> [seconds per repetition]``.
    """
    reps_of = reps_of or {}
    warmups = warmups or {}
    for _ in range(warmup):
        for name, fn in methods.items():
            warmups.get(name, fn)()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(reps):
        for name, fn in methods.items():
            if r < reps_of.get(name, reps):
                times[name].append(time_call(fn))
        if progress is not None:
            progress(f"rep {r + 1}/{reps}")
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``values`` (inclusive method; a single value gives three equal numbers)."""
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


def summary(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "q1", "q3", "iqr", "n"}`` of ``values``."""
    q1, med, q3 = quartiles(values)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(values)}


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Median/IQR of per-repetition ratios ``num[r] / den[r]`` (paired by repetition index)."""
    n = min(len(num), len(den))
    if n == 0:
        raise ValueError("no repetition has both timings")
    return summary([num[r] / den[r] for r in range(n)])


# ----- peak memory -----
def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size, MiB."""
    value = _status_mb("VmRSS")
    return value if value is not None else max_rss_mb()


def max_rss_mb() -> float:
    """This process's RSS high-water mark, MiB (``VmHWM``, else ``ru_maxrss``, which Linux gives in KiB)."""
    value = _status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False if not possible."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_of(fn: Callable[[], Any], calls: int = 2) -> dict[str, float]:
    """Run ``fn`` ``calls`` times; ``{"baseline_mb", "peak_mb", "extra_mb", "reset"}``: RSS before, the
    high-water mark after, their difference, and whether the mark could be reset first."""
    reset = reset_peak_rss()
    before = rss_mb() if reset else max_rss_mb()
    for _ in range(calls):
        fn()
    peak = max_rss_mb()
    return {"baseline_mb": before, "peak_mb": peak, "extra_mb": peak - before, "reset": reset}


def add_memory_child_option(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--measure-memory JOB`` option (a JSON object) that :func:`measure_in_subprocess` passes."""
    parser.add_argument("--measure-memory", type=json.loads, metavar="JOB", help=argparse.SUPPRESS)


def report_memory(job: dict, fn: Callable[[], Any], calls: int = 2) -> None:
    """Child side: run ``fn`` (the models already built) ``calls`` times under :func:`peak_memory_of` and
    print ``job`` with the measurement as the last stdout line."""
    print(json.dumps({**job, **peak_memory_of(fn, calls)}))


#: The memory child's allocator setting (see the module docstring): large blocks always mapped, so freed ones
#: leave the RSS.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def measure_in_subprocess(script: Path, job: dict, timeout: float = 1800) -> dict:
    """Parent side: run ``python script --measure-memory JOB`` in a fresh process (with
    ``MEMORY_CHILD_ENV``); the child's JSON line."""
    proc = subprocess.run([sys.executable, str(script), "--measure-memory", json.dumps(job)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **MEMORY_CHILD_ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----- machine -----
def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no trimming of the heap, heap (not
    ``mmap``) for blocks up to 32 MiB. Returns False where this is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20))
    )


def machine_info() -> dict:
    """CPU model, cores, threads, library versions and the load average at call time."""
    import timm

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def announce_machine() -> dict:
    """:func:`machine_info`, after printing its one-line summary (CPU, cores, torch threads, load)."""
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load {machine['load_average']}", flush=True)
    return machine


def command_line() -> str:
    """The command that ran this script, relative to the repository root when possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


# ----- output -----
def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (atomically: a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib (Agg) figure with ``ncols`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def ratio_text(s: dict[str, float]) -> str:
    """``"1.07x [1.05-1.09]"``: median and interquartile range of a ratio summary."""
    return f"{s['median']:.3f}x [{s['q1']:.3f}-{s['q3']:.3f}]"


def target_row(name: str, stat: dict[str, float], op: str, limit: float) -> dict:
    """A target check on a median: ``op`` is ``"<="`` or ``">="``."""
    value = stat["median"]
    ok = value <= limit if op == "<=" else value >= limit
    return {"target": name, "median": value, "q1": stat["q1"], "q3": stat["q3"], "n": stat["n"], "op": op,
            "limit": limit, "pass": bool(ok)}


def print_targets(targets: Sequence[dict]) -> None:
    rows = [[t["target"], f"{t['median']:.3f} [{t['q1']:.3f}-{t['q3']:.3f}]", f"{t['op']} {t['limit']}",
             "PASS" if t["pass"] else "MISS"] for t in targets]
    print(format_table(["target", "median [IQR]", "limit", "result"], rows))

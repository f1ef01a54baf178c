"""The served model and the adapters in it: hot loading and unloading, and the adapters file.

The model is never changed in place. A load or unload builds a new :class:`~learnable_memory.MemoryViT`
that shares the frozen backbone and the kept tasks (off the event loop, under a lock, so changes
apply one at a time) and then replaces the reference. Requests admitted before the swap keep the
model they were admitted on; a failed change leaves the set as it was.

With an adapters file (``--adapters-file``), the file is the only source of the set: one adapter per
line, ``SPEC`` or ``NAME=SPEC`` (SPEC: a folder, a ``save_pretrained`` folder or ``hf-hub:owner/repo``;
a relative path is read from the file's folder; blank lines and ``#`` comments are skipped; NAME is
everything before the first ``=``, so names can not hold ``=``). The file is checked every
``poll_interval_s`` and when it changed (modification time or size) the server builds exactly that
set. Write the file atomically (write a new file, then rename it over the old one) so that a half-
written file is never read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdapterError, adapter_folders, describe_task, read_adapter
from ..adapters.fingerprint import base_identity
from ..config import BASE_KEY
from ..model import MemoryViT, load_adapters
from ..pass_groups import grouped_by_caller
from .inference import has_full_task
from .settings import ServeError, ServeSettings

log = logging.getLogger("learnable_memory.serve")
HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class FileEntry:
    """One line of an adapters file: an adapter spec and an optional new task name. ``line`` and ``file`` say
    where it was written, ``relative`` whether its path was relative (then ``spec`` is under the file's folder)."""

    spec: str
    name: str | None = None
    line: str | None = field(default=None, compare=False)
    file: Path | None = field(default=None, compare=False)
    relative: bool = field(default=False, compare=False)

    def where(self) -> str:
        """Where the entry came from, for error messages: the line, and how a relative path was read."""
        if self.line is None:
            return ""
        how = f"; a relative path is read from the file's folder {self.file.parent}" if self.relative else ""
        return f" (line {self.line!r} of the adapters file {self.file}{how})"


def read_adapters_file(path: Path) -> list[FileEntry]:
    """The entries of an adapters file, in order (see the module docstring for the format; a relative path
    is read from the file's folder)."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, spec = line.partition("=")
        if not sep or line.startswith(HUB_PREFIX):
            name, spec = None, line
        name, spec = (name.strip() or None) if name else None, spec.strip()
        if not spec:
            raise ValueError(f"{path}: line {line!r} names no adapter; write SPEC or NAME=SPEC")
        relative = not spec.startswith(HUB_PREFIX) and not Path(spec).expanduser().is_absolute()
        entries.append(FileEntry(str(path.parent / spec) if relative else spec, name, line, path, relative))
    return entries


#: Entries with the adapter folders each stands for (:func:`resolve_entries`).
Resolved = list[tuple[FileEntry, list[Path]]]


def resolve_entries(entries: list[FileEntry], cache_dir: Path | None = None) -> Resolved:
    """Each entry with its adapter folders (``hf-hub:`` specs through the cache), each resolved once.
    Raises ``AdapterError`` naming the line for a missing folder or a NAME given to several adapters."""
    out = []
    for e in entries:
        try:
            found = adapter_folders(e.spec, cache_dir)
        except AdapterError as err:
            raise AdapterError(f"{err}{e.where()}") from err
        if e.name is not None and len(found) != 1:
            raise AdapterError(f"{e.spec} holds {len(found)} adapters; NAME=SPEC names a single adapter folder"
                               f"{e.where()}")
        out.append((e, found))
    return out


def load_resolved(base: Any, resolved: Resolved, *, check_fingerprint: bool = True,
                  cache_dir: Path | None = None) -> tuple[MemoryViT, dict[str, str]]:
    """A new model on the backbone ``base`` with exactly the adapters of ``resolved``, in order, and the spec
    each task came from. Raises ``AdapterError`` (nothing changes) for an unfit adapter."""
    folders = [f for _, found in resolved for f in found]
    if not folders:
        return MemoryViT(base).eval(), {}
    names = [e.name for e, found in resolved for _ in found]
    with grouped_by_caller():  # the server runs one pass per preprocessing group
        model = load_adapters(base, folders, rename=names, check_fingerprint=check_fingerprint, cache_dir=cache_dir)
    specs = [e.spec for e, found in resolved for _ in found]
    return model.eval(), dict(zip(model.task_names, specs, strict=True))


def load_entries(base: Any, entries: list[FileEntry], *, check_fingerprint: bool = True,
                 cache_dir: Path | None = None) -> tuple[MemoryViT, dict[str, str]]:
    """:func:`load_resolved` of :func:`resolve_entries`: the model with exactly the adapters of ``entries``."""
    return load_resolved(base, resolve_entries(entries, cache_dir), check_fingerprint=check_fingerprint,
                         cache_dir=cache_dir)


def without_task(model: MemoryViT, name: str) -> MemoryViT:
    """A new model with the tasks of ``model`` but ``name`` (``ValueError`` if another task extends it)."""
    new = MemoryViT(model.base)
    for task in model.tasks.values():
        new.add_task(task)
    new.remove_task(name)
    return new.eval()


class AdapterSet:
    """The model being served and where each of its tasks came from.

    Args:
        model: The initial model.
        settings: Who may change what (``adapter_root``, ``allow_hub``, ``adapters_file``, ...).
        sources: ``task -> spec`` for tasks loaded from folders (others are listed with source None).
        on_change: Called with the new model after every change (metrics).
    """

    def __init__(self, model: MemoryViT, settings: ServeSettings, sources: Mapping[str, str] | None = None,
                 on_change: Callable[[MemoryViT], None] | None = None):
        self.settings = settings
        self.on_change = on_change
        self._state: tuple[MemoryViT, dict[str, str]] = (model, dict(sources or {}))
        self._lock: asyncio.Lock | None = None
        self._identity: dict[str, Any] | None = None
        self._file_stamp: tuple[int, int] | None = None
        self.file_error: str | None = None
        self.file_loaded_at: float | None = None

    @property
    def model(self) -> MemoryViT:
        """The current model: the one a request admitted now runs on."""
        return self._state[0]

    def _swap(self, model: MemoryViT, sources: dict[str, str]) -> None:
        self._state = (model, sources)
        if self.on_change is not None:
            self.on_change(model)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def describe(self) -> dict[str, Any]:
        """``{"adapters": [...], "base_output": bool}``: ``describe_task``'s fields for every task, read from
        the model, plus its ``source`` (None for a task made in this process); and whether ``"base"`` is
        served (not while a full-mode task is loaded). Blocking: it hashes the tasks' tensors."""
        model, sources = self._state
        if self._identity is None:  # the backbone never changes: hash it once
            self._identity = base_identity(model.base)
        adapters = [{**describe_task(model, n, base=self._identity), "source": sources.get(n)}
                    for n in model.task_names]
        return {"adapters": adapters, "base_output": not has_full_task(model)}

    # ----- the API -----
    def check_api(self) -> None:
        """403 unless loading and unloading through the API are on."""
        s = self.settings
        if s.adapters_file is not None:
            raise ServeError(403, f"the adapter set comes from the adapters file {s.adapters_file}: edit that file "
                             "(the server re-reads it); loading through the API is off", "forbidden")
        if not s.api_loading:
            raise ServeError(403, "loading and unloading through the API are off: start the server with "
                             "--adapter-root DIR to allow adapters under DIR", "forbidden")

    def _root(self) -> Path:
        return Path(self.settings.adapter_root).expanduser().resolve()

    def _target(self, spec: str) -> str:
        """The path (or hub spec) to load for ``spec``: 403 outside the root or for the hub when it is off."""
        if spec.startswith(HUB_PREFIX):
            if not self.settings.allow_hub:
                raise ServeError(403, f"{spec}: loading from the Hugging Face Hub is off; start the server with "
                                 "--allow-hub", "forbidden")
            return spec
        root = self._root()
        path = (root / Path(spec).expanduser()).resolve()  # an absolute spec stays absolute
        if not path.is_relative_to(root):
            raise ServeError(403, f"{spec}: only adapters under the adapter root {root} may be loaded", "forbidden")
        if not path.exists():
            raise ServeError(404, f"{spec}: no adapter folder at {path}", "not_found")
        return str(path)

    def _check_inside_root(self, folders: list[Path]) -> None:
        """403 when one of ``folders``, or a file in one, is a link that leads out of the adapter root: where
        the folder is does not bound what a load reads."""
        root = self._root()
        for folder in folders:
            for entry in [folder, *(folder.iterdir() if folder.is_dir() else [])]:
                if not entry.resolve().is_relative_to(root):
                    raise ServeError(403, f"{entry} is a link that leads outside the adapter root {root}: only "
                                     "files under the root may be loaded", "forbidden")

    def _load(self, model: MemoryViT, target: str, name: str | None) -> MemoryViT:
        """A new model with the adapter(s) at ``target``; each file is read once."""
        local = not target.startswith(HUB_PREFIX)
        if local:
            self._check_inside_root([Path(target)])  # before its index file is read
        try:
            folders = adapter_folders(target, self.settings.cache_dir)
            if local:
                self._check_inside_root(folders)
            adapters = [read_adapter(f) for f in folders]
        except AdapterError as err:  # not an adapter, or a damaged one
            raise ServeError(422, str(err), "bad_adapter") from err
        if name is not None and len(adapters) != 1:
            raise ServeError(422, f"{target} holds {len(adapters)} adapters; 'name' renames a single adapter folder",
                             "bad_request")
        names = [name] if name is not None else [a.config.name for a in adapters]
        taken = [n for n in names if n in model.tasks or n == BASE_KEY]
        if taken:
            why = "is reserved for the base model's output" if taken[0] == BASE_KEY else "is loaded already"
            raise ServeError(409, f"task name {taken[0]!r} {why}: send the load again with another name in the "
                             f"request's 'name' field, e.g. {{\"path\": ..., \"name\": \"{taken[0]}_2\"}}"
                             + ("" if len(adapters) == 1 else " (for a save_pretrained folder, load its adapter "
                                "folders one at a time)"), "adapter_conflict")
        try:
            with grouped_by_caller():
                new = load_adapters(model, adapters, rename=None if name is None else [name],
                                    check_fingerprint=self.settings.check_fingerprint,
                                    cache_dir=self.settings.cache_dir)
        except AdapterError as err:  # does not fit: another backbone, a full-mode clash, ...
            message = str(err).replace("check_fingerprint=False", "start the server with --no-fingerprint-check")
            raise ServeError(409, message, "adapter_conflict") from err
        except ValueError as err:  # e.g. a name the library refuses
            raise ServeError(422, str(err), "bad_request") from err
        return new.eval()

    async def load(self, spec: str, name: str | None = None) -> list[str]:
        """Load the adapter(s) at ``spec``, optionally renamed; returns the new task names."""
        self.check_api()
        target = self._target(spec)
        async with self.lock:
            model, sources = self._state
            new = await asyncio.to_thread(self._load, model, target, name)
            added = [n for n in new.task_names if n not in model.tasks]
            self._swap(new, {**sources, **dict.fromkeys(added, spec)})
        log.info("loaded %s from %s", added, spec)
        return added

    async def unload(self, name: str) -> None:
        """Unload task ``name``: 404 if it is not loaded, 409 while another task extends it."""
        self.check_api()
        async with self.lock:
            model, sources = self._state
            if name not in model.tasks:
                why = " (the base model's output can not be unloaded)" if name == BASE_KEY else ""
                raise ServeError(404, f"no task {name!r} is loaded{why}; loaded: {model.task_names}", "unknown_task")
            try:
                new = await asyncio.to_thread(without_task, model, name)
            except ValueError as err:
                raise ServeError(409, str(err), "adapter_conflict") from err
            self._swap(new, {k: v for k, v in sources.items() if k != name})
        log.info("unloaded %s", name)

    # ----- the adapters file -----
    async def sync_file(self) -> bool:
        """Converge to the adapters file if it changed since the last reading (or that reading failed);
        True when the set was rebuilt. A bad file or adapter keeps the set and is reported in ``file_error``."""
        path = Path(self.settings.adapters_file)
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._file_stamp and self.file_error is None:
            return False
        async with self.lock:
            try:
                entries = read_adapters_file(path)
                new, sources = await asyncio.to_thread(
                    load_entries, self.model.base, entries, check_fingerprint=self.settings.check_fingerprint,
                    cache_dir=self.settings.cache_dir)
            except (OSError, ValueError) as err:  # AdapterError is a ValueError
                message = f"{type(err).__name__}: {err}"
                if message != self.file_error:
                    log.error("adapters file %s not applied, keeping %s: %s", path, self.model.task_names, message)
                self.file_error, self._file_stamp = message, stamp
                return False
            self._swap(new, sources)
            self.file_error, self._file_stamp, self.file_loaded_at = None, stamp, time.time()
        log.info("adapters file %s applied: %s", path, new.task_names)
        return True

    async def watch_file(self) -> None:
        """Poll the adapters file forever (a background task, cancelled at shutdown)."""
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            await self.sync_file()

"""The images a batch job labels: a fixed, ordered listing built from what the user names.

A source is one of, or a list of:

- an image file (any extension PIL reads; named files are taken as they are);
- a folder: its image files at any depth (extensions in :data:`IMAGE_EXTENSIONS`), sorted by path;
- a glob pattern (``photos/**/*.jpg``), sorted;
- ``@list.txt``: one path a line, relative to the list file's folder (blank lines and ``#`` comments
  skipped);
- a ``.csv`` or ``.parquet`` file with a ``path`` column (relative paths are taken relative to that
  file's folder); its other columns are carried into the output as ids;
- a webdataset ``.tar`` shard: one image per member with an image extension, its path written as
  ``shard.tar/member`` (members are read from the archive, not unpacked).

The listing is the unit the output's ``_manifest.json`` hashes (:meth:`Listing.digest`), so a resumed
run is refused when the images changed, and the unit ``--shard I/N`` splits into contiguous,
disjoint ranges (:meth:`Listing.shard`).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Extensions of the files a folder or ``.tar`` shard contributes (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Suffixes of the table sources (a ``path`` column and ids) and of webdataset shards.
TABLES = (".csv", ".parquet", ".tar")
#: Column names the output uses itself: an id column of the input may not have one of these names.
RESERVED_COLUMNS = ("path", "error")
#: Suffix of a path inside a webdataset shard: ``shard.tar/member.jpg``.
TAR_SUFFIX = ".tar"


@dataclass(frozen=True)
class Listing:
    """The images of a job, in order.

    Attributes:
        paths: Image paths (``shard.tar/member`` for a member of a ``.tar`` shard).
        ids: Id column name -> one value per image (strings, numbers or None), from CSV/Parquet sources.
    """

    paths: tuple[str, ...]
    ids: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def row_ids(self, i: int) -> dict:
        """The id columns of image ``i``."""
        return {k: v[i] for k, v in self.ids.items()}

    def digest(self) -> str:
        """``"sha256:<hex>"`` of the paths and ids, in order: what a resumed run must find again."""
        h = hashlib.sha256()
        h.update(json.dumps(sorted(self.ids), ensure_ascii=False).encode())
        for i, path in enumerate(self.paths):
            h.update(json.dumps([path, *(self.ids[k][i] for k in sorted(self.ids))], ensure_ascii=False,
                                default=str).encode() + b"\n")
        return "sha256:" + h.hexdigest()

    def select(self, start: int, stop: int) -> Listing:
        """Images ``start..stop-1``."""
        return Listing(self.paths[start:stop], {k: v[start:stop] for k, v in self.ids.items()})

    def shard(self, index: int, count: int) -> Listing:
        """Shard ``index`` of ``count``: a contiguous range; the shards are disjoint and cover the listing."""
        check_shard(index, count)
        n = len(self.paths)
        return self.select(index * n // count, (index + 1) * n // count)


def check_shard(index: int, count: int) -> None:
    if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard {index}/{count} does not exist: use --shard I/N with 0 <= I < N")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four shards") from None
    check_shard(index, count)
    return index, count


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _folder(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_name(p.name))


def _glob(pattern: str) -> list[str]:
    return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _list_file(spec: str) -> list[str]:
    path = Path(spec[1:])
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"list {spec} can not be read ({e}); give @FILE with one image path a line") from None
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return [str(_relative_to(path, e)) for e in entries]


def _relative_to(table: Path, entry: str) -> Path:
    p = Path(entry).expanduser()
    return p if p.is_absolute() else table.parent / p


def _tar(path: Path) -> list[str]:
    try:
        with tarfile.open(path) as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile() and is_image_name(m.name))
    except (OSError, tarfile.TarError) as e:
        raise ValueError(f"{path}: not a readable .tar shard ({e})") from None
    return [f"{path}/{n}" for n in names]


def _table(path: Path) -> tuple[list[str], dict[str, list]]:
    """The ``path`` column and the other columns of a CSV or Parquet file."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            columns = pq.read_table(path).to_pydict()
        except OSError as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
                header = list(rows[0]) if rows else []
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{path}: not a readable CSV file ({e})") from None
        columns = {k: [r[k] for r in rows] for k in header}
    if "path" not in columns:
        raise ValueError(f"{path} has no 'path' column (columns: {list(columns)}); name the column of image paths "
                         "'path'")
    clash = [c for c in columns if c != "path" and (c in RESERVED_COLUMNS or "." in c)]
    if clash:
        raise ValueError(f"{path}: id column {clash[0]!r} clashes with the output's columns (path, error and "
                         "TASK.field); rename it")
    paths = [str(_relative_to(path, str(p))) for p in columns.pop("path")]
    return paths, columns


def list_images(sources: str | Path | Sequence[str | Path]) -> Listing:
    """The :class:`Listing` of ``sources`` (see the module docstring), in the order given.

    Raises ``ValueError`` for a source that is missing, unreadable or holds no image, and when
    tables with different id columns are mixed.
    """
    specs = [sources] if isinstance(sources, str | Path) else list(sources)
    if not specs:
        raise ValueError("no images given: name image files, folders, globs, @list.txt or a CSV/Parquet file")
    paths: list[str] = []
    ids: dict[str, list] | None = None
    for spec in map(str, specs):
        p = Path(spec).expanduser()
        found_ids: dict[str, list] = {}
        if spec.startswith("@"):
            found = _list_file(spec)
        elif p.is_dir():
            found = _folder(p)
        elif p.is_file() and p.suffix.lower() in (".csv", ".parquet"):
            found, found_ids = _table(p)
        elif p.is_file() and p.suffix.lower() == TAR_SUFFIX:
            found = _tar(p)
        elif p.is_file():
            found = [str(p)]
        elif glob.has_magic(spec):
            found = _glob(spec)
            if not found:
                raise ValueError(f"no images found: no file matches {spec}")
        else:
            raise FileNotFoundError(f"image {spec} not found")
        if not found:
            raise ValueError(f"no images found in {spec} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if ids is not None and set(found_ids) != set(ids):
            raise ValueError(f"{spec} has id columns {sorted(found_ids)}, the sources before it {sorted(ids)}: "
                             "give tables with the same columns")
        ids = {k: [*(ids or {}).get(k, []), *v] for k, v in found_ids.items()}
        paths += found
    return Listing(tuple(paths), ids or {})

"""The batch job's choices and sizes, importable without torch (so ``predict --help`` starts fast):
the part formats (:mod:`.writers`), the precisions (:data:`.pipeline.DTYPES`) and the part size (:mod:`.job`)."""

from __future__ import annotations

#: Output formats and their file extensions.
FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}
#: Precisions by name: the keys of :data:`.pipeline.DTYPES` (tests/test_cli.py keeps them equal).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Images per part file (the most a kill loses).
PART_SIZE = 4096

"""``python -m learnable_memory``: the ``learnable-memory`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

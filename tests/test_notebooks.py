"""The quickstart notebook runs top to bottom (executed with nbclient, as a user would)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.integration
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel inherits this process's environment, so torch in it uses the suite's thread count
    nb.cells.append(nbformat.v4.new_code_cell("import torch\nprint('torch threads', torch.get_num_threads())"))
    # generous limits: a cell takes seconds to a minute on a quiet 2-core machine, many times that on a loaded one
    client = NotebookClient(nb, timeout=1800, startup_timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError if any cell fails
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "concatenated" in text and "accuracy" in text
    assert "torch threads 1\n" in text, "the kernel did not take the suite's one thread (OMP_NUM_THREADS)"

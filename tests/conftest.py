"""Fixtures. Helpers live in :mod:`learnable_memory.testing` (the guarantees, the dense
references) and :mod:`tests.helpers` (small random-weight backbones, images, the HTTP server's
test helpers)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import IMG, images_for

#: Threads for torch here and in every subprocess a test starts (the notebook's kernel, accelerate
#: launch, the benchmark scripts): the tests run tiny models, for which one thread is fastest and
#: least sensitive to a busy machine. Subprocesses inherit the environment and torch reads it at start.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Pin torch to one thread in this process and, through the environment, in subprocesses."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in THREAD_ENV.items():
            mp.setenv(key, value)
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def images() -> torch.Tensor:
    """Three 32x32 images for :func:`tests.helpers.make_vit` models."""
    return images_for(IMG)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out ``slow`` tests unless ``-m`` names them: ``pytest`` runs everything else, ``pytest -m slow``
    the sweeps, and ``pytest -m "not integration"`` the fast core (no subprocesses, no sweeps)."""
    if "slow" in config.getoption("markexpr", ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]

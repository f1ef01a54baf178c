"""learnable_memory.batch.ray_engine: on a local Ray cluster, the rows of the local engine."""

from __future__ import annotations

import json

import pytest
import ray  # the ray extra, part of dev

from learnable_memory import predict_dataset
from tests.helpers import demo_model, fashion_files, records


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_ray_gives_the_rows_of_the_local_engine(cluster, tmp_path):
    paths = fashion_files(tmp_path / "imgs", 9)
    (tmp_path / "imgs" / "broken.png").write_text("not an image")
    rows = [f"imgs/{p.name},{i}" for i, p in enumerate(paths)] + ["imgs/broken.png,99"]
    (tmp_path / "index.csv").write_text("path,sku\n" + "\n".join(rows) + "\n")
    model = demo_model()
    model.tasks["digits"].config.data_config = {**model.data_config(), "crop_pct": 0.75}  # a pass of its own
    kwargs = dict(batch_size=4, logits=True, features=True)  # batches of 4: the first two read every image
    local = predict_dataset(model, tmp_path / "index.csv", tmp_path / "local", progress=False, **kwargs)
    summary = predict_dataset(model, tmp_path / "index.csv", tmp_path / "ray", engine="ray",
                              ray_options={"concurrency": 1}, **kwargs)
    assert (summary.images, summary.errors, summary.passes_per_batch) == (10, 1, 2) == (
        local.images, local.errors, local.passes_per_batch)
    assert records(tmp_path / "ray") == records(tmp_path / "local")
    manifest = json.loads((tmp_path / "ray" / "_manifest.json").read_text())
    assert sum(p["rows"] for p in manifest["parts"].values()) == 10 and manifest["identity"]["options"]["engine"]
    with pytest.raises(ValueError, match="already holds a dataset"):
        predict_dataset(model, tmp_path / "index.csv", tmp_path / "ray", engine="ray")
    with pytest.raises(ValueError, match="--out DIR"):
        predict_dataset(model, tmp_path / "index.csv", engine="ray")
    for kwargs in ({"resume": True}, {"format": "csv"}):
        with pytest.raises(ValueError, match="the local engine's"):
            predict_dataset(model, tmp_path / "index.csv", tmp_path / "ray", engine="ray", **kwargs)

"""learnable_memory.batch.manifest: what an output folder records, and the refusals that keep two datasets
from ever being mixed."""

from __future__ import annotations

import json

import pytest
import torch

from learnable_memory import predict_dataset
from tests.helpers import demo_model, fashion_files


@pytest.fixture
def done(tmp_path):
    """A finished dataset of 4 images in ``out/``, its model and its image folder."""
    model = demo_model()
    fashion_files(tmp_path / "imgs", 4)
    predict_dataset(model, tmp_path / "imgs", tmp_path / "out", part_size=2, progress=False)
    return model, tmp_path / "imgs", tmp_path / "out"


def test_the_manifest_records_inputs_fingerprints_options_and_parts(done):
    model, _, out = done
    data = json.loads((out / "_manifest.json").read_text())
    identity = data["identity"]
    assert identity["inputs"]["count"] == 4 and identity["inputs"]["sha256"].startswith("sha256:")
    assert set(identity["tasks"]) == {"shoes", "digits"} and identity["base"].startswith("sha256:")
    assert identity["outputs"] == ["base", "shoes", "digits"] and identity["options"]["top_k"] == 3
    assert data["shard"] == [0, 1]
    assert data["parts"] == {f"part-00000-of-00001-00000{k}.parquet": {"rows": 2, "errors": 0} for k in (0, 1)}


def _changed_task(model):
    with torch.no_grad():
        model.tasks["digits"].head.bias.add_(1.0)
    return model


@pytest.mark.parametrize("change, what", [
    (lambda m, imgs: (m, imgs, {"tasks": ["shoes"]}), "the outputs"),
    (lambda m, imgs: (m, [*sorted(imgs.iterdir()), *fashion_files(imgs.parent / "more", 1)], {}), "the input images"),
    (lambda m, imgs: (_changed_task(m), imgs, {}), "the tasks (adapters)"),
    (lambda m, imgs: (m, imgs, {"top_k": 1}), "the options"),
    (lambda m, imgs: (m, imgs, {"part_size": 3}), "the options"),
])
def test_a_resume_with_other_inputs_tasks_or_options_is_refused(change, what, done):
    model, imgs, out = done
    model, source, kwargs = change(model, imgs)
    with pytest.raises(ValueError, match="holds another dataset") as e:
        predict_dataset(model, source, out, resume=True, progress=False, **{"part_size": 2, **kwargs})
    assert what in str(e.value) and "\n" not in str(e.value)


def test_an_output_folder_is_never_written_over_or_mixed(done, tmp_path):
    model, imgs, out = done
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="already holds a dataset; pass --resume"):
        predict_dataset(model, imgs, out, part_size=2, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        predict_dataset(model, imgs, tmp_path / "other", progress=False)
    with pytest.raises(ValueError, match="is a file"):
        predict_dataset(model, imgs, tmp_path / "other" / "thesis.tex", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "_manifest.json").write_text("{torn")
    with pytest.raises(ValueError, match="can not be read"):
        predict_dataset(model, imgs, out, resume=True, part_size=2, progress=False)


def test_other_shards_of_the_same_dataset_are_welcome(tmp_path):
    model = demo_model()
    fashion_files(tmp_path / "imgs", 4)
    predict_dataset(model, tmp_path / "imgs", tmp_path / "out", shard=(0, 2), progress=False)
    predict_dataset(model, tmp_path / "imgs", tmp_path / "out", shard=(1, 2), progress=False)  # no --resume needed
    assert sorted(p.name for p in (tmp_path / "out").glob("_manifest*")) == ["_manifest-0-of-2.json",
                                                                             "_manifest-1-of-2.json"]
    with pytest.raises(ValueError, match="holds another dataset"):
        predict_dataset(model, tmp_path / "imgs", tmp_path / "out", shard=(1, 2), top_k=1, resume=True,
                        progress=False)

"""learnable_memory.batch.pipeline: decoding with the backbone's own transform, ONE forward_all per batch,
a pass of its own for tasks trained with other preprocessing, features from the same pass, and
unreadable images as errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from learnable_memory import data as D
from learnable_memory.batch.pipeline import (
    ImageFiles,
    Preparation,
    batches,
    check_device,
    read_image,
    resolve_outputs,
    run_passes,
)
from learnable_memory.pass_groups import pass_groups
from tests.helpers import demo_model, fashion_files

#: Preprocessing unlike the demo base's (its mean/std are Fashion-MNIST's, its crop 1.0).
OTHER = {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.25], "interpolation": "bilinear", "crop_pct": 0.75,
         "crop_mode": "center"}


def reference(model, paths, task, config):
    """``task``'s logits for ``paths`` prepared with ``config``'s transform, in a pass of its own."""
    transform = D.model_transform(config)
    x = torch.stack([transform(D.open_image(p, D.pil_mode(config))) for p in paths])
    with torch.inference_mode():
        return model.forward_all(x, tasks=[task])[task]


def test_one_forward_all_per_batch_when_every_task_shares_the_preprocessing(tmp_path, monkeypatch):
    model = demo_model()
    paths = [str(p) for p in fashion_files(tmp_path, 5)]
    outputs = resolve_outputs(model, None)
    groups = pass_groups(model, outputs)
    assert outputs == ["base", "shoes", "digits"] and len(groups) == 1
    calls = []
    forward_all = model.forward_all
    monkeypatch.setattr(model, "forward_all", lambda x, tasks: calls.append(tasks) or forward_all(x, tasks))
    preps = [Preparation.of(g) for g in groups]
    for batch in batches(paths, preps, batch_size=2, workers=0):
        out = run_passes(model, groups, batch.images)
    assert calls == [outputs] * 3  # 5 images in batches of 2: three passes, each over every output
    want = reference(model, paths[4:], "shoes", D.data_config(model))
    assert torch.allclose(out.logits["shoes"], want, atol=1e-5)  # another task set packs the pass otherwise


def test_a_task_trained_with_other_preprocessing_gets_its_own_pass_and_transform(tmp_path):
    """Issue: one pass gave every task the first adapter's preprocessing."""
    model = demo_model()
    model.tasks["digits"].config.data_config = OTHER
    paths = [str(p) for p in fashion_files(tmp_path, 3)]
    groups = pass_groups(model, resolve_outputs(model, None))
    assert [g.outputs for g in groups] == [("base", "shoes"), ("digits",)]
    (batch,) = batches(paths, [Preparation.of(g) for g in groups], batch_size=8, workers=0)
    out = run_passes(model, groups, batch.images)
    assert torch.allclose(out.logits["digits"], reference(model, paths, "digits", OTHER), atol=1e-5)
    assert torch.allclose(out.logits["shoes"], reference(model, paths, "shoes", D.data_config(model)), atol=1e-5)
    wrong = reference(model, paths, "digits", D.data_config(model))  # what one pass for all would give
    assert (out.logits["digits"] - wrong).abs().max() > 0.1


def test_features_come_from_the_same_pass_as_the_logits(tmp_path):
    model = demo_model()
    paths = [str(p) for p in fashion_files(tmp_path, 3)]
    groups = pass_groups(model, ["base", "shoes", "digits"])
    (batch,) = batches(paths, [Preparation.of(g) for g in groups], batch_size=8, workers=0)
    out = run_passes(model, groups, batch.images, features=True)
    with torch.inference_mode():
        x = batch.images[0]
        want = model.forward_features(x, ["shoes", "digits"])
        base = model.base.forward_head(model.base.forward_features(x), pre_logits=True)
    assert torch.allclose(out.features["shoes"], want["shoes"], atol=1e-6)
    assert torch.allclose(out.features["digits"], want["digits"], atol=1e-6)
    assert torch.allclose(out.features["base"], base, atol=1e-5)
    assert torch.allclose(model.tasks["shoes"].head(out.features["shoes"]), out.logits["shoes"], atol=1e-6)


def test_features_of_a_base_with_two_heads_are_refused(images):
    import timm

    from learnable_memory import MemoryViT

    torch.manual_seed(0)
    model = MemoryViT(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1, img_size=32,
                                        patch_size=8, num_classes=3).eval())
    groups = pass_groups(model, ["base"])
    assert run_passes(model, groups, [images]).logits["base"].shape == (3, 3)
    with pytest.raises(ValueError, match="several heads"):
        run_passes(model, groups, [images], features=True)


def test_unreadable_images_are_errors_and_the_batch_goes_on(tmp_path, monkeypatch):
    good = [str(p) for p in fashion_files(tmp_path, 2)]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good[0], "rb").read()[:100])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    paths = [good[0], str(truncated), str(tmp_path / "gone.png"), str(text), good[1]]
    prep = Preparation(D.model_transform(D.data_config(D.load_demo_base())), "L")
    (batch,) = batches(paths, [prep], batch_size=8, workers=0)
    assert batch.ok == [True, False, False, False, True] and batch.images[0].shape == (2, 1, 28, 28)
    assert batch.errors[0] is None and batch.errors[4] is None
    assert f"image {truncated} can not be read" in batch.errors[1]
    assert batch.errors[2] == f"image {tmp_path / 'gone.png'} not found"
    assert f"image {text} can not be read" in batch.errors[3]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 28x28 is then over twice the limit: a "bomb"
    _, error, _ = ImageFiles([good[0]], [prep])[0]
    assert "too large" in error


def test_tar_members_are_read_in_place(tmp_path):
    (path,) = fashion_files(tmp_path / "imgs", 1)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(path, arcname="a/x.png")
    img = read_image(f"{tmp_path}/s.tar/a/x.png", "L")
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(path)))
    with pytest.raises(ValueError, match="can not be read"):
        read_image(f"{tmp_path}/s.tar/a/missing.png", "L")


@pytest.mark.integration
def test_decoding_workers_give_the_same_batches(tmp_path):
    """``workers=2``: two DataLoader processes decode (files and ``.tar`` members, the shard opened here
    first); the batches are those of decoding here, in order."""
    model = demo_model()
    paths = [str(p) for p in fashion_files(tmp_path, 7)]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for p in paths[:4]:
            tar.add(p, arcname=f"m/{Path(p).name}")
    paths += [f"{tmp_path}/s.tar/m/{Path(p).name}" for p in paths[:4]]
    preps = [Preparation.of(g) for g in pass_groups(model, ["base"])]
    here = list(batches(paths, preps, batch_size=3, workers=0))
    there = list(batches(paths, preps, batch_size=3, workers=2))
    assert len(here) == len(there) == 4
    for a, b in zip(here, there, strict=True):
        assert torch.equal(a.images[0], b.images[0]) and a.ok == b.ok and all(a.ok)
    assert torch.equal(here[0].images[0][:2], here[2].images[0][1:])  # members 0 and 1 read as their files


def test_devices_dtypes_and_tasks_are_checked():
    assert check_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    for device, dtype, message in (("cpu", "float16", "for GPUs"), ("cpu", "int8", "choose one of"),
                                   ("nonsense", "float32", "--device")):
        with pytest.raises(ValueError, match=message):
            check_device(device, dtype)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no such device"):
            check_device("cuda", "float32")
    with pytest.raises(ValueError, match="unknown task"):
        resolve_outputs(demo_model(), ["shoes", "nope"])
    assert resolve_outputs(demo_model(), ["digits", "base", "digits"]) == ["digits", "base"]

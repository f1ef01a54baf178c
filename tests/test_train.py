"""The training and evaluation loops (accelerate, torchmetrics, warm-up + cosine)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnable_memory import wrap_model
from learnable_memory.train import count_trainable, evaluate, fit, make_optimizer, parameter_groups, warmup_cosine
from tests.helpers import IMG, make_vit


def _blobs(n: int = 256, k: int = 3, d: int = 8, seed: int = 0) -> TensorDataset:
    """Well separated Gaussian blobs: inputs ``[n, d]``, labels ``[n]``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    y = torch.randint(0, k, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, d, generator=g), y)


def test_warmup_cosine_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2)  # 1/10 of the peak at the first step
    assert lrs[9] == pytest.approx(2.0) and max(lrs) == pytest.approx(2.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[55] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] < 0.01


def test_make_optimizer():
    p = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(p, "sgd", lr=0.5), torch.optim.SGD)
    assert isinstance(make_optimizer(p, "adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(p, "lion")


def test_parameter_groups_give_memory_its_own_rate():
    model = wrap_model(make_vit(), n_mem=2, num_classes=3, task="t")
    groups = parameter_groups(model, lr=0.5, memory_lr_scale=4.0)
    assert [g["lr"] for g in groups] == [0.5, 2.0]
    assert groups[1]["params"] == [model.tasks["t"].memory]
    assert len(groups[0]["params"]) == 3  # class token, head weight, head bias
    # no memory tokens (head + class token): one group; a plain module: one group
    assert len(parameter_groups(wrap_model(make_vit(), n_mem=0, num_classes=3, task="t"), 0.5, 4.0)) == 1
    assert len(parameter_groups(nn.Linear(2, 2), 0.5, 4.0)) == 1


def test_fit_scales_only_the_memory_step():
    """One plain SGD step (no momentum): the memory moves ``memory_lr_scale`` times as far, the rest alike."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, IMG, IMG, generator=g), torch.randint(0, 3, (8,), generator=g))
    base = make_vit()
    deltas = []
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        model = wrap_model(base, n_mem=2, num_classes=3, task="t")
        task = model.tasks["t"]
        before = {k: v.clone() for k, v in task.state_dict().items()}
        fit(model, DataLoader(data, batch_size=8), steps=1, lr=0.1, momentum=0.0, memory_lr_scale=scale,
            progress=False)
        deltas.append({k: v - before[k] for k, v in task.state_dict().items()})
    one, ten = deltas
    assert one["memory"].abs().max() > 0
    torch.testing.assert_close(ten["memory"], 10 * one["memory"])
    for k in ("class_token", "head.weight", "head.bias"):
        torch.testing.assert_close(ten[k], one[k])
    with pytest.raises(ValueError, match="memory_lr_scale"):
        fit(model, DataLoader(data, batch_size=8), steps=1, memory_lr_scale=0.0, progress=False)


def test_fit_learns_and_validates_every_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    train, val = _blobs(256, seed=0), _blobs(128, seed=0)
    before = evaluate(model, DataLoader(val, batch_size=64))["accuracy"]
    result = fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=50),
                 epochs=3, lr=0.05, seed=0, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["step"] for r in result.history] == [8, 16, 24] and result.steps == 24
    assert result.val["accuracy"] > 0.95 > before
    assert result.history[-1]["val_accuracy"] == result.val["accuracy"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_fit_steps_span_epochs_and_log(capsys):
    model = nn.Linear(8, 3)
    lines = []
    result = fit(model, DataLoader(_blobs(64), batch_size=16), steps=10, lr=0.1, progress=False, log=lines.append)
    assert result.steps == 10 and len(result.history) == 3 and result.history[-1]["step"] == 10
    assert len(lines) == 3 and lines[-1].startswith("epoch 3  step 10/10")
    assert result.val == {}


def test_fit_trains_only_the_task_of_a_memory_model():
    base = make_vit()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = wrap_model(base, n_mem=2, num_classes=3, task="t")
    task = {k: v.clone() for k, v in model.tasks["t"].state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, IMG, IMG, generator=g), torch.randint(0, 3, (32,), generator=g))
    assert count_trainable(model) == 2 * 2 * 192 + 192 + 3 * 192 + 3
    result = fit(model, DataLoader(data, batch_size=8), steps=4, lr=0.1, progress=False, bf16=True)
    assert result.steps == 4 and math.isfinite(result.history[-1]["train_loss"])
    for k, v in base.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not base.training
    changed = [k for k, v in model.tasks["t"].state_dict().items() if not torch.equal(v, task[k])]
    assert sorted(changed) == ["class_token", "head.bias", "head.weight", "memory"]


def test_fit_rejects_bad_arguments():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    loader = DataLoader(_blobs(8, d=2), batch_size=4)
    with pytest.raises(ValueError, match=r"the model has no trainable parameters: load adapters with "
                                         r"load_adapters\(\.\.\., trainable=True\).* or call requires_grad_\(\)"):
        fit(frozen, loader, steps=1)
    with pytest.raises(ValueError, match="exactly one"):
        fit(nn.Linear(2, 2), loader, steps=1, epochs=1)
    with pytest.raises(ValueError, match=">= 1"):
        fit(nn.Linear(2, 2), loader, steps=0)


class _Fixed(nn.Module):
    """Predicts class ``x[:, 0]`` (an integer stored in the input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), 3).float() * 10


def test_evaluate_accuracy_and_confusion():
    preds = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    target = torch.tensor([0, 1, 1, 2, 2, 0, 1])
    data = TensorDataset(preds[:, None].float(), target)
    r = evaluate(_Fixed(), DataLoader(data, batch_size=3))
    assert r["n"] == 7 and r["accuracy"] == pytest.approx(5 / 7)
    expected = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(target.tolist(), preds.tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(r["confusion"], expected)
    with pytest.raises(ValueError, match="empty"):
        evaluate(_Fixed(), DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0).long())))


def test_fit_shows_no_progress_bar_off_a_terminal(capsys):
    """A log file or CI output (stderr not a terminal) gets the epoch lines only, not a bar per step."""
    fit(nn.Linear(8, 3), DataLoader(_blobs(64), batch_size=4), steps=16, lr=0.1, progress=True)
    assert capsys.readouterr().err == ""

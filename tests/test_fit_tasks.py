"""``fit`` over several tasks of a ``MemoryViT`` in one pass per batch: each task ends where it would have
alone (the exactness the sweep relies on), faults stay in their task, labels per task, validation and the
best state per task, resuming; and the single-task path gives the parameters of the loop it replaced."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnable_memory import TaskConfig, wrap_model
from learnable_memory.train import NonFiniteError, NonFiniteInputError, fit, make_optimizer
from learnable_memory.training import FitState
from tests.helpers import IMG, make_vit

STEPS = 50
TOL = 1e-5


def _data(n: int = 64, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, classes, (n,), generator=g))


def _loader(data: TensorDataset, batch: int = 8) -> DataLoader:
    return DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def _fit_before_tasks(model: nn.Module, loader: DataLoader, *, steps: int, lr: float, optimizer: str = "sgd",
                      momentum: float = 0.9, weight_decay: float = 0.0, memory_lr_scale: float = 1.0,
                      warmup: float = 0.05, clip: float | None = 1.0, seed: int = 0) -> None:
    """The parameter updates of ``fit`` as they were before it trained several tasks (a copy of that loop)."""
    memory, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel() > 0:
            (memory if name.rsplit(".", 1)[-1] == "memory" else other).append(p)
    groups = [g for g in ({"params": other, "lr": lr}, {"params": memory, "lr": lr * memory_lr_scale}) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    set_seed(seed)
    accelerator = Accelerator()
    opt = make_optimizer(groups, optimizer, lr, momentum, weight_decay)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    w = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / max(1, steps - w))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    step = 0
    model.train()
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if clip is not None:
                accelerator.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break


@pytest.mark.parametrize("kwargs", [dict(lr=0.3, memory_lr_scale=4.0), dict(lr=1e-2, optimizer="adamw", clip=None,
                                                                               weight_decay=0.05)])
def test_one_task_gives_the_parameters_of_the_loop_it_replaced(kwargs):
    data = _data()
    torch.manual_seed(0)
    model = wrap_model(make_vit(), n_mem=2, num_classes=3, task="t")
    old = copy.deepcopy(model)
    _fit_before_tasks(old, _loader(data), steps=12, **kwargs)
    fit(model, _loader(data), steps=12, seed=0, progress=False, **kwargs)
    for (name, p), q in zip(model.tasks["t"].named_parameters(), old.tasks["t"].parameters(), strict=True):
        assert torch.equal(p, q), name
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMG * IMG, 3))
    old = copy.deepcopy(plain)
    _fit_before_tasks(old, _loader(data), steps=12, **kwargs)
    fit(plain, _loader(data), steps=12, seed=0, progress=False, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), old.parameters(), strict=True))


def _many_tasks() -> nn.Module:
    """A frozen task ``p``, then trainable ``a`` (m=2), ``b`` (m=5), ``c`` (m=0) and ``e``, an extension of ``p``."""
    torch.manual_seed(0)
    model = wrap_model(make_vit(), n_mem=3, num_classes=3, task="p")
    for cfg in (TaskConfig("a", 2, 3), TaskConfig("b", 5, 4), TaskConfig("c", 0, 3),
                TaskConfig("e", 2, 3, mode="extension", depends_on=["p"])):
        model.add_task(cfg)
    for name in "abce":
        model.tasks[name].requires_grad_(True)
    return model


SETTINGS = {
    "a": dict(lr=0.3, memory_lr_scale=4.0, clip=0.5),
    "b": dict(lr=3e-3, optimizer="adamw", weight_decay=0.05, warmup=5),
    # unclipped at lr 0.1, "c" is chaotic: the 6e-7 of float noise of a wider pass grows 10-fold in 10 steps
    "c": dict(lr=0.1, clip=1.0, momentum=0.5),
    "e": dict(lr=1e-2, optimizer="adamw", clip=1.0, memory_lr_scale=0.5),
}


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
               if p.numel())


def test_tasks_trained_together_end_where_each_ends_alone():
    data = _data()
    init = _many_tasks()
    model = copy.deepcopy(init)
    start_p = copy.deepcopy(model.tasks["p"])
    result = fit(model, _loader(data), steps=STEPS, seed=0, progress=False, settings=SETTINGS)
    assert sorted(result.tasks) == list("abce") and result.steps == STEPS
    assert all(r.steps == STEPS and r.stopped is None for r in result.tasks.values())
    diffs = {}
    for name in "abce":
        alone = copy.deepcopy(init)
        fit(alone, _loader(data), steps=STEPS, seed=0, progress=False, tasks=[name], settings={name: SETTINGS[name]})
        moved = _max_diff(alone.tasks[name], init.tasks[name])
        diffs[name] = _max_diff(model.tasks[name], alone.tasks[name])
        assert moved > 1e-3 and diffs[name] <= TOL, (name, moved, diffs[name])
    print("max |together - alone| after", STEPS, "steps:", diffs)
    assert _max_diff(model.tasks["p"], start_p) == 0  # the frozen predecessor


def test_a_diverging_task_is_stopped_and_the_others_train_on():
    data = _data()
    init = _many_tasks()
    model = copy.deepcopy(init)
    # lr 1e6 alone makes the loss huge but finite (the features are layer-normed); with weight decay the
    # parameters grow 1e4-fold per step until they overflow
    settings = dict(SETTINGS, c=dict(lr=1e6, clip=None, weight_decay=0.01, warmup=0))
    lines = []
    result = fit(model, _loader(data), steps=STEPS, seed=0, progress=False, settings=settings, log=lines.append)
    bad = result.tasks["c"]
    assert bad.stopped is not None and bad.stopped.startswith("diverged at step") and bad.steps < STEPS
    assert any(line.startswith("task 'c' stopped: diverged at step") for line in lines)
    assert all(bool(torch.isfinite(p).all()) for p in model.tasks["c"].parameters())
    stopped_at = int(bad.stopped.split()[3].rstrip(":"))
    alone, kept = copy.deepcopy(init), {}  # c alone, its parameters after every step until it diverges

    def keep(state, _result):
        kept[state.step] = copy.deepcopy(alone.tasks["c"])

    with pytest.raises(NonFiniteError, match=f"training diverged at step {stopped_at}"):
        fit(alone, _loader(data), steps=STEPS, seed=0, progress=False, tasks=["c"], settings={"c": settings["c"]},
            checkpoint_every=1, on_checkpoint=keep)
    for p, q in zip(model.tasks["c"].parameters(), kept[stopped_at - 1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)  # values near 1e20, growing 1e4-fold a step
    for name in "abe":
        assert result.tasks[name].stopped is None and result.tasks[name].steps == STEPS
        alone = copy.deepcopy(init)
        fit(alone, _loader(data), steps=STEPS, seed=0, progress=False, tasks=[name], settings={name: settings[name]})
        assert _max_diff(model.tasks[name], alone.tasks[name]) <= TOL, name


def test_labels_per_task_and_ignored_labels():
    data = _data()
    x, y = data.tensors
    other = (y + 1) % 3
    init = _many_tasks()
    model = copy.deepcopy(init)
    pairs = TensorDataset(x, y, other)
    loader = DataLoader(pairs, batch_size=8, collate_fn=lambda b: (torch.stack([i[0] for i in b]), {
        "a": torch.stack([i[1] for i in b]), "c": torch.stack([i[2] for i in b])}))
    fit(model, loader, steps=8, seed=0, progress=False, tasks=["a", "c"])
    for name, labels in (("a", y), ("c", other)):
        alone = copy.deepcopy(init)
        fit(alone, DataLoader(TensorDataset(x, labels), batch_size=8), steps=8, seed=0, progress=False, tasks=[name])
        assert _max_diff(model.tasks[name], alone.tasks[name]) <= TOL, name
    # -100 leaves an image out: what it shows does not matter; a task with no label in a batch does not step
    ignored = y.clone()
    ignored[::2] = -100
    noise = x.clone()
    noise[::2] = torch.randn_like(x[::2])
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    fit(a, DataLoader(TensorDataset(x, ignored), batch_size=8), steps=4, seed=0, progress=False, tasks=["a"])
    fit(b, DataLoader(TensorDataset(noise, ignored), batch_size=8), steps=4, seed=0, progress=False, tasks=["a"])
    assert _max_diff(a.tasks["a"], b.tasks["a"]) <= 1e-6 and _max_diff(a.tasks["a"], init.tasks["a"]) > 0
    none = copy.deepcopy(init)
    result = fit(none, DataLoader(TensorDataset(x, torch.full_like(y, -100)), batch_size=8), steps=2, progress=False,
                 tasks=["a"])
    assert _max_diff(none.tasks["a"], init.tasks["a"]) == 0 and result.history[0]["train_loss"] == 0
    with pytest.raises(ValueError, match=r"the batch has no labels for task 'b' \(it has \['a', 'c'\]\)"):
        fit(copy.deepcopy(init), loader, steps=1, progress=False, tasks=["a", "b"])


def test_validation_per_task_with_the_best_state_restored():
    data, val = _data(), _data(32, seed=1)
    model = _many_tasks()
    kept = {}
    result = fit(model, _loader(data), DataLoader(val, batch_size=16), steps=12, val_every=4, seed=0, progress=False,
                 tasks=["a", "b"], settings={"b": dict(lr=10.0, clip=None)}, restore_best=True,
                 checkpoint_every=4, on_checkpoint=lambda s, r: kept.update({s.step: copy.deepcopy(model)}))
    for name in ("a", "b"):
        r = result.tasks[name]
        assert [row["step"] for row in r.history] == [4, 8, 12]
        accs = [row["val_accuracy"] for row in r.history]
        assert r.best_metric == max(accs) and r.best_step == 4 * (accs.index(max(accs)) + 1)
        if r.best_step < 12:
            assert _max_diff(model.tasks[name], kept[r.best_step].tasks[name]) == 0
    from learnable_memory.train import evaluate_tasks

    again = evaluate_tasks(model, DataLoader(val, batch_size=16), ["a", "b"])
    assert again["a"]["accuracy"] == result.tasks["a"].best_metric and again["a"]["n"] == 32


def test_what_a_shared_pass_refuses():
    model = _many_tasks()
    model.tasks["p"].requires_grad_(True)  # e extends p: e's gradient would reach p's memory
    with pytest.raises(ValueError, match=r"task 'e' extends trained task\(s\) \['p'\]"):
        fit(model, _loader(_data()), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\] for task 'a'"):
        fit(_many_tasks(), _loader(_data()), steps=1, progress=False, settings={"a": {"learning_rate": 1}})
    with pytest.raises(ValueError, match=r"settings name task\(s\) \['zz'\] that this fit does not train"):
        fit(_many_tasks(), _loader(_data()), steps=1, progress=False, settings={"zz": {}})


def test_trainable_tasks_need_not_be_active_and_frozen_ones_are_named():
    model = wrap_model(make_vit(), n_mem=2, num_classes=3, task="a")
    model.add_task(TaskConfig("b", 2, 3))
    model.tasks["a"].requires_grad_(True)
    model.tasks["b"].requires_grad_(False)
    model.set_task("b")  # before: "element 0 of tensors does not require grad"
    before_a, before_b = copy.deepcopy(model.tasks["a"]), copy.deepcopy(model.tasks["b"])
    fit(model, _loader(_data()), steps=2, progress=False)
    assert _max_diff(model.tasks["a"], before_a) > 0 and _max_diff(model.tasks["b"], before_b) == 0
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\] have no trainable parameters \(trainable tasks: \['a'\], "
                                         r"active task: 'b'\): pass tasks=\['a'\], or make them trainable with "
                                         r"load_adapters\(\.\.\., trainable=\['b'\]\)"):
        fit(model, _loader(_data()), steps=1, progress=False, tasks=["b"])
    model.tasks["b"].requires_grad_(True)  # several trainable tasks: before, only the active one trained
    before_a, before_b = copy.deepcopy(model.tasks["a"]), copy.deepcopy(model.tasks["b"])
    result = fit(model, _loader(_data()), steps=2, progress=False)
    assert sorted(result.tasks) == ["a", "b"]
    assert _max_diff(model.tasks["a"], before_a) > 0 and _max_diff(model.tasks["b"], before_b) > 0
    model.tasks["a"].requires_grad_(False)
    model.tasks["b"].requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters \(tasks \['a', 'b'\] are frozen\): load adapters "
                                         r"with load_adapters\(\.\.\., trainable=True\).*requires_grad_\(\)"):
        fit(model, _loader(_data()), steps=1, progress=False)


def test_nan_images_are_named_as_the_data_not_the_learning_rate():
    x, y = _data().tensors
    x = x.clone()
    x[13, 0, 0, 0] = float("nan")
    for tasks in (None, ["a", "b"]):
        model = _many_tasks() if tasks else wrap_model(make_vit(), n_mem=2, num_classes=3)
        with pytest.raises(NonFiniteInputError, match=r"the training images of batch 2 \(step 2\) hold NaN or Inf: "
                                                      "the data is broken, not the training"):
            fit(model, DataLoader(TensorDataset(x, y), batch_size=8), steps=3, progress=False, tasks=tasks)


def test_gradient_accumulation_and_bf16_over_several_tasks():
    data = _data()
    one = _many_tasks()
    two = copy.deepcopy(one)
    fit(one, _loader(data, batch=8), steps=6, seed=0, progress=False, tasks=["a", "b"])
    result = fit(two, _loader(data, batch=4), steps=6, seed=0, progress=False, tasks=["a", "b"],
                 accelerator=Accelerator(gradient_accumulation_steps=2))
    assert result.steps == 6 and all(r.steps == 6 for r in result.tasks.values())
    for name in ("a", "b"):
        assert _max_diff(one.tasks[name], two.tasks[name]) <= TOL, name
    bf16 = _many_tasks()
    result = fit(bf16, _loader(data), steps=3, bf16=True, progress=False)
    assert all(math.isfinite(r.history[-1]["train_loss"]) for r in result.tasks.values())


def test_no_activation_of_the_original_tokens_is_kept_for_backward():
    model, shapes = _many_tasks(), []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    tokens = 1 + (IMG // 8) ** 2  # class token + patches of the base
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fit(model, _loader(_data()), steps=1, progress=False)
    assert shapes and not [s for s in shapes if s[:2] == (8, tokens)]  # [B, N, ...]: norm, MLP, attention inputs
    # what is kept of the original tokens is their keys and values per head, which the new tokens attend to
    assert {s for s in shapes if tokens in s} == {(8 * 3, tokens, 64), (8 * 3, 64, tokens), (8, 3, 5, tokens)}


def test_resume_continues_the_optimizer_and_the_schedule():
    x, y = _data(80).tensors  # 10 batches: the checkpoint at step 10 ends an epoch
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    init = _many_tasks()
    straight, states = copy.deepcopy(init), {}

    def keep(state, _result):
        states[state.step] = (state, copy.deepcopy(straight))

    settings = {"a": dict(lr=0.3), "b": dict(optimizer="adamw", lr=3e-3)}
    fit(straight, loader, steps=20, progress=False, tasks=["a", "b"], settings=settings, checkpoint_every=10,
        on_checkpoint=keep)
    state, resumed = states[10]
    result = fit(resumed, loader, steps=10, progress=False, tasks=["a", "b"], settings=settings, resume=state)
    assert result.state.step == 20 and result.steps == 10
    for name in ("a", "b"):
        assert _max_diff(straight.tasks[name], resumed.tasks[name]) == 0, name
    fresh = copy.deepcopy(states[10][1])
    fit(fresh, loader, steps=10, progress=False, tasks=["a", "b"], settings=settings)
    assert _max_diff(straight.tasks["b"], fresh.tasks["b"]) > 1e-4  # without the state it is another run
    lines = []
    fit(copy.deepcopy(init), loader, steps=1, progress=False, tasks=["a"], settings={"a": dict(optimizer="adamw")},
        resume=state, log=lines.append)
    assert lines[0] == "a: the saved state is for sgd, not adamw: the optimizer starts afresh"


def _checkpoints(model: nn.Module, steps: int, **kwargs) -> dict:
    """Fit ``model`` for ``steps`` on a shuffled loader (batch 8 of 40: 5 per epoch), keeping every step's
    state, saved and loaded as ``train`` does (``torch.load(weights_only=True)``), with a copy of the model."""
    import io

    states = {}

    def keep(state, _result):
        buf = io.BytesIO()
        torch.save(state.as_dict(), buf)
        buf.seek(0)
        states[state.step] = (FitState.from_dict(torch.load(buf, weights_only=True)), copy.deepcopy(model))

    fit(model, _loader(_data(40)), steps=steps, seed=0, progress=False, checkpoint_every=1, on_checkpoint=keep,
        **kwargs)
    return states


def _dropout_model() -> nn.Module:
    """A plain model that draws random numbers in every forward (what the saved random states are for)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(3 * IMG * IMG, 3))


RESUMED = {
    "two tasks": dict(tasks=["a", "b"], settings={"a": dict(lr=0.3), "b": dict(optimizer="adamw", lr=3e-3)}),
    "one task": dict(tasks=["a"], lr=0.3), "plain model": dict(lr=0.3),
    # the best validation before the checkpoint is restored at the end; a task stopped before it stays stopped
    "validated": dict(tasks=["a", "b", "c"], settings={"a": dict(lr=0.3), "b": dict(lr=3.0),
                                                       "c": dict(lr=1e30, clip=None)},
                      val_loader=DataLoader(_data(16, seed=1), batch_size=8), val_every=2, restore_best=True),
}


@pytest.mark.parametrize("what", list(RESUMED))
def test_a_resumed_fit_continues_the_data_order_and_random_state_exactly(what):
    """N steps in one fit against k steps, then a fresh loader built the same way and fit(resume=state):
    k inside the first epoch, at its end, and inside the second (every resumed run crosses an epoch)."""
    kwargs = RESUMED[what]
    init = _dropout_model() if what == "plain model" else _many_tasks()
    straight = copy.deepcopy(init)
    states = _checkpoints(straight, 13, **kwargs)
    for k in (3, 5, 7):
        state, resumed = states[k]
        assert (state.epoch, state.batches, state.epoch_batches) == (1 + (k - 1) // 5, (k - 1) % 5 + 1, 5)
        result = fit(resumed, _loader(_data(40)), steps=13 - k, seed=0, progress=False, resume=state, **kwargs)
        assert result.state.step == 13
        for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p, q), (what, k, name)
        if what == "validated":
            assert [(t.best_step, t.stopped is not None) for t in result.tasks.values()] == [(2, False), (4, False),
                                                                                           (None, True)]
        if k == 3 and "val_loader" not in kwargs:  # a fit of k steps ends at the longer fit's step k (which
            # validates at its end: an iteration of the validation loader draws its seed from torch's state)
            alone = copy.deepcopy(init)
            end = fit(alone, _loader(_data(40)), steps=3, seed=0, progress=False, **kwargs).state
            assert (end.epoch, end.batches) == (1, 3)
            assert all(torch.equal(a, b) for a, b in zip(end.epoch_rng["generators"], state.epoch_rng["generators"],
                                                         strict=True))
            assert torch.equal(end.epoch_rng["torch"], state.epoch_rng["torch"])
            assert torch.equal(end.rng["torch"], state.rng["torch"])
            assert torch.equal(end.rng["python"]["state"], state.rng["python"]["state"])


def test_a_state_saved_without_a_data_position_begins_a_fresh_epoch():
    settings = {"a": dict(lr=0.3)}
    states = _checkpoints(_many_tasks(), 13, tasks=["a"], settings=settings)
    state, model = states[3]
    old = FitState.from_dict({k: v for k, v in state.as_dict().items()  # as saved before the position was kept
                              if k in ("step", "total", "optimizers", "optimizer_names")})
    assert (old.epoch, old.batches, old.rng) == (0, 0, {})
    merged = FitState.merged([state.of_task("a"), dataclasses.replace(state.of_task("a"), optimizers={"b": {}},
                                                                      optimizer_names={"b": "sgd"})])
    assert sorted(merged.optimizers) == ["a", "b"] and merged.epoch_rng is state.epoch_rng
    with pytest.raises(ValueError, match=r"at different steps \[3, 4\]"):
        FitState.merged([state, dataclasses.replace(state, step=4)])
    exact, fresh = copy.deepcopy(model), copy.deepcopy(model)
    fit(exact, _loader(_data(40)), steps=4, progress=False, tasks=["a"], settings=settings, resume=state)
    result = fit(fresh, _loader(_data(40)), steps=4, progress=False, tasks=["a"], settings=settings, resume=old)
    assert result.state.step == 7 and result.state.epoch == 1 and result.state.batches == 4
    assert _max_diff(exact.tasks["a"], fresh.tasks["a"]) > 1e-4  # other batches
    lines = []
    fit(copy.deepcopy(model), _loader(_data(48)), steps=1, progress=False, tasks=["a"], settings=settings,
        resume=state, log=lines.append)
    assert lines[0] == ("the saved data position is for 5 batches per epoch and 1 generator(s), this loader has 6 "
                        "and 1: a fresh epoch begins")


LAUNCHED = '''
import sys, torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from learnable_memory.train import fit
from tests.test_fit_tasks import SETTINGS, _data, _many_tasks

model = _many_tasks()
result = fit(model, DataLoader(_data(), batch_size=4), steps=5, seed=0, progress=False, tasks=["a", "b"],
             settings={"a": SETTINGS["a"], "b": SETTINGS["b"]}, accelerator=Accelerator(cpu=True))
if result.tasks["a"].steps == 5 and int(__import__("os").environ["RANK"]) == 0:
    torch.save({n: model.tasks[n].state_dict() for n in "ab"}, sys.argv[1])
'''


def _launch(tmp_path, script: str, saved) -> None:
    """Run ``script`` (its argv[1]: ``saved``) under ``accelerate launch`` with two CPU processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "launched.py").write_text(script)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(tmp_path / "launched.py"), str(saved)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.integration
def test_several_tasks_under_accelerate_launch_reduce_each_task(tmp_path):
    """Two processes of batch 4 take the steps one process of batch 8 takes: every task's gradient is averaged."""
    saved = tmp_path / "tasks.pt"
    _launch(tmp_path, LAUNCHED, saved)
    launched = torch.load(saved, weights_only=True)
    model = _many_tasks()
    fit(model, DataLoader(_data(), batch_size=8), steps=5, seed=0, progress=False, tasks=["a", "b"],
        settings={"a": SETTINGS["a"], "b": SETTINGS["b"]})
    for name in "ab":
        for key, value in model.tasks[name].state_dict().items():
            torch.testing.assert_close(launched[name][key], value, rtol=0, atol=TOL)


RESUMED_LAUNCHED = '''
import copy, sys, torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from learnable_memory.train import fit
from tests.test_fit_tasks import _data, _loader, _many_tasks

accelerator = Accelerator(cpu=True)
kwargs = dict(tasks=["a", "b"], settings={"a": dict(lr=0.3), "b": dict(optimizer="adamw", lr=3e-3)}, progress=False,
              accelerator=accelerator)
straight, states = _many_tasks(), {}
fit(straight, _loader(_data(40), batch=4), steps=8, checkpoint_every=3, seed=0,
    on_checkpoint=lambda state, _: states.setdefault(state.step, (state, copy.deepcopy(straight))), **kwargs)
state, resumed = states[3]
state = broadcast_object_list([state])[0]  # every process reads the checkpoint of process 0
result = fit(resumed, _loader(_data(40), batch=4), steps=5, resume=state, **kwargs)
same = [torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True)]
if accelerator.is_main_process:
    open(sys.argv[1], "w").write(f"{state.epoch} {state.batches} {state.epoch_batches} {all(same)}")
'''


@pytest.mark.integration
def test_a_fit_resumed_under_accelerate_launch_continues_exactly(tmp_path):
    """Two processes (5 batches of 4 each per epoch): resumed from step 3 of 8 with the checkpoint of process 0,
    every process continues its own shard of the data order."""
    saved = tmp_path / "same.txt"
    _launch(tmp_path, RESUMED_LAUNCHED, saved)
    assert saved.read_text() == "1 3 5 True"

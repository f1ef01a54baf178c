"""Pretrain a small base model and save it in timm's ``local-dir`` format.

The model is a timm ``VisionTransformer`` (28x28 grayscale, patch 7, width 128, depth 4, 4 heads), trained with
AdamW, batch 128, a linear warm-up, then cosine decay. Two sources:

- ``--source fashion-mnist`` (default): Fashion-MNIST classes 0-4 (30,000 images), 800 steps, 30% warm-up to
  1e-3. The other five classes are left for fine-tuning. Writes ``learnable_memory/assets/fmnist_vit_base``.
- ``--source glyphs``: the 1,188 character classes of ``glyphs-pretrain`` (``learnable_memory.glyphs``; 200
  rendered images per class, 10 per class held out for test), 10,000 steps, 5% warm-up to 1e-3, weight decay
  on the weight matrices only. A many-class source needs many views per class: 10,000 steps of 128 show each
  class about 1,100 times. The held-out scripts (Cyrillic,
  Hebrew) are left for fine-tuning. Writes ``learnable_memory/assets/glyph_vit_base``. This run is
  resumable: it renders its images once into ``--checkpoint-dir`` and saves its state there every
  ``--checkpoint-every`` steps; the same command continues from the last checkpoint (the batches depend on the
  step only, so an interrupted run ends with the same weights as one that was not).

Output: ``<out>/config.json`` (architecture, model args, mean/std, input size, interpolation, label names,
and a ``training`` record with the test accuracy, the time and this command) and ``<out>/model.safetensors``.
Load it back with ``learnable_memory.data.load_demo_base(out)`` (or by name, ``load_demo_base("glyphs")``) or
``timm.create_model("local-dir:<out>", pretrained=True)``.

    python benchmarks/pretrain_base.py                      # writes learnable_memory/assets/fmnist_vit_base
    python benchmarks/pretrain_base.py --source glyphs      # writes learnable_memory/assets/glyph_vit_base
    python benchmarks/pretrain_base.py --steps 20 --out /tmp/base   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf
from torch.utils.data import DataLoader

from learnable_memory import glyphs
from learnable_memory.data import (
    DEMO_BASE_DIR,
    GLYPH_BASE_DIR,
    data_config,
    load_dataset,
    load_fashion_mnist,
)
from learnable_memory.train import evaluate, fit, warmup_cosine

ARCH = "vit_tiny_patch16_224"  # a registered ViT whose kwargs are overridden below
MODEL_ARGS = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=4, num_heads=4)
CLASSES = "0-4"
DEFAULTS = {"fashion-mnist": dict(steps=800, lr=1e-3, warmup=0.3, out=DEMO_BASE_DIR),
            "glyphs": dict(steps=10000, lr=1e-3, warmup=0.05, out=GLYPH_BASE_DIR)}
WEIGHT_DECAY = 0.05


def build_model(mean: float, std: float, num_classes: int = 5) -> torch.nn.Module:
    """A freshly initialised base with its data's preprocessing in its ``pretrained_cfg``."""
    overlay = dict(input_size=(1, 28, 28), mean=(mean,), std=(std,), interpolation="bilinear", crop_pct=1.0,
                   hf_hub_id=None, url=None, tag=None, license=None)
    return timm.create_model(ARCH, pretrained=False, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                             **MODEL_ARGS)


def pretrain_fashion_mnist(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, list[str]]:
    """800 AdamW steps on Fashion-MNIST classes 0-4 with :func:`learnable_memory.train.fit`."""
    torch.manual_seed(args.seed)
    images, labels = load_fashion_mnist("train")
    pixels = images[labels < 5].astype("float64") / 255.0
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    model = build_model(mean, std)
    cfg = data_config(model)
    train = load_dataset("fashion-mnist", "train", cfg, classes=CLASSES)
    test = load_dataset("fashion-mnist", "test", cfg, classes=CLASSES)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=g, drop_last=True)
    start = time.perf_counter()
    fit(model, train_loader, steps=args.steps, lr=args.lr, optimizer="adamw", weight_decay=WEIGHT_DECAY,
        warmup=args.warmup, clip=1.0, seed=args.seed, desc="pretrain")
    seconds = time.perf_counter() - start
    result = evaluate(model, DataLoader(test, batch_size=256))
    print(f"test accuracy on Fashion-MNIST classes {CLASSES}: {result['accuracy']:.4f} "
          f"({result['n']} images, {seconds:.0f} s of training)")
    training = dict(dataset="fashion-mnist", classes=CLASSES, train_images=len(train), test_accuracy=result["accuracy"],
                    test_images=result["n"], train_seconds=round(seconds))
    return model, training, list(train.classes)


# ----- glyphs: rendered once, trained resumably -----
def glyph_images(chars: tuple[str, ...], per_class: int, split: str, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """``glyphs.render_set`` of ``chars``, kept in ``cache`` (an ``.npy`` file) so a resumed run skips it."""
    labels = np.repeat(np.arange(len(chars), dtype=np.int64), per_class)
    if cache.is_file():
        images = np.load(cache)
        first, _ = glyphs.render_set(chars[:1], min(per_class, 2), split)  # the cache is this generator's
        if images.shape == (len(labels), glyphs.SIZE, glyphs.SIZE) and np.array_equal(images[:len(first)], first):
            return images, labels
    images, _ = glyphs.render_set(chars, per_class, split)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, images)
    os.replace(tmp, cache)
    return images, labels


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The images of optimizer step ``step``: a permutation per epoch, seeded by (seed, epoch)."""
    epoch, k = divmod(step, n // batch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch:(k + 1) * batch]


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1024]).argmax(-1) == y[i:i + 1024]).sum()) for i in range(0, len(x), 1024))
    return correct / len(x)


def pretrain_glyphs(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, list[str]]:
    """AdamW on ``glyphs-pretrain`` with a checkpoint every ``--checkpoint-every`` steps, resumed when present."""
    ckpt = args.checkpoint_dir
    ckpt.mkdir(parents=True, exist_ok=True)
    chars = glyphs.class_sets()["pretrain"][:args.max_classes]
    per_class = args.per_class or glyphs.IMAGES_PER_CLASS["pretrain"]["train"]
    per_test = glyphs.IMAGES_PER_CLASS["pretrain"]["test"]
    start = time.perf_counter()
    images, labels = glyph_images(chars, per_class, "train", ckpt / f"train_{len(chars)}x{per_class}.npy")
    test_images, test_labels = glyph_images(chars, per_test, "test", ckpt / f"test_{len(chars)}x{per_test}.npy")
    render_seconds = time.perf_counter() - start
    print(f"{len(chars)} classes, {len(images)} training and {len(test_images)} test images "
          f"({render_seconds:.0f} s to render or load)", flush=True)

    pixels = images.astype(np.float64) / 255.0
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    del pixels
    torch.manual_seed(args.seed)
    model = build_model(mean, std, num_classes=len(chars))
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    x_test = (torch.from_numpy(test_images).float().div(255).unsqueeze(1) - mean) / std
    y_test = torch.from_numpy(test_labels)
    params = dict(model.named_parameters())  # weight decay on the weight matrices only
    decay = {n for n, p in params.items() if p.ndim > 1 and "pos_embed" not in n and "token" not in n}
    opt = torch.optim.AdamW([{"params": [params[n] for n in sorted(decay)], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}],
                            lr=args.lr)
    sched = warmup_cosine(opt, args.steps, max(1, round(args.warmup * args.steps)))
    state_file = ckpt / "state.pt"
    step, wall, cpu, log = 0, 0.0, 0.0, []
    if state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state["settings"] != _settings(args, len(chars), per_class):
            raise ValueError(f"{state_file} was written with other settings ({state['settings']}); "
                             "remove it or use another --checkpoint-dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, wall, cpu, log = state["step"], state["wall_seconds"], state["cpu_seconds"], state["log"]
        print(f"resumed from {state_file} at step {step}", flush=True)

    t_wall, t_cpu, loss_sum = time.perf_counter(), time.process_time(), 0.0
    model.train()
    while step < args.steps:
        idx = batch_indices(step, len(x_all), args.batch_size, args.seed)
        x = (x_all[idx].float().div(255).unsqueeze(1) - mean) / std
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        loss_sum += float(loss.detach())
        if step % args.checkpoint_every == 0 or step == args.steps or step == args.stop_after:
            wall += time.perf_counter() - t_wall
            cpu += time.process_time() - t_cpu
            row = dict(step=step, loss=loss_sum / (step - (log[-1]["step"] if log else 0)), wall_seconds=round(wall))
            if step % (4 * args.checkpoint_every) == 0 or step == args.steps:
                row["test_accuracy"] = round(accuracy(model, x_test, y_test), 4)
                model.train()
            log.append(row)
            print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            save_state(state_file, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                        scheduler=sched.state_dict(), step=step, wall_seconds=wall, cpu_seconds=cpu,
                                        log=log, settings=_settings(args, len(chars), per_class)))
            t_wall, t_cpu, loss_sum = time.perf_counter(), time.process_time(), 0.0
            if step == args.stop_after and step < args.steps:
                raise SystemExit(f"stopped after step {step} (--stop-after); run the same command to resume")

    acc = accuracy(model, x_test, y_test)
    print(f"test accuracy on the {len(chars)} glyph classes: {acc:.4f} ({len(x_test)} images, {wall:.0f} s of "
          f"training wall time, {cpu:.0f} s CPU time)", flush=True)
    training = dict(dataset="glyphs-pretrain", classes=len(chars), train_images=len(x_all), images_per_class=per_class,
                    test_accuracy=acc, test_images=len(x_test), train_seconds=round(wall), cpu_seconds=round(cpu),
                    render_seconds=round(render_seconds), threads=torch.get_num_threads(), log=log)
    return model, training, list(chars)


def _settings(args: argparse.Namespace, classes: int, per_class: int) -> dict:
    return dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
                classes=classes, per_class=per_class)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=list(DEFAULTS), default="fashion-mnist")
    p.add_argument("--out", type=Path, help="output directory (default: the shipped base of --source)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=float, help="warm-up fraction of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    g = p.add_argument_group("glyphs only")
    g.add_argument("--checkpoint-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "pretrain_glyphs",
                   help="rendered images and the resumable state (default: %(default)s)")
    g.add_argument("--checkpoint-every", type=int, default=250)
    g.add_argument("--per-class", type=int, help="training images per class (default: glyphs.IMAGES_PER_CLASS)")
    g.add_argument("--max-classes", type=int, help="the first N classes only (smoke runs)")
    g.add_argument("--stop-after", type=int, help="stop after this step, as an interruption would (tests)")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.source].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = pretrain_glyphs if args.source == "glyphs" else pretrain_fashion_mnist
    model, training, names = run(args)
    command = "python benchmarks/pretrain_base.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    training.update(steps=args.steps, batch_size=args.batch_size, optimizer="adamw", lr=args.lr,
                    weight_decay=WEIGHT_DECAY, schedule=f"{args.warmup:.0%} linear warm-up, cosine decay",
                    seed=args.seed, command=command.strip())
    training["test_accuracy"] = round(training["test_accuracy"], 4)
    save_for_hf(model, str(args.out), model_config=dict(label_names=names, training=training),
                safe_serialization=True, data_config=data_config(model))
    print(f"saved {args.out}/config.json and {args.out}/model.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pretrain the small demo base model and save it in timm's ``local-dir`` format.

The model is a timm ``VisionTransformer`` (28x28 grayscale, patch 7, width 128, depth 4, 4 heads)
trained on Fashion-MNIST classes 0-4 (30,000 images) with AdamW, batch 128, a one-cycle-like schedule
(30% linear warm-up to 1e-3, then cosine decay). The other five classes are left for fine-tuning.

Output: ``<out>/config.json`` (architecture, model args, mean/std, input size, interpolation, label
names, and a ``training`` record with the test accuracy and this command) and ``<out>/model.safetensors``.
Load it back with ``learnable_memory.data.load_demo_base(out)`` or
``timm.create_model("local-dir:<out>", pretrained=True)``.

    python benchmarks/pretrain_base.py                      # writes learnable_memory/assets/fmnist_vit_base
    python benchmarks/pretrain_base.py --steps 20 --out /tmp/base   # smoke run
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from torch.utils.data import DataLoader

from learnable_memory.data import DEMO_BASE_DIR, data_config, load_dataset, load_fashion_mnist
from learnable_memory.train import evaluate, fit

ARCH = "vit_tiny_patch16_224"  # a registered ViT whose kwargs are overridden below
MODEL_ARGS = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=4, num_heads=4, num_classes=5)
CLASSES = "0-4"


def build_model(mean: float, std: float) -> torch.nn.Module:
    """A freshly initialised base with the Fashion-MNIST preprocessing in its ``pretrained_cfg``."""
    overlay = dict(input_size=(1, 28, 28), mean=(mean,), std=(std,), interpolation="bilinear", crop_pct=1.0,
                   hf_hub_id=None, url=None, tag=None, license=None)
    return timm.create_model(ARCH, pretrained=False, pretrained_cfg_overlay=overlay, **MODEL_ARGS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEMO_BASE_DIR, help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

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
    test_loader = DataLoader(test, batch_size=256)

    start = time.perf_counter()
    fit(model, train_loader, steps=args.steps, lr=args.lr, optimizer="adamw", weight_decay=0.05, warmup=0.3,
        clip=1.0, seed=args.seed, desc="pretrain")
    seconds = time.perf_counter() - start
    result = evaluate(model, test_loader)
    print(f"test accuracy on Fashion-MNIST classes {CLASSES}: {result['accuracy']:.4f} "
          f"({result['n']} images, {seconds:.0f} s of training)")

    command = "python benchmarks/pretrain_base.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    training = dict(dataset="fashion-mnist", classes=CLASSES, train_images=len(train), steps=args.steps,
                    batch_size=args.batch_size, optimizer="adamw", lr=args.lr, weight_decay=0.05,
                    schedule="30% linear warm-up, cosine decay", seed=args.seed,
                    test_accuracy=round(result["accuracy"], 4), test_images=result["n"], command=command.strip())
    save_for_hf(model, str(args.out), model_config=dict(label_names=list(train.classes), training=training),
                safe_serialization=True, data_config=cfg)
    print(f"saved {args.out}/config.json and {args.out}/model.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch prediction of an image folder: one job over every task against one job per task, decoding and
writing included; decoding workers; the Ray engine against the local one.

Data: Fashion-MNIST test images written as files (PNG and JPEG alternately) at 224 px, so every job
reads, decodes, resizes and normalises real files with the backbone's timm transform. Model:
ViT-S/16 at 224 px with random weights (``common.build_vit``) and K non-destructive tasks of m=10
memory tokens. A job is ``learnable_memory.predict_dataset`` into a fresh Parquet folder.

- ``one_job``: ONE job over the K tasks: each image decoded once, one ``forward_all`` per batch.
- ``per_task``: K jobs of one task each (what one-model-per-task tools do): every image decoded and
  passed K times. The ratio is the K jobs' total time over the one job's, per repetition; the two
  alternate within a repetition, so a drifting machine load hits both alike.
- Workers: the one job with 0, 1 and 2 ``DataLoader`` decoding processes (images/s).
- Decode share: time reading and preparing images over that plus time in the model (the summary's
  ``decode_share``; with workers, decoding overlaps the model and this is their CPU time).
- Ray: the same one job on Ray Data (``--engine ray``, a local cluster of this machine's cores, one
  model actor), timed twice: the first includes the cluster's start and the actor's imports.

    python benchmarks/batch_predict.py            # 2,000 images, ViT-S/16, K=8
    python benchmarks/batch_predict.py --quick    # 48 images at 32 px, a depth-2 ViT-Tiny (smoke test)
    python benchmarks/batch_predict.py --device cuda --dtype bfloat16 --batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
from PIL import Image

from learnable_memory import MemoryViT, TaskConfig, predict_dataset
from learnable_memory import data as D

TARGET = {"k": 8, "min_ratio": 5.0}
M = 10


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` Fashion-MNIST test images as ``size`` px files, PNG and JPEG alternately."""
    images, _ = D.load_fashion_mnist("test")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(images[i % len(images)], "L").resize((size, size), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def build_model(name: str, quick: bool, k: int) -> MemoryViT:
    model = MemoryViT(common.build_vit(name, quick))
    for i in range(k):
        model.add_task(TaskConfig(name=f"t{i}", n_mem=M, num_classes=common.NUM_CLASSES))
    return model.eval()


def job(model: MemoryViT, images: Path, tasks: list[str], scratch: Path, args, **kwargs) -> dict:
    """One job into a fresh folder: its wall time and its summary."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    start = time.perf_counter()
    summary = predict_dataset(model, images, out, tasks=tasks, batch_size=args.batch_size, device=args.device,
                              dtype=args.dtype, progress=False, **{"workers": args.workers, **kwargs})
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": summary.images, "images_per_s": summary.images / seconds,
            "decode_s": summary.decode_s, "model_s": summary.model_s, "decode_share": summary.decode_share}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="48 images at 32 px, a depth-2 ViT-Tiny, no workers in "
                   "the comparison, no Ray")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--k", type=int, default=8, help="tasks")
    p.add_argument("--reps", type=int, default=2, help="repetitions of one job against the K jobs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="decoding processes of the one-job/per-task comparison")
    p.add_argument("--worker-counts", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None, help="time the Ray engine "
                   "(default: on, off with --quick)")
    args = p.parse_args(argv)
    size = 224
    if args.quick:
        args.model, args.images, args.reps, args.workers, size = common.QUICK_MODEL[0], 48, 1, 0, 32
    use_ray = (not args.quick) if args.ray is None else args.ray
    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average']}", flush=True)
    started = time.perf_counter()
    model = build_model(args.model, args.quick, args.k)
    tasks = model.task_names
    result: dict = {"command": common.command_line(), "machine": machine,
                    "settings": {"model": args.model, "image_px": size, "images": args.images, "k": args.k, "m": M,
                                 "reps": args.reps, "batch_size": args.batch_size, "workers": args.workers,
                                 "device": args.device, "dtype": args.dtype}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        folder = scratch / "images"
        write_images(folder, args.images, size)
        small = scratch / "warm"
        write_images(small, 2 * args.batch_size, size)
        job(model, small, tasks, scratch, args)  # warm-up: allocator, kernels, the transform's first calls
        reps = []
        for r in range(args.reps):
            one = job(model, folder, tasks, scratch, args)
            per = [job(model, folder, [t], scratch, args) for t in tasks]
            reps.append({"one_job": one, "per_task": per, "ratio": sum(j["seconds"] for j in per) / one["seconds"]})
            print(f"  rep {r + 1}: one job {one['seconds']:.1f} s ({one['images_per_s']:.1f} images/s, "
                  f"{one['decode_share']:.0%} decoding); {len(per)} jobs of one task "
                  f"{sum(j['seconds'] for j in per):.1f} s: {reps[-1]['ratio']:.2f}x", flush=True)
        result["jobs"] = reps
        result["workers"] = []
        for w in args.worker_counts:
            row = {"workers": w, **job(model, folder, tasks, scratch, args, workers=w)}
            result["workers"].append(row)
            print(f"  workers={w}: {row['images_per_s']:.1f} images/s, {row['decode_share']:.0%} decoding", flush=True)
        result["ray"] = []
        if use_ray:
            import ray

            ray.init(num_cpus=machine["cores"], include_dashboard=False, log_to_driver=False)
            for attempt in ("first (cluster start, actor imports)", "second"):
                row = {"run": attempt, **job(model, folder, tasks, scratch, args, engine="ray")}
                result["ray"].append(row)
                print(f"  ray, {attempt}: {row['seconds']:.1f} s, {row['images_per_s']:.1f} images/s", flush=True)
            ray.shutdown()
    ratios = [r["ratio"] for r in reps]
    stat = common.summary(ratios)
    result["targets"] = [common.target_row(f"K={args.k}: {args.k} one-task jobs / one job over all tasks (time)",
                                           stat, ">=", TARGET["min_ratio"])] if args.k == TARGET["k"] else []
    result["seconds"] = time.perf_counter() - started
    result["load_average_end"] = common.load_average()
    common.write_json(args.out / "batch_predict.json", result)
    plot(result, args.out / "batch_predict.png")
    rows = [["one job, all tasks", args.workers, f"{reps[-1]['one_job']['images_per_s']:.1f}",
             f"{reps[-1]['one_job']['decode_share']:.0%}"]]
    rows += [[f"one-task job ({t})", args.workers, f"{j['images_per_s']:.1f}", f"{j['decode_share']:.0%}"]
             for t, j in zip(tasks, reps[-1]["per_task"], strict=True)][:2]
    rows += [["one job, all tasks", w["workers"], f"{w['images_per_s']:.1f}", f"{w['decode_share']:.0%}"]
             for w in result["workers"]]
    rows += [[f"ray, {r['run']}", "-", f"{r['images_per_s']:.1f}", "-"] for r in result["ray"]]
    print()
    print(common.format_table(["job", "workers", "images/s", "decoding"], rows))
    print(f"\nratio per repetition: {', '.join(f'{r:.2f}x' for r in ratios)}")
    if result["targets"]:
        print()
        common.print_targets(result["targets"])
    print(f"\nwrote {args.out / 'batch_predict.json'} and {args.out / 'batch_predict.png'} in "
          f"{result['seconds']:.0f} s (load average at the end {result['load_average_end']})")
    return 0


def plot(result: dict, path: Path) -> None:
    """images/s of every configuration (task-images/s would multiply the one job's by K)."""
    fig, (ax,) = common.new_figure(width=8.0)
    last = result["jobs"][-1]
    names = ["one job\n(all tasks)", "one-task job\n(mean)"]
    values = [last["one_job"]["images_per_s"], sum(j["images_per_s"] for j in last["per_task"]) / len(last["per_task"])]
    names += [f"workers={w['workers']}" for w in result["workers"]]
    values += [w["images_per_s"] for w in result["workers"]]
    names += [f"ray {r['run'].split()[0]}" for r in result["ray"]]
    values += [r["images_per_s"] for r in result["ray"]]
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), names, fontsize=8)
    ax.set_ylabel("images/s")
    k = result["settings"]["k"]
    ax.set_title(f"{result['settings']['model']}, K={k}: one job labels every image with {k} tasks")
    common.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())

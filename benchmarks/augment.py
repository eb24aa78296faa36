"""Augmentation throughput (issue 13): the PIL path (common.train_transform, one image at a time in
DataLoader workers) against common.BatchedAugment on whole uint8 batches, on the CPU and, where
CUDA is available, on the GPU. Views per second, one view per image (SimCLR needs two per image).

    python benchmarks/augment.py                      # 4,096 generated 32x32 uint8 images
    python benchmarks/augment.py --data_dir DATA      # an image folder (DATA/train/<class>/*.png)
    python benchmarks/augment.py --quick --csv augment.csv

Every configuration runs once per repeat, interleaved (on a shared machine the load drifts); the
table reports the median, min and max over repeats. Timing only: nothing here is a test.
"""
import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="PIL per-image augmentation against the batched path.")
    p.add_argument("--images", type=int, default=4096, help="images augmented per repeat")
    p.add_argument("--batch", type=int, default=512, help="batch size (loader and batched path)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per configuration")
    p.add_argument("--crop_size", type=int, default=32, help="crop size")
    p.add_argument("--data_dir", default=None, help="an image folder instead of random images")
    p.add_argument("--image_size", type=int, help="resize and centre-crop the folder's images")
    p.add_argument("--workers", type=int, nargs="+", help="loader workers (default: 0, 1, CPUs)")
    p.add_argument("--threads", type=int, nargs="*",
                   help="the batched path's CPU threads (default: 1, CPUs; none: no CPU rows)")
    p.add_argument("--csv", default=None, help="write the table here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test)")
    return p


class PILViews(torch.utils.data.Dataset):
    """One train_transform view per image, from a uint8 [N, H, W, 3] array."""

    def __init__(self, array, transform):
        self.array, self.transform = array, transform

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.array[i]))


def pil_runner(array, crop_size, batch, workers):
    views = PILViews(array, common.train_transform(crop_size))
    loader = torch.utils.data.DataLoader(views, batch_size=batch, num_workers=workers,
                                         persistent_workers=workers > 0)
    next(iter(loader))  # start the workers before timing

    def run():
        for _ in loader:
            pass
    return run


def batched_runner(images, crop_size, batch, device):
    aug, images = common.BatchedAugment(crop_size).to(device), images.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    aug(images[:batch])  # warm-up (allocator, kernels)
    sync()

    def run():
        for start in range(0, len(images), batch):
            aug(images[start:start + batch])
        sync()
    return run


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats = 64, 32, 1
    cpus = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else sorted({0, 1, cpus})
    threads = args.threads if args.threads is not None else sorted({1, cpus})
    if args.data_dir:
        data = common.subset(common.build_dataset("folder", args.data_dir, "train"), args.images)
        images = common.images_as_tensor(data, args.image_size)[0]
    else:
        images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
    array = images.permute(0, 2, 3, 1).numpy().copy()

    # (path, device, workers or threads, runner, threads to set while it runs)
    configs = [("PIL per image", "cpu", f"{w} workers",
                pil_runner(array, args.crop_size, args.batch, w), 1) for w in workers]
    configs += [("batched", "cpu", f"{t} threads",
                 batched_runner(images, args.crop_size, args.batch, "cpu"), t) for t in threads]
    if torch.cuda.is_available():
        configs.append(("batched", "cuda", torch.cuda.get_device_name(),
                        batched_runner(images, args.crop_size, args.batch, "cuda"), 1))

    rates, threads_before = [[] for _ in configs], torch.get_num_threads()
    for _ in range(args.repeats):
        for config, rate in zip(configs, rates):
            torch.set_num_threads(config[4])
            start = time.perf_counter()
            config[3]()
            rate.append(len(images) / (time.perf_counter() - start))
    torch.set_num_threads(threads_before)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{platform.machine()}, {cpus} CPUs, load average {load:.1f}, torch {torch.__version__}"
          f"; {len(images)} images {tuple(images.shape[1:])} uint8 -> float32 views "
          f"{args.crop_size}x{args.crop_size}, batch {args.batch}, {args.repeats} repeats "
          f"(median [min, max])")
    base = statistics.median(rates[0])
    header = ["path", "device", "workers_or_threads", "dtype", "batch", "images", "repeats",
              "median_views_per_s", "min_views_per_s", "max_views_per_s", "vs_first_row"]
    rows = [[path, device, what, "float32", args.batch, len(images), args.repeats,
             round(statistics.median(r)), round(min(r)), round(max(r)),
             round(statistics.median(r) / base, 2)]
            for (path, device, what, _, _), r in zip(configs, rates)]
    print("| path | device | workers/threads | views/s (median) | [min, max] | vs row 1 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[7]:,} | [{row[8]:,}, {row[9]:,}] "
              f"| {row[10]:.2f}x |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    return rows


if __name__ == "__main__":
    main()

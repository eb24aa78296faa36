"""What NNCLR's support set and KMCLR's k-means cost per training step of nnclr_kmclr.py, against
the backbone's forward and backward on the same batch, measured in the same run.

    python benchmarks/nnclr_cost.py                 # B = 64, K = 98304, k = 400, d = 256, ResNet-18 at 32 px
    python benchmarks/nnclr_cost.py --width 16      # a smaller backbone (a busy CPU)
    python benchmarks/nnclr_cost.py --quick         # tiny sizes (a test runs this)

Pieces (medians over --repeats, interleaved so a busy machine slows each alike):
  backbone_fwd_bwd  the backbone on both views (2B images), forward and backward
  nn_lookup         SupportSet.positives + update: cosine NN of 2B projections among K rows, enqueue
  kmeans_step       Prototypes.positives + update: assignment of 2B rows, ring write, count-weighted
                    update, and the re-seed check (the mean over 10 steps, so it holds one re-seed)
  loss_fwd_bwd      pair_loss on the positives, forward and backward (the same for both methods)
Random inputs: the time does not depend on the data. Timing only: nothing here is a test.
"""
import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import nnclr_kmclr  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Support-set and k-means cost per NNCLR/KMCLR step.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", type=int, default=64, help="B images per step (two views each)")
    p.add_argument("--queue_size", type=int, default=98304, help="K, NNCLR support set")
    p.add_argument("--num_prototypes", type=int, default=400, help="k, KMCLR centroids")
    p.add_argument("--dim", type=int, default=256, help="d, projection dimension")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = standard)")
    p.add_argument("--crop_size", type=int, default=32, help="image size")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per piece (medians reported)")
    p.add_argument("--csv", default="results/benchmarks/nnclr_cost.csv", help="output CSV")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for the test suite)")
    return p


def timed(fn, device, steps=1):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    args = build_parser().parse_args()
    if args.quick:
        args.batch_size, args.queue_size, args.num_prototypes, args.dim = 8, 64, 8, 16
        args.width, args.crop_size, args.repeats = 2, 16, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    b, d = args.batch_size, args.dim
    backbone = common.build_backbone("resnet18", "cifar", args.width).to(device)
    x1, x2 = (torch.randn(b, 3, args.crop_size, args.crop_size, device=device) for _ in range(2))
    z1, z2, p1, p2 = (torch.randn(b, d, device=device) for _ in range(4))  # BN outputs: about N(0, 1)
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    y = torch.zeros(b, dtype=torch.long, device=device)
    support = nnclr_kmclr.SupportSet(args.queue_size, d).to(device)
    prototypes = nnclr_kmclr.Prototypes(args.num_prototypes, d).to(device)

    def backbone_fwd_bwd():
        (backbone(x1).sum() + backbone(x2).sum()).backward()

    def nn_lookup():
        support.positives(z1, z2, y)
        support.update(z1, y)

    def kmeans_step():
        prototypes.positives(z1, z2, y)
        prototypes.update(z1, y)

    a1, a2, _ = support.positives(z1, z2, y)

    def loss_fwd_bwd():
        nnclr_kmclr.pair_loss(a1, a2, p1, p2).backward()

    pieces = {"backbone_fwd_bwd": (backbone_fwd_bwd, 1), "nn_lookup": (nn_lookup, 1),
              "kmeans_step": (kmeans_step, 10), "loss_fwd_bwd": (loss_fwd_bwd, 1)}
    for fn, _ in pieces.values():  # warm-up
        fn()
    times = {name: [] for name in pieces}
    for _ in range(args.repeats):
        for name, (fn, steps) in pieces.items():
            times[name].append(timed(fn, device, steps))
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    sizes = f"B={b} (2B={2 * b} views) K={args.queue_size} k={args.num_prototypes} d={d} resnet18 width {args.width} " \
            f"{args.crop_size}px"
    print(f"device {device_name}, fp32, {sizes}, median of {args.repeats}")
    print(f"{'piece':20s} {'median ms':>10s} {'/ backbone':>11s}")
    rows = []
    for name, ms in med.items():
        ratio = ms / med["backbone_fwd_bwd"]
        print(f"{name:20s} {ms:10.3f} {ratio:11.4f}")
        rows.append({"piece": name, "median_ms": f"{ms:.4f}", "ratio_to_backbone": f"{ratio:.5f}", "device": device_name,
                     "dtype": "fp32", "sizes": sizes, "repeats": args.repeats})
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

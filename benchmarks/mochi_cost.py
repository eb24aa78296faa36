"""What MoCHi costs over plain MoCo: one training step of moco_mochi.py (its own train_one_epoch,
query and key encoders, loss, SGD, enqueue) with and without mixing, measured in the same run, and
the mixing alone (mochi_negatives plus the extra logits, forward and backward) against the query
backbone's forward and backward.

    python benchmarks/mochi_cost.py                       # N = 1024, s = 1024, s' = 512, K = 16384, B = 64
    python benchmarks/mochi_cost.py --width 64 --batch_size 256 --crop_size 32      # a GPU, full width
    python benchmarks/mochi_cost.py --quick               # tiny sizes (a test runs this)

Prints a table (medians over --repeats, the two training variants interleaved) and writes a CSV.
Random images: the time does not depend on the data. Timing only: nothing here is a test.
"""
import argparse
import contextlib
import csv
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import moco_mochi  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="MoCHi's cost per MoCo training step.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n_hard", type=int, default=1024, help="N")
    p.add_argument("--s1_hard", type=int, default=1024, help="s (type 1)")
    p.add_argument("--s2_hard", type=int, default=512, help="s' (type 2)")
    p.add_argument("--queue_size", type=int, default=16384, help="K")
    p.add_argument("--batch_size", type=int, default=64, help="images per step")
    p.add_argument("--width", type=int, default=8, help="ResNet-18 base width (64 = standard)")
    p.add_argument("--crop_size", type=int, default=32, help="image size")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (medians reported)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="backbone autocast")
    p.add_argument("--csv", default="results/benchmarks/mochi_cost.csv", help="output CSV")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for the test suite)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main():
    args = build_parser().parse_args()
    if args.quick:
        args.n_hard, args.s1_hard, args.s2_hard, args.queue_size = 8, 8, 4, 64
        args.batch_size, args.width, args.crop_size, args.steps, args.repeats = 8, 2, 16, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    torch.manual_seed(0)
    b, steps = args.batch_size, args.steps
    flags = ["--width", str(args.width), "--queue_size", str(args.queue_size), "--batch_size", str(b), "--epochs", "1"]
    mochi = ["--n_hard", str(args.n_hard), "--s1_hard", str(args.s1_hard), "--s2_hard", str(args.s2_hard),
             "--start1_hard", "0", "--start2_hard", "0"]
    run_args = {"mochi": moco_mochi.get_parser().parse_args(flags + mochi),
                "moco": moco_mochi.get_parser().parse_args(flags)}
    model = moco_mochi.MoCo(run_args["moco"], bn_splits=8 if b % 8 == 0 and b >= 16 else 1).to(device)
    optimizer = torch.optim.SGD(model.query_parameters(), lr=1e-6, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    x = torch.randn(b, 3, args.crop_size, args.crop_size, device=device)
    loader = [(x, x.flip(3), None, torch.arange(b)) for _ in range(steps)]
    model.queue.copy_(F.normalize(torch.randn_like(model.queue), dim=1))
    model.queue_ids.copy_(torch.arange(args.queue_size) + b)  # nothing masked

    def train(variant):
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # no progress bar
            moco_mochi.train_one_epoch(model, model, loader, optimizer, scaler, run_args[variant], 0, device, dtype)

    # Pieces of one step, with the same sizes: backbone forward+backward, mixing, loss with and without it.
    q = torch.randn(b, 128, device=device, requires_grad=True)
    k = F.normalize(torch.randn(b, 128, device=device), dim=1)

    def backbone():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model.backbone(x).float().sum().backward()

    def mixing():
        syn = moco_mochi.mochi_negatives(q, model.queue, args.n_hard, args.s1_hard, args.s2_hard)
        moco_mochi.moco_loss(q, k, model.queue, 0.1, syn).backward()

    def loss_only():
        moco_mochi.moco_loss(q, k, model.queue, 0.1).backward()

    pieces = {"moco": lambda: train("moco"), "mochi": lambda: train("mochi"), "backbone_fwd_bwd": backbone,
              "loss_with_mixing_fwd_bwd": mixing, "loss_without_mixing_fwd_bwd": loss_only,
              "mochi_negatives_only": lambda: moco_mochi.mochi_negatives(q, model.queue, args.n_hard,
                                                                          args.s1_hard, args.s2_hard)}
    for fn in pieces.values():  # warm-up
        fn()
    times = {name: [] for name in pieces}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows every variant alike
        for name, fn in pieces.items():
            times[name].append(timed(fn, device) / (steps if name in ("moco", "mochi") else 1))
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    mix_extra = med["loss_with_mixing_fwd_bwd"] - med["loss_without_mixing_fwd_bwd"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} " \
        f"({torch.get_num_threads()} threads)"
    sizes = (f"B={b} K={args.queue_size} N={args.n_hard} s={args.s1_hard} s'={args.s2_hard} D=128 "
             f"resnet18 width {args.width} {args.crop_size}px")
    print(f"device {device_name}, {args.precision}, {sizes}, median of {args.repeats}")
    print(f"{'piece':32s} {'median ms':>10s}")
    for name in pieces:
        print(f"{name:32s} {med[name]:10.2f}")
    print(f"MoCHi / MoCo per training step: {med['mochi'] / med['moco']:.3f}")
    print(f"mixing (negatives + extra logits, fwd+bwd) / backbone fwd+bwd: {mix_extra / med['backbone_fwd_bwd']:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "value", "unit", "repeats", "device", "precision", "sizes"])
        rows = [(name, med[name], "median ms") for name in pieces]
        rows += [("mochi_over_moco", med["mochi"] / med["moco"], "ratio"),
                 ("mixing_over_backbone", mix_extra / med["backbone_fwd_bwd"], "ratio")]
        for name, value, unit in rows:
            writer.writerow([name, f"{value:.4g}", unit, args.repeats, device_name, args.precision, sizes])


if __name__ == "__main__":
    main()

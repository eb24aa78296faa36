"""How much the fast path of linear_eval.py saves: the probe trained on features computed once
(`--augment none`) against the same probe passing the training images through the frozen backbone
every epoch (`--augment none --recompute_features`). Same checkpoint, data, settings and seed;
both runs give the same probe (tests/test_linear_eval.py checks that), so only time differs.

    python benchmarks/linear_eval_cache.py                           # ResNet-18 width 16, CIFAR-10 subset
    python benchmarks/linear_eval_cache.py --checkpoint runs/hcl/last.pt --epochs 100 --protocol nozawa

Without --checkpoint an untrained simclr_debiased.py checkpoint is written to a temporary folder
(the time does not depend on the weights). Prints the wall time of each whole evaluation, its
feature-extraction and probe phases, and the ratios. Timing only: nothing here is a test.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import linear_eval  # noqa: E402
import simclr_debiased  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="linear_eval.py: cached features vs recomputing them every epoch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint to evaluate (default: an untrained one)")
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10"),
                   help="image folder (train/ and test/) for the untrained checkpoint, and for the evaluation")
    p.add_argument("--arch", default="resnet18", help="backbone of the untrained checkpoint")
    p.add_argument("--width", type=int, default=16, help="base width of the untrained checkpoint")
    p.add_argument("--protocol", default="dcl", choices=list(linear_eval.PROTOCOLS), help="linear_eval.py preset")
    p.add_argument("--epochs", type=int, default=10, help="probe epochs (the presets use 100)")
    p.add_argument("--subset", type=int, default=0, help="training images (0: all)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times; the minimum counts")
    p.add_argument("--precision", default="fp32", help="linear_eval.py --precision")
    return p


def untrained_checkpoint(args, directory):
    """An untrained simclr_debiased.py checkpoint of the given backbone (build_model, as the script)."""
    run_args = simclr_debiased.build_parser().parse_args(
        ["--dataset", "folder", "--data_dir", args.data_dir, "--arch", args.arch, "--width", str(args.width)])
    torch.manual_seed(0)
    model = simclr_debiased.build_model(run_args)
    path = os.path.join(directory, "last.pt")
    common.save_checkpoint({"script": "simclr_debiased.py", "args": vars(run_args), "epoch": 0,
                            "backbone": model.backbone.state_dict(), "model": model.state_dict()}, path)
    return path


def timed(argv):
    start = time.perf_counter()
    results = linear_eval.main(argv)
    return time.perf_counter() - start, results


def main(argv=None):
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or untrained_checkpoint(args, tmp)
        base = [ckpt, "--protocol", args.protocol, "--augment", "none", "--epochs", str(args.epochs),
                "--subset", str(args.subset), "--workers", str(args.workers), "--data_dir", args.data_dir,
                "--precision", args.precision]
        runs = {"cached": [], "recomputed": []}
        for _ in range(args.repeats):
            runs["recomputed"].append(timed(base + ["--recompute_features", "--out", os.path.join(tmp, "slow.json")]))
            runs["cached"].append(timed(base + ["--out", os.path.join(tmp, "fast.json")]))
    best = {name: min(values, key=lambda v: v[0]) for name, values in runs.items()}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.1f}; protocol {args.protocol}, "
          f"{args.epochs} probe epochs, {best['cached'][1]['data']['num_train']} train / "
          f"{best['cached'][1]['data']['num_test']} test images, {args.arch} width {args.width}")
    print(f"{'':>11} {'total s':>9} {'features s':>11} {'probe s':>9} {'probe s/epoch':>14} {'final top-1':>12}")
    for name in ("recomputed", "cached"):
        seconds, results = best[name]
        timing = results["timing"]
        print(f"{name:>11} {seconds:9.1f} {timing['feature_seconds']:11.1f} {timing['probe_seconds']:9.1f} "
              f"{timing['probe_seconds'] / args.epochs:14.3f} {results['linear']['top1']:12.2f}")
    slow, fast = best["recomputed"], best["cached"]
    print(f"speed-up of the whole evaluation: {slow[0] / fast[0]:.1f}x; of the probe phase: "
          f"{slow[1]['timing']['probe_seconds'] / fast[1]['timing']['probe_seconds']:.0f}x")
    # The recomputing probe costs about one pass over the training images per epoch, the cached one
    # next to nothing: at E epochs the whole evaluation takes about features + E * per-epoch.
    for epochs in (100,):
        if epochs != args.epochs:
            per_slow = slow[1]["timing"]["probe_seconds"] / args.epochs
            per_fast = fast[1]["timing"]["probe_seconds"] / args.epochs
            other = fast[0] - fast[1]["timing"]["probe_seconds"]
            print(f"extrapolated to {epochs} epochs (not measured): "
                  f"{(other + epochs * per_slow) / (other + epochs * per_fast):.0f}x")


if __name__ == "__main__":
    main()

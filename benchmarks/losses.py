"""Loss-only cost: forward + backward of each method's loss function (imported from its training
script, called with its real signature) on random embeddings [B, D] that require grad, against
plain NT-Xent, contrastive_loss(z1, z2, 0.5, 0, 0), on the same embeddings.

    python benchmarks/losses.py                     # B = 256, D = 128, queue 16384, bank 50000, support 98304
    python benchmarks/losses.py --device cuda
    python benchmarks/losses.py --quick             # tiny sizes (tests/test_benchmarks.py runs this)

What each row times (positives k and pools carry no gradient, as in training):
  SimCLR, DCL, HCL   simclr_debiased.contrastive_loss(z1, z2, 0.5, tau_plus, beta)        2B anchors
  MoCo               moco_mochi.moco_loss(q, k, queue, 0.2, exclude=own-image mask)        B queries, K keys
  MoCHi              + mochi_negatives(q, queue, N, s, s', exclude) as `synthetic`
  MoCo / Ring-MoCo   ring_nce.ring_nce_loss(q, k, queue, 0.07, lower, upper)               B queries, K keys
  IR / Ring-IR       ring_nce.sampled_ring_nce_loss(q, bank[idx], bank, 0.07, lower, upper, n)
  NNCLR              nnclr_kmclr.nnclr_loss(z1, z2, p1, p2, support, 0.1)
  NNCLR (step)       nnclr_kmclr.memory_step(SupportSet(K, D), ...): what training runs (one look-up
                     matmul for both views on the stored unit rows, the loss, then the enqueue)
  KMCLR              nnclr_kmclr.memory_step(Prototypes(k, D), z1, z2, p1, p2, y, 0.1): the nearest
                     centroids, the loss, then one mini-batch k-means update (the prototype step)
Medians over --repeats of the mean over --steps calls. Timing only: nothing here is a test.
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

import moco_mochi  # noqa: E402
import nnclr_kmclr  # noqa: E402
import ring_nce  # noqa: E402
import simclr_debiased  # noqa: E402

SIZES = {
    "full": dict(batch_size=256, dim=128, queue=16384, bank=50000, support=98304, prototypes=400, negatives=4096,
                 n_hard=1024, s1=1024, s2=512, steps=5, repeats=5),
    "quick": dict(batch_size=32, dim=16, queue=256, bank=512, support=256, prototypes=16, negatives=64,
                  n_hard=32, s1=32, s2=16, steps=1, repeats=1),
}


def build_parser():
    p = argparse.ArgumentParser(description="Each loss's forward + backward against plain NT-Xent.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the losses run")
    help_ = {"batch_size": "B", "dim": "D", "queue": "MoCo queue K", "bank": "IR memory bank (images)",
             "support": "NNCLR support set", "prototypes": "KMCLR centroids", "negatives": "IR negatives drawn per anchor",
             "n_hard": "MoCHi N", "s1": "MoCHi s", "s2": "MoCHi s'", "steps": "calls per timed run",
             "repeats": "timed runs (medians reported)"}
    for name, text in help_.items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"{text} (default {SIZES['full'][name]}; --quick tiny)")
    p.add_argument("--csv", default="results/benchmarks/losses.csv", help="output CSV")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for the test suite)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, leaves, device, steps, repeats, warmup=2):
    def step():
        for t in leaves:
            t.grad = None
        fn().backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def cases(a, device):
    """name -> (what, pool description, loss closure, leaves needing grad)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    B, D = a.batch_size, a.dim
    z1, z2 = randn(B, D, grad=True), randn(B, D, grad=True)           # two views' projections
    k = randn(B, D)                                                   # keys: no gradient
    queue = torch.nn.functional.normalize(randn(a.queue, D), dim=1)
    ids, queue_ids = (torch.randint(0, 50000, (n,), generator=g).to(device) for n in (B, a.queue))
    bank = torch.nn.functional.normalize(randn(a.bank, D), dim=1)
    index = torch.randint(0, a.bank, (B,), generator=g).to(device)
    support = torch.nn.functional.normalize(randn(a.support, D), dim=1)
    y = torch.randint(0, 10, (B,), generator=g).to(device)
    p1, p2 = randn(B, D, grad=True), randn(B, D, grad=True)           # NNCLR predictions
    prototypes = nnclr_kmclr.Prototypes(a.prototypes, D).to(device)
    support_set = nnclr_kmclr.SupportSet(a.support, D).to(device)
    closs, mloss = simclr_debiased.contrastive_loss, moco_mochi.moco_loss
    ring, sampled = ring_nce.ring_nce_loss, ring_nce.sampled_ring_nce_loss
    mix = (a.n_hard, a.s1, a.s2)

    def mochi():
        exclude = ids[:, None] == queue_ids[None]
        synthetic = moco_mochi.mochi_negatives(z1, queue, *mix, exclude=exclude)
        return mloss(z1, k, queue, 0.2, synthetic, exclude)

    both, one, nn_ = [z1, z2], [z1], [p1, p2]
    return {
        "NT-Xent": ("contrastive_loss(0.5, 0, 0)", f"2B={2 * B}", lambda: closs(z1, z2, 0.5, 0.0, 0.0), both),
        "SimCLR": ("contrastive_loss(0.5, 0, 0)", f"2B={2 * B}", lambda: closs(z1, z2, 0.5, 0.0, 0.0), both),
        "DCL": ("contrastive_loss(0.5, 0.1, 0)", f"2B={2 * B}", lambda: closs(z1, z2, 0.5, 0.1, 0.0), both),
        "HCL": ("contrastive_loss(0.5, 0.1, 1)", f"2B={2 * B}", lambda: closs(z1, z2, 0.5, 0.1, 1.0), both),
        "MoCo": ("moco_loss(T=0.2, exclude)", f"K={a.queue}",
                 lambda: mloss(z1, k, queue, 0.2, None, ids[:, None] == queue_ids[None]), one),
        "MoCHi": ("mochi_negatives + moco_loss", f"K={a.queue} N={a.n_hard} s={a.s1} s'={a.s2}", mochi, one),
        "MoCo (ring_nce)": ("ring_nce_loss(0.07, 0, 1)", f"K={a.queue}", lambda: ring(z1, k, queue, 0.07, 0.0, 1.0), one),
        "Ring-MoCo": ("ring_nce_loss(0.07, 0.01, 0.1)", f"K={a.queue}", lambda: ring(z1, k, queue, 0.07, 0.01, 0.1), one),
        "IR": ("sampled_ring_nce_loss(0.07, 0, 1)", f"bank={a.bank} n={a.negatives}",
               lambda: sampled(z1, bank[index], bank, 0.07, 0.0, 1.0, a.negatives), one),
        "Ring-IR": ("sampled_ring_nce_loss(0.07, 0.01, 0.1)", f"bank={a.bank} n={a.negatives}",
                    lambda: sampled(z1, bank[index], bank, 0.07, 0.01, 0.1, a.negatives), one),
        "NNCLR": ("nnclr_loss(0.1)", f"support={a.support}",
                  lambda: nnclr_kmclr.nnclr_loss(z1.detach(), z2.detach(), p1, p2, support, 0.1), nn_),
        "NNCLR (step)": ("memory_step(SupportSet, 0.1)", f"support={a.support}",
                         lambda: nnclr_kmclr.memory_step(support_set, z1.detach(), z2.detach(), p1, p2, y, 0.1)[0], nn_),
        "KMCLR": ("memory_step(Prototypes, 0.1)", f"k={a.prototypes}",
                  lambda: nnclr_kmclr.memory_step(prototypes, z1.detach(), z2.detach(), p1, p2, y, 0.1)[0], nn_),
    }


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("losses.py: error: --device cuda but CUDA is not available")
    device = torch.device(a.device)
    for key, value in SIZES["quick" if a.quick else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name_of}), {torch.get_num_threads()} thread(s), torch {torch.__version__}, float32 "
          f"losses; B={a.batch_size}, D={a.dim}; forward + backward, median of {a.repeats} x {a.steps} calls")
    rows, base = [], None
    for name, (what, pool, fn, leaves) in cases(a, device).items():
        ms = median_ms(fn, leaves, device, a.steps, a.repeats)
        base = base or ms
        rows.append({"loss": name, "call": what, "pool": pool, "device": str(device), "dtype": "float32",
                     "batch": a.batch_size, "dim": a.dim, "repeats": a.repeats, "steps": a.steps, "ms": ms,
                     "vs_ntxent": ms / base})
    print(f"{'loss':<16} {'call':<40} {'pool':<34} {'ms':>9} {'x NT-Xent':>10}")
    for r in rows:
        print(f"{r['loss']:<16} {r['call']:<40} {r['pool']:<34} {r['ms']:>9.3f} {r['vs_ntxent']:>9.2f}x")
    if os.path.dirname(a.csv):
        os.makedirs(os.path.dirname(a.csv), exist_ok=True)
    with open(a.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    print(f"wrote {a.csv}")
    return rows


if __name__ == "__main__":
    main()

"""Loss-only cost: forward + backward of each method's loss as its train_step computes it (the
scripts' functions, their real signatures) on random embeddings [B, D], against NT-Xent,
simclr_debiased.contrastive_loss(z1, z2, 0.5, 0, 0), on the same embeddings.

    python benchmarks/losses.py --device cpu    # B 256, D 128, queue 16384, bank 50000, 98304 rows
    python benchmarks/losses.py                # on the GPU where there is one
    python benchmarks/losses.py --quick        # tiny sizes

Rows (keys, pools and memories carry no gradient, as in training):
  NT-Xent, DCL, HCL    contrastive_loss(z1, z2, 0.5, tau_plus, beta)                  2B anchors
  MoCo                 moco_loss(q, k, queue, 0.1)                                    B queries
  MoCHi                mochi_negatives(q, queue, N, s, s') + moco_loss(..., synthetic)
  MoCo (ring_nce)      ring_nce_loss(q, k, queue, 0.07, 0, 1); Ring-MoCo: (0.01, 0.1)
  IR, Ring-IR          ring_nce_loss(q, bank[ids], bank, 0.07, lower, upper, draws)   n draws
  NNCLR                support rows[_nn_index([z1; z2], rows)] + contrast(..., p1, p2, 0.1)
  KMCLR                the nearest centroids + contrast, then kmeans_step on z1 (k prototypes)
Medians over --repeats (interleaved) of the mean over --steps calls. Timing only: not a test.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import write_csv  # noqa: E402  (it puts the repository on sys.path)

import moco_mochi  # noqa: E402
import nnclr_kmclr  # noqa: E402
import ring_nce  # noqa: E402
import simclr_debiased  # noqa: E402

SIZES = {
    "full": dict(batch_size=256, dim=128, queue=16384, bank=50000, support=98304, prototypes=400,
                 negatives=4096, n_hard=1024, s1=1024, s2=256, steps=5, repeats=5),
    "quick": dict(batch_size=32, dim=16, queue=256, bank=512, support=256, prototypes=16,
                  negatives=64, n_hard=32, s1=32, s2=16, steps=1, repeats=1),
}


def build_parser():
    p = argparse.ArgumentParser(description="Each loss's forward + backward against NT-Xent.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for name, value in SIZES["full"].items():
        p.add_argument(f"--{name}", type=int, help=f"default {value} (--quick: tiny)")
    p.add_argument("--csv", default="results/benchmarks/losses.csv")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    return p


def medians_ms(fns, device, steps, repeats, warmup=2):
    """{name: median over repeats of the mean ms of one forward + backward in `steps` calls}; every
    repeat times each loss in turn (on a shared machine the load drifts)."""
    def run(fn, leaves, n):
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        for _ in range(n):
            for t in leaves:
                t.grad = None
            fn().backward()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return (time.perf_counter() - start) / max(n, 1) * 1e3

    times = {name: [] for name in fns}
    for name, (_, fn, leaves) in fns.items():
        run(fn, leaves, warmup)
    for _ in range(repeats):
        for name, (_, fn, leaves) in fns.items():
            times[name].append(run(fn, leaves, steps))
    return {name: statistics.median(t) for name, t in times.items()}


def kmclr_memory(a, device):
    """nnclr_kmclr's model for --method kmclr with tiny networks: its centroids and counters."""
    args = nnclr_kmclr.get_parser().parse_args(
        ["--method", "kmclr", "--num_prototypes", str(a.prototypes), "--feature_dim", str(a.dim),
         "--width", "1", "--hidden_dim", "1", "--pred_dim", "1"])
    return nnclr_kmclr.NNCLR(args, steps_per_epoch=1000).to(device)


def cases(a, device):
    """name -> (pool, loss closure, leaves with gradient)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    def unit(n):
        return F.normalize(randn(n, a.dim), dim=1)

    B = a.batch_size
    z1, z2, p1, p2 = (randn(B, a.dim, grad=True) for _ in range(4))
    k, queue, bank, support = randn(B, a.dim), unit(a.queue), unit(a.bank), unit(a.support)
    ids = torch.randint(0, a.bank, (B,), generator=g).to(device)
    memory = kmclr_memory(a, device)
    loss, moco = simclr_debiased.contrastive_loss, moco_mochi.moco_loss
    ring = ring_nce.ring_nce_loss

    def mochi():
        synthetic = moco_mochi.mochi_negatives(z1, queue, a.n_hard, a.s1, a.s2)
        return moco(z1, k, queue, 0.1, synthetic)

    def ir(lower, upper):
        lo, hi = ring_nce.ring_bounds(a.bank, lower, upper)
        draws = torch.randint(0, hi - lo, (B, a.negatives), device=device)
        return ring(z1, bank[ids], bank, 0.07, lower, upper, draws)

    def nnclr():
        z = torch.cat([z1, z2]).detach()
        return nnclr_kmclr.contrast(*support[nnclr_kmclr._nn_index(z, support)].chunk(2), p1, p2)[0]

    def kmclr():
        z = torch.cat([z1, z2]).detach()
        out = nnclr_kmclr.contrast(*memory.centroids[nnclr_kmclr.kmeans_assign(
            z, memory.centroids)].chunk(2), p1, p2)[0]
        nnclr_kmclr.kmeans_step(memory, z1.detach())
        return out

    both, one, preds = [z1, z2], [z1], [p1, p2]
    bank_pool, mix = f"bank {a.bank}, {a.negatives} draws", f"N {a.n_hard} s {a.s1} s' {a.s2}"
    return {
        "NT-Xent": (f"2B {2 * B}", lambda: loss(z1, z2, 0.5, 0.0, 0.0), both),
        "DCL": (f"2B {2 * B}", lambda: loss(z1, z2, 0.5, 0.1, 0.0), both),
        "HCL": (f"2B {2 * B}", lambda: loss(z1, z2, 0.5, 0.1, 1.0), both),
        "MoCo": (f"queue {a.queue}", lambda: moco(z1, k, queue, 0.1), one),
        "MoCHi": (f"queue {a.queue}, {mix}", mochi, one),
        "MoCo (ring_nce)": (f"queue {a.queue}", lambda: ring(z1, k, queue, 0.07, 0.0, 1.0), one),
        "Ring-MoCo": (f"queue {a.queue}", lambda: ring(z1, k, queue, 0.07, 0.01, 0.1), one),
        "IR": (bank_pool, lambda: ir(0.0, 1.0), one),
        "Ring-IR": (bank_pool, lambda: ir(0.01, 0.1), one),
        "NNCLR": (f"support {a.support}", nnclr, preds),
        "KMCLR": (f"k {a.prototypes}", kmclr, preds),
    }


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("losses.py: error: --device cuda but CUDA is not available")
    device = torch.device("cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu")
    for key, value in SIZES["quick" if a.quick else "full"].items():
        setattr(a, key, value if getattr(a, key) is None else getattr(a, key))
    print(f"{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32; "
          f"B {a.batch_size}, D {a.dim}; median of {a.repeats} x {a.steps} calls")
    fns = cases(a, device)
    times, rows = medians_ms(fns, device, a.steps, a.repeats), []
    for name, (pool, _, _) in fns.items():
        ms, base = times[name], times["NT-Xent"]
        rows.append({"loss": name, "pool": pool, "device": device.type, "batch": a.batch_size,
                     "dim": a.dim, "repeats": a.repeats, "steps": a.steps, "ms": ms,
                     "vs_ntxent": ms / base})
        print(f"{name:<16} {pool:<36} {ms:9.3f} ms {ms / base:8.2f}x NT-Xent", flush=True)
    write_csv(rows, a.csv)
    print(f"wrote {a.csv}")
    return rows


if __name__ == "__main__":
    main()

"""Cost of the ring selection over plain InfoNCE, per training step (loss forward + backward).

    python benchmarks/ring_cost.py                  # queue 65536 and bank 50000, batch 256, dim 128
    python benchmarks/ring_cost.py --quick          # tiny sizes (the test suite runs this)

Rows: MoCo queue (InfoNCE; Ring by topk as ring_nce.py does it; Ring by a full sort as the original
MoCoRing) and IR bank (uniform draws; Ring-IR by topk; by a full sort), with --num_negatives draws.
Each timing is the median over --repeats of the loss on the same inputs; ratio = time / baseline.
Prints a table and writes a CSV.
"""
import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ring_nce import ring_nce_loss, sampled_ring_nce_loss  # noqa: E402


def sorted_ring_loss(q, k, pool, t, lower, upper, draws=None):
    """The original code's selection: a full descending sort of every row, then the rank slice."""
    q, k, pool = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    pos = (q * k).sum(1) / t
    sims = (q @ pool.T / t).sort(dim=1, descending=True).values
    ring = sims[:, math.floor(lower * pool.shape[0]):math.floor(upper * pool.shape[0])]
    if draws:
        ring = ring.gather(1, torch.randint(0, ring.shape[1], (ring.shape[0], draws)))
    return (torch.logsumexp(torch.cat([pos[:, None], ring], 1), 1) - pos).mean()


def time_ms(fn, q, repeats):
    fn().backward()  # warm-up
    times = []
    for _ in range(repeats):
        q.grad = None
        start = time.perf_counter()
        fn().backward()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    p.add_argument("--repeats", type=int, default=7, help="timings per row (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--lower", type=float, default=0.01, help="ring start (the released 0.1/0.1)")
    p.add_argument("--upper", type=float, default=0.1, help="ring end")
    p.add_argument("--csv", default="results/benchmarks/ring_cost.csv", help="output CSV")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch, dim, queue_size, bank_size, draws = (256, 128, 65536, 50000, 4096) if not a.quick else (8, 16, 512, 400, 64)
    repeats = 2 if a.quick else a.repeats
    q = torch.randn(batch, dim, requires_grad=True)
    k = torch.randn(batch, dim)
    rows = []
    for pool_name, size in (("queue", queue_size), ("bank", bank_size)):
        pool = F.normalize(torch.randn(size, dim), dim=1)
        n = None if pool_name == "queue" else draws
        if n is None:
            variants = [("infonce", lambda: ring_nce_loss(q, k, pool, 0.07, 0.0, 1.0)),
                        ("ring_topk", lambda: ring_nce_loss(q, k, pool, 0.07, a.lower, a.upper)),
                        ("ring_sort", lambda: sorted_ring_loss(q, k, pool, 0.07, a.lower, a.upper))]
        else:
            variants = [("ir_uniform", lambda: sampled_ring_nce_loss(q, k, pool, 0.07, 0.0, 1.0, n)),
                        ("ring_topk", lambda: sampled_ring_nce_loss(q, k, pool, 0.07, a.lower, a.upper, n)),
                        ("ring_sort", lambda: sorted_ring_loss(q, k, pool, 0.07, a.lower, a.upper, n))]
        base = None
        for name, fn in variants:
            ms = time_ms(fn, q, repeats)
            base = base or ms
            rows.append({"pool": pool_name, "size": size, "batch": batch, "dim": dim, "draws": n or "",
                         "variant": name, "median_ms": round(ms, 3), "ratio": round(ms / base, 3)})
    print(f"CPU, float32, {a.threads} thread(s), ring [{a.lower}, {a.upper}), median of {repeats}")
    print(f"{'pool':6} {'size':>6} {'batch':>5} {'draws':>5} {'variant':11} {'ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['pool']:6} {r['size']:6d} {r['batch']:5d} {str(r['draws']):>5} {r['variant']:11} "
              f"{r['median_ms']:9.2f} {r['ratio']:6.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    with open(a.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()

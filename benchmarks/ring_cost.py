"""The ring's selection cost: ring_nce.ring_nce_loss (topk) against plain InfoNCE on the same pool
(ring [0, 1)) and against a full sort of every row (the Ring code's selection), loss forward +
backward, on a MoCo queue and on an IR bank with --draws negatives drawn from the ring.

    python benchmarks/ring_cost.py                  # queue 65536, bank 50000, batch 256, dim 128
    python benchmarks/ring_cost.py --quick          # tiny sizes

Medians over --repeats (the variants interleaved); ratio = time / the pool's first row. CPU.
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

from ring_nce import ring_bounds, ring_nce_loss  # noqa: E402


def sorted_ring_loss(q, k, pool, t, lower, upper, draws=None):
    """The same loss with the ring cut from a full descending sort of every row."""
    q, k, pool = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    pos = (q * k).sum(1) / t                                                           # [B]
    lo, hi = ring_bounds(len(pool), lower, upper)
    ring = (q @ pool.T / t).sort(dim=1, descending=True).values[:, lo:hi]            # [B, R]
    ring = ring if draws is None else ring.gather(1, draws)                           # [B, n]
    return (torch.cat([pos[:, None], ring], 1).logsumexp(1) - pos).mean()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    p.add_argument("--repeats", type=int, default=7, help="timings per row (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--lower", type=float, default=0.01, help="ring start (the released 0.1/0.1)")
    p.add_argument("--upper", type=float, default=0.1, help="ring end")
    p.add_argument("--csv", default="results/benchmarks/ring_cost.csv", help="output CSV")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sizes = (8, 16, 512, 400, 64) if a.quick else (256, 128, 65536, 50000, 4096)
    batch, dim, queue, bank, n = sizes
    repeats = 2 if a.quick else a.repeats
    q, k = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim)
    cases = {}
    for pool_name, size, draws in (("queue", queue, None), ("bank", bank, n)):
        pool = F.normalize(torch.randn(size, dim), dim=1)
        lo, hi = ring_bounds(size, a.lower, a.upper)
        d_all = None if draws is None else torch.randint(0, size, (batch, draws))
        d_ring = None if draws is None else torch.randint(0, hi - lo, (batch, draws))
        cases[pool_name, size, "infonce" if draws is None else "ir_uniform"] = \
            lambda pool=pool, d=d_all: ring_nce_loss(q, k, pool, 0.07, 0.0, 1.0, d)
        cases[pool_name, size, "ring_topk"] = \
            lambda pool=pool, d=d_ring: ring_nce_loss(q, k, pool, 0.07, a.lower, a.upper, d)
        cases[pool_name, size, "ring_sort"] = \
            lambda pool=pool, d=d_ring: sorted_ring_loss(q, k, pool, 0.07, a.lower, a.upper, d)
    times = {key: [] for key in cases}
    for r in range(repeats + 1):  # the first round warms up
        for key, fn in cases.items():
            q.grad = None
            start = time.perf_counter()
            fn().backward()
            times[key].append(1e3 * (time.perf_counter() - start)) if r else None
    torch.set_num_threads(threads)
    rows = []
    for (pool_name, size, variant), t in times.items():
        base = statistics.median(times[next(key for key in times if key[0] == pool_name)])
        rows.append({"pool": pool_name, "size": size, "batch": batch, "dim": dim,
                     "draws": "" if pool_name == "queue" else n, "variant": variant,
                     "median_ms": statistics.median(t), "ratio": statistics.median(t) / base})
    print(f"CPU, float32, {a.threads} thread(s), ring [{a.lower}, {a.upper}), median of {repeats}")
    for r in rows:
        print(f"{r['pool']:6} {r['size']:6d} {str(r['draws']):>5} {r['variant']:11} "
              f"{r['median_ms']:9.2f} ms {r['ratio']:6.2f}x")
    write_csv(rows, a.csv)
    return rows


if __name__ == "__main__":
    main()

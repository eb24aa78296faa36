"""Every method's cost over its backbone, in each training script's own loop: the script's main()
with --gpu_aug (views drawn on the device per batch, no loader work) for a few epochs, its
metrics.csv read back, against common.py's backbone alone (forward + backward) on the images the
trained encoder sees per step. Also the negatives monitor's cost (issue 20: at most 3% of a step):
the same run with the script's `negative_rates` replaced by a stub.

    python benchmarks/overhead.py --device cpu      # ResNet-18 width 8, batch 64, 512 images, fp32
    python benchmarks/overhead.py                   # GPU: width 64, batch 512, 10240 images, bf16
    python benchmarks/overhead.py --data_dir DATA   # an image folder (DATA/train/<class>/*)
    python benchmarks/overhead.py --quick           # tiny sizes

Columns (the last epoch of each run: the first warms up; medians over --repeats fresh runs):
images_per_sec, step_ms; baseline_ms: the backbone's forward + backward on the step's images (two
views: 2 x batch, one call per view; MoCo and IR: 1 x batch, the key forward is method cost; CMC:
its L and ab encoders' backbones); overhead = step_ms / baseline_ms; monitor_pct = 100 (step -
step with the stub) / step, the two runs interleaved (run-to-run noise included);
monitor_call_pct: the time inside negative_rates calls in the real runs / step (CUDA events on a
GPU); peak_mem_mb (GPU); with --pil, pil_images_per_sec: the PIL loader path at the scripts'
default --workers. Checkpoints are not written (torch.save is a no-op during the runs). Random
labelled images unless --data_dir. Timing only: nothing here is a test.
"""
import argparse
import contextlib
import csv
import io
import math
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import moco_mochi  # noqa: E402
import nnclr_kmclr  # noqa: E402
import ring_nce  # noqa: E402
import simclr_debiased  # noqa: E402

RING = ["--ring_lower", "0.01", "--ring_upper", "0.1"]
# name -> (script, flags, baseline: "two" views with gradient, "one" view, or "cmc")
METHODS = {
    "SimCLR": (simclr_debiased, ["--tau_plus", "0", "--beta", "0"], "two"),
    "DCL": (simclr_debiased, ["--tau_plus", "0.1", "--beta", "0"], "two"),
    "HCL": (simclr_debiased, ["--tau_plus", "0.1", "--beta", "1"], "two"),
    "MoCo": (moco_mochi, [], "one"),
    "MoCHi": (moco_mochi, ["--start1_hard", "0", "--start2_hard", "0"], "one"),
    "IR": (ring_nce, ["--method", "ir"], "one"),
    "Ring-IR": (ring_nce, ["--method", "ir", *RING], "one"),
    "MoCo (ring_nce)": (ring_nce, ["--method", "moco"], "one"),
    "Ring-MoCo": (ring_nce, ["--method", "moco", *RING], "one"),
    "CMC": (ring_nce, ["--method", "cmc"], "cmc"),
    "Ring-CMC": (ring_nce, ["--method", "cmc", *RING], "cmc"),
    "NNCLR": (nnclr_kmclr, ["--method", "nnclr"], "two"),
    "KMCLR": (nnclr_kmclr, ["--method", "kmclr"], "two"),
}
# Sizes by device (None: the script's default). queue: MoCo's K; nnclr_queue: NNCLR's support set;
# negatives: IR/CMC draws; prototypes: KMCLR's k; n_hard: MoCHi's N (s, s': the script's).
SIZES = {
    "cuda": dict(width=64, batch_size=512, images=10240, crop_size=32, epochs=2, repeats=2,
                 queue=None, nnclr_queue=None, negatives=None, prototypes=None, n_hard=1024),
    "cpu": dict(width=8, batch_size=64, images=512, crop_size=32, epochs=2, repeats=3,
                queue=4096, nnclr_queue=4096, negatives=4096, prototypes=400, n_hard=1024),
    "quick": dict(width=4, batch_size=16, images=64, crop_size=16, epochs=2, repeats=1,
                  queue=256, nnclr_queue=256, negatives=256, prototypes=32, n_hard=64),
}


def build_parser():
    p = argparse.ArgumentParser(description="Each method's step against its backbone's forward + "
                                "backward, and the negatives monitor's share of the step.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   metavar="M", help=f"some of: {', '.join(METHODS)}")
    p.add_argument("--arch", default="resnet18", choices=list(common.ARCHS))
    for name in SIZES["cpu"]:
        p.add_argument(f"--{name}", type=int, help="default: by device (SIZES)")
    p.add_argument("--data_dir", default="", help="an image folder; --images of it are used")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs, fp32 on CPUs (scripts and baseline alike)")
    p.add_argument("--pil", action="store_true", help="also time the PIL loader path")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=5, help="baseline: timed calls per repeat")
    p.add_argument("--csv", default="results/benchmarks/overhead.csv")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    return p


def sizes(a, device):
    """The SIZES of the device (or --quick), overridden by the flags given."""
    table = SIZES["quick" if a.quick else device.type]
    return {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in table.items()}


def random_image_folder(root, n, size, classes=10, seed=0):
    """root/train/c<k>/<i>.png: n random RGB images in `classes` classes (no test split)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = os.path.join(root, "train", f"c{i % classes}")
        os.makedirs(folder, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


def method_flags(name, s):
    module, flags, _ = METHODS[name]
    given = {"--queue_size": s["queue"] if module is moco_mochi or "moco" in flags
             else s["nnclr_queue"] if module is nnclr_kmclr else None,
             "--num_negatives": s["negatives"] if module is ring_nce and "moco" not in flags
             else None,
             "--num_prototypes": s["prototypes"] if module is nnclr_kmclr else None,
             "--n_hard": s["n_hard"] if name == "MoCHi" else None}
    return flags + [str(x) for k, v in given.items() if v is not None for x in (k, v)]


def script_argv(name, s, data_dir, out_dir, precision, gpu_aug=True):
    """The script's flags for a timed run (no kNN monitor; --gpu_aug or PIL at default workers)."""
    argv = ["--dataset", "folder", "--data_dir", data_dir, "--subset", str(s["images"]),
            "--arch", s.get("arch", "resnet18"), "--width", str(s["width"]),
            "--batch_size", str(s["batch_size"]), "--crop_size", str(s["crop_size"]),
            "--epochs", str(s["epochs"]), "--eval_every", "0", "--precision", precision,
            "--out_dir", out_dir]
    return argv + (["--gpu_aug", "--workers", "0"] if gpu_aug else []) + method_flags(name, s)


def stub_rates(sim, *args):
    """negative_rates' stand-in: no monitor values (NaN per anchor)."""
    return {"fn_rate": torch.full(sim.shape[:1], math.nan, device=sim.device)}


class Timed:
    """negative_rates with the time inside each call recorded (CUDA events on a GPU)."""

    def __init__(self, fn, device):
        self.fn, self.cuda, self.calls = fn, device.type == "cuda", []

    def __call__(self, *args):
        if not self.cuda:
            start = time.perf_counter()
            out = self.fn(*args)
            self.calls.append(time.perf_counter() - start)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn(*args)
        end.record()
        self.calls.append((start, end))
        return out

    def seconds(self, last):
        """Seconds inside the last `last` calls."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.calls[len(self.calls) - last:]) / 1e3
        return sum(self.calls[len(self.calls) - last:])


def run_script(module, argv, device, negative_rates=None, save=False):
    """module.main(argv) in this process on `device`, its output swallowed (shown on failure), with
    `negative_rates` in place of the script's if given and last.pt left empty unless `save`; the
    rows of its metrics.csv."""
    out = io.StringIO()
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":  # the scripts take the GPU where there is one
            stack.enter_context(mock.patch("torch.cuda.is_available", lambda: False))
        if negative_rates is not None:
            stack.enter_context(mock.patch.object(module, "negative_rates", negative_rates))
        if not save:
            stack.enter_context(mock.patch.object(module.torch, "save",
                                                  lambda obj, path: open(path, "wb").close()))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(out))
        try:
            module.main(argv)
        except SystemExit as err:
            raise RuntimeError(f"{module.__name__}.py {' '.join(argv)} exited ({err}):\n"
                               f"{out.getvalue()[-2000:]}") from None
    with open(os.path.join(argv[argv.index("--out_dir") + 1], "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def median_ms(fn, device, steps, repeats, warmup=2):
    """Median over repeats of the mean time of one fn() call in a run of `steps` calls, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def baseline_ms(name, s, device, dtype, steps, repeats):
    """The backbone's forward + backward on one step's images (see the docstring), in ms."""
    kind, b, c = METHODS[name][2], s["batch_size"], s["crop_size"]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if kind == "cmc":  # ring_nce.py's L and ab encoders at half width
        args = ring_nce.get_parser().parse_args(["--arch", s.get("arch", "resnet18"),
                                                 "--width", str(s["width"])])
        nets = [ring_nce.encoder(args, ch, s["width"] // 2).backbone for ch in (1, 2)]
        inputs = [torch.randn(b, ch, c, c) for ch in (1, 2)]
    else:
        net = common.build_backbone(s.get("arch", "resnet18"), "cifar", s["width"])
        nets, inputs = [net] * (2 if kind == "two" else 1), [torch.randn(b, 3, c, c)] * 2
    nets = [n.to(device, memory_format=fmt).train() for n in nets]
    inputs = [x.to(device).contiguous(memory_format=fmt) for x in inputs]

    def fwd_bwd():
        for n in nets:
            n.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = sum(n(x).float().sum() for n, x in zip(nets, inputs))
        out.backward()

    return median_ms(fwd_bwd, device, steps, repeats)


def measure(name, s, data_dir, device, precision, tmp, pil=False, steps=5):
    """One row: the method's runs (real and stubbed monitor, interleaved), its baseline, PIL."""
    module = METHODS[name][0]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    real, stub, monitor, memory = [], [], [], []
    for r in range(s["repeats"]):
        for variant in ("real", "stub"):
            out_dir = os.path.join(tmp, f"{module.__name__}-{len(os.listdir(tmp))}")
            timed = Timed(module.negative_rates, device) if variant == "real" else stub_rates
            torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
            row = run_script(module, script_argv(name, s, data_dir, out_dir, precision), device,
                             timed)[-1]
            step = 1e3 * s["batch_size"] / float(row["images_per_sec"])
            (real if variant == "real" else stub).append(step)
            if variant == "real":
                per_epoch = len(timed.calls) // s["epochs"]  # calls in an epoch
                monitor.append(100 * timed.seconds(per_epoch) / float(row["epoch_seconds"]))
                memory.append(torch.cuda.max_memory_allocated() / 2 ** 20
                              if device.type == "cuda" else math.nan)
    step_ms = statistics.median(real)
    base = baseline_ms(name, s, device, dtype, steps, s["repeats"])
    row = {"method": name, "script": f"{module.__name__}.py",
           "flags": " ".join(method_flags(name, s)), "device": device.type,
           "precision": precision, "threads": torch.get_num_threads() if device.type == "cpu"
           else "", "width": s["width"], "batch": s["batch_size"],
           "images": s["images"], "repeats": s["repeats"],
           "images_per_sec": 1e3 * s["batch_size"] / step_ms, "step_ms": step_ms,
           "baseline_ms": base, "overhead": step_ms / base,
           "monitor_pct": 100 * (step_ms - statistics.median(stub)) / step_ms,
           "monitor_call_pct": statistics.median(monitor), "peak_mem_mb": max(memory),
           "pil_images_per_sec": math.nan}
    if pil:
        out_dir = os.path.join(tmp, f"{module.__name__}-{len(os.listdir(tmp))}")
        argv = script_argv(name, s, data_dir, out_dir, precision, gpu_aug=False)
        row["pil_images_per_sec"] = float(run_script(module, argv, device)[-1]["images_per_sec"])
    return row


def write_csv(rows, path):
    """rows (dicts) to path; floats to 6 significant digits, NaN as empty."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows({k: ("" if v != v else f"{v:.6g}") if type(v) is float else v
                          for k, v in r.items()} for r in rows)


def table(rows):
    """The rows as a markdown table (img/s, step, backbone, overhead, monitor, memory, PIL)."""
    def f(v, fmt):
        return "" if v != v else format(v, fmt)
    lines = ["| method | images/s | step ms | backbone ms | overhead | monitor % (stub) | "
             "monitor % (calls) | peak MB | PIL images/s |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['images_per_sec']:.0f} | {r['step_ms']:.2f} | "
                     f"{r['baseline_ms']:.2f} | {r['overhead']:.2f}x | {r['monitor_pct']:.1f} | "
                     f"{r['monitor_call_pct']:.1f} | {f(r['peak_mem_mb'], '.0f')} | "
                     f"{f(r['pil_images_per_sec'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None):
    a = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        raise SystemExit("overhead.py: error: --device cuda but CUDA is not available")
    device = torch.device("cuda" if a.device == "cuda" or a.device == "auto" and cuda else "cpu")
    s = {**sizes(a, device), "arch": a.arch}
    precision = {"auto": "bf16" if device.type == "cuda" else "fp32"}.get(a.precision, a.precision)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()} cores"
    print(f"{device.type} ({name}), {a.threads or torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {precision}, {s}")
    rows, threads = [], torch.get_num_threads()
    torch.set_num_threads(a.threads or threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = a.data_dir or random_image_folder(os.path.join(tmp, "data"), s["images"],
                                                         s["crop_size"])
            os.makedirs(os.path.join(tmp, "runs"))
            for name in a.methods:
                rows.append(measure(name, s, data_dir, device, precision,
                                    os.path.join(tmp, "runs"), a.pil, a.steps))
                print(f"{name}: {rows[-1]['images_per_sec']:.0f} images/s, "
                      f"{rows[-1]['overhead']:.2f}x, monitor {rows[-1]['monitor_pct']:.1f}%",
                      flush=True)
    finally:
        torch.set_num_threads(threads)
    print(table(rows))
    write_csv(rows, a.csv)
    print(f"wrote {a.csv}")
    return rows


if __name__ == "__main__":
    main()

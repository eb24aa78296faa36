"""Every method's overhead over its backbone: each training script's own main() (its real training
loop with --gpu_aug: views made per batch on the device, no DataLoader work) for a few epochs on the
same images, against the common.py backbone's own forward and backward on the same images per step.

    python benchmarks/overhead.py                    # GPU: ResNet-18 width 64, batch 256, 10240 images
    python benchmarks/overhead.py --device cpu       # CPU: width 8, batch 64, 512 images, small pools
    python benchmarks/overhead.py --dataset cifar10 --data_dir DATA --images 10240   # real images
    python benchmarks/overhead.py --quick            # tiny sizes (tests/test_benchmarks.py runs this)

Per method: images/s and step time of the LAST epoch of its run (the first includes warm-up), read
from the script's metrics.csv (step = epoch_seconds / (images // batch)); the baseline is
common.build_backbone's forward + backward on the images the method's trained encoder sees per step
(two-view methods: 2 x batch, one call per view as the scripts do; MoCo, IR, CMC: 1 x batch, CMC
with its two half-width encoders on L and ab); overhead = step / baseline. Also measured, as parts
of the method's step: the augmentation of the step's views with the script's --gpu_aug recipe
(aug_ms) and, for MoCo-type methods, the key encoder's forward (key_fwd_ms). The step also holds
the heads, the loss, the optimizer and the memory updates. Medians over --repeats (each repeat a
fresh run). Timing only: nothing here is a test.
"""
import argparse
import contextlib
import csv
import io
import math
import os
import platform
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

# name -> (script module, extra flags, views through the trained encoder per image, key-encoder views, kind)
METHODS = {
    "SimCLR": (simclr_debiased, ["--tau_plus", "0", "--beta", "0"], 2, 0, "rgb"),
    "DCL": (simclr_debiased, ["--tau_plus", "0.1", "--beta", "0"], 2, 0, "rgb"),
    "HCL": (simclr_debiased, ["--tau_plus", "0.1", "--beta", "1"], 2, 0, "rgb"),
    "MoCo": (moco_mochi, [], 1, 1, "rgb"),
    "MoCHi": (moco_mochi, ["MOCHI"], 1, 1, "rgb"),
    "IR": (ring_nce, ["--method", "ir", "--ring_lower", "0", "--ring_upper", "1"], 1, 0, "rgb"),
    "Ring-IR": (ring_nce, ["--method", "ir", "--ring_lower", "0.01", "--ring_upper", "0.1"], 1, 0, "rgb"),
    "MoCo (ring_nce)": (ring_nce, ["--method", "moco", "--ring_lower", "0", "--ring_upper", "1"], 1, 1, "rgb"),
    "Ring-MoCo": (ring_nce, ["--method", "moco", "--ring_lower", "0.01", "--ring_upper", "0.1"], 1, 1, "rgb"),
    "CMC": (ring_nce, ["--method", "cmc", "--ring_lower", "0", "--ring_upper", "1"], 1, 0, "cmc"),
    "Ring-CMC": (ring_nce, ["--method", "cmc", "--ring_lower", "0.01", "--ring_upper", "0.1"], 1, 0, "cmc"),
    "NNCLR": (nnclr_kmclr, ["--method", "nnclr", "--no-online_probe"], 2, 0, "rgb"),
    "KMCLR": (nnclr_kmclr, ["--method", "kmclr", "--no-online_probe"], 2, 0, "rgb"),
}
# Sizes: GPU (the scripts' defaults where they are one number), CPU, --quick.
SIZES = {
    "cuda": dict(width=64, batch_size=256, images=10240, crop_size=32, queue=16384, nnclr_queue=98304,
                 negatives=4096, prototypes=400, n_hard=1024, s1=1024, s2=512, epochs=3, repeats=3),
    "cpu": dict(width=8, batch_size=64, images=512, crop_size=32, queue=4096, nnclr_queue=4096,
                negatives=4096, prototypes=400, n_hard=1024, s1=1024, s2=512, epochs=2, repeats=3),
    "quick": dict(width=4, batch_size=16, images=64, crop_size=16, queue=256, nnclr_queue=256,
                  negatives=256, prototypes=32, n_hard=64, s1=64, s2=32, epochs=2, repeats=1),
}


def build_parser():
    p = argparse.ArgumentParser(description="Each method's training step against its backbone's forward + backward.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where everything runs")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="M",
                   help=f"subset of: {', '.join(METHODS)}")
    p.add_argument("--arch", default="resnet18", choices=list(common.ARCHS), help="backbone of every method")
    for name in ("width", "batch_size", "images", "crop_size", "queue", "nnclr_queue", "negatives", "prototypes",
                 "n_hard", "s1", "s2", "epochs", "repeats"):
        p.add_argument(f"--{name}", type=int, default=None, help="default: by device (see SIZES), --quick: tiny")
    p.add_argument("--dataset", default="folder", choices=common.DATASETS,
                   help="folder: random images generated in a temporary folder unless --data_dir")
    p.add_argument("--data_dir", default="", help="real images (e.g. CIFAR-10); --images of them are used")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 (fp16 without bf16) on CUDA, fp32 on CPU; scripts and baseline alike")
    p.add_argument("--compile", action="store_true", help="--compile the scripts and torch.compile the baseline")
    p.add_argument("--steps", type=int, default=5, help="baseline: timed steps per repeat")
    p.add_argument("--csv", default="results/benchmarks/overhead.csv", help="output CSV")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (for the test suite)")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, steps, repeats, warmup=2):
    """Median over repeats of the mean time of one fn() call in a run of `steps` calls, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def random_image_folder(root, n, size, seed=0):
    """root/train/*.png: n random RGB images (flat, unlabelled: no kNN monitor runs)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "train")
    os.makedirs(folder)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return root


def script_argv(name, a, data_dir, out_dir, precision):
    argv = ["--dataset", a.dataset, "--data_dir", data_dir, "--arch", a.arch, "--width", str(a.width),
            "--batch_size", str(a.batch_size), "--crop_size", str(a.crop_size), "--epochs", str(a.epochs),
            "--gpu_aug", "--workers", "0", "--eval_every", "0", "--precision", precision, "--out_dir", out_dir]
    if a.dataset != "folder":
        argv += ["--subset", str(a.images)]
    if a.compile:
        argv.append("--compile")
    return argv + method_flags(name, a)


def method_flags(name, a):
    module, extra, _, _, _ = METHODS[name]
    if extra == ["MOCHI"]:
        extra = ["--n_hard", str(a.n_hard), "--s1_hard", str(a.s1), "--s2_hard", str(a.s2),
                 "--start1_hard", "0", "--start2_hard", "0"]
    if module is moco_mochi or (module is ring_nce and "moco" in extra):
        extra = extra + ["--queue_size", str(a.queue)]
    if module is ring_nce and "moco" not in extra:
        extra = extra + ["--num_negatives", str(a.negatives)]
    if module is nnclr_kmclr:
        extra = extra + ["--queue_size", str(a.nnclr_queue), "--num_prototypes", str(a.prototypes),
                         "--warmup_epochs", "0"]
    return extra


def run_script(name, argv, device):
    """main(argv) in this process on `device`, its output swallowed; the last metrics.csv row."""
    module = METHODS[name][0]
    out = io.StringIO()
    with mock.patch.object(module, "setup_distributed", lambda: (0, 1, device)), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            module.main(argv)
        except SystemExit as err:
            raise RuntimeError(f"{name}: {module.SCRIPT} {' '.join(argv)} exited ({err}):\n{out.getvalue()[-2000:]}")
    out_dir = argv[argv.index("--out_dir") + 1]
    with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))[-1]


def baseline_parts(name, a, device, dtype):
    """(fwd+bwd fn, its description, key-forward fn or None, augmentation fn) on one step's images."""
    _, _, views, key_views, kind = METHODS[name]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    b = a.batch_size

    def batch(channels=3):
        return torch.randn(b, channels, a.crop_size, a.crop_size, device=device).contiguous(memory_format=fmt)

    if kind == "cmc":  # ring_nce.py's own CMC encoders' backbones (width/2, 1 and 2 input channels)
        args = argparse.Namespace(arch=a.arch, stem="cifar", width=a.width, stem_padding=1, hidden_dim=512,
                                  feature_dim=128)
        nets = [ring_nce.Encoder(args, c, a.width // 2).backbone.to(device, memory_format=fmt) for c in (1, 2)]
        inputs = [batch(1), batch(2)]
        what = f"L + ab backbones (width {a.width // 2}), {b} img"
    else:
        nets = [common.build_backbone(a.arch, "cifar", a.width).to(device, memory_format=fmt)]
        inputs = [batch() for _ in range(views)]
        nets = nets * views
        what = f"{views} x {b} img" + (" (one call per view)" if views > 1 else "")
    for net in nets:
        net.train()
    calls = [torch.compile(n) if a.compile else n for n in nets]

    def fwd_bwd():
        for n in nets:
            for p in n.parameters():
                p.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = sum(c(x).float().sum() for c, x in zip(calls, inputs))
        out.backward()

    key_fwd = None
    if key_views:
        key_net, key_x = calls[0], inputs[0]

        @torch.no_grad()
        def key_fwd():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                key_net(key_x)

    # The views of one step with the script's own --gpu_aug recipe (its default flags).
    module, c = METHODS[name][0], a.crop_size
    if kind == "cmc":
        rgb = common.BatchedAugment(c, (0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, normalize=None).to(device)
        augment = lambda x: ring_nce.rgb_to_lab(rgb(x))  # noqa: E731 (mean/std: negligible)
    elif module is ring_nce:
        augment = common.BatchedAugment(c, (0.2, 1.0), (0.4, 0.4, 0.4, 0.4), jitter_p=1.0, blur_p=0.0).to(device)
    elif module is moco_mochi:
        augment = common.BatchedAugment(c, blur_p=0.0).to(device)
    elif module is nnclr_kmclr:
        augment = common.BatchedAugment(c, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.0).to(device)
    else:
        augment = common.BatchedAugment(c, blur_p=0.5).to(device)
    images = torch.randint(0, 256, (b, 3, a.crop_size, a.crop_size), dtype=torch.uint8, device=device)
    n_aug = views + key_views

    def aug():
        for _ in range(n_aug):
            augment(images)

    return fwd_bwd, what, key_fwd, aug


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("overhead.py: error: --device cuda but CUDA is not available")
    device = torch.device(a.device)
    for key, value in SIZES["quick" if a.quick else a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.epochs < 2:
        raise SystemExit("overhead.py: error: --epochs must be >= 2 (the last epoch is timed, the first warms up)")
    precision = a.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    steps = a.images // a.batch_size
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (f"device {device} ({name_of}), "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {precision}; {a.arch} width {a.width}, "
              f"batch {a.batch_size}, {a.images} {'random' if not a.data_dir else a.dataset} images {a.crop_size}px, "
              f"{steps} steps/epoch, last of {a.epochs} epochs timed, median of {a.repeats} repeats; "
              f"queue {a.queue} (MoCo), {a.nnclr_queue} (NNCLR), {a.negatives} negatives (IR, CMC), "
              f"{a.prototypes} prototypes, MoCHi N={a.n_hard} s={a.s1} s'={a.s2}")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = a.data_dir or random_image_folder(os.path.join(tmp, "data"), a.images, a.crop_size)
        for name in a.methods:
            seconds, rates = [], []
            for r in range(a.repeats):
                out_dir = os.path.join(tmp, f"run{len(rows)}_{r}")
                row = run_script(name, script_argv(name, a, data_dir, out_dir, precision), device)
                seconds.append(float(row["epoch_seconds"]))
                rates.append(float(row["images_per_sec"]))
            step_ms = statistics.median(seconds) / steps * 1e3
            fwd_bwd, what, key_fwd, aug = baseline_parts(name, a, device, dtype)
            base_ms = median_ms(fwd_bwd, device, a.steps, a.repeats)
            key_ms = median_ms(key_fwd, device, a.steps, a.repeats) if key_fwd else float("nan")
            aug_ms = median_ms(aug, device, a.steps, a.repeats)
            rows.append({"method": name, "script": METHODS[name][0].SCRIPT,
                         "flags": " ".join(method_flags(name, a)),
                         "device": str(device), "dtype": precision, "arch": a.arch, "width": a.width,
                         "batch": a.batch_size, "images": a.images, "epochs": a.epochs, "repeats": a.repeats,
                         "images_per_sec": statistics.median(rates), "step_ms": step_ms, "baseline_ms": base_ms,
                         "baseline": what, "overhead": step_ms / base_ms, "aug_ms": aug_ms, "key_fwd_ms": key_ms})
            del fwd_bwd, key_fwd, aug
    print(f"{'method':<16} {'img/s':>9} {'step ms':>9} {'backbone ms':>12} {'overhead':>9} {'aug ms':>8} "
          f"{'key fwd ms':>11}  baseline (fwd+bwd)")
    for r in rows:
        key = "" if math.isnan(r["key_fwd_ms"]) else f"{r['key_fwd_ms']:.2f}"
        print(f"{r['method']:<16} {r['images_per_sec']:>9.1f} {r['step_ms']:>9.2f} {r['baseline_ms']:>12.2f} "
              f"{r['overhead']:>8.2f}x {r['aug_ms']:>8.2f} {key:>11}  {r['baseline']}")
    if os.path.dirname(a.csv):
        os.makedirs(os.path.dirname(a.csv), exist_ok=True)
    with open(a.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else v)
                          for k, v in r.items()} for r in rows)
    print(f"wrote {a.csv}")
    return rows


if __name__ == "__main__":
    main()

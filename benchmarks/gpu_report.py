"""The GPU report (issue 21): every speed and precision number the README's GPU rows need, and a
short learning run, in one command that keeps to a time budget (default 8 minutes) on one GPU.

    mkdir -p data && cp -r CIFAR10 data/cifar10      # CIFAR10/train/<class>/*.jpg, test/<class>/
    python benchmarks/gpu_report.py --data_dir data/cifar10          # -> runs/gpu_report/
    python benchmarks/gpu_report.py --quick                          # CPU smoke test, tiny sizes

Parts (each writes <part>.csv; one that fails logs its error and the next one runs):
  methods   per method, the script's own loop (benchmarks/overhead.py's measure): images/s with
            --gpu_aug and with PIL loader workers (the default --workers, one epoch), the overhead
            over the backbone's forward + backward, peak GPU memory, the negatives monitor's share
  augment   batched augmentation on the device against PIL workers on the CPU cores (augment.py)
  losses    the losses alone (losses.py)
  amp       bf16, fp16 (GradScaler) and TF32 against fp32 (TF32 off): one train_step of
            simclr_debiased.py and moco_mochi.py from one seed on one batch; relative differences
            of the loss, of the gradient norm and of the gradient (fp16 and TF32: GPU only)
  learning  simclr_debiased.py (DCL, its default) and moco_mochi.py (the CIFAR demo) on the folder
            for about 90 s each (two epochs, the second timed, then resumed to the epochs that
            fit), kNN top-1 at the end, and the untrained network's (--epochs 0)
  compile   --compile off and on for SimCLR and MoCo: images/s of the second epoch (the first
            compiles; --quick: dynamo with the eager backend, no code generation)
ResNet-18, CIFAR stem, width 64, bf16, batch 512 (--quick: tiny; on a CPU fp32, one thread).
Each part gets a share of what is left of --budget_s and scales its work to it. --out gets the
CSVs, report.md (a table per part, the device, torch, the command line) and log.txt (everything
printed)."""
import argparse
import contextlib
import csv
import functools
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import augment  # noqa: E402
import losses  # noqa: E402
import overhead  # noqa: E402  (it puts the repository on sys.path)

import common  # noqa: E402
import moco_mochi  # noqa: E402
import simclr_debiased  # noqa: E402

SHARES = {"methods": 0.30, "augment": 0.03, "losses": 0.03, "amp": 0.02, "learning": 0.38,
          "compile": 0.24}
GPU = dict(width=64, batch_size=512, images=5120, crop_size=32, epochs=2, repeats=1, queue=None,
           nnclr_queue=None, negatives=None, prototypes=None, n_hard=1024, learn_seconds=90,
           learn_images=0)
QUICK = dict(overhead.SIZES["quick"], images=32, epochs=1, pil_workers=0, learn_seconds=3,
             learn_images=64)


def build_parser():
    p = argparse.ArgumentParser(description="Speed, precision and a short learning run on one GPU.")
    p.add_argument("--data_dir", default="", help="a CIFAR-10 image folder (train/, test/)")
    p.add_argument("--out", default="runs/gpu_report", help="CSVs, report.md, log.txt")
    p.add_argument("--budget_s", type=float, help="total seconds (default 480; --quick 120)")
    p.add_argument("--parts", nargs="+", default=list(SHARES), choices=list(SHARES), metavar="P",
                   help=f"some of: {', '.join(SHARES)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU, tests)")
    return p


class Report:
    """The run's context: flags, device, sizes, the data, the log."""

    def __init__(self, a, argv):
        self.a, self.argv, self.start = a, argv, time.time()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.precision = "bf16" if self.cuda else "fp32"
        self.sizes = dict(QUICK if a.quick else GPU, arch="resnet18")
        os.makedirs(a.out, exist_ok=True)
        self.log_file = open(os.path.join(a.out, "log.txt"), "w")

    def log(self, message):
        line = f"[{time.time() - self.start:6.1f} s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self):
        return self.a.budget_s - (time.time() - self.start)


def labelled_folder(root, classes=4, train=16, test=8, size=16, seed=0):
    """root/{train,test}/c<k>/<i>.png: noisy images whose colour tells the class."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (classes, 3))
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(
                    os.path.join(root, split, f"c{c}", f"{i}.png"))
    return root


# -------------------------------------------------------------------------------------------------
# Parts: each returns its rows (dicts), or None when it wrote its CSV itself
# -------------------------------------------------------------------------------------------------

class OutOfTime(Exception):
    pass


def each(r, items, rows_of, end=None):
    """The rows of rows_of(item) for every item (a name): one that raises is logged and left out
    (r.failed); one reached after the time `end`, or raising OutOfTime, is skipped (r.skipped)."""
    rows = []
    for item in items:
        try:
            if end is not None and time.time() > end:
                raise OutOfTime("the part's time is spent")
            rows += rows_of(item)
        except OutOfTime as err:
            r.log(f"  {item}: skipped ({err})")
            r.skipped.append(item)
        except Exception:
            r.log(f"  {item} FAILED: {traceback.format_exc()}")
            r.failed.append(item)
    return rows


def train_images(r):
    return len(common.build_dataset("folder", r.data_dir, "train"))


def part_methods(r, seconds, tmp):
    s = dict(r.sizes, images=min(r.sizes["images"], train_images(r)))

    def rows_of(name):
        row = overhead.measure(name, s, r.data_dir, r.device, r.precision, tmp)
        out_dir = os.path.join(tmp, f"pil-{name}")  # PIL workers restart every epoch: one will do
        argv = overhead.script_argv(name, dict(s, epochs=1), r.data_dir, out_dir, r.precision,
                                    gpu_aug=False)
        argv += ["--workers", str(s["pil_workers"])] if "pil_workers" in s else []
        module = overhead.METHODS[name][0]
        row["pil_images_per_sec"] = float(overhead.run_script(module, argv, r.device)[-1][
            "images_per_sec"])
        r.log(f"  {name}: {row['images_per_sec']:.0f} images/s (PIL "
              f"{row['pil_images_per_sec']:.0f}), {row['overhead']:.2f}x the backbone, monitor "
              f"{row['monitor_call_pct']:.1f}% (stub: {row['monitor_pct']:.1f}%)"
              + (f", peak {row['peak_mem_mb']:.0f} MB" if r.cuda else ""))
        return [row]

    return each(r, overhead.METHODS, rows_of, time.time() + seconds)


def part_augment(r, seconds, tmp):
    cpus = os.cpu_count() or 1
    argv = ["--data_dir", r.data_dir, "--csv", os.path.join(r.a.out, "augment.csv"),
            "--workers", *sorted({"0", str(min(4, cpus)), str(cpus)}, key=int),
            "--threads", *([] if r.cuda else [str(cpus)])]
    sizes = ["64", "32", "1", "16"] if r.a.quick else ["4096", "512", "3", "32"]
    names = ["--images", "--batch", "--repeats", "--crop_size"]
    augment.main(argv + [x for pair in zip(names, sizes) for x in pair])


def part_losses(r, seconds, tmp):
    losses.main(["--csv", os.path.join(r.a.out, "losses.csv")] +
                (["--quick"] if r.a.quick else ["--repeats", "3", "--steps", "3"]))


def one_step(script, r, images, labels, precision):
    """(loss, flat gradient, note) of one train_step of `script` on two views of `images` from
    seed 0; precision fp32 (TF32 off), tf32, bf16 or fp16 (a step the GradScaler skips is taken
    again at the lower scale)."""
    s, dtype = r.sizes, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    argv = ["--arch", "resnet18", "--width", str(s["width"]), "--batch_size", str(len(images)),
            "--crop_size", str(s["crop_size"])]
    args = script.get_parser().parse_args(
        argv + (["--queue_size", str(s["queue"] or 4096)] if script is moco_mochi else []))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    fmt = torch.channels_last if r.cuda else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    x1, x2 = (common.BatchedAugment(s["crop_size"])(images, g).to(r.device)
              .contiguous(memory_format=fmt) for _ in range(2))
    y, ids = labels.to(r.device), torch.arange(len(labels), device=r.device)
    scaler, note = torch.amp.GradScaler(r.device.type, enabled=precision == "fp16"), ""
    for attempt in range(30):
        torch.manual_seed(0)
        model = (moco_mochi.MoCo(args, args.bn_splits or 8) if script is moco_mochi
                 else simclr_debiased.SimCLR(args)).to(r.device, memory_format=fmt)
        optimizer, scale = script.make_optimizer(model, args, r.device), scaler.get_scale()
        torch.manual_seed(2)  # MoCo's key shuffle
        if script is moco_mochi:
            stats = moco_mochi.train_step(model, model, optimizer, scaler, [x1, x2], y, ids, y,
                                          args, dtype)
        else:
            stats = simclr_debiased.train_step(model, optimizer, scaler, x1, x2, y, args, dtype)
        if not scaler.is_enabled() or scaler.get_scale() >= scale:
            break
        note = f"GradScaler: {attempt + 1} skipped step(s), scale {scaler.get_scale():g}"
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return stats["loss"].item(), torch.cat(grads), note


def part_amp(r, seconds, tmp):
    data = common.build_dataset("folder", r.data_dir, "train")
    data = common.subset(data, min(r.sizes["batch_size"], len(data)))
    images, labels = common.images_as_tensor(data, r.sizes["crop_size"])
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def rows_of(name):
        script = {"simclr_debiased": simclr_debiased, "moco_mochi": moco_mochi}[name]
        loss32, grad32, _ = one_step(script, r, images, labels, "fp32")
        norm32, rows = grad32.norm().item(), []
        for precision in ("tf32", "bf16", "fp16"):
            row = {"script": f"{script.__name__}.py", "precision": precision,
                   "batch": len(images), "width": r.sizes["width"], "loss_fp32": loss32}
            if precision != "bf16" and not r.cuda:
                rows.append({**row, "note": f"skipped: {precision} needs a GPU"})
                continue
            loss, grad, note = one_step(script, r, images, labels, precision)
            rows.append({**row, "loss": loss, "loss_rel_diff": abs(loss - loss32) / abs(loss32),
                         "grad_norm_fp32": norm32, "grad_norm": grad.norm().item(),
                         "grad_norm_rel_diff": abs(grad.norm().item() - norm32) / norm32,
                         "grad_rel_err": (grad - grad32).norm().item() / norm32, "note": note})
            r.log(f"  {script.__name__} {precision}: loss {loss:.6g} (fp32 {loss32:.6g}), "
                  f"gradient error {rows[-1]['grad_rel_err']:.2e} {note}")
        return rows

    try:
        return each(r, ["simclr_debiased", "moco_mochi"], rows_of)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def part_learning(r, seconds, tmp):
    s, runs = r.sizes, {"DCL": simclr_debiased, "MoCo": moco_mochi}

    def rows_of(name):
        module, left = runs[name], list(runs)[list(runs).index(name):]  # this run and the next
        end = time.time() + (seconds - (time.time() - r.part_start)) / len(left)
        base = ["--dataset", "folder", "--data_dir", r.data_dir, "--arch", "resnet18",
                "--width", str(s["width"]), "--batch_size", str(s["batch_size"]),
                "--crop_size", str(s["crop_size"]), "--precision", r.precision, "--gpu_aug",
                "--workers", "0", "--subset", str(s["learn_images"])]
        out, start = os.path.join(tmp, name), time.time()
        untrained = overhead.run_script(module, base + ["--epochs", "0", "--out_dir", out + "0"],
                                        r.device, save=True)[-1]
        knn_s = time.time() - start  # the data and a kNN: what the last epoch's kNN costs at most
        first = overhead.run_script(module, base + ["--epochs", "2", "--eval_every", "0",
                                                    "--out_dir", out], r.device, save=True)
        e1, e2 = (float(row["epoch_seconds"]) for row in first)  # the second: after warm-up
        train_s = min(s["learn_seconds"], end - start - 2 * knn_s)
        epochs = 2 + max(1, int((train_s - e1 - e2) / e2))
        r.log(f"  {name}: untrained kNN top-1 {float(untrained['knn_top1']):.2f}%, an epoch "
              f"{e2:.1f} s: {epochs} epochs in about {e1 + (epochs - 1) * e2:.0f} s")
        hist = overhead.run_script(module, ["--resume", os.path.join(out, "last.pt"), "--out_dir",
                                            out, "--epochs", str(epochs), "--eval_every",
                                            str(epochs)], r.device)
        row = {"method": name, "command": f"python {module.__name__}.py {' '.join(base)} "
               f"--epochs {epochs}", "epochs": epochs,
               "train_s": sum(float(h["epoch_seconds"]) for h in hist),
               "images_per_sec": float(hist[-1]["images_per_sec"]),
               "loss": float(hist[-1]["loss"]), "knn_top1": float(hist[-1]["knn_top1"]),
               "knn_top5": float(hist[-1]["knn_top5"]),
               "untrained_knn_top1": float(untrained["knn_top1"]),
               "untrained_knn_top5": float(untrained["knn_top5"]),
               "fn_rate": float(hist[-1]["fn_rate"] or "nan")}
        r.log(f"  {name}: {epochs} epochs in {row['train_s']:.0f} s, kNN top-1 "
              f"{row['knn_top1']:.2f}% (untrained {row['untrained_knn_top1']:.2f}%)")
        return [row]

    return each(r, runs, rows_of)


def part_compile(r, seconds, tmp):
    s = dict(r.sizes, epochs=2, images=min(r.sizes["images"], train_images(r)))
    end, eager = time.time() + seconds, functools.partial(torch.compile, backend="eager")

    def rows_of(run):
        name, on = run.split()[0], run.endswith("on")
        if on and not r.a.quick and end - time.time() < 45:
            raise OutOfTime(f"{end - time.time():.0f} s left: too little to compile")
        module, out_dir = overhead.METHODS[name][0], os.path.join(tmp, f"{name}-{on}")
        argv = overhead.script_argv(name, s, r.data_dir, out_dir, r.precision)
        start = time.time()
        with mock.patch.object(torch, "compile", eager) if r.a.quick and on \
                else contextlib.nullcontext():  # --quick: dynamo, no code generation
            hist = overhead.run_script(module, argv + ["--compile"] * on, r.device)
        row = {"method": name, "compile": "on" if on else "off",
               "images_per_sec": float(hist[-1]["images_per_sec"]),
               "first_epoch_s": float(hist[0]["epoch_seconds"]), "wall_s": time.time() - start}
        r.log(f"  {name} compile {row['compile']}: {row['images_per_sec']:.0f} images/s after "
              f"warm-up, first epoch {row['first_epoch_s']:.1f} s, {row['wall_s']:.0f} s in all")
        return [row]

    runs = [f"{name} --compile {on}" for name in ("SimCLR", "MoCo") for on in ("off", "on")]
    return each(r, runs, rows_of)


PARTS = {"methods": part_methods, "augment": part_augment, "losses": part_losses,
         "amp": part_amp, "learning": part_learning, "compile": part_compile}


# -------------------------------------------------------------------------------------------------
# The report
# -------------------------------------------------------------------------------------------------

def markdown(path):
    """The CSV at path as a markdown table (numbers to 4 significant digits), the columns with one
    value in every row of several said once above it."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))

    def cell(v):
        try:
            return f"{float(v):.4g}" if v and not v.lstrip("-").isdigit() else v
        except ValueError:
            return v
    same = [i for i in range(len(header)) if len(rows) > 1 and len({r[i] for r in rows}) == 1]
    keep = [i for i in range(len(header)) if i not in same]
    lines = [f"In every row: {', '.join(f'{header[i]} {cell(rows[0][i])}' for i in same)}.", ""] \
        if same else []
    lines += ["| " + " | ".join(header[i] for i in keep) + " |", "|---" * len(keep) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(r[i]) for i in keep) + " |" for r in rows])


def write_report(r, outcome):
    device = torch.cuda.get_device_name() if r.cuda else f"CPU ({os.cpu_count()} cores, no GPU)"
    lines = ["# GPU report", "", f"- device: {device}; {platform.platform()}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {r.precision}, "
             f"sizes {r.sizes}",
             f"- command: `python benchmarks/gpu_report.py {shlex.join(r.argv)}`",
             f"- data: {r.data_dir}; wall time {time.time() - r.start:.0f} s of "
             f"{r.a.budget_s:.0f}", ""]
    for part, (state, seconds) in outcome.items():
        lines += [f"## {part}", "", f"{state} in {seconds:.0f} s", ""]
        path = os.path.join(r.a.out, f"{part}.csv")
        if os.path.exists(path):
            lines += [markdown(path), ""]
    with open(os.path.join(r.a.out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.budget_s is None:
        a.budget_s = 120.0 if a.quick else 480.0
    if not a.data_dir and not a.quick:
        build_parser().error("--data_dir DATA (a CIFAR-10 image folder) is needed without --quick")
    r, outcome = Report(a, sys.argv[1:] if argv is None else argv), {}
    r.log(f"{r.device} ({torch.cuda.get_device_name() if r.cuda else platform.machine()}), "
          f"torch {torch.__version__}, budget {a.budget_s:.0f} s, parts {' '.join(a.parts)}")
    threads = torch.get_num_threads()
    if a.quick and not r.cuda:  # tiny sizes gain nothing from threads, which a busy CPU stalls
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        r.data_dir = a.data_dir or labelled_folder(os.path.join(tmp, "data"))
        for i, part in enumerate(a.parts):
            if os.path.exists(os.path.join(a.out, f"{part}.csv")):  # an earlier run's
                os.remove(os.path.join(a.out, f"{part}.csv"))
            seconds = max(0.0, r.left()) * SHARES[part] / sum(SHARES[p] for p in a.parts[i:])
            r.log(f"{part}: {seconds:.0f} s of the {r.left():.0f} s left")
            r.part_start, r.failed, r.skipped = time.time(), [], []
            os.makedirs(os.path.join(tmp, part))
            try:
                rows = PARTS[part](r, seconds, os.path.join(tmp, part))
                if rows:
                    overhead.write_csv(rows, os.path.join(a.out, f"{part}.csv"))
                state = "no rows" if rows == [] else "done"
                state += "".join(f"; {what}: {', '.join(items)}" for what, items in
                                 (("failed", r.failed), ("skipped", r.skipped)) if items)
            except Exception as err:  # the other parts still run
                r.log(f"{part} FAILED: {traceback.format_exc()}")
                state = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            outcome[part] = (state, time.time() - r.part_start)
            if r.cuda:
                torch.cuda.empty_cache()
            r.log(f"{part}: {state} ({outcome[part][1]:.0f} s)")
            write_report(r, outcome)  # after every part: a crash later keeps what was measured
    torch.set_num_threads(threads)
    r.log(f"wrote {os.path.join(a.out, 'report.md')} ({time.time() - r.start:.0f} s)")
    r.log_file.close()
    return outcome


if __name__ == "__main__":
    main()

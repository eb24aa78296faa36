"""NNCLR and KMCLR: a view's positive is a neighbour from a memory of past views, in one file.

    python nnclr_kmclr.py --method nnclr          # NNCLR on CIFAR-100, as the KMCLR authors ran it
    python nnclr_kmclr.py --method kmclr          # KMCLR: 400 online k-means centroids
    torchrun --standalone --nproc_per_node 4 nnclr_kmclr.py --method nnclr --batch_size 256

Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual
Representations" (ICCV 2021); M. Rossini, "Beyond Single Instance Positives for Contrastive Visual
Representation Learning" (KMCLR; code mwritescode/nnclr-cifar100, "theirs" below).

Per view z = projector(backbone(x)), p = predictor(z); the positive a(z) comes from a memory of past
view-1 projections as it is before the step (no gradient flows through it); ^: L2-normalised:
    NNCLR   a(z) = argmax_{q in Q} z^.q^      Q: a FIFO queue of normalize(z1)         (paper eq. 1)
    KMCLR   a(z) = argmin_{c_j} |z - c_j|^2   c: online k-means centroids of raw z1 (kmeans_step)
    loss    = 1/2 l(a(z1), p2) + 1/2 l(a(z2), p1),  l(a, p) = mean_i -log softmax_j(a^_i.p^_j / t)_i
Row i's negatives are the other view's B - 1 other predictions (the global batch under torchrun);
metrics.csv: fn_rate over them; nn_acc, the share of positives of the anchor's class (KMCLR: a
centroid has no class; that of the memory's row nearest to it).
"""
import argparse
import csv
import datetime
import json
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import common


def get_parser():
    p = Parser(prog="nnclr_kmclr.py", description="NNCLR and KMCLR.")
    shared_flags(p, dataset="cifar100", epochs=510, batch_size=64, lr=0.2, weight_decay=1e-6)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="nnclr", choices=["nnclr", "kmclr"], help="the memory")
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature t")
    g.add_argument("--hidden_dim", type=int, default=2048, help="hidden width of the projector")
    g.add_argument("--feature_dim", type=int, default=256, help="projection (memory) dimension")
    g.add_argument("--pred_dim", type=int, default=4096, help="hidden width of the predictor")
    g.add_argument("--queue_size", type=int, default=98304, help="NNCLR: support set size")
    g.add_argument("--num_prototypes", type=int, default=400, help="KMCLR: k centroids")
    g.add_argument("--reset_every", type=int, default=3, help="KMCLR: restart every N epochs")
    g.add_argument("--warmup_epochs", type=int, default=10, help="linear warm-up, at most half the "
                   "epochs (then cosine to 0)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    return p


def rules(a):
    return []  # setup's checks by type and name cover every flag of this script


class NNCLR(nn.Module):
    """common.py's ResNet; projector d -> h -> h -> D, BN after each Linear; predictor D -> pred_dim
    -> D (p = g(z): lightly#536); the memory in buffers, the same on every process."""

    def __init__(self, args, steps_per_epoch):
        super().__init__()
        self.backbone = common.build_backbone(args.arch, args.stem, args.width, args.stem_padding)
        d, h, e, q = self.backbone.out_dim, args.hidden_dim, args.feature_dim, args.pred_dim
        self.projector = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(),
                                       nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
                                       nn.Linear(h, e), nn.BatchNorm1d(e))
        self.predictor = nn.Sequential(nn.Linear(e, q), nn.BatchNorm1d(q), nn.ReLU(),
                                       nn.Linear(q, e))
        self.seed, self.reset_steps = args.seed, args.reset_every * steps_per_epoch
        g, k, n = torch.Generator().manual_seed(args.seed), args.num_prototypes, args.queue_size
        if args.method == "nnclr":  # the queue of unit rows (randn at first); labels (-1: none)
            self.register_buffer("rows", F.normalize(torch.randn(n, e, generator=g), dim=1))
        else:  # the ring of the last k raw z1 (theirs: uniform at first), their labels; centroids
            self.register_buffer("rows", torch.rand(k, e, generator=g))
            self.register_buffer("centroids", self.rows.double())  # = their first partial_fit
            self.register_buffer("counts", torch.ones(k, dtype=torch.float64))
            self.register_buffer("seen", torch.tensor(0))  # scikit-learn's re-seed counter
            self.register_buffer("step", torch.tensor(1))
        self.register_buffer("labels", torch.full((len(self.rows),), -1))
        self.register_buffer("ptr", torch.tensor(0))

    def forward(self, x1, x2):
        # Each view passes alone, as in the original code: BatchNorm statistics per view.
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return z1, z2, self.predictor(z1), self.predictor(z2)


def _check(need="", ok=True, **tensors):
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if not ok or any(len(s) != 2 or 0 in s for s in shapes.values()) or len(
            {s[1] for s in shapes.values()}) > 1:
        raise ValueError(f"need non-empty 2-D tensors [rows, D] of one D{need}; got {shapes}")


@torch.no_grad()
def _nn_index(z, support):
    """[B]: argmax_j cos(z_i, support_j), the first on ties, in float32 (or float64)."""
    _check(z=z, support=support)
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(torch.promote_types(z.dtype, support.dtype), torch.float32)
        return (F.normalize(z.to(dtype), dim=1) @ F.normalize(support.to(dtype), dim=1).T).argmax(1)


@torch.no_grad()
def nearest_neighbour(z, support):
    """NN(z) [B, D] = normalize(support[_nn_index(z, support)]): no gradient."""
    dtype = torch.promote_types(torch.promote_types(z.dtype, support.dtype), torch.float32)
    return F.normalize(support[_nn_index(z, support)].to(dtype), dim=1)


def contrast(a1, a2, p1, p2, temperature=0.1):
    """(loss, logits [2b, B], targets [2b]) of 1/2 l(a1, p2) + 1/2 l(a2, p1): rows this process's a1
    then a2 (no gradient), columns the other view's p of the global batch (gathered with gradient),
    targets i + rank b; the processes' mean is the whole batch's loss."""
    _check(", one shape, temperature > 0", a1.shape == a2.shape == p1.shape == p2.shape and
           temperature > 0, a1=a1, p1=p1)
    with torch.autocast(p1.device.type, enabled=False):
        dtype, b = torch.promote_types(p1.dtype, torch.float32), len(p1)
        a = F.normalize(torch.cat([a1, a2]).detach().to(dtype), dim=1)                   # [2b, D]
        c2, c1 = (gather(F.normalize(p.to(dtype), dim=1)) for p in (p2, p1))             # [B, D]
        logits = torch.cat([a[:b] @ c2.T, a[b:] @ c1.T]) / temperature                    # [2b, B]
        target = (torch.arange(b, device=p1.device) + rank() * b).repeat(2)               # [2b]
        return F.cross_entropy(logits, target), logits, target


def nnclr_loss(z1, z2, p1, p2, support, temperature=0.1):
    """1/2 l(NN(z1), p2) + 1/2 l(NN(z2), p1) (see contrast); gradients reach p1 and p2 alone."""
    nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
    return contrast(nn1, nn2, p1, p2, temperature)[0]


def kmeans_assign(x, centroids):
    """[B]: argmin_j |x_i - c_j|^2 = argmin_j |c_j|^2 - 2 x_i.c_j, the first on ties; float64."""
    _check(x=x, centroids=centroids)
    c = centroids.double()
    return ((c * c).sum(1) - 2 * x.double() @ c.T).argmin(1)


@torch.no_grad()
def kmeans_update(centroids, counts, x, assign):
    """(centroids, counts) after a mini-batch k-means step: where m_j = #{a_i = j} > 0, c_j <- (n_j
    c_j + sum_{a_i = j} x_i) / (n_j + m_j) and n_j <- n_j + m_j. Pure; float64, no atomic adds."""
    k = len(centroids)
    _check(f", counts [{k}], {len(x)} assignments in [0, {k})", counts.shape == (k,) and
           assign.shape == (len(x),) and bool(((assign >= 0) & (assign < k)).all()),
           x=x, centroids=centroids)
    onehot = F.one_hot(assign, k).double()                                                # [N, k]
    m, sums = onehot.sum(0), onehot.T @ x.double()                                        # [k, D]
    moved = (counts[:, None] * centroids.double() + sums) / (counts + m)[:, None]
    return (torch.where(m[:, None] > 0, moved, centroids.double()).to(centroids.dtype),
            (counts + m).to(counts.dtype))


@torch.no_grad()
def reseed_dead(centroids, counts, x, ratio=0.01, generator=None):
    """scikit-learn's MiniBatchKMeans re-seeding: the centroids of counts < ratio max(counts), at
    most N // 2 (the lowest counts, stable), move onto x[randperm(N)[:r]] in ascending order; their
    counts become the least of the others'. Pure; returns (centroids, counts)."""
    _check(f", counts [{len(centroids)}], ratio >= 0", counts.shape == (len(centroids),) and
           ratio >= 0, x=x, centroids=centroids)
    centroids, counts, low = centroids.clone(), counts.clone(), counts < ratio * counts.max()
    if low.sum() > len(x) // 2:
        low = torch.zeros_like(low).index_fill_(0, counts.sort(stable=True)[1][:len(x) // 2], True)
    if low.all():
        raise ValueError(f"ratio {ratio} re-seeds every centroid: no count is left to take")
    if low.any():
        rows = torch.randperm(len(x), generator=generator,
                              device=generator.device if generator else "cpu")[:int(low.sum())]
        centroids[low] = x[rows.to(x.device)].to(centroids.dtype)
        counts[low] = counts[~low].min()
    return centroids, counts


def kmeans_step(model, x):
    """Theirs on every process's view-1 rows x [N, D], raw, in the ring already: a restart from the
    ring every reset_steps steps (the oldest row first, counts 1); scikit-learn's counter, which
    grows by min(1024, k) a call, checks at 10 k (every 10 calls for k <= 1024; its other trigger, a
    count of 0, cannot happen here); the update; on a check, re-seeding (draws seeded by step)."""
    k, step = len(model.centroids), int(model.step)
    if model.reset_steps and step % model.reset_steps == 0:
        model.centroids.copy_(model.rows.roll(-int(model.ptr), 0))
        model.counts.fill_(1.0)
        model.seen.zero_()
    model.seen += min(1024, k)
    check = bool(model.seen >= 10 * k)
    c, n = kmeans_update(model.centroids, model.counts, x, kmeans_assign(x, model.centroids))
    if check:
        model.seen.zero_()
        c, n = reseed_dead(c, n, x, 0.01, torch.Generator().manual_seed((model.seed << 32) + step))
    model.centroids.copy_(c)
    model.counts.copy_(n)
    model.step += 1


@torch.no_grad()
def lars_(optimizer, trust=1e-3, eps=1e-8):
    """Theirs (lightning-bolts' LARS) where weight decay is on, before the SGD step: g <- (g + wd p)
    trust |p| / (|g| + wd |p| + eps), left alone where |p| or |g| is 0."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            wd = group["lars_weight_decay"]
            if p.grad is not None and wd > 0:
                p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                scaled = (p.grad + wd * p) * (trust * p_norm / (g_norm + wd * p_norm + eps))
                p.grad.copy_(torch.where((p_norm > 0) & (g_norm > 0), scaled, p.grad))


def make_optimizer(model, args, device):
    """SGD; LARS and weight decay on the weights, not on 1-D parameters (biases, all BN weights)."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    return torch.optim.SGD(
        [{"params": weights, "lars_weight_decay": args.weight_decay},
         {"params": [p for p in model.parameters() if p.dim() == 1], "lars_weight_decay": 0.0}],
        args.lr, momentum=args.momentum, **({"fused": True} if device.type == "cuda" else {}))


def train_step(net, model, optimizer, scaler, x1, x2, labels, args, dtype):
    """One step on two views [b, 3, H, W] of b images (labels [b], -1: none): forward per view, the
    positives from the memory as it is, the loss (float32, outside autocast), the LARS step, then
    every process's view 1 updates the memory (`model`'s buffers; `net`: model or its wrapper).
    Returns the loss and the monitors per anchor (view 1's rows, then view 2's)."""
    with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype is not None):
        z1, z2, p1, p2 = net(x1, x2)                                                    # [b, D]
    z = torch.cat([z1, z2]).detach().float()                                           # [2b, D]
    if args.method == "nnclr":
        index = _nn_index(z, model.rows)
        positives, positive_labels = model.rows[index], model.labels[index]
    else:
        positives = model.centroids[kmeans_assign(z, model.centroids)]
        positive_labels = model.labels[kmeans_assign(positives, model.rows)]
    loss, logits, target = contrast(*positives.chunk(2), p1, p2, args.temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # LARS needs the true gradient norms
    lars_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    # The memory: every process's view 1 in rank order, the last K rows in at the pointer.
    x, y, K = gather(z1.detach().float()), gather(labels), len(model.rows)               # [N, D]
    at = (model.ptr + torch.arange(min(len(x), K), device=x.device)) % K
    model.rows[at] = (F.normalize(x, dim=1) if args.method == "nnclr" else x)[-K:]
    model.labels[at] = y[-K:]
    model.ptr.copy_((model.ptr + len(at)) % K)
    if args.method == "kmclr":
        kmeans_step(model, x)
    y2, negative = labels.repeat(2), torch.ones_like(logits, dtype=torch.bool)         # [2b, B]
    negative[torch.arange(len(logits)), target] = False
    known = (y2 >= 0) & (positive_labels >= 0)
    return {"loss": loss.detach(), **negative_rates(logits.detach(), negative, y2, y),
            "nn_acc": torch.where(known, positive_labels == y2, math.nan)}


def train_one_epoch(net, model, data, optimizer, scaler, args, epoch, device, dtype):
    """One pass: each step's lr (theirs, per step: linear from 0 over the warm-up, at most half the
    run, then cosine to 0 at the end of --epochs), its views, train_step. Returns the statistics."""
    net.train()
    steps, warm = [], min(args.warmup_epochs, args.epochs / 2)
    for step, batch in enumerate(batches(data, epoch)):
        t = epoch + step / len(data.loader)
        lr = args.lr * (t / warm if t < warm else
                        0.5 * (1 + math.cos(math.pi * (t - warm) / (args.epochs - warm))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        (x1, x2), labels, _ = common.batch_views(batch, data, device)
        steps.append(train_step(net, model, optimizer, scaler, x1, x2, labels, args, dtype))
    return {**epoch_stats(steps), "lr": lr}


def main(argv=None):
    parser = get_parser()
    args, ckpt, device, dtype = setup(parser, argv, rules)
    history = ckpt["history"] if ckpt else []
    # Two views by their recipe, less their blur (a no-op at 32 px) and view 2's solarisation.
    recipe = {"scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8,
              "grayscale_p": 0.2, "blur_p": args.blur_p,
              "normalize": common.normalization(args.norm, args.dataset)}
    data = load_data(args, parser, device, recipe)
    model = NNCLR(args, len(data.loader)).to(device)
    if world() > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = restore(ckpt, model, optimizer, scaler, parser)
    net = distribute(model, model, args, device)

    def state(epoch):
        return {"script": parser.prog, "args": vars(args), "epoch": epoch,
                "backbone": model.backbone.state_dict(), "model": model.state_dict(),
                "head": {"layout": head_layout(model.projector),
                         "state": model.projector.state_dict()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}

    if args.epochs == 0:  # the untrained network
        end_epoch(args, {"epoch": 0, **knn_monitor(model.backbone, data, args, device, dtype)},
                  history, state(0))
    for epoch in range(start, args.epochs):
        start_time = time.time()
        row = {"epoch": epoch + 1, **train_one_epoch(net, model, data, optimizer, scaler, args,
                                                     epoch, device, dtype)}
        row["epoch_seconds"] = time.time() - start_time
        row["images_per_sec"] = len(data.loader) * args.batch_size / row["epoch_seconds"]
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            row.update(knn_monitor(model.backbone, data, args, device, dtype))
        end_epoch(args, row, history, state(epoch + 1))
    if world() > 1:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------
# The harness: the same in every training script, word for word (tests/test_copies.py)
# -------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit 2, from rank 0 alone)."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kwargs})

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def shared_flags(parser, **defaults):
    """The flags of every training script (shared/specs/api.md), with the script's defaults."""
    g = parser.add_argument_group("data, backbone and training")
    g.add_argument("--dataset", default="cifar10", choices=common.DATASETS,
                   help="folder: DATA_DIR/train/<class>/*, optional DATA_DIR/test/<class>/*")
    g.add_argument("--data_dir", default="data", help="data root; torchvision sets download here")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced images (0: all)")
    g.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size")
    g.add_argument("--blur_p", type=float, default=0.0, help="Gaussian blur probability")
    g.add_argument("--norm", default="auto", choices=["auto", *common.NORMALIZATION], help="inputs")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--gpu_aug", action="store_true", help="augment whole batches on the device")
    g.add_argument("--arch", default="resnet18", choices=list(common.ARCHS), help="backbone")
    g.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="cifar: 3x3 conv")
    g.add_argument("--width", type=int, default=64, help="base channels (64: the standard ResNet)")
    g.add_argument("--stem_padding", type=int, default=1, help="padding of the CIFAR stem's conv")
    g.add_argument("--epochs", type=int, default=200, help="total epochs (0: the untrained net)")
    g.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch over all processes")
    g.add_argument("--lr", type=float, default=0.03, help="learning rate (see the docstring)")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="weight decay")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast: auto is bf16 (or fp16) on GPUs, fp32 on CPUs")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained network")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by rank)")
    g.add_argument("--out_dir", default="runs/" + parser.prog[:-3], help="metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue this last.pt up to --epochs")
    g.add_argument("--knn_k", type=int, default=200, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.1, help="kNN monitor: temperature")
    g.add_argument("--eval_every", type=int, default=1, help="kNN every N epochs (0: never)")
    parser.set_defaults(**defaults)


MAY_CHANGE = ("epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision",
              "gpu_aug", "compile")
POSITIVE = ("lr", "temperature", "width", "crop_size", "knn_k", "knn_t", "feature_dim",
            "hidden_dim", "queue_size", "num_chunks", "num_negatives", "num_prototypes",
            "pred_dim", "embedding_dim")


def resume_checkpoint(parser, argv, path, n_proc):
    """(args, checkpoint, its checks) for --resume: the checkpoint's flags win over the defaults
    and only MAY_CHANGE's may take new values; a damaged or foreign file is a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        parser.error(f"no checkpoint at {path}")
    except Exception:  # random bytes, text, a truncated file, objects other than tensors
        parser.error(f"{path} is not a checkpoint (not written by torch.save, or damaged)")
    if not isinstance(ckpt, dict) or ckpt.get("script") != parser.prog:
        parser.error(f"{path} is not a checkpoint of {parser.prog}")
    missing = [k for k in ("args", "epoch", "model", "optimizer", "scaler", "rng", "history")
               if k not in ckpt]
    parser.set_defaults(**{**ckpt.get("args", {}), "out_dir": os.path.dirname(os.path.abspath(
        path))})
    args = parser.parse_args(argv)
    changed = [f"--{k}" for k, v in ckpt.get("args", {}).items()
               if k not in MAY_CHANGE and vars(args).get(k) != v]
    return args, ckpt, [
        (not missing, f"{path} lacks {', '.join(missing)}"),
        (not changed, f"{', '.join(changed)}: a resumed run keeps the checkpoint's values (only "
         f"--{', --'.join(MAY_CHANGE)} may change)"),
        (missing or n_proc == len(ckpt["rng"]), f"{path} ran on {len(ckpt.get('rng', ()))} "
         "process(es): resume it on as many"),
        (missing or args.epochs > ckpt["epoch"], f"{path} has trained {ckpt.get('epoch')} "
         "epochs: ask for more with --epochs")]


def setup(parser, argv, rules):
    """(args, checkpoint or None, device, autocast dtype or None). Checks the flags (floats finite,
    ints >= 0, *_p in [0, 1], *momentum in [0, 1), POSITIVE > 0, the script's rules(args)) and
    --resume's checkpoint, joins the process group, seeds by rank, writes args.json."""
    args, ckpt, n_proc = parser.parse_args(argv), None, int(os.environ.get("WORLD_SIZE", 1))
    checks = []
    if args.resume:
        args, ckpt, checks = resume_checkpoint(parser, argv, args.resume, n_proc)
    for name, v in vars(args).items():  # the first rule a value breaks, by type and name
        need = next((rule for bad, rule in [
            (type(v) is float and not math.isfinite(v), "finite"),
            ((type(v) is int or name in ("weight_decay", "warmup_epochs")) and v < 0, ">= 0"),
            (name.endswith("_p") and not 0 <= v <= 1, "in [0, 1]"),
            (name.endswith("momentum") and type(v) is float and not 0 <= v < 1, "in [0, 1)"),
            (name in POSITIVE and not v > 0, "> 0")] if bad), "")
        if need:
            parser.error(f"--{name} must be {need}, got {v}")
    for ok, message in [*checks, *rules(args), (args.batch_size % n_proc == 0 and args.batch_size
                        >= 2 * n_proc, "--batch_size must hold 2 or more images for each of "
                        f"{n_proc} process(es)")]:
        if not ok:
            parser.error(message)
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if n_proc > 1 and not dist.is_initialized():  # a long timeout: rank 0 alone runs the kNN
        torch.cuda.set_device(device) if cuda else None
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        if rank() == 0:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2, sort_keys=True)
    except OSError as err:
        parser.error(f"cannot write to --out_dir {args.out_dir}: {err}")
    auto = "fp32" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    precision = auto if args.precision == "auto" else args.precision
    if precision == "fp16" and not cuda and rank() == 0:
        print(f"{parser.prog}: warning: fp16 autocast on a CPU is very slow", file=sys.stderr)
    torch.manual_seed(args.seed + rank())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return args, ckpt, device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


class GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient and returns this process's slice:
    the other processes' anchors then push on this process's rows, as in one process."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.stack(grads)
        dist.all_reduce(grad)
        return grad[rank()]


def gather(x):
    """The rows of every process in rank order, with gradient where x has one (x in one process)."""
    return x if world() == 1 else torch.cat(GatherLayer.apply(x))


def load_data(args, parser, device, recipe, views=2, split="train", to_input=None):
    """common.run_data (the data sets, views and this process's loader) with one-line errors."""
    try:
        if rank() > 0:
            dist.barrier()  # rank 0 downloads first, then the others find the files
        data = common.run_data(args, recipe, device, views, split, to_input, rank(), world())
    except (OSError, ValueError) as err:  # missing data, an unreadable image, mixed image sizes
        parser.error(str(err))
    finally:
        if rank() == 0 and world() > 1:
            dist.barrier()
    data.parser = parser
    return data


def batches(data, epoch):
    """The epoch's batches, with a progress bar on rank 0 in a terminal; an unreadable image stops
    the run with a one-line error naming it, also when a loader worker met it."""
    data.sampler.set_epoch(epoch)
    try:
        yield from tqdm(data.loader, f"epoch {epoch + 1}", leave=False, disable=rank() > 0 or None)
    except OSError as err:
        data.parser.error((re.findall(r"cannot read image .*", str(err)) or [str(err)])[-1])


@torch.no_grad()
def negative_rates(sim, negative, labels, candidate_labels):
    """The negatives monitor per anchor (NaN where no negative has a known class): fn_rate, the
    share of its negatives of its own class, and fn_rate_hard, the share among its 1% most
    similar negatives (at least one). sim, negative [a, m]: similarities and the pairs the loss
    contrasts; labels [a], candidate_labels [m] or [a, m]: classes, -1 where unknown."""
    cand = candidate_labels.expand_as(sim)
    known = negative & (cand >= 0) & (labels[:, None] >= 0)                       # [a, m]
    same, n = known & (cand == labels[:, None]), known.sum(1)                     # [a, m], [a]
    k = (n // 100).clamp(min=1)                                                   # [a]
    top = sim.masked_fill(~known, -math.inf).topk(max(1, sim.shape[1] // 100), dim=1).indices
    hard = same.gather(1, top) & (torch.arange(top.shape[1], device=sim.device) < k[:, None])
    return {"fn_rate": torch.where(n > 0, same.sum(1) / n, math.nan),
            "fn_rate_hard": torch.where(n > 0, hard.sum(1) / k, math.nan)}


def epoch_stats(steps):
    """{name: mean over the epoch's values on every process} of the steps' statistics (the loss;
    values per anchor, NaN for none: '' if all are; a non-finite loss is kept: it stops the run)."""
    out = {}
    for name in steps[0]:
        v = torch.cat([s[name].double().reshape(-1) for s in steps])
        valid = ~v.isnan() | (name == "loss")
        total = torch.stack([torch.where(valid, v, 0.0).sum(), valid.sum().double()])
        dist.all_reduce(total) if world() > 1 else None
        out[name] = (total[0] / total[1]).item() if total[1] else ""
    return out


@torch.no_grad()
def knn_monitor(backbone, data, args, device, dtype):
    """{knn_top1, knn_top5} (%) on rank 0 ({} elsewhere, or without a labelled test split): each
    test image's --knn_k nearest training images (cosine of backbone features) vote with weight
    exp(sim / --knn_t) (Wu et al. 2018)."""
    if data.test is None or rank() > 0:
        return {}
    backbone.eval()

    def embed(dataset):
        feats, labels = [], []
        for x, y in DataLoader(dataset, args.batch_size, num_workers=args.workers):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                feats.append(F.normalize(backbone(data.to_input(x.to(device))).float(), dim=1))
            labels.append(y.to(device))
        return torch.cat(feats), torch.cat(labels)

    (bank, bank_labels), (feats, labels), hits = embed(data.memory), embed(data.test), 0
    for f, y in zip(feats.split(1024), labels.split(1024)):  # [1024, N] similarities at a time
        sim, idx = (f @ bank.T).topk(min(args.knn_k, len(bank)), dim=1)            # [n, k]
        votes = torch.zeros(len(f), int(bank_labels.max()) + 1, device=device)
        votes.scatter_add_(1, bank_labels[idx], (sim / args.knn_t).exp())         # [n, classes]
        top = votes.topk(min(5, votes.shape[1]), dim=1).indices == y[:, None]      # [n, 5]
        hits = hits + torch.stack([top[:, 0].sum(), top.any(1).sum()]) / len(labels)
    return {"knn_top1": 100 * hits[0].item(), "knn_top5": 100 * hits[1].item()}


def restore(ckpt, model, optimizer, scaler, parser):
    """The first epoch: 0, or the checkpoint's after loading the model, optimizer, scaler and this
    process's RNG states (a tensor of another shape is a one-line error)."""
    try:
        if ckpt is None:
            return 0
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:  # bf16 and fp32 runs save a disabled scaler
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"][rank()][0])
        if torch.cuda.is_available() and len(ckpt["rng"][rank()][1]):
            torch.cuda.set_rng_state(ckpt["rng"][rank()][1])
        return ckpt["epoch"]
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][1:2] or [str(err)]
        parser.error(f"the checkpoint does not fit the model its arguments build: {detail[0]}")


def distribute(model, trained, args, device):
    """All processes start from rank 0's state (weights, queues, banks); `trained`, the part with
    gradients, runs under DDP with torchrun, compiled with --compile. Checkpoints save `model`."""
    model.to(memory_format=torch.channels_last) if device.type == "cuda" else None
    if world() > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, 0) if torch.is_tensor(t) else None
        ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(trained, ids)
    return torch.compile(trained) if args.compile else trained


def head_layout(head):
    """[name, kind, sizes...] of each Linear, BatchNorm1d and ReLU of a head: with the head's state
    dict it rebuilds the head without this script (linear_eval.py, bound.py)."""
    return [[n, "linear", m.in_features, m.out_features, m.bias is not None] if type(m) is nn.Linear
            else [n, "relu"] if type(m) is nn.ReLU else [n, "bn", m.num_features, m.affine]
            for n, m in head.named_children()]


def end_epoch(args, row, history, state):
    """A non-finite loss stops the run (last.pt keeps the last good epoch); else the row joins
    metrics.csv, and rank 0 prints it and replaces last.pt atomically (a temporary file, then
    os.replace)."""
    path = os.path.join(args.out_dir, "last.pt")
    if not math.isfinite(row.get("loss", 0.0)):
        if rank() == 0:
            kept = f"{path} keeps epoch {history[-1]['epoch']}" if history else "no last.pt written"
            print(f"non-finite loss in epoch {row['epoch']}; {kept}", file=sys.stderr)
        sys.exit(1)
    history.append(row)
    rng = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else []]
    rngs = [rng] * world()
    dist.all_gather_object(rngs, rng) if world() > 1 else None  # every process's, for a resume
    if rank() == 0:
        with open(os.path.join(args.out_dir, "metrics.csv"), "w", newline="") as f:  # whole
            writer = csv.DictWriter(f, list(dict.fromkeys(k for r in history for k in r)))
            writer.writeheader()
            writer.writerows({k: f"{v:.6g}" if type(v) is float else v for k, v in r.items()}
                             for r in history)
        print(" ".join(f"{k} {v:.4g}" if type(v) is float else f"{k} {v}" for k, v in row.items()))
        torch.save({**state, "history": history, "rng": rngs}, path + ".tmp")
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()

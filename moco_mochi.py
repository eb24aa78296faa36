"""MoCo v2 and MoCHi hard negative mixing, in one file.

    python moco_mochi.py             # the official CIFAR-10 demo (--symmetric: its symmetric loss)
    python moco_mochi.py --n_hard 1024 --s1_hard 1024 --s2_hard 256     # MoCHi (1024, 1024, 256)
    torchrun --standalone --nproc_per_node 4 moco_mochi.py --n_hard 1024       # 4 GPUs, shuffle BN
    python moco_mochi.py --mlp --temperature 0.2 --crop_min 0.2 --blur_p 0.5   # MoCo v2's changes

He et al. (CVPR 2020) and Chen et al. (2020), MoCo and MoCo v2, code facebookresearch/moco;
Kalantidis et al., "Hard Negative Mixing for Contrastive Learning" (NeurIPS 2020; no official
code: the port davidsvy/hard-negative-mixing). Queries q = f_q(x1) and keys k = f_k(x2) are unit
vectors, f_k <- m f_k + (1 - m) f_q before the keys, the queue holds the last K keys n_j of every
process. With temperature T, and for MoCHi n_i, n_j, n_m drawn from q's N hardest keys (top q.n):

    MoCo     loss = -log exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.n_j / T))
    type 1   s  more negatives normalize(a n_i + (1 - a) n_j), a ~ U(0, 1)     of q alone,
    type 2   s' more negatives normalize(b q + (1 - b) n_m),   b ~ U(0, 0.5)   detached, not queued

Shuffle BN: under torchrun the key images are shuffled across processes; one process runs
BatchNorm in --bn_splits groups (the demo's SplitBatchNorm) of a shuffled key batch.
"""
import argparse
import copy
import csv
import datetime
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import common


def get_parser():
    p = Parser(prog="moco_mochi.py", description="MoCo v2 and MoCHi hard negative mixing.")
    shared_flags(p, batch_size=512, lr=0.06)  # the CIFAR demo's, as the shared defaults
    g = p.add_argument_group("MoCo (the original names are aliases)")
    g.add_argument("--crop_min", type=float, default=0.08, help="smallest crop scale")
    g.add_argument("--mlp", action="store_true", help="v2's head d -> d -> ReLU -> feature_dim")
    g.add_argument("--bn_splits", type=int, default=0, help="split-BN groups (0: 8, torchrun 1)")
    g.add_argument("--queue_size", type=int, default=4096, help="queue length K")
    g.add_argument("--ema", type=float, default=0.99, help="key encoder momentum m")
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature T")
    g.add_argument("--feature_dim", type=int, default=128, help="query and key dimension")
    for alias, dest, kind in (("k", "queue_size", int), ("m", "ema", float),
                              ("t", "temperature", float), ("dim", "feature_dim", int)):
        g.add_argument(f"--{alias}_moco", dest=dest, type=kind, default=argparse.SUPPRESS,
                       help=f"= --{dest}")
    g.add_argument("--symmetric", action="store_true", help="add the loss with the views swapped")
    g.add_argument("--mask_own", action="store_true", help="no negatives from the query's image")
    g = p.add_argument_group("MoCHi (davidsvy's names; --n_hard 0: MoCo)")
    g.add_argument("--n_hard", type=int, default=0, help="N: hardest queue keys per query")
    g.add_argument("--s1_hard", type=int, default=1024, help="s: type-1 points per query")
    g.add_argument("--s2_hard", type=int, default=256, help="s': type-2 points per query")
    g.add_argument("--start1_hard", type=int, default=10, help="first epoch (from 0) of type 1")
    g.add_argument("--start2_hard", type=int, default=10, help="first epoch (from 0) of type 2")
    return p


def rules(a):
    """The method's flag checks for setup: (condition, message) pairs."""
    n_proc, keys = int(os.environ.get("WORLD_SIZE", 1)), a.batch_size * (1 + a.symmetric)
    splits = a.bn_splits or (8 if n_proc == 1 else 1)
    return [(0 < a.crop_min <= 1 and 0 <= a.ema <= 1, "need 0 < --crop_min <= 1, 0 <= --ema <= 1"),
            (a.queue_size % keys == 0, f"--queue_size must be a multiple of the {keys} keys/step"),
            (a.n_hard <= a.queue_size, "--n_hard must be at most --queue_size"),
            (a.batch_size // n_proc % splits == 0, f"--bn_splits {splits} must divide the "
             f"{a.batch_size // n_proc} images of each process")]


class SplitBatchNorm(nn.BatchNorm2d):
    """The CIFAR demo's SplitBatchNorm: in training, images n, n + G, n + 2G, ... (G = splits) are
    normalised together, as on G GPUs; the running statistics are the groups' mean."""

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        g, (n, c, h, w) = self.splits, x.shape
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)            # [G C]
        y = F.batch_norm(x.reshape(n // g, c * g, h, w), mean, var, self.weight.repeat(g),
                         self.bias.repeat(g), True, self.momentum, self.eps)
        self.running_mean.copy_(mean.view(g, c).mean(0))
        self.running_var.copy_(var.view(g, c).mean(0))
        return y.view(n, c, h, w)


class MoCo(nn.Module):
    """builder.py's MoCo: the query encoder (common.py's ResNet, the head), its momentum copy, and
    buffers: the queue [K, D] of unit keys, each key's image id (-1: the random initial keys) and
    the next row to write."""

    def __init__(self, args, bn_splits=1):
        super().__init__()
        backbone = common.build_backbone(args.arch, args.stem, args.width, args.stem_padding)
        for m in backbone.modules():  # the demo's split BN, weights kept (bn_splits 1: plain BN)
            if type(m) is nn.BatchNorm2d:
                m.__class__, m.splits = SplitBatchNorm, bn_splits
        d = backbone.out_dim
        mlp = [nn.Linear(d, d), nn.ReLU()] if args.mlp else []  # v2's head; the demo: fc alone
        head = nn.Sequential(*mlp, nn.Linear(d, args.feature_dim))
        self.encoder_q = nn.Sequential(OrderedDict(backbone=backbone, head=head))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        queue = F.normalize(torch.randn(args.queue_size, args.feature_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ids", torch.full((args.queue_size,), -1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, *views):
        return [self.encoder_q(x) for x in views]  # queries [b, D]: a forward pass per view

    @torch.no_grad()
    def enqueue(self, keys, ids):
        """builder.py's _dequeue_and_enqueue: keys [B, D], image ids [B] replace the oldest."""
        rows = self.queue_ptr + torch.arange(len(keys), device=keys.device)            # [B]
        self.queue[rows], self.queue_ids[rows] = keys, ids
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))


@torch.no_grad()
def shuffled_keys(key_encoder, x):
    """builder.py's _batch_shuffle_ddp and _batch_unshuffle_ddp: the key encoder sees the key
    images of every process in rank 0's random order, this process a slice of them, and each key
    goes back to its image, so BatchNorm cannot pair a key with its query. In one process the
    order matters only to split BN (moco_mochi.py); with plain BN it changes nothing (the Ring
    code's one-GPU shuffle_bn)."""
    x_all = gather(x)                                                                # [B, ...]
    perm = torch.randperm(len(x_all), device=x.device)                               # [B]
    dist.broadcast(perm, 0) if world() > 1 else None
    keys = gather(key_encoder(x_all[perm.view(world(), -1)[rank()]]))                # [B, D]
    return keys[perm.argsort().view(world(), -1)[rank()]]                            # [b, D]


def moco_logits(q, k, queue, temperature=0.2, synthetic=None, exclude=None):
    """builder.py's logits [q.k | q.queue^T] / T with each query's MoCHi points appended, [B, 1 +
    K + S], float32 (float64 for float64 q) outside autocast. q, k [B, D], queue [K, D], synthetic
    [B, S, D] are normalised here; exclude [B, K]: queue keys that are no negatives (-inf)."""
    if q.shape != k.shape or queue.shape[1:] != q.shape[1:] or not temperature > 0:
        raise ValueError(f"need q, k [B, D], queue [K, D], temperature > 0; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(queue.shape)}, {temperature}")
    with torch.autocast(q.device.type, enabled=False):
        dt = torch.promote_types(q.dtype, torch.float32)
        q, k = F.normalize(q.to(dt), dim=1), F.normalize(k.to(dt), dim=1)             # [B, D]
        l_pos = (q * k).sum(1, keepdim=True)                                            # [B, 1]
        l_neg = q @ F.normalize(queue.to(dt), dim=1).T                                  # [B, K]
        l_neg = l_neg if exclude is None else l_neg.masked_fill(exclude, -math.inf)
        l_syn = l_pos[:, :0] if synthetic is None else torch.einsum(
            "bd,bsd->bs", q, F.normalize(synthetic.to(dt), dim=2))                      # [B, S]
        return torch.cat([l_pos, l_neg, l_syn], dim=1) / temperature                    # [B, 1+K+S]


def moco_loss(q, k, queue, temperature=0.2, synthetic=None, exclude=None):
    """MoCo's InfoNCE: the batch mean of the cross-entropy of moco_logits, the positive class 0."""
    logits = moco_logits(q, k, queue, temperature, synthetic, exclude)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def mochi_negatives(q, queue, n_hard, s1, s2, generator=None, exclude=None, return_sources=False):
    """MoCHi's points [B, s1 + s2, D], unit and detached: s1 of type 1, then s2 of type 2, from each
    query's n_hard most similar queue rows but `exclude` [B, K], drawn with replacement in
    davidsvy's order (src/moco.py). return_sources: also the rows each mixes, [B, S, 2] (type 2:
    m twice)."""
    if not (0 < n_hard <= len(queue) and s1 >= 0 and s2 >= 0):
        raise ValueError(f"need 0 < n_hard <= K = {len(queue)}, s1, s2 >= 0: {n_hard}, {s1}, {s2}")
    with torch.autocast(q.device.type, enabled=False):
        dt, b, dev = torch.promote_types(q.dtype, torch.float32), len(q), q.device
        q, queue = F.normalize(q.to(dt), dim=1), F.normalize(queue.to(dt), dim=1)   # [B, D], [K, D]
        sim = q @ queue.T if exclude is None else (q @ queue.T).masked_fill(exclude, -math.inf)
        hard = sim.topk(n_hard, dim=1).indices                                         # [B, N] rows
        pos = torch.randint(0, n_hard, (2, b, s1), generator=generator, device=dev)
        i, j = hard.gather(1, pos[0]), hard.gather(1, pos[1])                          # [B, s1]
        a = torch.rand(b, s1, 1, generator=generator, device=dev, dtype=dt)             # [B, s1, 1]
        m = hard.gather(1, torch.randint(0, n_hard, (b, s2), generator=generator, device=dev))
        beta = 0.5 * torch.rand(b, s2, 1, generator=generator, device=dev, dtype=dt)    # [B, s2, 1]
        points = F.normalize(torch.cat([a * queue[i] + (1 - a) * queue[j],
                                        beta * q[:, None] + (1 - beta) * queue[m]], 1), dim=2)
        sources = torch.stack([torch.cat([i, m], 1), torch.cat([j, m], 1)], dim=2)     # [B, S, 2]
        return (points, sources) if return_sources else points                         # [B, S, D]


def make_optimizer(model, args, device):
    """main_moco.py: SGD, momentum 0.9, weight decay on every parameter (the key encoder's get no
    gradient: SGD leaves them alone); fused kernels on GPUs."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD(model.parameters(), args.lr, momentum=0.9,
                           weight_decay=args.weight_decay, **fused)


@torch.no_grad()
def monitor(logits, own, labels, key_labels, sources):
    """Per query, negative_rates over the queue keys the loss contrasts (key_labels [K], -1: no
    image) and fn_rate_synth: the share of its MoCHi points with a source key of its class (type
    1: either of two), points with a source of unknown class left out."""
    stats = negative_rates(logits[:, 1:len(key_labels) + 1], ~own, labels, key_labels)
    if sources is not None:
        src = key_labels[sources]                                                       # [b, S, 2]
        known = (src >= 0).all(2) & (labels[:, None] >= 0)                              # [b, S]
        same = ((src == labels[:, None, None]).any(2) & known).sum(1)                    # [b]
        stats["fn_rate_synth"] = torch.where(known.any(1), same / known.sum(1), math.nan)
    return stats


def train_step(net, model, optimizer, scaler, views, labels, ids, classes, args, dtype, mix=(0, 0)):
    """main_moco.py train() and builder.py forward() on two views [b, 3, H, W] of b images (labels
    [b], -1: unknown; ids [b]: their indices; classes [N]: the class of each index): queries, EMA,
    keys, the loss of each (query view, key view), the SGD step, the keys into the queue. mix =
    (s1, s2): MoCHi's points per query. Returns the loss and the monitor's values per query."""
    pairs = [(0, 1), (1, 0)] if args.symmetric else [(0, 1)]          # (query view, key view)
    with torch.autocast(views[0].device.type, dtype=dtype, enabled=dtype is not None):
        queries = net(*(views[v] for v, _ in pairs))                                   # [b, D] each
        with torch.no_grad():  # builder.py: the momentum update, then the keys
            for pk, pq in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
                pk.mul_(args.ema).add_(pq.detach(), alpha=1 - args.ema)
            keys = [F.normalize(shuffled_keys(model.encoder_k, views[v]).to(model.queue.dtype),
                                dim=1) for _, v in pairs]                              # [b, D] each
    own = (ids[:, None] == model.queue_ids) & args.mask_own                           # [b, K]
    key_labels = torch.where(model.queue_ids >= 0, classes[model.queue_ids], -1)      # [K]
    loss, stats = 0.0, []
    for q, k in zip(queries, keys):
        synthetic, sources = mochi_negatives(q, model.queue, args.n_hard, *mix, exclude=own,
                                             return_sources=True) if sum(mix) else (None, None)
        logits = moco_logits(q, k, model.queue, args.temperature, synthetic, own)      # [b, 1+K+S]
        loss = loss + F.cross_entropy(logits, torch.zeros_like(ids))
        stats.append(monitor(logits.detach(), own, labels, key_labels, sources))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    for k in keys[::-1]:  # the demo enqueues [k1, k2]: the keys of view 1 first
        model.enqueue(gather(k), gather(ids))
    return {"loss": loss.detach(), **{n: torch.cat([s[n] for s in stats]) for n in stats[0]}}


def train_one_epoch(net, model, data, optimizer, scaler, args, epoch, device, dtype):
    """One pass at main_moco.py's cosine lr (--cos: set per epoch), MoCHi's types from their start
    epochs on, each batch's views through train_step. Returns the epoch's statistics."""
    net.train()
    lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr
    mix = [s if args.n_hard and epoch >= start else 0 for s, start in
           ((args.s1_hard, args.start1_hard), (args.s2_hard, args.start2_hard))]
    steps = []
    for batch in batches(data, epoch):
        views, labels, ids = common.batch_views(batch, data, device)
        steps.append(train_step(net, model, optimizer, scaler, views, labels, ids, data.labels,
                                args, dtype, mix))
    return {**epoch_stats(steps), "lr": lr}


def main(argv=None):
    parser = get_parser()
    args, ckpt, device, dtype = setup(parser, argv, rules)
    history = ckpt["history"] if ckpt else []
    recipe = {"scale": (args.crop_min, 1.0), "blur_p": args.blur_p,
              "normalize": common.normalization(args.norm, args.dataset)}
    data = load_data(args, parser, device, recipe)

    # ---- model (split BN in one process, shuffle BN across processes), optimizer, resume ----
    splits = args.bn_splits or (8 if world() == 1 else 1)
    model = MoCo(args, splits).to(device)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = restore(ckpt, model, optimizer, scaler, parser)
    net = distribute(model, model, args, device)
    backbone, head = model.encoder_q.backbone, model.encoder_q.head

    def state(epoch):
        return {"script": parser.prog, "args": vars(args), "epoch": epoch,
                "bn_mode": f"shuffle BN, {world()} process(es), split BN in {splits} groups each",
                "backbone": backbone.state_dict(), "model": model.state_dict(),
                "head": {"layout": head_layout(head), "state": head.state_dict()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}

    # ---- training: a row of metrics.csv and last.pt per epoch (--epochs 0: the untrained net) ----
    if args.epochs == 0:
        end_epoch(args, {"epoch": 0, **knn_monitor(backbone, data, args, device, dtype)},
                  history, state(0))
    for epoch in range(start, args.epochs):
        start_time = time.time()
        row = {"epoch": epoch + 1, **train_one_epoch(net, model, data, optimizer, scaler, args,
                                                     epoch, device, dtype)}
        row["epoch_seconds"] = time.time() - start_time
        row["images_per_sec"] = len(data.loader) * args.batch_size / row["epoch_seconds"]
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            row.update(knn_monitor(backbone, data, args, device, dtype))
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

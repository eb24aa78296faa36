"""MoCo v2 with optional MoCHi hard negative mixing, in one file.

    python moco_mochi.py                                              # MoCo v2, CIFAR-10 (official CIFAR demo's settings)
    python moco_mochi.py --n_hard 1024 --s1_hard 1024 --s2_hard 256   # MoCHi (1024, 1024, 256)
    torchrun --standalone --nproc_per_node 4 moco_mochi.py --n_hard 1024
    torchrun --nproc_per_node 8 moco_mochi.py --dataset folder --data_dir IMAGENET --arch resnet50 --stem imagenet \
        --crop_size 224 --crop_min 0.2 --blur_p 0.5 --k_moco 65536 --m_moco 0.999 --t_moco 0.2 \
        --weight_decay 1e-4 --batch_size 256 --lr 0.03 --epochs 200                  # the ImageNet MoCo v2 recipe
    python moco_mochi.py --dataset folder --data_dir DATA --width 8 --batch_size 128 --epochs 3    # CPU

Papers: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020);
Chen et al., "Improved Baselines with Momentum Contrastive Learning" (arXiv 2003.04297, MoCo v2);
Kalantidis et al., "Hard Negative Mixing for Contrastive Learning" (NeurIPS 2020, MoCHi).

A query q = f_q(x1) and its key k = f_k(x2) (f_k an exponential moving average of f_q, updated
before the keys are computed: theta_k <- m theta_k + (1 - m) theta_q) are unit vectors; a queue
holds the last K keys n_1..n_K of all processes. With temperature T:

    MoCo     loss = -log exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.n_j / T))
    MoCHi    for each query, among its N hardest queue keys (largest q.n):
             type 1: s  points h  = normalize(a n_i + (1 - a) n_j),  a ~ U(0, 1), i != j
             type 2: s' points h' = normalize(b q + (1 - b) n_j),    b ~ U(0, 0.5)
             q.h / T and q.h' / T join that query's negatives; h, h' are detached, never enqueued.

Shuffle BN: under torchrun the key batch is permuted across processes (permutation broadcast from
rank 0) before f_k and restored after. In one process split BN (--bn_splits, the CIFAR demo's
SplitBatchNorm) computes BatchNorm statistics over groups of the batch, after a permutation.
"""
import argparse
import copy
import csv
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import common

SCRIPT = "moco_mochi.py"
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision", "gpu_aug",
                        "compile"}


def get_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="MoCo v2 with MoCHi hard negative mixing.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=common.DATASETS, help="folder: DATA_DIR/train/<class>/*")
    g.add_argument("--data_dir", default="data", help="data root; torchvision data sets are downloaded here")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced images (0: all)")
    g.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size")
    g.add_argument("--crop_min", type=float, default=0.08, help="smallest crop scale (0.2 in the ImageNet recipe)")
    g.add_argument("--blur_p", type=float, default=0.0, help="Gaussian blur probability (0.5 in the ImageNet recipe)")
    g.add_argument("--norm", default="auto", choices=["auto", *common.NORMALIZATION], help="input normalisation")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--gpu_aug", action="store_true", help="decode the images once, augment whole batches on the device")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=list(common.ARCHS), help="backbone")
    g.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="cifar: 3x3 stride-1 conv, no max-pool")
    g.add_argument("--width", type=int, default=64, help="base channels of the ResNet (64 = standard)")
    g.add_argument("--stem_padding", type=int, default=1, help="padding of the CIFAR stem's conv")
    g.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="MoCo v2 head d -> d -> ReLU -> dim (--no-mlp: one Linear, as MoCo v1 and the CIFAR demo)")
    g.add_argument("--bn_splits", type=int, default=0,
                   help="split BN groups per process (0: 8 in one process, 1 under torchrun, where shuffle BN runs)")
    g = p.add_argument_group("MoCo")
    g.add_argument("--queue_size", "--k_moco", dest="queue_size", type=int, default=4096, help="queue length K")
    g.add_argument("--ema", "--m_moco", dest="ema", type=float, default=0.99, help="key encoder momentum m")
    g.add_argument("--temperature", "--t_moco", dest="temperature", type=float, default=0.1, help="temperature T")
    g.add_argument("--feature_dim", "--dim_moco", dest="feature_dim", type=int, default=128, help="key/query dimension")
    g.add_argument("--symmetric", action="store_true", help="add the loss with the views swapped (2 B keys per step)")
    g = p.add_argument_group("MoCHi")
    g.add_argument("--n_hard", type=int, default=0, help="N hardest queue keys per query (0: plain MoCo)")
    g.add_argument("--s1_hard", type=int, default=1024, help="s: type-1 points (two hard keys mixed) per query")
    g.add_argument("--s2_hard", type=int, default=256, help="s': type-2 points (query and hard key) per query")
    g.add_argument("--start1_hard", type=int, default=10, help="first epoch (0-based) with type-1 points")
    g.add_argument("--start2_hard", type=int, default=10, help="first epoch (0-based) with type-2 points")
    g.add_argument("--mask_own", action=argparse.BooleanOptionalAction, default=True,
                   help="ignore queue keys of the query's own image (loss and hard set)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200, help="total epochs (0: evaluate the untrained model)")
    g.add_argument("--batch_size", type=int, default=512, help="GLOBAL batch of images over all processes")
    g.add_argument("--lr", type=float, default=0.03, help="SGD lr for a batch of 256, scaled by batch_size / 256")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="weight decay")
    g = p.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="backbone autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints load either way)")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by rank)")
    g.add_argument("--out_dir", default="results/moco_mochi", help="args.json, metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs")
    g.add_argument("--knn_k", type=int, default=200, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.1, help="kNN monitor: temperature")
    g.add_argument("--eval_every", type=int, default=1, help="kNN every N epochs (0: never)")
    return p


def check_args(parser, a):
    finite = all(math.isfinite(v) for v in (a.lr, a.weight_decay, a.temperature, a.ema, a.momentum, a.knn_t))
    for ok, message in [
            (finite, "--lr, --weight_decay, --temperature, --ema, --momentum and --knn_t must be finite"),
            (a.lr > 0 and a.weight_decay >= 0 and a.temperature > 0, "--lr, --temperature must be > 0, --weight_decay >= 0"),
            (0 <= a.ema < 1 and a.momentum >= 0, f"--ema (--m_moco) must be in [0, 1), --momentum >= 0"),
            (a.batch_size >= 2 and a.width >= 1 and a.crop_size >= 1, "--batch_size >= 2, --width and --crop_size >= 1"),
            (0 < a.crop_min <= 1 and 0 <= a.blur_p <= 1, "--crop_min in (0, 1], --blur_p in [0, 1]"),
            (a.queue_size >= 1 and a.feature_dim >= 1 and a.bn_splits >= 0, "--queue_size, --feature_dim >= 1, --bn_splits >= 0"),
            (min(a.epochs, a.subset, a.workers, a.eval_every) >= 0, "--epochs, --subset, --workers, --eval_every >= 0"),
            (a.knn_k >= 1 and a.knn_t > 0, "--knn_k >= 1, --knn_t > 0"),
            (min(a.n_hard, a.start1_hard, a.start2_hard) >= 0, "--n_hard, --start1_hard, --start2_hard must be >= 0"),
            (a.s1_hard >= 0 and a.s2_hard >= 0, f"--s1_hard and --s2_hard must be >= 0, got {a.s1_hard}, {a.s2_hard}"),
            (a.n_hard <= a.queue_size, f"--n_hard {a.n_hard} is larger than the queue (--queue_size {a.queue_size})"),
            (a.n_hard != 1 or a.s1_hard == 0, "--n_hard must be >= 2 for type-1 points (pairs of distinct keys)")]:
        if not ok:
            parser.error(message)


# ------------------------------------------------------------------------------------------------
# Distributed helpers (the same in every training script; tests/test_copies.py keeps them so)
# ------------------------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device): under torchrun join the process group (NCCL on GPUs, gloo on
    CPU); otherwise one process on cuda:0 or the CPU. The same code path serves both."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_master():
    return world() == 1 or dist.get_rank() == 0


class GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice: the
    other ranks' anchors then push on this rank's embeddings, as in one process."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.stack(grads)
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_with_grad(x):
    """Rows of every rank concatenated in rank order, with gradient; x itself in one process."""
    return x if world() == 1 else torch.cat(GatherLayer.apply(x))


@torch.no_grad()
def concat_all_gather(x):
    """Rows of every rank concatenated in rank order, without gradient (labels, queues, banks)."""
    if world() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def shuffled_keys(encoder, x):
    """encoder(x) row by row, computed on a permuted batch (shuffle BN, MoCo's _batch_shuffle_ddp):
    the key images of all processes are gathered, permuted with rank 0's permutation, and each
    process encodes its slice; the keys are gathered and this process's rows taken back in order.
    In one process the permutation decides which images share a split-BN group."""
    rank = dist.get_rank() if world() > 1 else 0
    x_all = concat_all_gather(x)                                               # [B, C, H, W]
    perm = torch.randperm(x_all.shape[0], device=x.device)                     # [B]
    if world() > 1:
        dist.broadcast(perm, 0)
    keys = concat_all_gather(encoder(x_all[perm.view(world(), -1)[rank]]))     # [B, D], shuffled order
    return keys[perm.argsort().view(world(), -1)[rank]]                        # [b, D], this rank's order


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `splits` contiguous groups of the batch,
    each normalised on its own as if on its own GPU; the running statistics are the mean of the
    groups' updates. Same state dict as BatchNorm2d; evaluation is plain BatchNorm."""

    def __init__(self, bn, splits):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.splits = splits

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        g, (n, c, h, w) = self.splits, x.shape
        grouped = x.view(g, n // g, c, h, w).transpose(0, 1).reshape(n // g, g * c, h, w)  # group i -> channels of block i
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        y = F.batch_norm(grouped, mean, var, self.weight.repeat(g), self.bias.repeat(g), True, self.momentum, self.eps)
        self.running_mean.copy_(mean.view(g, c).mean(0))
        self.running_var.copy_(var.view(g, c).mean(0))
        self.num_batches_tracked.add_(1)
        return y.view(n // g, g, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def split_bn_(module, splits):
    """Replace every BatchNorm2d of `module` (in place) by a SplitBatchNorm with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, SplitBatchNorm(child, splits))
        else:
            split_bn_(child, splits)
    return module


class MoCo(nn.Module):
    """Query encoder (common.py ResNet + head), its momentum copy, and the queue as buffers:
    queue [K, D] (one unit key per row), queue_ids [K] (dataset index of each key, -1 at start),
    queue_ptr [1] (the next row to write)."""

    def __init__(self, args, bn_splits=1):
        super().__init__()
        self.backbone = split_bn_(common.build_backbone(args.arch, args.stem, args.width, args.stem_padding), bn_splits)
        d = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, args.feature_dim)) if args.mlp \
            else nn.Sequential(nn.Linear(d, args.feature_dim))
        self.key_backbone, self.key_projector = copy.deepcopy(self.backbone), copy.deepcopy(self.projector)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(args.queue_size, args.feature_dim), dim=1))
        self.register_buffer("queue_ids", torch.full((args.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def query_parameters(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def key_parameters(self):
        return [*self.key_backbone.parameters(), *self.key_projector.parameters()]

    def forward(self, *views):
        """Query projections (not normalised) of each view; one call so DDP sees one forward."""
        return [self.projector(self.backbone(x)) for x in views]

    def keys(self, x):
        """Unit keys in float32 (the queue's dtype, also under autocast)."""
        return F.normalize(self.key_projector(self.key_backbone(x)).float(), dim=1)

    @torch.no_grad()
    def momentum_update(self, m):
        """theta_k <- m theta_k + (1 - m) theta_q on the parameters (float32, also under AMP)."""
        for pk, pq in zip(self.key_parameters(), self.query_parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys, ids):
        """Gather this process's keys [b, D] and dataset ids [b] from every process (rank order) and
        write them at the pointer, oldest first out, wrapping around: every process holds the same queue."""
        keys, ids = concat_all_gather(keys), concat_all_gather(ids)                  # [B, D], [B]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.queue.shape[0]
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ids[rows] = ids
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.queue.shape[0])


def head_layout(head):
    """[name, kind, sizes...] per layer of a Linear/BatchNorm1d/ReLU head: with the head's state
    dict it rebuilds the head without this script (linear_eval.py, bound.py)."""
    layout = []
    for name, m in head.named_children():
        if isinstance(m, nn.Linear):
            layout.append([name, "linear", m.in_features, m.out_features, m.bias is not None])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            layout.append([name, "bn", m.num_features, m.affine])
        elif isinstance(m, nn.ReLU):
            layout.append([name, "relu"])
        else:
            raise TypeError(f"head_layout cannot describe {type(m).__name__}")
    return layout


# ------------------------------------------------------------------------------------------------
# Loss and hard negative mixing
# ------------------------------------------------------------------------------------------------

def _check(q, queue, exclude):
    if q.dim() != 2 or queue.dim() != 2 or q.shape[1] != queue.shape[1]:
        raise ValueError(f"q must be [B, D] and queue [K, D], got {tuple(q.shape)} and {tuple(queue.shape)}")
    if exclude is not None and exclude.shape != (q.shape[0], queue.shape[0]):
        raise ValueError(f"exclude must be [B, K] = {(q.shape[0], queue.shape[0])}, got {tuple(exclude.shape)}")


def mochi_negatives(q, queue, n_hard, s1, s2, generator=None, exclude=None):
    """MoCHi's synthetic negatives [B, s1 + s2, D] (unit vectors, no gradient): for each query its
    n_hard most similar queue rows (exclude [B, K] bool: rows never picked, e.g. its own image's
    keys), then s1 type-1 points normalize(a n_i + (1-a) n_j), a ~ U(0,1), i != j, and s2 type-2
    points normalize(b q + (1-b) n_j), b ~ U(0, 0.5); n_i, n_j drawn uniformly from that hard set.
    Batched on q's device, no loop over the batch; random draws from `generator` (device's)."""
    _check(q, queue, exclude)
    if s1 < 0 or s2 < 0 or not 0 < n_hard <= queue.shape[0] or (s1 > 0 and n_hard < 2):
        raise ValueError(f"need s1, s2 >= 0 and 0 < n_hard <= K ({queue.shape[0]}), n_hard >= 2 for s1 > 0; "
                         f"got n_hard={n_hard}, s1={s1}, s2={s2}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q, queue = F.normalize(q.detach().to(dtype), dim=1), F.normalize(queue.detach().to(dtype), dim=1)
        b, dev = q.shape[0], q.device
        sim = q @ queue.T                                                               # [B, K]
        if exclude is not None:
            sim = sim.masked_fill(exclude, -math.inf)
        hard = sim.topk(n_hard, dim=1).indices                                          # [B, N] queue rows
        pi = torch.randint(0, n_hard, (b, s1), generator=generator, device=dev)         # [B, s1]
        pj = (pi + torch.randint(1, max(n_hard, 2), (b, s1), generator=generator, device=dev)) % n_hard  # != pi
        a = torch.rand(b, s1, 1, generator=generator, device=dev, dtype=dtype)          # [B, s1, 1]
        h1 = a * queue[hard.gather(1, pi)] + (1 - a) * queue[hard.gather(1, pj)]         # [B, s1, D]
        pm = torch.randint(0, n_hard, (b, s2), generator=generator, device=dev)         # [B, s2]
        beta = 0.5 * torch.rand(b, s2, 1, generator=generator, device=dev, dtype=dtype)  # [B, s2, 1]
        h2 = beta * q[:, None] + (1 - beta) * queue[hard.gather(1, pm)]                # [B, s2, D]
        return F.normalize(torch.cat([h1, h2], dim=1), dim=2)                           # [B, s1+s2, D]


def moco_logits(q, k, queue, temperature=0.2, synthetic=None, exclude=None):
    """[q.k | q.queue^T | q.synthetic_b^T] / T, [B, 1 + K + S], in float32 (float64 for float64
    inputs) outside autocast; queue entries marked in `exclude` [B, K] are -inf."""
    _check(q, queue, exclude)
    if k.shape != q.shape or (synthetic is not None and (synthetic.dim() != 3 or synthetic.shape[0] != q.shape[0]
                                                         or synthetic.shape[2] != q.shape[1])):
        raise ValueError(f"k must be [B, D] like q {tuple(q.shape)} and synthetic [B, S, D]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k = F.normalize(q.to(dtype), dim=1), F.normalize(k.to(dtype), dim=1)          # [B, D]
        l_pos = (q * k).sum(dim=1, keepdim=True)                                          # [B, 1]
        l_neg = q @ F.normalize(queue.detach().to(dtype), dim=1).T                        # [B, K]
        if exclude is not None:
            l_neg = l_neg.masked_fill(exclude, -math.inf)
        parts = [l_pos, l_neg]
        if synthetic is not None:
            parts.append(torch.einsum("bd,bsd->bs", q, F.normalize(synthetic.to(dtype), dim=2)))  # [B, S]
        return torch.cat(parts, dim=1) / temperature                                      # [B, 1+K+S]


def moco_loss(q, k, queue, temperature=0.2, synthetic=None, exclude=None):
    """Mean over the batch of the cross-entropy of moco_logits with the positive as class 0."""
    logits = moco_logits(q, k, queue, temperature, synthetic, exclude)                    # [B, 1+K+S]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def learning_rate(args, epoch):
    """MoCo v2: base lr x batch/256 (linear scaling), cosine over --epochs, set once per epoch."""
    return args.lr * args.batch_size / 256 * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))


def mixing(args, epoch):
    """(s1, s2) active in this epoch: a type mixes from epoch start*_hard on (0: from the first step)."""
    if args.n_hard == 0:
        return 0, 0
    return (args.s1_hard if epoch >= args.start1_hard else 0), (args.s2_hard if epoch >= args.start2_hard else 0)


def train_one_epoch(net, model, loader, optimizer, scaler, args, epoch, device, dtype, images=None, augment=None):
    """One pass over `loader`; returns (mean loss, lr, stats dict, first non-finite step or -1).
    With `augment` (--gpu_aug) the loader yields image indices; the views are made here, on the device."""
    net.train()
    lr = learning_rate(args, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    s1, s2 = mixing(args, epoch)
    steps = len(loader)
    # loss, instance acc@1, hardest real negative cosine, synthetic cosine, synthetic harder than hardest, queries
    sums = torch.zeros(6, device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False) if is_master() else None
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for step, batch in enumerate(loader):
        ids = batch[-1].to(device, non_blocking=True)                       # data-set indices [b]
        if augment is not None:
            x1, x2 = augment(images[ids]), augment(images[ids])              # two independent draws per image
        else:
            x1, x2 = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        x1, x2 = x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            queries = net(x1, x2) if args.symmetric else net(x1)
            with torch.no_grad():  # official order: EMA first, then the keys
                model.momentum_update(args.ema)
                keys = [shuffled_keys(model.keys, x) for x in ((x2, x1) if args.symmetric else (x2,))]
        loss = 0.0
        for q, k in zip(queries, keys):  # float32 from here on
            exclude = ids[:, None] == model.queue_ids[None] if args.mask_own else None       # [b, K]
            synthetic = mochi_negatives(q, model.queue, args.n_hard, s1, s2, exclude=exclude) if s1 + s2 else None
            logits = moco_logits(q, k, model.queue, args.temperature, synthetic, exclude)    # [b, 1+K+S]
            loss = loss + F.cross_entropy(logits, torch.zeros_like(ids))
            with torch.no_grad():  # monitors, in cosines: the (K+1)-way task leaves the synthetic columns out
                cos, K = logits * args.temperature, model.queue.shape[0]
                hardest, syn = cos[:, 1:1 + K].max(dim=1).values, cos[:, 1 + K:]            # [b], [b, S]
                sums[1:] += torch.stack([(cos[:, :1 + K].argmax(1) == 0).sum(), hardest.sum(), syn.sum() / max(syn.shape[1], 1),
                                         (syn > hardest[:, None]).sum() / max(syn.shape[1], 1),
                                         hardest.new_tensor(q.shape[0])]).double()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # The queue changes only after the loss has been used, so no copy of it is needed.
        for k in keys:
            model.enqueue(k, ids)
        sums[0] += loss.detach().double()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.4f}", lr=f"{lr:.3g}")
    if bar is not None:
        bar.close()
    if world() > 1:
        dist.all_reduce(sums)  # a non-finite loss on any rank shows on every rank, so all stop together
    n = sums[5].item()
    stats = {"instance_top1": 100 * sums[1].item() / n, "hardest_cos": sums[2].item() / n,
             "synthetic": s1 + s2, "synthetic_cos": sums[3].item() / n if s1 + s2 else "",
             "synthetic_harder": sums[4].item() / n if s1 + s2 else ""}
    return sums[0].item() / (steps * world()), lr, stats, int(first_bad)


# ------------------------------------------------------------------------------------------------
# kNN monitor, checkpoints (the same in every training script)
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_monitor(backbone, memory_set, test_set, k, t, batch_size, workers, device, dtype):
    """kNN top-1/top-5 (%) on `test_set` with `memory_set` as the bank: cosine similarity, the k
    nearest vote with weight exp(sim / t) (Wu et al. 2018). Every process embeds every world-th
    image; the bank is gathered and the counts summed, so every process returns the same numbers."""
    rank, n_proc = (dist.get_rank(), world()) if world() > 1 else (0, 1)
    backbone.eval()

    def embed(dataset):
        part = Subset(dataset, range(rank, len(dataset), n_proc))
        feats, labels = [torch.zeros(0, backbone.out_dim, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
        for x, y in DataLoader(part, batch_size=batch_size, num_workers=workers):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                feats.append(F.normalize(backbone(x.to(device)).float(), dim=1))
            labels.append(y.to(device))
        feats, labels = torch.cat(feats), torch.cat(labels)
        rows = -(-len(dataset) // n_proc)  # pad to equal size for all_gather; label -1 marks padding
        pad = rows - feats.shape[0]
        return torch.cat([feats, feats.new_zeros(pad, feats.shape[1])]), torch.cat([labels, labels.new_full((pad,), -1)])

    bank, bank_labels = embed(memory_set)
    bank, bank_labels = concat_all_gather(bank), concat_all_gather(bank_labels)
    bank, bank_labels = bank[bank_labels >= 0], bank_labels[bank_labels >= 0]
    feats, labels = embed(test_set)
    classes = int(bank_labels.max()) + 1
    sim, idx = (feats @ bank.T).topk(min(k, bank.shape[0]), dim=1)                 # [n, k]
    votes = torch.zeros(feats.shape[0], classes, device=device).scatter_add_(1, bank_labels[idx], (sim / t).exp())
    ranked = votes.argsort(dim=1, descending=True)
    hits = (ranked[:, :5] == labels[:, None]) & (labels[:, None] >= 0)
    counts = torch.stack([hits[:, :1].any(1).sum(), hits.any(1).sum(), (labels >= 0).sum()]).double()
    if n_proc > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


def save_checkpoint(state, path):
    """torch.save to a temporary file, then os.replace: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, script, parser):
    """torch.load(weights_only=True); a missing, junk or foreign file is a one-line error (exit 2)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, not a checkpoint, or holding unsafe objects
        parser.error(f"cannot read checkpoint {path}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}")
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        parser.error(f"{path} is not a checkpoint of {script}")
    return ckpt


def resumed_args(parser, argv, args, ckpt):
    """The checkpoint's arguments, except the flags of MAY_CHANGE_ON_RESUME given on the command
    line; any other flag given with a different value is an error (the run would not be the one asked for)."""
    for action in parser._actions:  # parse again with no defaults: only the flags given remain
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    merged = {**vars(args), **ckpt["args"]}
    for name, value in given.items():
        if name in MAY_CHANGE_ON_RESUME:
            merged[name] = value
        elif value != merged[name]:
            parser.error(f"--{name} {value} differs from the checkpoint's {merged[name]}; a resumed run keeps its "
                         f"settings (only --{', --'.join(sorted(MAY_CHANGE_ON_RESUME))} may change)")
    if "out_dir" not in given:
        merged["out_dir"] = os.path.dirname(os.path.abspath(args.resume))
    return argparse.Namespace(**merged)


def rng_states():
    """Every process's torch RNG states (CPU and CUDA), in rank order, for an exact resume."""
    state = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0)]
    if world() == 1:
        return [state]
    states = [None] * world()
    dist.all_gather_object(states, state)
    return states


COLUMNS = ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "instance_top1",
           "hardest_cos", "synthetic", "synthetic_cos", "synthetic_harder"]


def write_metrics(path, row):
    """Append one row to metrics.csv (header first): epoch, loss, lr, images_per_sec, epoch_seconds,
    knn_top1, knn_top5 (%), instance_top1 (% of queries whose positive beats every queue key: the
    (K+1)-way task, synthetic columns left out), hardest_cos (mean cosine of each query's hardest
    queue key), synthetic (points per query), synthetic_cos (their mean cosine with the query) and
    synthetic_harder (fraction of them closer to the query than its hardest queue key)."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({c: (f"{row[c]:.6g}" if isinstance(row.get(c), float) else row.get(c, "")) for c in COLUMNS})


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, SCRIPT, parser)
        args = resumed_args(parser, argv, args, ckpt)

    # ---- processes, batch and queue sizes, precision, seeds ----
    rank, n_proc, device = setup_distributed()
    master = rank == 0
    batch = args.batch_size // n_proc
    splits = args.bn_splits or (8 if n_proc == 1 else 1)
    per_step = args.batch_size * (2 if args.symmetric else 1)
    if args.batch_size % n_proc or batch % splits or batch // splits < 2:
        parser.error(f"--batch_size {args.batch_size} (global) must split into {n_proc} process(es) x "
                     f"{splits} BN group(s) (--bn_splits) of at least 2 images")
    if args.queue_size % per_step:
        parser.error(f"--queue_size (--k_moco) {args.queue_size} is not a multiple of the {per_step} keys "
                     f"enqueued per step (global batch{' x 2, --symmetric' if args.symmetric else ''})")
    bn_mode = (f"shuffle BN over {n_proc} processes" if n_proc > 1 else "permuted key batch") + \
        (f", split BN in {splits} groups per process" if splits > 1 else "")
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data ----
    norm = common.normalization(args.norm, args.dataset)
    augment = common.train_transform(args.crop_size, scale=(args.crop_min, 1.0), blur_p=args.blur_p, normalize=norm)
    plain = common.eval_transform(norm, size=args.crop_size if args.dataset == "folder" else None)
    try:
        if not master:
            dist.barrier()  # rank 0 downloads first; the others then find the files
        train_set = common.subset(common.build_dataset(args.dataset, args.data_dir, "train"), args.subset)
        memory_set = common.subset(common.build_dataset(args.dataset, args.data_dir, "train", plain), args.subset)
        test_set = common.build_dataset(args.dataset, args.data_dir, "test", plain)
    except OSError as err:  # missing data (FileNotFoundError) or an unreadable file
        parser.error(str(err))
    finally:
        if master and n_proc > 1:
            dist.barrier()
    if test_set is None or common.num_classes(memory_set) == 0:
        memory_set = test_set = None
    if len(train_set) < args.batch_size:
        parser.error(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    images = labels = gpu_augment = None
    if args.gpu_aug:  # the uint8 images live on the device (CIFAR-10: 150 MB); the loader yields indices
        try:
            images, labels = (t.to(device) for t in common.images_as_tensor(train_set))
        except ValueError as err:
            parser.error(f"--gpu_aug: {err}")
        gpu_augment = common.BatchedAugment(args.crop_size, scale=(args.crop_min, 1.0), blur_p=args.blur_p,
                                            normalize=norm).to(device)
        train_set = torch.utils.data.TensorDataset(torch.arange(len(images)))
    else:
        train_set = common.Views(train_set, augment)
    sampler = DistributedSampler(train_set, n_proc, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)

    # ---- model, optimizer, scaler (the key encoder has no gradient, so SGD leaves it alone) ----
    model = MoCo(args, splits).to(
        device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters on GPUs
    optimizer = torch.optim.SGD(model.query_parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, **fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- resume: weights, queue, ids and pointer (model buffers), optimizer, RNG (mixing draws) ----
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():  # a bf16/fp32 run saved a disabled scaler's empty state
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == n_proc:
            torch.set_rng_state(ckpt["rng"][rank][0])
            if device.type == "cuda" and ckpt["rng"][rank][1].numel():
                torch.cuda.set_rng_state(ckpt["rng"][rank][1])
        start_epoch = ckpt["epoch"]
    # Only the queries need DDP; it syncs the parameters once, the buffers are synced here once (rank
    # 0's random initial queue) and then stay identical: every rank enqueues the same gathered keys.
    if n_proc > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False) if n_proc > 1 else model
    if args.compile:  # the checkpoint saves `model`, never the compiled wrapper, so it loads either way
        net = torch.compile(net)

    # ---- output directory (checked before any compute) ----
    metrics_path, ckpt_path = os.path.join(args.out_dir, "metrics.csv"), os.path.join(args.out_dir, "last.pt")
    if master:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2, sort_keys=True)
            rows = []
            if ckpt is not None and os.path.exists(metrics_path):  # keep the rows the checkpoint covers
                with open(metrics_path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= start_epoch]
            with open(metrics_path, "w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        except OSError as err:
            parser.error(f"cannot write to --out_dir {args.out_dir}: {err}")
        n_cls = common.num_classes(memory_set) if memory_set is not None else 0
        print(f"{SCRIPT}: {len(train_set)} images, {n_proc} process(es) x {batch}, {bn_mode}, K = {args.queue_size}"
              f"{f' (K/C = {args.queue_size / n_cls:.0f})' if n_cls else ''}, "
              f"{f'MoCHi N = {args.n_hard} (N/K = {args.n_hard / args.queue_size:.1%})' if args.n_hard else 'MoCo'}, "
              f"{sum(p.numel() for p in model.query_parameters()) / 1e6:.2f}M parameters, {precision} on {device}")

    def save(epoch):
        state = {"script": SCRIPT, "args": vars(args), "epoch": epoch, "backbone": model.backbone.state_dict(),
                 "head": {"layout": head_layout(model.projector), "state": model.projector.state_dict()},
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_states(), "world_size": n_proc, "bn_mode": bn_mode}
        if master:
            save_checkpoint(state, ckpt_path)

    def knn(row):
        if memory_set is not None:
            row["knn_top1"], row["knn_top5"] = knn_monitor(model.backbone, memory_set, test_set, args.knn_k,
                                                           args.knn_t, batch, args.workers, device, dtype)

    # ---- training loop ----
    if args.epochs == 0 and ckpt is None:  # the untrained network: a baseline
        row = {"epoch": 0}
        knn(row)
        if master:
            write_metrics(metrics_path, row)
            print(f"epoch 0 (untrained): kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(0)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.time()
        loss, lr, stats, bad_step = train_one_epoch(net, model, loader, optimizer, scaler, args, epoch, device, dtype,
                                                    images, gpu_augment)
        if not math.isfinite(loss):
            raise SystemExit(f"{SCRIPT}: error: non-finite loss at epoch {epoch + 1}, step {bad_step + 1} "
                             f"(of this process); {ckpt_path} still holds epoch {epoch}")
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr, "epoch_seconds": seconds,
               "images_per_sec": len(loader) * args.batch_size / seconds, **stats}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            knn(row)
        if master:
            write_metrics(metrics_path, row)
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} instance top-1 {stats['instance_top1']:.1f} "
                  f"synthetic {stats['synthetic']} {row['images_per_sec']:.0f} img/s "
                  f"kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(epoch + 1)
    if n_proc > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

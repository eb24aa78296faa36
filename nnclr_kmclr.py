"""NNCLR and KMCLR: the positive of a view is a neighbour from a support set, in one file.

    python nnclr_kmclr.py --method nnclr                                  # NNCLR, CIFAR-100, queue 98304
    python nnclr_kmclr.py --method kmclr --num_prototypes 400             # KMCLR, 400 online k-means prototypes
    torchrun --standalone --nproc_per_node 4 nnclr_kmclr.py --method nnclr --batch_size 256
    python nnclr_kmclr.py --dataset folder --data_dir DATA --width 8 --queue_size 1024 --epochs 5   # CPU

Papers: Dwibedi et al., "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning
of Visual Representations" (ICCV 2021); KMCLR: M. Rossini, "Beyond Single Instance Positives for
Contrastive Visual Representation Learning" (code mwritescode/nnclr-cifar100), where online
mini-batch k-means prototypes replace NNCLR's support set.

With z = projector(backbone(x)) and p = predictor(z) for two views, and a_i the positive of z_i:

    NNCLR    a_i = NN(z_i, Q) = argmax_{q in Q} z_i.q / (|z_i| |q|)    Q: FIFO queue of past view-1 z
    KMCLR    a_i = c_j,  j = argmin_j |z_i - c_j|^2                     c: k-means centroids of past view-1 z
    l(a, p)  = mean_i -log( exp(a^_i.p^_i / t) / sum_j exp(a^_i.p^_j / t) )           (^: L2-normalised)
    loss     = 1/2 l(a(z1), p2) + 1/2 l(a(z2), p1)                                       (paper eq. 1, t = 0.1)

No gradient flows through the positive; the look-up uses the memory as it was before this step.
Then view 1 updates it: NNCLR enqueues normalize(z1); KMCLR takes one mini-batch k-means step
(scikit-learn's MiniBatchKMeans rule: c_j <- (n_j c_j + sum_{a_i=j} x_i) / (n_j + m_j), n_j <- n_j + m_j;
every 10 steps centroids with n_j < 1% of max n move onto random batch rows; every --reset_every
epochs the centroids restart from the last k view-1 projections). Under torchrun the columns p are
the global batch (gathered with gradient) and every process applies the same gathered update.
"""
import argparse
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

SCRIPT = "nnclr_kmclr.py"
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision", "gpu_aug",
                        "compile"}


def get_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="NNCLR and KMCLR (nearest-neighbour / prototype positives).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=common.DATASETS, help="folder: DATA_DIR/train/<class>/*")
    g.add_argument("--data_dir", default="data", help="data root; torchvision data sets are downloaded here")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced images (0: all)")
    g.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size")
    g.add_argument("--blur_p", type=float, default=0.0, help="Gaussian blur probability (the original's is a no-op)")
    g.add_argument("--norm", default="auto", choices=["auto", *common.NORMALIZATION], help="input normalisation")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--gpu_aug", action="store_true", help="decode the images once, augment whole batches on the device")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=list(common.ARCHS), help="backbone")
    g.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="cifar: 3x3 stride-1 conv, no max-pool")
    g.add_argument("--width", type=int, default=64, help="base channels of the ResNet (64 = standard)")
    g.add_argument("--stem_padding", type=int, default=1, help="padding of the CIFAR stem's conv (the originals: 2)")
    g.add_argument("--proj_hidden_dim", type=int, default=2048, help="projector hidden width")
    g.add_argument("--proj_dim", type=int, default=256, help="projector output = queue/centroid dimension d")
    g.add_argument("--pred_dim", type=int, default=4096, help="predictor hidden width (its output is d)")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True, help="SyncBatchNorm on GPUs")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="nnclr", choices=["nnclr", "kmclr"], help="queue NN or k-means prototypes")
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature t")
    g.add_argument("--queue_size", type=int, default=98304, help="NNCLR support set size K (multiple of --batch_size)")
    g.add_argument("--num_prototypes", type=int, default=400, help="KMCLR number of centroids k")
    g.add_argument("--reset_every", type=int, default=3, help="KMCLR: centroids restart every N epochs (0: never)")
    g.add_argument("--reseed_ratio", type=float, default=0.01, help="KMCLR: re-seed counts below this share of the max")
    g.add_argument("--reseed_counter", default="sklearn", choices=["sklearn", "samples"],
                   help="re-seed check every 10 steps (sklearn, as coded) or every 10k samples")
    g.add_argument("--kmeans_metric", default="euclidean", choices=["euclidean", "cosine"],
                   help="euclidean on raw z (original) or cosine on normalised z")
    g.add_argument("--kmeans_update", default="count", choices=["count", "ema"], help="running mean (original) or EMA")
    g.add_argument("--kmeans_momentum", type=float, default=0.9, help="EMA momentum for --kmeans_update ema")
    g.add_argument("--count_decay", type=float, default=1.0, help="counts *= this before each update (1: off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=510, help="total epochs, warm-up included (0: evaluate untrained)")
    g.add_argument("--warmup_epochs", type=float, default=10, help="linear warm-up, then cosine to 0 at the last step")
    g.add_argument("--batch_size", type=int, default=64, help="GLOBAL batch of images over all processes")
    g.add_argument("--optimizer", default="lars", choices=["lars", "sgd"], help="LARS (original) or SGD")
    g.add_argument("--lr", type=float, default=0.2, help="base learning rate (no batch-size scaling)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay (not on biases and norms)")
    g.add_argument("--lars_eta", type=float, default=1e-3, help="LARS trust coefficient")
    g.add_argument("--online_probe", action=argparse.BooleanOptionalAction, default=True,
                   help="linear probe on detached backbone features")
    g.add_argument("--classifier_lr", type=float, default=0.01, help="online-probe learning rate")
    g = p.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="backbone autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints load either way)")
    g.add_argument("--seed", type=int, default=0, help="random seed (augmentations offset by rank)")
    g.add_argument("--out_dir", default="results/nnclr_kmclr", help="args.json, metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs")
    g.add_argument("--knn_k", type=int, default=200, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.1, help="kNN monitor: temperature")
    g.add_argument("--eval_every", type=int, default=1, help="kNN and probe every N epochs (0: never)")
    return p


def check_args(parser, a):
    finite = all(math.isfinite(v) for v in (a.lr, a.weight_decay, a.temperature, a.momentum, a.knn_t, a.lars_eta,
                                            a.classifier_lr, a.warmup_epochs, a.reseed_ratio, a.count_decay))
    for ok, message in [
            (finite, "--lr, --weight_decay, --temperature, --momentum, --knn_t and the other rates must be finite"),
            (a.temperature > 0, f"--temperature must be > 0, got {a.temperature}"),
            (a.lr > 0 and a.weight_decay >= 0 and a.classifier_lr >= 0 and a.lars_eta > 0,
             "--lr and --lars_eta must be > 0, --weight_decay and --classifier_lr >= 0"),
            (0 <= a.warmup_epochs and (a.epochs == 0 or a.warmup_epochs < a.epochs),
             f"--warmup_epochs ({a.warmup_epochs}) must be >= 0 and below --epochs ({a.epochs})"),
            (a.batch_size >= 2 and min(a.width, a.crop_size, a.proj_hidden_dim, a.proj_dim, a.pred_dim) >= 1,
             "--batch_size >= 2; --width, --crop_size and the head sizes >= 1"),
            (min(a.epochs, a.subset, a.workers, a.eval_every, a.reset_every) >= 0,
             "--epochs, --subset, --workers, --eval_every, --reset_every must be >= 0"),
            (a.knn_k >= 1 and a.knn_t > 0 and 0 <= a.blur_p <= 1, "--knn_k >= 1, --knn_t > 0, --blur_p in [0, 1]"),
            (a.queue_size >= 1 and a.num_prototypes >= 1, "--queue_size and --num_prototypes must be >= 1"),
            (a.method != "nnclr" or a.queue_size % a.batch_size == 0,
             f"--queue_size {a.queue_size} must be a multiple of the global --batch_size {a.batch_size}"),
            (0 <= a.reseed_ratio <= 1, f"--reseed_ratio must be in [0, 1], got {a.reseed_ratio}"),
            (0 < a.kmeans_momentum < 1 and 0 < a.count_decay <= 1, "need 0 < --kmeans_momentum < 1, 0 < --count_decay <= 1")]:
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


# ------------------------------------------------------------------------------------------------
# Model: backbone, projector f, predictor g, online probe; the memories live outside DDP
# ------------------------------------------------------------------------------------------------

class NNCLR(nn.Module):
    """common.py's ResNet, the paper's projector d -> 2048 -> 2048 -> 256 (BN after every Linear,
    ReLU after all but the last), the predictor 256 -> 4096 -> 256 (BN, ReLU in between; p = g(z),
    not g(features): lightly#536) and a linear probe on detached features (None: no probe)."""

    def __init__(self, args, num_classes):
        super().__init__()
        self.backbone = common.build_backbone(args.arch, args.stem, args.width, args.stem_padding)
        d, h, e, q = self.backbone.out_dim, args.proj_hidden_dim, args.proj_dim, args.pred_dim
        self.projector = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h),
                                       nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, e), nn.BatchNorm1d(e))
        self.predictor = nn.Sequential(nn.Linear(e, q), nn.BatchNorm1d(q), nn.ReLU(), nn.Linear(q, e))
        self.probe = nn.Linear(d, num_classes) if num_classes else None

    def forward(self, x1, x2):
        f1, f2 = self.backbone(x1), self.backbone(x2)          # each view alone: BN statistics per view
        z1, z2 = self.projector(f1), self.projector(f2)
        logits = self.probe(torch.cat([f1, f2]).detach()) if self.probe is not None else None
        return z1, z2, self.predictor(z1), self.predictor(z2), logits


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
# Loss and the five method functions (float32, or float64 for float64 inputs; outside autocast)
# ------------------------------------------------------------------------------------------------

def _check_2d(**tensors):
    for name, t in tensors.items():
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D tensor [rows, D], got shape {tuple(t.shape)}")
    if len({t.shape[1] for t in tensors.values()}) > 1:
        raise ValueError("feature sizes differ: " + ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items()))


@torch.no_grad()
def _nn_index(z, support, normalized=False):
    """Index of the cosine nearest row of `support` for each row of z (first maximum on ties)."""
    dtype = torch.promote_types(torch.promote_types(z.dtype, support.dtype), torch.float32)
    with torch.autocast(z.device.type, enabled=False):
        s = support.to(dtype) if normalized else F.normalize(support.to(dtype), dim=1)   # [K, D]
        return (F.normalize(z.to(dtype), dim=1) @ s.T).argmax(dim=1)                      # [B]


@torch.no_grad()
def nearest_neighbour(z, support):
    """normalize(support[j*]) with j* = argmax_j cos(z_i, support_j), per row of z [B, D]; no gradient."""
    _check_2d(z=z, support=support)
    dtype = torch.promote_types(torch.promote_types(z.dtype, support.dtype), torch.float32)
    return F.normalize(support[_nn_index(z, support)].to(dtype), dim=1)                   # [B, D]


def pair_loss(a1, a2, p1, p2, temperature=0.1):
    """1/2 l(a1, p2) + 1/2 l(a2, p1): rows are the positives a (no gradient), columns the other
    view's predictions. Under torch.distributed the columns are the global batch (gathered with
    gradient), the targets i + rank b, and the value the mean over this process's rows."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_2d(a1=a1, a2=a2, p1=p1, p2=p2)
    if not a1.shape == a2.shape == p1.shape == p2.shape:
        raise ValueError(f"a1, a2, p1, p2 must have one shape, got {[tuple(t.shape) for t in (a1, a2, p1, p2)]}")
    dtype = torch.promote_types(p1.dtype, torch.float32)
    with torch.autocast(p1.device.type, enabled=False):
        b, d = p1.shape
        a = F.normalize(torch.stack([a1, a2]).detach().to(dtype), dim=2)            # [2, b, D] rows
        p = F.normalize(torch.cat([p2, p1], dim=1).to(dtype).view(b, 2, d), dim=2)   # [b, 2, D] (p2, p1) per image
        cols = gather_with_grad(p.view(b, 2 * d)).view(-1, 2, d).transpose(0, 1)     # [2, B, D] global columns
        logits = torch.bmm(a, cols.transpose(1, 2)) / temperature                    # [2, b, B]
        rank = dist.get_rank() if world() > 1 else 0
        target = torch.arange(b, device=p1.device) + rank * b                        # [b] own image's column
        return F.cross_entropy(logits.flatten(0, 1), target.repeat(2))               # mean over 2b rows


def nnclr_loss(z1, z2, p1, p2, support, temperature=0.1):
    """NNCLR: 1/2 l(NN(z1), p2) + 1/2 l(NN(z2), p1) with NN from `support` (the queue before this
    step's enqueue); gradients reach p1 and p2 only."""
    _check_2d(z1=z1, z2=z2, p1=p1, p2=p2, support=support)
    return pair_loss(nearest_neighbour(z1, support), nearest_neighbour(z2, support), p1, p2, temperature)


@torch.no_grad()
def kmeans_assign(x, centroids):
    """argmin_j |x_i - c_j|^2 on the vectors as given (first minimum on ties) -> LongTensor [B]."""
    _check_2d(x=x, centroids=centroids)
    dtype = torch.promote_types(torch.promote_types(x.dtype, centroids.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, c = x.to(dtype), centroids.to(dtype)
        return ((c * c).sum(1) - 2 * x @ c.T).argmin(dim=1)                         # [B]; |x|^2 is common


@torch.no_grad()
def kmeans_update(centroids, counts, x, assign, momentum=None, validate=True):
    """One mini-batch k-means step, m_j = #{a_i = j}, S_j = sum_{a_i = j} x_i: where m_j > 0,
    c_j <- (n_j c_j + S_j) / (n_j + m_j) (or with `momentum` mu: mu c_j + (1 - mu) S_j / m_j), and
    n_j <- n_j + m_j. Pure, deterministic (a one-hot GEMM, no atomics); returns (centroids, counts)."""
    if validate:
        _check_2d(x=x, centroids=centroids)
        k = centroids.shape[0]
        if counts.shape != (k,) or assign.shape != (x.shape[0],) or assign.dtype != torch.long:
            raise ValueError(f"need counts [{k}] and a LongTensor assign [{x.shape[0]}]")
        if int(assign.min()) < 0 or int(assign.max()) >= k:
            raise ValueError(f"assignments must lie in [0, {k})")
    with torch.autocast(x.device.type, enabled=False):
        onehot = (assign[:, None] == torch.arange(centroids.shape[0], device=x.device)).to(centroids.dtype)  # [N, k]
        sums = onehot.T @ x.to(centroids.dtype)                                       # [k, D] S_j
        m = onehot.sum(0)                                                             # [k]
        new_counts = counts + m
        hit = (m > 0)[:, None]
        if momentum is None:
            moved = (counts[:, None] * centroids + sums) / new_counts.clamp_min(1e-12)[:, None]
        else:
            moved = momentum * centroids + (1 - momentum) * sums / m.clamp_min(1)[:, None]
        return torch.where(hit, moved, centroids), new_counts


@torch.no_grad()
def reseed_dead(centroids, counts, x, ratio=0.01, generator=None):
    """scikit-learn MiniBatchKMeans's re-seeding, after kmeans_update on the same x [N, D]: the
    centroids with counts < ratio max(counts) (at most N // 2, the lowest counts, stable) move onto
    distinct random rows x[randperm(N)[:r]] in ascending centroid order; their counts become the
    minimum count of the others. Pure; returns (centroids, counts)."""
    _check_2d(x=x, centroids=centroids)
    if counts.shape != (centroids.shape[0],):
        raise ValueError(f"counts must be [{centroids.shape[0]}], got {tuple(counts.shape)}")
    if not ratio >= 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    centroids, counts, n = centroids.clone(), counts.clone(), x.shape[0]
    if ratio == 0:
        return centroids, counts
    to_re = counts < ratio * counts.max()                                             # [k]
    if int(to_re.sum()) > 0.5 * n:                                                    # cap: the N // 2 lowest counts
        to_re = torch.zeros_like(to_re)
        to_re[torch.sort(counts, stable=True).indices[:n // 2]] = True
    r = int(to_re.sum())
    if r == 0:
        return centroids, counts
    if bool(to_re.all()):
        raise ValueError(f"ratio {ratio} would re-seed every centroid: no count is left to reset them to")
    perm = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")[:r]
    centroids[to_re] = x[perm.to(x.device)].to(centroids.dtype)
    counts[to_re] = counts[~to_re].min()
    return centroids, counts


# ------------------------------------------------------------------------------------------------
# The memories: identical on every process (same initial draw, same gathered updates)
# ------------------------------------------------------------------------------------------------

class SupportSet(nn.Module):
    """NNCLR's FIFO queue of normalised view-1 projections and their labels (labels only feed the
    nn_acc monitor). Persistent buffers; the write pointer is extra state (a Python int: no sync)."""

    def __init__(self, size, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.ptr = 0

    def positives(self, z1, z2, y):
        """NN rows of both views (one matmul) and nn_acc, the share of NN(z1) with z1's label."""
        idx = _nn_index(torch.cat([z1, z2]), self.queue, normalized=True)            # [2b]
        nn1, nn2 = self.queue[idx].chunk(2)                                           # copies: later writes don't alter them
        return nn1, nn2, (self.labels[idx[:len(y)]] == y).float().mean()

    @torch.no_grad()
    def update(self, z1, y):
        """Enqueue every process's normalize(z1), in rank order, at the pointer (wrapping, no row dropped)."""
        rows = concat_all_gather(F.normalize(z1.detach().to(self.queue.dtype), dim=1))  # [N, d]
        at = (self.ptr + torch.arange(rows.shape[0], device=rows.device)) % self.queue.shape[0]
        self.queue[at] = rows
        self.labels[at] = concat_all_gather(y)
        self.ptr = (self.ptr + rows.shape[0]) % self.queue.shape[0]
        return torch.zeros((), device=rows.device)                                    # nothing re-seeded

    def get_extra_state(self):
        return {"ptr": self.ptr}

    def set_extra_state(self, state):
        self.ptr = int(state["ptr"])


class Prototypes(nn.Module):
    """KMCLR's online k-means on the device: centroids and counts, the ring `recent` of the last k
    view-1 rows (for resets), and as extra state the ring pointer, scikit-learn's re-seed counter
    `seen`, the step number and the CPU generator of every random draw (same seed on every process)."""

    def __init__(self, k, dim, seed=0, metric="euclidean", update="count", momentum=0.9, count_decay=1.0,
                 reseed_ratio=0.01, reseed_counter="sklearn", reset_steps=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        recent = torch.rand(k, dim, generator=self.generator)                        # uniform [0, 1), as coded
        self.register_buffer("centroids", recent.clone())                            # = MiniBatchKMeans.partial_fit(recent)
        self.register_buffer("counts", torch.ones(k))
        self.register_buffer("recent", recent)
        self.metric, self.momentum, self.count_decay, self.reseed_ratio = metric, momentum, count_decay, reseed_ratio
        self.update_rule, self.reseed_counter, self.reset_steps = update, reseed_counter, reset_steps
        self.recent_ptr, self.seen, self.step, self.zero_possible = 0, 0, 1, True

    def assign(self, x):
        """Nearest centroid: squared Euclidean on raw x (original) or cosine (option)."""
        return kmeans_assign(x, self.centroids) if self.metric == "euclidean" else _nn_index(x, self.centroids)

    def positives(self, z1, z2, y):
        """Nearest centroids of both views before this step's reset and update, and the number of
        distinct centroids they use."""
        a = self.assign(torch.cat([z1, z2]))                                          # [2b]
        pos1, pos2 = self.centroids[a].chunk(2)
        used = torch.zeros_like(self.counts).index_fill_(0, a, 1.0).sum()
        return pos1, pos2, used

    @torch.no_grad()
    def update(self, z1, y):
        """One step of the original flow on every process's z1 (gathered in rank order): ring write,
        reset every `reset_steps`, re-seed check, count-weighted update, re-seeding. Returns the
        number of re-seeded centroids (a tensor)."""
        x = concat_all_gather(z1.detach().to(self.centroids.dtype))                   # [N, d]
        if self.metric == "cosine":
            x = F.normalize(x, dim=1)
        n, k = x.shape[0], self.centroids.shape[0]
        if n < k:   # the last k rows, oldest at recent_ptr
            self.recent[(self.recent_ptr + torch.arange(n, device=x.device)) % k] = x
            self.recent_ptr = (self.recent_ptr + n) % k
        else:
            self.recent.copy_(x[torch.randperm(n, generator=self.generator)[:k].to(x.device)])
            self.recent_ptr = 0
        if self.reset_steps and self.step % self.reset_steps == 0:  # forget: restart from the last k rows
            self.centroids.copy_(torch.roll(self.recent, -self.recent_ptr, 0))
            self.counts.fill_(1.0)
            self.seen = 0
        # scikit-learn's cadence, checked before the update: every 10 calls for k <= 1024 (its
        # counter grows by its internal batch size min(1024, k)), or when a count is 0.
        self.seen += min(1024, k) if self.reseed_counter == "sklearn" else n
        check = self.seen >= 10 * k
        if self.zero_possible:  # counts reach 0 only when set so or decayed: skip the host sync otherwise
            zero = bool((self.counts == 0).any())
            check, self.zero_possible = check or zero, zero or self.count_decay < 1
        if check:
            self.seen = 0
        a = self.assign(x)
        counts = self.counts * self.count_decay if self.count_decay < 1 else self.counts
        momentum = self.momentum if self.update_rule == "ema" else None
        centroids, counts = kmeans_update(self.centroids, counts, x, a, momentum, validate=False)
        reseeded = torch.zeros((), device=x.device)
        if check and self.reseed_ratio > 0:
            new, counts = reseed_dead(centroids, counts, x, self.reseed_ratio, self.generator)
            reseeded = (new != centroids).any(dim=1).sum().float()
            centroids = new
        self.centroids.copy_(centroids)
        self.counts.copy_(counts)
        self.step += 1
        return reseeded

    def get_extra_state(self):
        return {"recent_ptr": self.recent_ptr, "seen": self.seen, "step": self.step,
                "zero_possible": self.zero_possible, "generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.recent_ptr, self.seen, self.step = int(state["recent_ptr"]), int(state["seen"]), int(state["step"])
        self.zero_possible = bool(state["zero_possible"])
        self.generator.set_state(state["generator"])


def memory_step(memory, z1, z2, p1, p2, y, temperature):
    """The order that matters: positives from the memory as it is, the loss, then the update."""
    a1, a2, health = memory.positives(z1, z2, y)
    loss = pair_loss(a1, a2, p1, p2, temperature)
    return loss, health, memory.update(z1, y)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def lars_(optimizer, eps=1e-8):
    """LARS (lightning-bolts, as in mwritescode) on the gradients of the groups marked `lars`:
    g <- (g + wd p) eta |p| / (|g| + wd |p| + eps), left alone where |p| or |g| is 0."""
    for group in optimizer.param_groups:
        if group["lars"]:
            wd, eta = group["lars_wd"], group["eta"]
            for p in group["params"]:
                if p.grad is not None:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    scaled = (p.grad + wd * p) * (eta * p_norm / (g_norm + wd * p_norm + eps))
                    p.grad.copy_(torch.where((p_norm > 0) & (g_norm > 0), scaled, p.grad))


def lr_factor(args, epoch_float):
    """Linear warm-up from 0, then cosine to 0 at the end of --epochs (per step)."""
    if epoch_float < args.warmup_epochs:
        return epoch_float / args.warmup_epochs
    progress = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(net, memory, loader, optimizer, scaler, args, epoch, device, dtype, images=None, labels=None,
                    augment=None):
    """One pass: (mean loss, probe loss, nn_acc or distinct prototypes per step, re-seeded
    centroids, last lr, first non-finite step or -1)."""
    net.train()
    steps = len(loader)
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # loss, probe loss, health, re-seeded
    first_bad = torch.full((), -1, device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False) if is_master() else None
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for step, batch in enumerate(loader):
        factor = lr_factor(args, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if augment is not None:  # --gpu_aug: the loader yields indices; the views are made here, on the device
            ids = batch[-1].to(device, non_blocking=True)
            x1, x2, y = augment(images[ids]), augment(images[ids]), labels[ids]
        else:
            x1, x2, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True), batch[2].to(device)
        x1, x2 = x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z1, z2, p1, p2, logits = net(x1, x2)
        # Loss, look-ups and memory updates in float32 outside autocast.
        loss, health, reseeded = memory_step(memory, z1.float(), z2.float(), p1, p2, y, args.temperature)
        probe = F.cross_entropy(logits.float(), y.repeat(2)) if logits is not None else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss + probe).backward()
        if args.optimizer == "lars":
            scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
            lars_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        sums += torch.stack([loss.detach(), probe.detach(), health, reseeded]).double()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.4f}", lr=f"{args.lr * factor:.3g}")
    if bar is not None:
        bar.close()
    if world() > 1:
        dist.all_reduce(sums[:3])  # the re-seed count is already the same everywhere
        sums[:3] /= world()
    loss, probe, health, reseeded = (sums / torch.tensor([steps, steps, steps, 1.0], device=device)).tolist()
    return loss, probe, health, reseeded, args.lr * factor, int(first_bad)


@torch.no_grad()
def probe_accuracy(model, test_set, batch_size, workers, device, dtype):
    """Online-probe top-1/top-5 (%) on `test_set`, every process a strided share, counts summed."""
    rank, n_proc = (dist.get_rank(), world()) if world() > 1 else (0, 1)
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    for x, y in DataLoader(Subset(test_set, range(rank, len(test_set), n_proc)), batch_size=batch_size,
                           num_workers=workers):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model.probe(model.backbone(x)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        counts += torch.stack([top[:, 0].sum(), top.any(1).sum(), torch.tensor(len(y), device=device)]).double()
    if n_proc > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


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


COLUMNS = ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "online_top1",
           "online_top5", "probe_loss", "nn_acc", "distinct_pos", "reseeded", "count_min", "count_median", "count_max"]


def write_metrics(path, row):
    """Append one row to metrics.csv (header first): epoch, loss, lr, images_per_sec, epoch_seconds,
    knn_top1, knn_top5, online_top1, online_top5 (%, the probe on the test split), probe_loss; NNCLR:
    nn_acc (share of NN(z1) with z1's label); KMCLR: distinct_pos (distinct prototypes per step),
    reseeded (centroids re-seeded in the epoch), count_min, count_median, count_max (after it)."""
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
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, SCRIPT, parser)
        args = resumed_args(parser, argv, args, ckpt)
    check_args(parser, args)  # after the merge: a resume may lower --epochs below the default warm-up

    # ---- processes, precision, seeds ----
    rank, n_proc, device = setup_distributed()
    master = rank == 0
    if args.batch_size % n_proc:
        parser.error(f"--batch_size {args.batch_size} (global) must be a multiple of the {n_proc} processes")
    batch = args.batch_size // n_proc
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(args.seed + rank)  # before the model (mwritescode seeded after it); DDP copies rank 0's
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data ----
    norm = common.normalization(args.norm, args.dataset)
    augment = common.train_transform(args.crop_size, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=args.blur_p, normalize=norm)
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
    classes = common.num_classes(memory_set)
    if test_set is None or classes == 0:
        memory_set = test_set = None
    if len(train_set) < args.batch_size:
        parser.error(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    per_epoch = len(train_set) // args.batch_size * args.batch_size  # images per epoch (drop_last)
    if args.method == "kmclr" and args.num_prototypes > per_epoch:
        parser.error(f"--num_prototypes {args.num_prototypes} exceeds the {per_epoch} view-1 projections of an "
                     f"epoch: resets and re-seeding could not seed them from real data")
    if master and args.method == "nnclr" and (args.queue_size >= len(train_set) or args.queue_size < 10 * classes):
        print(f"{SCRIPT}: warning: --queue_size {args.queue_size} against {len(train_set)} images and {classes} "
              f"classes: keep it well above the classes and below the images (stale rows)")
    images = labels = gpu_augment = None
    if args.gpu_aug:  # the uint8 images live on the device (CIFAR-10: 150 MB); the loader yields indices
        try:
            images, labels = (t.to(device) for t in common.images_as_tensor(train_set))
        except ValueError as err:
            parser.error(f"--gpu_aug: {err}")
        gpu_augment = common.BatchedAugment(args.crop_size, jitter=(0.4, 0.4, 0.2, 0.1), blur_p=args.blur_p, normalize=norm).to(device)
        train_set = torch.utils.data.TensorDataset(torch.arange(len(images)))
    else:
        train_set = common.Views(train_set, augment)
    sampler = DistributedSampler(train_set, n_proc, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)

    # ---- model, memory, optimizer, scaler ----
    model = NNCLR(args, classes if args.online_probe else 0).to(
        device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    if n_proc > 1 and device.type == "cuda" and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.method == "nnclr":
        memory = SupportSet(args.queue_size, args.proj_dim, args.seed).to(device)
    else:
        memory = Prototypes(args.num_prototypes, args.proj_dim, args.seed, args.kmeans_metric, args.kmeans_update,
                            args.kmeans_momentum, args.count_decay, args.reseed_ratio, args.reseed_counter,
                            args.reset_every * len(loader)).to(device)
    # Biases and norm weights (every 1-D parameter): no weight decay, no LARS; the probe on its own.
    ssl = [(n, p) for n, p in model.named_parameters() if not n.startswith("probe.")]
    sgd_wd = args.weight_decay if args.optimizer == "sgd" else 0.0  # LARS folds it into the gradient
    groups = [{"params": [p for _, p in ssl if p.dim() > 1], "base_lr": args.lr, "weight_decay": sgd_wd,
               "lars": args.optimizer == "lars", "lars_wd": args.weight_decay, "eta": args.lars_eta},
              {"params": [p for _, p in ssl if p.dim() <= 1], "base_lr": args.lr, "weight_decay": 0.0, "lars": False}]
    if model.probe is not None:
        groups.append({"params": list(model.probe.parameters()), "base_lr": args.classifier_lr, "weight_decay": 0.0,
                       "lars": False})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                                **({"fused": True} if device.type == "cuda" else {}))  # one kernel on GPUs
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- resume ----
    start_epoch = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            memory.load_state_dict(ckpt["memory"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            parser.error(f"{args.resume} does not fit this run: {str(err).strip().splitlines()[0]}")
        if ckpt["scaler"] and scaler.is_enabled():  # a bf16/fp32 run saved a disabled scaler's empty state
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == n_proc:
            torch.set_rng_state(ckpt["rng"][rank][0])
            if device.type == "cuda" and ckpt["rng"][rank][1].numel():
                torch.cuda.set_rng_state(ckpt["rng"][rank][1])
        start_epoch = ckpt["epoch"]
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if n_proc > 1 else model
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
        print(f"{SCRIPT}: {args.method}, {len(train_set)} images, {n_proc} process(es) x {batch}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {precision} on {device}")

    def save(epoch):
        state = {"script": SCRIPT, "args": vars(args), "epoch": epoch, "backbone": model.backbone.state_dict(),
                 "head": {"layout": head_layout(model.projector), "state": model.projector.state_dict()},
                 "model": model.state_dict(), "memory": memory.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_states(), "world_size": n_proc}
        if master:
            save_checkpoint(state, ckpt_path)

    def evaluate(row):
        if memory_set is not None:
            row["knn_top1"], row["knn_top5"] = knn_monitor(model.backbone, memory_set, test_set, args.knn_k,
                                                           args.knn_t, batch, args.workers, device, dtype)
            if model.probe is not None:
                row["online_top1"], row["online_top5"] = probe_accuracy(model, test_set, batch, args.workers,
                                                                        device, dtype)

    # ---- training loop ----
    if args.epochs == 0 and ckpt is None:  # the untrained network: a baseline
        row = {"epoch": 0}
        evaluate(row)
        if master:
            write_metrics(metrics_path, row)
            print(f"epoch 0 (untrained): kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(0)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.time()
        loss, probe, health, reseeded, lr, bad_step = train_one_epoch(net, memory, loader, optimizer, scaler, args,
                                                                      epoch, device, dtype, images, labels, gpu_augment)
        if not math.isfinite(loss):
            raise SystemExit(f"{SCRIPT}: error: non-finite loss at epoch {epoch + 1}, step {bad_step + 1} "
                             f"(of this process); {ckpt_path} still holds epoch {epoch}")
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr, "epoch_seconds": seconds,
               "images_per_sec": len(loader) * args.batch_size / seconds}
        if model.probe is not None:
            row["probe_loss"] = probe
        if args.method == "nnclr":
            row["nn_acc"] = health
        else:
            counts = memory.counts.float()
            row.update(distinct_pos=health, reseeded=int(reseeded), count_min=counts.min().item(),
                       count_median=counts.median().item(), count_max=counts.max().item())
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            evaluate(row)
        if master:
            write_metrics(metrics_path, row)
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} {row['images_per_sec']:.0f} img/s "
                  f"kNN top-1 {row.get('knn_top1', float('nan')):.2f} probe top-1 "
                  f"{row.get('online_top1', float('nan')):.2f}")
        save(epoch + 1)
    if n_proc > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

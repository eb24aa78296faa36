"""SimCLR with debiased (DCL) and hard (HCL) negatives, in one file.

    python simclr_debiased.py --tau_plus 0.1 --batch_size 256            # DCL on STL-10 (the default)
    python simclr_debiased.py --tau_plus 0.1 --beta 1.0                  # HCL, the paper's best
    python simclr_debiased.py --tau_plus 0 --beta 0                      # plain SimCLR (NT-Xent)
    torchrun --standalone --nproc_per_node 4 simclr_debiased.py --tau_plus 0.1 --beta 1.0
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint MASTER:29500 simclr_debiased.py
    python simclr_debiased.py --dataset folder --data_dir DATA --arch resnet18 --width 16 --epochs 5  # CPU

Papers: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
(ICML 2020); Chuang et al., "Debiased Contrastive Learning" (NeurIPS 2020, code chingyaoc/DCL);
Robinson et al., "Contrastive Learning with Hard Negative Samples" (ICLR 2021, code joshr17/HCL).

B images give 2B views z (L2-normalised projections). Each view is an anchor; its positive is the
other view of its image and the N = 2B - 2 other views are its negatives. With s_ij = z_i.z_j / t:

    SimCLR   Ng_i = sum_j exp(s_ij)
    HCL      rew_i = N sum_j softmax_j(beta s_ij) exp(s_ij)          (= sum_j exp(s_ij) at beta = 0)
    DCL/HCL  Ng_i = max((rew_i - tau_plus N exp(s_i+)) / (1 - tau_plus), N exp(-1/t))
    loss     = mean_i -log(exp(s_i+) / (exp(s_i+) + Ng_i))

tau_plus is the class prior (the chance that a "negative" shares the anchor's class) and beta the
hardness; tau_plus = beta = 0 is SimCLR. Where the floor N exp(-1/t) binds, no gradient reaches that
anchor's negatives; the fraction of such anchors is logged. Under torchrun the negatives are the
global batch (gathered with gradient) and N counts it.
"""
import argparse
import csv
import json
import math
import os
import time
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import common

SCRIPT = "simclr_debiased.py"
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision", "gpu_aug",
                        "compile"}


def get_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="SimCLR with debiased (DCL) and hard (HCL) negatives.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="stl10", choices=common.DATASETS, help="folder: DATA_DIR/train/<class>/*")
    g.add_argument("--data_dir", default="data", help="data root; torchvision data sets are downloaded here")
    g.add_argument("--train_split", default=None, choices=["train", "unlabeled", "train+unlabeled"],
                   help="STL-10 pre-training split (default train+unlabeled)")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced images (0: all)")
    g.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size (32 on STL-10 too)")
    g.add_argument("--blur_p", type=float, default=0.5, help="probability of the Gaussian blur")
    g.add_argument("--norm", default="cifar10", choices=["auto", *common.NORMALIZATION], help="input normalisation")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--gpu_aug", action="store_true", help="decode the images once, augment whole batches on the device")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=list(common.ARCHS), help="backbone")
    g.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="cifar: 3x3 stride-1 conv, no max-pool")
    g.add_argument("--width", type=int, default=64, help="base channels of the ResNet (64 = standard)")
    g.add_argument("--stem_padding", type=int, default=1, help="padding of the CIFAR stem's conv")
    g.add_argument("--hidden_dim", type=int, default=512, help="hidden size of the projection head")
    g.add_argument("--feature_dim", type=int, default=128, help="projection (loss) dimension")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True, help="SyncBatchNorm on GPUs")
    g = p.add_argument_group("method")
    g.add_argument("--temperature", type=float, default=0.5, help="softmax temperature t")
    g.add_argument("--tau_plus", type=float, default=0.1, help="class prior in [0, 1); 0: no debiasing")
    g.add_argument("--beta", type=float, default=0.0, help="hardness >= 0; 0: DCL, 1: HCL")
    g.add_argument("--anneal", default="none", choices=["none", "down"], help="down: beta to 0 in 9 steps (HCL)")
    g.add_argument("--negatives", default="global", choices=["global", "local"],
                   help="negatives from the global batch or each process's own")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=400, help="total epochs (0: evaluate the untrained model)")
    g.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch of images over all processes")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay")
    g = p.add_argument_group("Nozawa & Sato's training")
    g.add_argument("--head", default="simclr", choices=["simclr", "nozawa"], help="projection head layout")
    g.add_argument("--optimizer", default="adam", choices=["adam", "larc"], help="Adam, or SGD with LARC")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (larc)")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="lr per step after warm-up (over --epochs, also when resumed)")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="linear warm-up epochs")
    g.add_argument("--num_chunks", type=int, default=1, help="split each process's batch into N loss chunks")
    g = p.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="backbone autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints load either way)")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by rank)")
    g.add_argument("--out_dir", default="results/simclr_debiased", help="args.json, metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs")
    g.add_argument("--knn_k", "--k", dest="knn_k", type=int, default=200, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.5, help="kNN monitor: temperature")
    g.add_argument("--eval_every", type=int, default=1, help="kNN every N epochs (0: never)")
    return p


def check_args(parser, a):
    finite = all(math.isfinite(v) for v in (a.lr, a.weight_decay, a.temperature, a.beta, a.momentum, a.knn_t))
    for ok, message in [
            (finite, "--lr, --weight_decay, --temperature, --beta, --momentum and --knn_t must be finite"),
            (0 <= a.tau_plus < 1, f"--tau_plus must be in [0, 1), got {a.tau_plus}"),
            (a.beta >= 0 and a.temperature > 0, "--beta must be >= 0 and --temperature > 0"),
            (a.lr > 0 and a.weight_decay >= 0 and a.warmup_epochs >= 0, "--lr must be > 0, --weight_decay >= 0"),
            (a.batch_size >= 2 and a.width >= 1 and a.crop_size >= 1, "--batch_size >= 2, --width and --crop_size >= 1"),
            (min(a.epochs, a.subset, a.workers, a.eval_every) >= 0, "--epochs, --subset, --workers, --eval_every >= 0"),
            (a.knn_k >= 1 and a.knn_t > 0 and 0 <= a.blur_p <= 1, "--knn_k >= 1, --knn_t > 0, --blur_p in [0, 1]"),
            (a.num_chunks >= 1 and (a.num_chunks == 1 or a.negatives == "local"), "--num_chunks > 1 needs --negatives local"),
            (a.train_split in (None, "train") or a.dataset == "stl10", "--train_split exists only for stl10")]:
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
# Model
# ------------------------------------------------------------------------------------------------

class SimCLR(nn.Module):
    """common.py's ResNet and a projection head: simclr = d -> hidden (no bias) -> BN -> ReLU -> 128
    (DCL/HCL); nozawa = d -> hidden -> BN -> ReLU -> 128 (no bias), with their module names (the
    LARC weight-decay filter skips names containing 'bias' or 'bn', as theirs did)."""

    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args.arch, args.stem, args.width, args.stem_padding)
        d, h, k = self.backbone.out_dim, args.hidden_dim, args.feature_dim
        if args.head == "nozawa":
            self.projector = nn.Sequential(OrderedDict([("linear1", nn.Linear(d, h)), ("bn1", nn.BatchNorm1d(h)),
                                                        ("relu1", nn.ReLU()), ("linear2", nn.Linear(h, k, bias=False))]))
        else:
            self.projector = nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, k))

    def forward(self, x1, x2):
        # Each view passes on its own, as in the original code: BatchNorm statistics per view.
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


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
# Loss
# ------------------------------------------------------------------------------------------------

def log1mexp(d):
    """log(1 - exp(d)) for d < 0, accurate on both sides of -log 2."""
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def contrastive_loss_terms(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0, gather=True):
    """Per-anchor losses [2b] and a mask of the anchors where the floor N exp(-1/t) binds.

    The estimator of the docstring in log space (the official code's value, finite at any
    temperature), in float32 (float64 for float64 inputs) outside autocast:
        log rew_i = log N + LSE_j((1 + beta) s_ij) - LSE_j(beta s_ij)
        D_i       = log(tau_plus N) + s_i+ - log rew_i
        log Ng_i  = log rew_i + log(1 - exp(D_i)) - log(1 - tau_plus)      (-inf where D_i >= 0)
        loss_i    = softplus(max(log Ng_i, log N - 1/t) - s_i+)
    Rows 0..b-1 are view-1 anchors, b..2b-1 view-2 anchors. With `gather` under torch.distributed
    the negatives are every process's views and N = 2B - 2 counts the global batch B.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not (temperature > 0 and 0 <= tau_plus < 1 and beta >= 0):
        raise ValueError(f"need temperature > 0, 0 <= tau_plus < 1, beta >= 0; got {temperature}, {tau_plus}, {beta}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)    # [b, D]
        all1, all2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather else (z1, z2)  # [B, D]
        b, B = z1.shape[0], all1.shape[0]
        rank = dist.get_rank() if gather and world() > 1 else 0
        n = 2 * B - 2
        if n < 1:
            raise ValueError("need at least 2 images in the batch")
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature           # [2b, 2B]
        pos = (z1 * z2).sum(dim=1).repeat(2) / temperature                                # [2b]
        image = torch.arange(b, device=z1.device) + rank * b                              # global image ids
        rows = torch.arange(2 * b, device=z1.device)
        not_neg = torch.zeros_like(logits, dtype=torch.bool)                               # [2b, 2B]
        not_neg[rows, torch.cat([image, image + B])] = True                               # self
        not_neg[rows, torch.cat([image + B, image])] = True                               # positive
        neg = logits.masked_fill(not_neg, -math.inf)                                      # [2b, 2B]
        # beta * logits is masked after scaling: 0 * (-inf) would be nan at beta = 0.
        log_rew = (math.log(n) + torch.logsumexp((1 + beta) * neg, dim=1)
                   - torch.logsumexp((beta * logits).masked_fill(not_neg, -math.inf), dim=1))   # [2b]
        log_ng = log_rew
        if tau_plus > 0:
            d = math.log(tau_plus * n) + pos - log_rew                                    # [2b]
            ok = d < 0
            d = torch.where(ok, d, torch.full_like(d, -1.0))  # no nan gradient from the unused branch
            log_ng = torch.where(ok, log_rew + log1mexp(d) - math.log1p(-tau_plus), torch.full_like(d, -math.inf))
        floor = math.log(n) - 1.0 / temperature
        clamped = ~(log_ng > floor)                                                       # [2b]
        log_ng = torch.where(clamped, torch.full_like(log_ng, floor), log_ng)
        return F.softplus(log_ng - pos), clamped


def contrastive_loss(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0, gather=True):
    """SimCLR / DCL / HCL loss, the mean over the 2B anchors (see `contrastive_loss_terms`).
    Under torch.distributed each process passes its own rows: the mean of the per-process values
    is the whole-batch loss, and each gradient divided by the world size (DDP) the whole-batch one."""
    return contrastive_loss_terms(z1, z2, temperature, tau_plus, beta, gather)[0].mean()


def beta_for_epoch(beta, epoch, epochs, anneal):
    """HCL's `--anneal down`: every epochs//9 epochs beta takes the next of linspace(beta, 0, 9)."""
    steps = 0 if anneal == "none" else min(epoch // max(epochs // 9, 1), 9)
    return beta if steps == 0 else beta * (1.0 - (steps - 1) / 8.0)


@torch.no_grad()
def larc_(optimizer, trust=1e-3, eps=1e-8):
    """LARC without clipping (NVIDIA Apex) on the gradients, computed on the device (no host sync):
    g <- (g + wd p) trust ||p|| / (||g|| + wd ||p|| + eps), left alone where ||p|| or ||g|| is 0."""
    for group in optimizer.param_groups:
        wd = group["larc_weight_decay"]
        for p in group["params"]:
            if p.grad is not None:
                p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                scaled = (p.grad + wd * p) * (trust * p_norm / (g_norm + wd * p_norm + eps))
                p.grad.copy_(torch.where((p_norm > 0) & (g_norm > 0), scaled, p.grad))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def learning_rate(args, epoch_float):
    """Linear warm-up from 0, then constant or cosine to 0 over --epochs (per step)."""
    if epoch_float < args.warmup_epochs:
        return args.lr * epoch_float / args.warmup_epochs
    if args.schedule == "constant":
        return args.lr
    progress = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(net, loader, optimizer, scaler, args, epoch, beta, device, dtype, images=None, augment=None):
    """One pass over `loader`: returns (mean loss, clamped fraction, lr, first non-finite step or -1).
    With `augment` (--gpu_aug) the loader yields image indices; the views are made here, on the device."""
    net.train()
    steps = len(loader)
    sums = torch.zeros(2, device=device, dtype=torch.float64)   # loss, clamped anchors
    first_bad = torch.full((), -1, device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False) if is_master() else None
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for step, batch in enumerate(loader):
        lr = learning_rate(args, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if augment is not None:
            x = images[batch[-1].to(device, non_blocking=True)]          # uint8 [b, 3, H, W]
            x1, x2 = augment(x), augment(x)                              # two independent draws per image
        else:
            x1, x2 = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        x1, x2 = x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z1, z2 = net(x1, x2)
        # The loss in float32, outside autocast; chunks stand in for GPUs with their own negatives.
        pieces = [contrastive_loss_terms(a, b, args.temperature, args.tau_plus, beta, args.negatives == "global")
                  for a, b in zip(z1.chunk(args.num_chunks), z2.chunk(args.num_chunks))]
        terms, clamped = torch.cat([t for t, _ in pieces]), torch.cat([c for _, c in pieces])
        loss = terms.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.optimizer == "larc":
            scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
            larc_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        sums += torch.stack([loss.detach().double(), clamped.sum().double()])
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.4f}", lr=f"{lr:.3g}")
    if bar is not None:
        bar.close()
    if world() > 1:
        dist.all_reduce(sums)  # a non-finite loss on any rank shows on every rank, so all stop together
    anchors = steps * world() * 2 * loader.batch_size
    return sums[0].item() / (steps * world()), sums[1].item() / anchors, lr, int(first_bad)


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


def write_metrics(path, rows, columns):
    """metrics.csv, rewritten whole after every epoch: one row per epoch with epoch, loss, lr,
    images_per_sec, epoch_seconds, knn_top1, knn_top5 (%), beta and clamped_fraction (the anchors
    where the floor binds); blank where not measured (epoch 0 is the untrained network)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)


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

    # ---- processes, precision, seeds ----
    rank, n_proc, device = setup_distributed()
    master = rank == 0
    if args.batch_size % n_proc or (args.batch_size // n_proc) % args.num_chunks or \
            args.batch_size // n_proc // args.num_chunks < 2:
        parser.error(f"--batch_size {args.batch_size} (global) must split into {n_proc} process(es) x "
                     f"--num_chunks {args.num_chunks} chunks of at least 2 images")
    if ckpt is not None and args.negatives == "local" and ckpt["world_size"] != n_proc:
        parser.error(f"the checkpoint ran on {ckpt['world_size']} process(es); with --negatives local, "
                     f"{n_proc} would change the number of negatives")
    batch = args.batch_size // n_proc
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data ----
    norm = common.normalization(args.norm, args.dataset)
    augment = common.train_transform(args.crop_size, blur_p=args.blur_p, normalize=norm)
    plain = common.eval_transform(norm, size=args.crop_size if args.dataset == "folder" else None)
    split = args.train_split or ("train+unlabeled" if args.dataset == "stl10" else "train")
    try:
        if not master:
            dist.barrier()  # rank 0 downloads first; the others then find the files
        train_set = common.subset(common.build_dataset(args.dataset, args.data_dir, split), args.subset)
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
    images = gpu_augment = None
    if args.gpu_aug:  # the uint8 images live on the device (CIFAR-10: 150 MB); the loader yields indices
        try:
            images = common.images_as_tensor(train_set)[0].to(device)
        except ValueError as err:
            parser.error(f"--gpu_aug: {err}")
        gpu_augment = common.BatchedAugment(args.crop_size, blur_p=args.blur_p, normalize=norm).to(device)
        train_set = torch.utils.data.TensorDataset(torch.arange(len(images)))
    else:
        train_set = common.Views(train_set, augment)
    sampler = DistributedSampler(train_set, n_proc, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)

    # ---- model, optimizer, scaler ----
    model = SimCLR(args).to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    if n_proc > 1 and device.type == "cuda" and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters on GPUs
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, **fused)
    else:  # LARC folds the weight decay into the gradient (larc_), so SGD runs without it
        decay = [p for n, p in model.named_parameters() if "bias" not in n and "bn" not in n]
        no_decay = [p for n, p in model.named_parameters() if "bias" in n or "bn" in n]
        optimizer = torch.optim.SGD([{"params": decay, "larc_weight_decay": args.weight_decay},
                                     {"params": no_decay, "larc_weight_decay": 0.0}], lr=args.lr, momentum=args.momentum,
                                    **fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- resume ----
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
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if n_proc > 1 else model
    if args.compile:  # the checkpoint saves `model`, never the compiled wrapper, so it loads either way
        net = torch.compile(net)

    # ---- output directory (checked before any compute) ----
    columns = ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "beta", "clamped_fraction"]
    metrics_path, ckpt_path = os.path.join(args.out_dir, "metrics.csv"), os.path.join(args.out_dir, "last.pt")
    history = []  # the rows of metrics.csv; on resume those the checkpoint covers
    if master:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(os.path.join(args.out_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2, sort_keys=True)
            if ckpt is not None and os.path.exists(metrics_path):
                with open(metrics_path, newline="") as f:
                    history = [r for r in csv.DictReader(f) if int(r["epoch"]) <= start_epoch]
            write_metrics(metrics_path, history, columns)
        except OSError as err:
            parser.error(f"cannot write to --out_dir {args.out_dir}: {err}")
        print(f"{SCRIPT}: {len(train_set)} images, {n_proc} process(es) x {batch}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {precision} on {device}")

    def save(epoch):
        state = {"script": SCRIPT, "args": vars(args), "epoch": epoch, "backbone": model.backbone.state_dict(),
                 "head": {"layout": head_layout(model.projector), "state": model.projector.state_dict()},
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_states(), "world_size": n_proc}
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
            history.append(row)
            write_metrics(metrics_path, history, columns)
            print(f"epoch 0 (untrained): kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(0)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        beta = beta_for_epoch(args.beta, epoch, args.epochs, args.anneal)
        start = time.time()
        loss, clamped, lr, bad_step = train_one_epoch(net, loader, optimizer, scaler, args, epoch, beta, device, dtype,
                                                      images, gpu_augment)
        if not math.isfinite(loss):
            raise SystemExit(f"{SCRIPT}: error: non-finite loss at epoch {epoch + 1}, step {bad_step + 1} "
                             f"(of this process); {ckpt_path} still holds epoch {epoch}")
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr, "epoch_seconds": seconds, "beta": beta,
               "images_per_sec": len(loader) * args.batch_size / seconds, "clamped_fraction": clamped}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            knn(row)
        if master:
            history.append(row)
            write_metrics(metrics_path, history, columns)
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} clamped {clamped:.3f} "
                  f"{row['images_per_sec']:.0f} img/s kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(epoch + 1)
    if n_proc > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

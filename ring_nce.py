"""Ring: conditional negatives ("rings" of semi-hard negatives) for IR, MoCo and CMC, in one file.

    python ring_nce.py --method moco --ring_lower 0.01 --ring_upper 0.1            # Ring-MoCo on CIFAR-10
    python ring_nce.py --method moco --ring_lower 0 --ring_upper 1                 # MoCo (no ring)
    python ring_nce.py --method ir --ring_lower 0.01 --ring_upper 0.1              # Ring-IR (0 1: IR)
    python ring_nce.py --method cmc --ring_lower 0.01 --ring_upper 0.1 --ring_anneal linear
    torchrun --standalone --nproc_per_node 4 ring_nce.py --method moco --ring_lower 0.01 --ring_upper 0.1
    python ring_nce.py --dataset folder --data_dir DATA --width 8 --crop_size 16 --epochs 3   # CPU

Paper: Wu, Mosse, Zhuang, Yamins and Goodman, "Conditional Negative Sampling for Contrastive
Learning of Visual Representations" (ICLR 2021; code mhw32/contrastive-ring-public), applied to
instance discrimination (IR, Wu et al. 2018), MoCo (He et al. 2020) and CMC (Tian et al. 2020).

q is an anchor (L2-normalised projection), k+ its positive, C a pool of K candidates (MoCo: the
queue of past keys; IR, CMC: the memory bank, one vector per training image). With s = q.c / t
sorted most similar first, the ring of q is the ranks [floor(lower K), floor(upper K)) and

    loss = mean_i [ -s_i+ + logsumexp(s_i+, {s_ij : j in ring_i}) ]      (positive in the normaliser)

lower = 0, upper = 1 is InfoNCE over the whole pool. MoCo keeps the whole ring; IR and CMC draw
--num_negatives ring members per anchor, uniformly with replacement (the original's NCERing; with
0 1 this is IR's uniform draw from the bank). CMC: an L and an ab encoder (half width each) on
Lab images, one bank per view, loss = l(L anchors vs ab bank) + l(ab anchors vs L bank). A bank
row becomes normalize(m row + (1 - m) z) after its step: m = 0 for IR (the Ring code), 0.5 for CMC
(CMC's code; with m = 0 CMC did not learn in the CPU check). The
official thres_outer / thres_inner (dynamic inner) are upper = thres_outer and lower =
thres_inner * thres_outer: its released 0.1 / 0.1 is --ring_lower 0.01 --ring_upper 0.1.
Annealing moves upper from 1.0 to --ring_upper; lower keeps its ratio to upper (dynamic inner).
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import common

SCRIPT = "ring_nce.py"
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision", "gpu_aug",
                        "compile"}
# CMC's Lab normalisation: the middle and half-range of each channel over the sRGB gamut.
LAB_MEAN, LAB_STD = (50.0, 6.025, -6.6895), (50.0, 92.208, 101.1675)


def get_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="Ring (conditional negative sampling) for IR, MoCo and CMC.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=common.DATASETS, help="folder: DATA_DIR/train/<class>/*")
    g.add_argument("--data_dir", default="data", help="data root; torchvision data sets are downloaded here")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced images (0: all)")
    g.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size (the original: 224)")
    g.add_argument("--blur_p", type=float, default=0.0, help="probability of the Gaussian blur (none originally)")
    g.add_argument("--norm", default="imagenet", choices=["auto", *common.NORMALIZATION],
                   help="RGB normalisation (IR, MoCo); CMC uses Lab constants")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--gpu_aug", action="store_true", help="decode the images once, augment whole batches on the device")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=list(common.ARCHS), help="backbone")
    g.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="cifar: 3x3 stride-1 conv, no max-pool")
    g.add_argument("--width", type=int, default=64, help="base channels (CMC: L and ab encoders of width/2 each)")
    g.add_argument("--stem_padding", type=int, default=1, help="padding of the CIFAR stem's conv")
    g.add_argument("--hidden_dim", type=int, default=512, help="hidden size of the head (Linear, ReLU, Linear)")
    g.add_argument("--feature_dim", type=int, default=128, help="projection (loss) dimension")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True, help="SyncBatchNorm on GPUs")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="moco", choices=["ir", "moco", "cmc"], help="base method the ring applies to")
    g.add_argument("--temperature", type=float, default=0.07, help="softmax temperature t")
    g.add_argument("--ring_lower", type=float, default=0.0,
                   help="ring start: fraction of the pool sorted most similar first (official thres_inner*thres_outer)")
    g.add_argument("--ring_upper", type=float, default=1.0,
                   help="ring end (official thres_outer); '--ring_lower 0 --ring_upper 1' is no ring")
    g.add_argument("--ring_anneal", default="none", choices=["none", "linear", "step"],
                   help="upper from 1.0 to --ring_upper: linearly, or in 10 equal steps, over --anneal_epochs")
    g.add_argument("--anneal_epochs", type=int, default=100, help="epochs of the annealing (max_anneal_epoch)")
    g.add_argument("--num_negatives", type=int, default=4096, help="IR, CMC: negatives drawn per anchor (replacement)")
    g.add_argument("--bank_momentum", type=float, default=None,
                   help="row <- normalize(m row + (1-m) z); default: IR 0 (the Ring code), CMC 0.5 (CMC's code)")
    g.add_argument("--queue_size", "--k_moco", dest="queue_size", type=int, default=4096,
                   help="MoCo queue K, a multiple of --batch_size (Ring-MoCo's original: 65536)")
    g.add_argument("--moco_momentum", type=float, default=0.999, help="MoCo key-encoder EMA")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=200, help="total epochs (0: evaluate the untrained model)")
    g.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch of images over all processes")
    g.add_argument("--lr", type=float, default=0.03, help="SGD learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--lr_steps", type=int, nargs="*", default=[136, 166], help="epochs where the lr is multiplied by 0.1")
    g = p.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="backbone autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints load either way)")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by rank)")
    g.add_argument("--out_dir", default="results/ring_nce", help="args.json, metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs")
    g.add_argument("--knn_k", type=int, default=200, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.1, help="kNN monitor: temperature")
    g.add_argument("--eval_every", type=int, default=1, help="kNN every N epochs (0: never)")
    return p


def check_args(parser, a):
    if a.bank_momentum is None:
        a.bank_momentum = 0.5 if a.method == "cmc" else 0.0
    finite = all(math.isfinite(v) for v in (a.lr, a.momentum, a.weight_decay, a.temperature, a.ring_lower,
                                            a.ring_upper, a.bank_momentum, a.moco_momentum, a.knn_t, a.blur_p))
    for ok, message in [
            (finite, "--lr, --momentum, --weight_decay, --temperature, --ring_*, --*_momentum, --knn_t must be finite"),
            (0 <= a.ring_lower <= 1 and 0 <= a.ring_upper <= 1,
             f"--ring_lower and --ring_upper are fractions in [0, 1], got {a.ring_lower} and {a.ring_upper}"),
            (a.ring_lower < a.ring_upper, f"--ring_lower {a.ring_lower} must be below --ring_upper {a.ring_upper}"),
            (a.temperature > 0 and a.lr > 0 and min(a.momentum, a.weight_decay) >= 0,
             "--temperature and --lr must be > 0, --momentum and --weight_decay >= 0"),
            (0 <= a.bank_momentum < 1 and 0 <= a.moco_momentum <= 1,
             "--bank_momentum in [0, 1), --moco_momentum in [0, 1]"),
            (a.batch_size >= 1 and min(a.width, a.crop_size, a.hidden_dim, a.feature_dim) >= 1,
             "--batch_size, --width, --crop_size, --hidden_dim and --feature_dim must be >= 1"),
            (a.method != "cmc" or a.width % 2 == 0, f"--method cmc needs an even --width (two halves), got {a.width}"),
            (min(a.num_negatives, a.queue_size, a.anneal_epochs) >= 1,
             "--num_negatives, --queue_size, --anneal_epochs >= 1"),
            (min(a.epochs, a.subset, a.workers, a.eval_every) >= 0, "--epochs, --subset, --workers, --eval_every >= 0"),
            (a.knn_k >= 1 and a.knn_t > 0 and 0 <= a.blur_p <= 1, "--knn_k >= 1, --knn_t > 0, --blur_p in [0, 1]"),
            (a.method != "moco" or a.queue_size % a.batch_size == 0,
             f"--queue_size {a.queue_size} must be a multiple of --batch_size {a.batch_size}")]:
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
# Data: one view per image (IR, CMC) and the Lab colour space (CMC)
# ------------------------------------------------------------------------------------------------

def rgb_to_lab(rgb):
    """CIE L*a*b* (D65 white) of sRGB values in [0, 1], channels at dim -3 (skimage's rgb2lab):
    L in [0, 100], a in [-86.2, 98.2], b in [-107.9, 94.5] over the sRGB gamut."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz_from_rgb = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                                 [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,...jhw->...ihw", xyz_from_rgb / white[:, None], linear)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


class ToLab:
    """The image as normalised Lab channels [3, H, W]: CMC's L view is channel 0, its ab view 1-2."""

    def __init__(self, transform):
        self.transform = transform  # ends with ToTensor, no normalisation: RGB in [0, 1]

    def __call__(self, img):
        lab = rgb_to_lab(self.transform(img))
        return (lab - torch.tensor(LAB_MEAN)[:, None, None]) / torch.tensor(LAB_STD)[:, None, None]


# ------------------------------------------------------------------------------------------------
# Model: encoders, memory bank or queue as buffers
# ------------------------------------------------------------------------------------------------

def make_head(d, h, k):
    """The Ring code's head, always built: Linear d -> h, ReLU, Linear h -> k."""
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k))


class Encoder(nn.Module):
    """common.py's ResNet and the head; for CMC's L (1 channel) and ab (2 channels) inputs the
    stem's conv is replaced by one with that many input channels."""

    def __init__(self, args, in_channels=3, width=None):
        super().__init__()
        self.backbone = common.build_backbone(args.arch, args.stem, width or args.width, args.stem_padding)
        if in_channels != 3:
            c = self.backbone.conv1
            self.backbone.conv1 = nn.Conv2d(in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
            nn.init.kaiming_normal_(self.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.projector = make_head(self.backbone.out_dim, args.hidden_dim, args.feature_dim)

    def forward(self, x):
        return self.projector(self.backbone(x))


class CMCEncoder(nn.Module):
    """CMC's two encoders of half the width: L = channel 0 and ab = channels 1-2 of a Lab image."""

    def __init__(self, args):
        super().__init__()
        self.l, self.ab = Encoder(args, 1, args.width // 2), Encoder(args, 2, args.width // 2)

    def forward(self, x):
        return self.l(x[:, :1]), self.ab(x[:, 1:])


class RingModel(nn.Module):
    """The trained encoder (what DDP wraps) and the candidate pools, as buffers: MoCo's key encoder,
    queue of normalised keys and pointer; IR's bank (N rows); CMC's L bank and ab bank."""

    def __init__(self, args, num_images):
        super().__init__()
        self.encoder = CMCEncoder(args) if args.method == "cmc" else Encoder(args)
        d = args.feature_dim
        if args.method == "moco":
            self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.register_buffer("queue", F.normalize(torch.randn(args.queue_size, d), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:  # the original's bank: uniform in a cube, normalised
            self.register_buffer("bank", F.normalize(torch.rand(num_images, d) * 2 - 1, dim=1))
            if args.method == "cmc":
                self.register_buffer("bank_ab", F.normalize(torch.rand(num_images, d) * 2 - 1, dim=1))


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


def side_by_side(a, b):
    """Two state dicts of one network built at two widths -> the state of that network at the summed
    width with both inside: weights block-diagonal, per-channel vectors concatenated. Convolutions,
    BatchNorm, ReLU, residual sums and pooling act per channel group, so on the concatenated inputs
    it returns the concatenated outputs."""
    out = {}
    for name, x in a.items():
        y = b[name]
        if x.dim() == 0:  # num_batches_tracked
            out[name] = x.clone()
        elif x.dim() == 1:
            out[name] = torch.cat([x, y])
        else:
            w = x.new_zeros(x.shape[0] + y.shape[0], x.shape[1] + y.shape[1], *x.shape[2:])
            w[:x.shape[0], :x.shape[1]], w[x.shape[0]:, x.shape[1]:] = x, y
            out[name] = w
    return out


def export(model, args):
    """(backbone state, head) of the checkpoint. CMC: the L and ab networks side by side in one
    common.py ResNet of --width that takes the 3 normalised Lab channels and returns [L, ab] features
    concatenated (the paper's CMC evaluation), and their heads side by side likewise."""
    enc = model.encoder
    if args.method != "cmc":
        return enc.backbone.state_dict(), {"layout": head_layout(enc.projector), "state": enc.projector.state_dict()}
    head = make_head(2 * enc.l.backbone.out_dim, 2 * args.hidden_dim, 2 * args.feature_dim)
    head_state = side_by_side(enc.l.projector.state_dict(), enc.ab.projector.state_dict())
    return side_by_side(enc.l.backbone.state_dict(), enc.ab.backbone.state_dict()), {"layout": head_layout(head),
                                                                                   "state": head_state}


# ------------------------------------------------------------------------------------------------
# Loss and pool updates
# ------------------------------------------------------------------------------------------------

def ring_bounds(size, lower, upper):
    """Ranks [lo, hi) of the ring among `size` candidates sorted most similar first."""
    if not (0 <= lower < upper <= 1):
        raise ValueError(f"need 0 <= lower < upper <= 1, got lower={lower}, upper={upper}")
    lo, hi = math.floor(lower * size), math.floor(upper * size)
    if hi <= lo:
        raise ValueError(f"the ring [{lower}, {upper}) of {size} candidates is empty (ranks [{lo}, {hi}))")
    return lo, hi


def ring_logits(q, k, candidates, temperature, lower, upper):
    """(s+ [B], ring [B, hi - lo]) in float32 (float64 for float64 inputs) outside autocast. The ring
    comes from topk (no full sort), most similar first; lower = 0, upper = 1 keeps the pool's order."""
    if q.dim() != 2 or q.shape != k.shape or candidates.dim() != 2 or candidates.shape[1] != q.shape[1]:
        raise ValueError(f"need q, k [B, D] and candidates [K, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(candidates.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lo, hi = ring_bounds(candidates.shape[0], lower, upper)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)                                    # [B, D]
        k = F.normalize(k.to(dtype), dim=1)                                    # [B, D]
        pool = F.normalize(candidates.to(dtype), dim=1)                        # [K, D]
        pos = (q * k).sum(dim=1) / temperature                                 # [B]
        sims = q @ pool.T / temperature                                        # [B, K]
        if lo > 0 or hi < pool.shape[0]:
            sims = sims.topk(hi, dim=1).values[:, lo:]                         # [B, hi - lo], hardest first
    return pos, sims


def ring_nce_loss(q, k, candidates, temperature=0.07, lower=0.0, upper=1.0):
    """Ring-MoCo (the original's MoCoRing): mean cross-entropy of [q.k, q.ring^T] / t, positive as
    class 0, the whole ring as negatives; lower = 0, upper = 1 is InfoNCE (MoCo)."""
    pos, ring = ring_logits(q, k, candidates, temperature, lower, upper)      # [B], [B, R]
    return (torch.logsumexp(torch.cat([pos[:, None], ring], dim=1), dim=1) - pos).mean()


def sampled_ring_nce_loss(q, k, candidates, temperature=0.07, lower=0.0, upper=1.0, num_negatives=4096,
                          generator=None):
    """Ring-IR (the original's NCERing): like ring_nce_loss, with num_negatives ring members per
    anchor drawn uniformly with replacement; lower = 0, upper = 1 is IR's uniform draw from the bank."""
    pos, ring = ring_logits(q, k, candidates, temperature, lower, upper)      # [B], [B, R]
    pick = torch.randint(0, ring.shape[1], (ring.shape[0], num_negatives), device=ring.device, generator=generator)
    neg = ring.gather(1, pick)                                                 # [B, n]
    return (torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos).mean()


@torch.no_grad()
def update_bank(bank, index, z, momentum):
    """Rows `index` of every process <- normalize(m old + (1 - m) normalize(z)), in place, so that
    every process keeps an identical bank (the sampler gives disjoint indices)."""
    index, z = concat_all_gather(index), concat_all_gather(F.normalize(z.float(), dim=1))
    bank[index] = F.normalize(momentum * bank[index] + (1 - momentum) * z, dim=1)


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Every process's normalised keys replace the oldest rows of the queue (FIFO), in place."""
    keys = concat_all_gather(F.normalize(keys.float(), dim=1))
    start = int(ptr)
    queue[start:start + keys.shape[0]] = keys
    ptr.fill_((start + keys.shape[0]) % queue.shape[0])


@torch.no_grad()
def momentum_update(encoder, key_encoder, m):
    for p, p_key in zip(encoder.parameters(), key_encoder.parameters()):
        p_key.mul_(m).add_(p.detach(), alpha=1 - m)


@torch.no_grad()
def shuffled_keys(key_encoder, x):
    """MoCo's ShuffleBN under torchrun: the key encoder sees a batch mixed across processes, so its
    BatchNorm statistics cannot tell which key belongs to which query. One process: no shuffle."""
    if world() == 1:
        return key_encoder(x)
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, 0)
    b, rank = x.shape[0], dist.get_rank()
    keys = concat_all_gather(key_encoder(x_all[perm[rank * b:(rank + 1) * b]]))
    return keys[torch.argsort(perm)][rank * b:(rank + 1) * b]


def ring_fractions(args, epoch):
    """(lower, upper) of an epoch. Annealing moves upper from 1.0 to --ring_upper (linear: over
    --anneal_epochs; step: 10 plateaus of anneal_epochs/10 epochs); lower keeps its ratio to upper."""
    if args.ring_anneal == "none":
        return args.ring_lower, args.ring_upper
    if args.ring_anneal == "linear":
        done = min(epoch / args.anneal_epochs, 1.0)
    else:
        done = min(epoch // max(args.anneal_epochs // 10, 1), 9) / 9
    if done >= 1:
        return args.ring_lower, args.ring_upper
    upper = 1.0 - (1.0 - args.ring_upper) * done
    return args.ring_lower * upper / args.ring_upper, upper


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def batch_loss(net, model, batch, args, lower, upper, device, dtype):
    """Loss of one batch (float32, outside autocast) and what update_pools writes after the optimizer
    step: the loss sees the bank or queue as it was before this batch."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if args.method == "moco":
            x1, x2, _, _ = batch
            q = net(x1.to(device, non_blocking=True))                          # [b, d]
            with torch.no_grad():
                momentum_update(model.encoder, model.key_encoder, args.moco_momentum)
                k = shuffled_keys(model.key_encoder, x2.to(device, non_blocking=True))  # [b, d]
        else:
            x, _, index = batch
            z = net(x.to(device, non_blocking=True))                           # [b, d] or ([b, d], [b, d])
            index = index.to(device)
    t, n = args.temperature, args.num_negatives
    if args.method == "moco":
        return ring_nce_loss(q, k, model.queue, t, lower, upper), k.detach()
    if args.method == "ir":  # the positive: the image's own bank row, written at its previous visit
        return sampled_ring_nce_loss(z, model.bank[index], model.bank, t, lower, upper, n), (index, z.detach())
    zl, zab = z  # CMC: each view's anchors against the other view's bank
    loss = (sampled_ring_nce_loss(zl, model.bank_ab[index], model.bank_ab, t, lower, upper, n)
            + sampled_ring_nce_loss(zab, model.bank[index], model.bank, t, lower, upper, n))
    return loss, (index, zl.detach(), zab.detach())


def update_pools(model, new, args):
    if args.method == "moco":
        enqueue(model.queue, model.queue_ptr, new)
    elif args.method == "ir":
        update_bank(model.bank, new[0], new[1], args.bank_momentum)
    else:
        update_bank(model.bank, new[0], new[1], args.bank_momentum)
        update_bank(model.bank_ab, new[0], new[2], args.bank_momentum)


def train_one_epoch(net, model, loader, optimizer, scaler, args, epoch, lower, upper, device, dtype, images=None,
                    labels=None, augment=None):
    """One pass over `loader`: returns (mean loss, lr, first non-finite step or -1).
    With `augment` (--gpu_aug) the loader yields image indices; the views are made here, on the device."""
    net.train()
    lr = args.lr * 0.1 ** sum(epoch >= s for s in args.lr_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    steps = len(loader)
    total = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False) if is_master() else None
    for step, batch in enumerate(loader):
        if augment is not None:  # the batch batch_loss expects: (view, [view,] label, index)
            ids = batch[-1].to(device, non_blocking=True)
            batch = (*[augment(images[ids]) for _ in range(2 if args.method == "moco" else 1)], labels[ids], ids)
        loss, new = batch_loss(net, model, batch, args, lower, upper, device, dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        update_pools(model, new, args)
        total += loss.detach().double()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{total.item() / (step + 1):.4f}")
    if bar is not None:
        bar.close()
    if world() > 1:
        dist.all_reduce(total)  # a non-finite loss on any rank shows on every rank, so all stop together
    return total.item() / (steps * world()), lr, int(first_bad)


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


def write_metrics(path, row, columns):
    """Append one row to metrics.csv (header first): epoch, loss, lr, images_per_sec, epoch_seconds,
    knn_top1, knn_top5 (%), then ring_lower, ring_upper (the epoch's fractions), ring_size (number
    of pool members in each anchor's ring) and negatives (per anchor: the ring, or the draws)."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, columns)
        if new:
            writer.writeheader()
        writer.writerow({c: (f"{row[c]:.6g}" if isinstance(row.get(c), float) else row.get(c, "")) for c in columns})


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
    if args.batch_size % n_proc:
        parser.error(f"--batch_size {args.batch_size} (global) must split evenly into {n_proc} processes")
    batch = args.batch_size // n_proc
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- data: CMC sees Lab images (crop and flip only), IR and MoCo the original's augmentation ----
    size = args.crop_size if args.dataset == "folder" else None
    if args.method == "cmc":
        augment = ToLab(common.train_transform(args.crop_size, (0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                               normalize=None))
        plain = ToLab(common.eval_transform(None, size))
        args.input_space, args.lab_mean, args.lab_std = "lab", list(LAB_MEAN), list(LAB_STD)
    else:
        norm = common.normalization(args.norm, args.dataset)
        augment = common.train_transform(args.crop_size, (0.2, 1.0), (0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                                         grayscale_p=0.2, blur_p=args.blur_p, normalize=norm)
        plain = common.eval_transform(norm, size)
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
    pool, pool_name = (args.queue_size, "queue") if args.method == "moco" else (len(train_set), "bank")
    for epoch in range(max(args.epochs, 1)):  # every epoch's ring (annealed or not) must hold candidates
        lower, upper = ring_fractions(args, epoch)
        if math.floor(upper * pool) <= math.floor(lower * pool):
            parser.error(f"--ring_lower {args.ring_lower} --ring_upper {args.ring_upper} leave no candidates in the "
                         f"{pool}-entry {pool_name} (epoch {epoch + 1}: ranks [{math.floor(lower * pool)}, "
                         f"{math.floor(upper * pool)}))")
    images = labels = gpu_augment = None
    if args.gpu_aug:  # the uint8 images live on the device (CIFAR-10: 150 MB); the loader yields indices
        try:
            images, labels = (t.to(device) for t in common.images_as_tensor(train_set))
        except ValueError as err:
            parser.error(f"--gpu_aug: {err}")
        if args.method == "cmc":  # the same crop and flip, then Lab
            rgb = common.BatchedAugment(args.crop_size, (0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                        normalize=None).to(device)
            mean = torch.tensor(LAB_MEAN, device=device)[:, None, None]
            std = torch.tensor(LAB_STD, device=device)[:, None, None]
            gpu_augment = lambda x: (rgb_to_lab(rgb(x)) - mean) / std  # noqa: E731
        else:
            gpu_augment = common.BatchedAugment(args.crop_size, (0.2, 1.0), (0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                                                grayscale_p=0.2, blur_p=args.blur_p, normalize=norm).to(device)
        train_set = torch.utils.data.TensorDataset(torch.arange(len(images)))
    else:
        train_set = common.Views(train_set, augment, 2 if args.method == "moco" else 1)
    sampler = DistributedSampler(train_set, n_proc, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)

    # ---- model, optimizer, scaler ----
    model = RingModel(args, len(train_set)).to(
        device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    if n_proc > 1 and device.type == "cuda" and args.sync_bn:
        model.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
    optimizer = torch.optim.SGD(model.encoder.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, **({"fused": True} if device.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- resume ----
    start_epoch = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError) as err:
            parser.error(f"{args.resume} does not fit this model: {str(err).strip().splitlines()[0]}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():  # a bf16/fp32 run saved a disabled scaler's empty state
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == n_proc:
            torch.set_rng_state(ckpt["rng"][rank][0])
            if device.type == "cuda" and ckpt["rng"][rank][1].numel():
                torch.cuda.set_rng_state(ckpt["rng"][rank][1])
        start_epoch = ckpt["epoch"]
    # Every process starts from rank 0's weights, key encoder, queue and banks (their random initial
    # values were drawn with per-rank seeds); then gathered updates keep them identical. DDP wraps
    # the trained encoder only: the banks and the queue stay out of its buffer broadcast.
    if n_proc > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    net = nn.parallel.DistributedDataParallel(model.encoder, device_ids=[device.index] if device.type == "cuda" else None) \
        if n_proc > 1 else model.encoder
    if args.compile:  # the checkpoint saves `model`, never the compiled wrapper, so it loads either way
        net = torch.compile(net)

    # ---- output directory (checked before any compute) ----
    columns = ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5",
               "ring_lower", "ring_upper", "ring_size", "negatives"]
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
                writer = csv.DictWriter(f, columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        except OSError as err:
            parser.error(f"cannot write to --out_dir {args.out_dir}: {err}")
        print(f"{SCRIPT}: {args.method}, {len(train_set)} images, {n_proc} process(es) x {batch}, "
              f"{sum(p.numel() for p in model.encoder.parameters()) / 1e6:.2f}M parameters, {precision} on {device}")

    def save(epoch, fractions):
        backbone, head = export(model, args)
        state = {"script": SCRIPT, "args": vars(args), "epoch": epoch, "backbone": backbone, "head": head,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_states(), "world_size": n_proc, "ring": list(fractions)}
        if master:
            save_checkpoint(state, ckpt_path)

    def knn(row):
        if memory_set is None:
            return
        backbone = model.encoder.backbone if args.method != "cmc" else \
            common.build_backbone(args.arch, args.stem, args.width, args.stem_padding).to(device)
        if args.method == "cmc":  # the two encoders side by side, as the checkpoint holds them
            backbone.load_state_dict(export(model, args)[0])
        row["knn_top1"], row["knn_top5"] = knn_monitor(backbone, memory_set, test_set, args.knn_k, args.knn_t,
                                                       batch, args.workers, device, dtype)

    # ---- training loop ----
    if args.epochs == 0 and ckpt is None:  # the untrained network: a baseline
        row = {"epoch": 0}
        knn(row)
        if master:
            write_metrics(metrics_path, row, columns)
            print(f"epoch 0 (untrained): kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(0, ring_fractions(args, 0))
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        lower, upper = ring_fractions(args, epoch)
        lo, hi = ring_bounds(pool, lower, upper)
        start = time.time()
        loss, lr, bad_step = train_one_epoch(net, model, loader, optimizer, scaler, args, epoch, lower, upper,
                                             device, dtype, images, labels, gpu_augment)
        if not math.isfinite(loss):
            raise SystemExit(f"{SCRIPT}: error: non-finite loss at epoch {epoch + 1}, step {bad_step + 1} "
                             f"(of this process); {ckpt_path} still holds epoch {epoch}")
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr, "epoch_seconds": seconds, "ring_lower": lower,
               "ring_upper": upper, "ring_size": hi - lo, "images_per_sec": len(loader) * args.batch_size / seconds,
               "negatives": hi - lo if args.method == "moco" else args.num_negatives}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            knn(row)
        if master:
            write_metrics(metrics_path, row, columns)
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} ring [{lo}, {hi}) of {pool} "
                  f"{row['images_per_sec']:.0f} img/s kNN top-1 {row.get('knn_top1', float('nan')):.2f}")
        save(epoch + 1, (lower, upper))
    if n_proc > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Ring: conditional negatives (a ring of semi-hard negatives) for IR, MoCo and CMC, in one file.

    python ring_nce.py --method ir --ring_lower 0.01 --ring_upper 0.1       # Ring-IR (0, 1: IR)
    python ring_nce.py --method cmc --ring_lower 0.01 --ring_upper 0.1      # Ring-CMC (0, 1: CMC)
    torchrun --standalone --nproc_per_node 4 ring_nce.py --ring_lower 0.01 --ring_upper 0.1
    python ring_nce.py --dataset folder --data_dir DATA --width 8 --epochs 5   # MoCo on a CPU

Wu et al., "Conditional Negative Sampling for Contrastive Learning of Visual Representations" (ICLR
2021, code mhw32/contrastive-ring-public) on IR (Wu et al. 2018), MoCo (He et al. 2020) and CMC
(Tian et al. 2020, code HobbitLong/CMC). An anchor q's positive k+ is the key of its other view
(MoCo), its image's bank row (IR) or that row in the other view's bank (CMC: views L and ab of a
Lab image); its candidates are the K rows of the queue or the bank, all L2-normalised. With s =
q.c / t sorted most similar first, its ring is the ranks [floor(lower K), floor(upper K)), and

    loss = mean_i [ -s_i+ + logsumexp(s_i+, {s_ij : j in ring_i}) ]    (CMC: summed over its views)

MoCo keeps the whole ring, IR and CMC draw --num_negatives members with replacement; lower 0,
upper 1 is the base method; the Ring code's thres_outer, thres_inner are upper = thres_outer,
lower = thres_inner * thres_outer. After the step, the queue takes the keys and the bank rows of
the batch become normalize(m row + (1 - m) z).
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
    p = Parser(prog="ring_nce.py", description="Ring (conditional negatives) on IR, MoCo and CMC.")
    shared_flags(p, norm="imagenet", weight_decay=1e-4)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="moco", choices=["ir", "moco", "cmc"], help="base method")
    g.add_argument("--ring_lower", type=float, default=0.0, help="the ring's start: a fraction of "
                   "the pool sorted most similar first (the Ring code's thres_inner * thres_outer)")
    g.add_argument("--ring_upper", type=float, default=1.0, help="its end (thres_outer)")
    g.add_argument("--temperature", type=float, default=0.07, help="softmax temperature t")
    g.add_argument("--num_negatives", type=int, default=4096, help="IR, CMC: draws from the ring")
    g.add_argument("--bank_momentum", type=float, help="bank rows' m (None: IR 0, CMC 0.5)")
    g.add_argument("--queue_size", type=int, default=4096, help="MoCo's K (Ring-MoCo's: 65536)")
    g.add_argument("--ema", type=float, default=0.999, help="MoCo's key-encoder momentum")
    g.add_argument("--hidden_dim", type=int, default=512, help="hidden size of the head")
    g.add_argument("--feature_dim", type=int, default=128, help="projection (loss) dimension")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--lr_steps", type=int, nargs="*", default=[136, 166],
                   help="epochs where the lr drops x0.1 (the Ring code: 0.68 and 0.83 of 200)")
    return p


def rules(a):
    """The method's flag checks for setup: (condition, message) pairs. First sets the default
    --bank_momentum: IR overwrites rows (the Ring code's m = 0), CMC moves them halfway (nce_m)."""
    if a.bank_momentum is None:
        a.bank_momentum = 0.5 if a.method == "cmc" else 0.0
    cmc = a.method == "cmc"
    return [(0 <= a.ring_lower < a.ring_upper <= 1, "need 0 <= --ring_lower < --ring_upper <= 1"),
            (0 <= a.ema <= 1, "need --ema in [0, 1]"),
            (a.method != "moco" or a.queue_size % a.batch_size == 0,
             "--queue_size must be a multiple of --batch_size"),
            (not cmc or a.width % 2 == 0, "--method cmc halves --width: make it even"),
            (not cmc or (a.norm, a.blur_p) == ("imagenet", 0.0),
             "--method cmc crops and flips only, on Lab input: no --norm, no --blur_p")]


# -------------------------------------------------------------------------------------------------
# Model, loss and memory updates
# -------------------------------------------------------------------------------------------------

def encoder(args, channels=3, width=None):
    """common.py's ResNet (its first conv taking `channels` inputs: CMC's L or ab) and the Ring
    code's head d -> hidden -> ReLU -> feature_dim (resnet2.py's CustomResNet)."""
    backbone = common.build_backbone(args.arch, args.stem, width or args.width, args.stem_padding)
    if channels != 3:
        c = backbone.conv1
        backbone.conv1 = nn.Conv2d(channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                   bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
    head = nn.Sequential(nn.Linear(backbone.out_dim, args.hidden_dim), nn.ReLU(),
                         nn.Linear(args.hidden_dim, args.feature_dim))
    return nn.Sequential(OrderedDict(backbone=backbone, head=head))


class Split(nn.Module):
    """CMC's views of a Lab image: channel L to `l`, channels ab to `ab`; outputs side by side."""

    def __init__(self, l, ab):
        super().__init__()
        self.l, self.ab = l, ab

    def forward(self, x):
        return torch.cat([self.l(x[:, :1]), self.ab(x[:, 1:])], dim=1)


class Ring(nn.Module):
    """The trained encoder_q (CMC: L and ab encoders of half --width) and the pools, as buffers:
    MoCo's encoder_k, queue [K, D] of unit keys, their image ids (-1: the random start) and next
    row; IR's and CMC's bank [N, views, D] (uniform in a cube, L2-normalised: memory.py)."""

    def __init__(self, args, num_images):
        super().__init__()
        d, K, half = args.feature_dim, args.queue_size, args.width // 2
        self.encoder_q = Split(encoder(args, 1, half), encoder(args, 2, half)) \
            if args.method == "cmc" else encoder(args)
        if args.method == "moco":
            self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
            self.register_buffer("queue", F.normalize(torch.randn(K, d), dim=1))
            self.register_buffer("queue_ids", torch.full((K,), -1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:  # one row per image and view (IR 1, CMC 2)
            views = 2 if args.method == "cmc" else 1
            self.register_buffer("bank", F.normalize(torch.rand(num_images, views, d) - 0.5, dim=2))


def export(e):
    """(backbone, head) of encoder_q e for last.pt. CMC's: one common.py ResNet of --width on the
    Lab channels, features [L, ab] (the paper's evaluation), its head likewise: the L and ab
    networks side by side (their weights block-diagonal, their vectors concatenated)."""
    def both(a, b):
        return {n: x.clone() if x.dim() == 0 else torch.cat([x, b[n]]) if x.dim() == 1 else
                torch.cat([F.pad(x, [0, 0] * (x.dim() - 2) + [0, b[n].shape[1]]),
                           F.pad(b[n], [0, 0] * (x.dim() - 2) + [x.shape[1], 0])])
                for n, x in a.items()}

    if not isinstance(e, Split):
        return e.backbone.state_dict(), {"layout": head_layout(e.head),
                                         "state": e.head.state_dict()}
    layout = [[n, kind, *[2 * s for s in sizes[:2]], *sizes[2:]]
              for n, kind, *sizes in head_layout(e.l.head)]
    return both(e.l.backbone.state_dict(), e.ab.backbone.state_dict()), {
        "layout": layout, "state": both(e.l.head.state_dict(), e.ab.head.state_dict())}


def ring_bounds(size, lower, upper):
    """Ranks [lo, hi) of the ring among `size` candidates; int() as the Ring code (K 64: [0, 6))."""
    lo, hi = math.floor(lower * size), math.floor(upper * size)
    if not (0 <= lower < upper <= 1 and lo < hi):
        raise ValueError(f"no ring [{lower}, {upper}) of {size} candidates (ranks [{lo}, {hi}))")
    return lo, hi


def ring_nce_terms(q, k, candidates, temperature=0.07, lower=0.0, upper=1.0, draws=None):
    """(loss [B], (logits, pool rows) of the negatives [B, n], (logits, rows) of ranks [0, lo)):
    q, k [B, D], candidates [K, D], float32 (float64 inputs: float64) outside autocast. The ring
    comes from topk (no full sort; without a ring the pool keeps its order); `draws` [B, n] are
    positions in it (IR, CMC); None keeps it whole (MoCo)."""
    if q.dim() != 2 or q.shape != k.shape or candidates.shape[1:] != q.shape[1:] \
            or not temperature > 0:
        raise ValueError(f"need q, k [B, D], candidates [K, D], temperature > 0; got "
                         f"{[tuple(x.shape) for x in (q, k, candidates)]}, {temperature}")
    (lo, hi), K = ring_bounds(len(candidates), lower, upper), len(candidates)
    with torch.autocast(q.device.type, enabled=False):
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k = F.normalize(q.to(dtype), dim=1), F.normalize(k.to(dtype), dim=1)          # [B, D]
        pos = (q * k).sum(dim=1) / temperature                                             # [B]
        logits = q @ F.normalize(candidates.to(dtype), dim=1).T / temperature             # [B, K]
        rows = torch.arange(K, device=q.device).expand_as(logits)                          # [B, K]
        logits, rows = logits.topk(hi, dim=1) if (lo, hi) != (0, K) else (logits, rows)    # [B, hi]
        ring, ring_rows = logits[:, lo:], rows[:, lo:]                                     # [B, R]
        if draws is not None:
            ring, ring_rows = ring.gather(1, draws), ring_rows.gather(1, draws)             # [B, n]
        loss = torch.cat([pos[:, None], ring], dim=1).logsumexp(dim=1) - pos               # [B]
    return loss, (ring.detach(), ring_rows), (logits[:, :lo].detach(), rows[:, :lo])


def ring_nce_loss(q, k, candidates, temperature=0.07, lower=0.0, upper=1.0, draws=None):
    """The Ring code's MoCoRing (MoCo at 0, 1), with `draws` its NCERing (IR's NCE at 0, 1)."""
    return ring_nce_terms(q, k, candidates, temperature, lower, upper, draws)[0].mean()


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


@torch.no_grad()
def enqueue(model, keys, ids):
    """builder.py's _dequeue_and_enqueue: every process's unit keys and image ids replace the
    oldest rows of the queue, alike on every process."""
    keys, ids = gather(F.normalize(keys.to(model.queue.dtype), dim=1)), gather(ids)  # [B, D], [B]
    rows = (model.queue_ptr + torch.arange(len(ids), device=ids.device)) % len(model.queue)
    model.queue[rows], model.queue_ids[rows] = keys, ids
    model.queue_ptr.copy_((model.queue_ptr + len(ids)) % len(model.queue))


@torch.no_grad()
def update_bank(bank, ids, z, m):
    """Rows ids of every process <- normalize(m row + (1 - m) normalize(z)), z [b, views, D], alike
    on every process (disjoint ids): instdisc.py's updated_new_data_memory, CMC's NCEAverage."""
    ids, z = gather(ids), gather(F.normalize(z.to(bank.dtype), dim=2))         # [B], [B, views, D]
    bank[ids] = F.normalize(m * bank[ids] + (1 - m) * z, dim=2)


# -------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------

def make_optimizer(model, args, device):
    """SGD on encoder_q (the Ring code's configure_optimizers), fused on GPUs."""
    return torch.optim.SGD(model.encoder_q.parameters(), args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, fused=device.type == "cuda" or None)


def train_step(net, model, optimizer, scaler, views, ids, classes, args, dtype):
    """One step on fixed views [b, C, H, W] (MoCo: 2, IR and CMC: 1) of the training images ids
    [b] (their bank rows); classes [N]: every training image's class (-1: unknown). Forward per
    view, the loss against the pools as they were (float32), the optimizer step, then the memory
    update. torch's RNG draws the ring positions (IR, CMC) and the key permutation (MoCo).
    Returns the loss and the negatives monitor per anchor (CMC: L anchors, then ab), detached."""
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype is not None):
        z = net(views[0])                                                   # [b, D] (CMC: [b, 2D])
        if args.method == "moco":
            with torch.no_grad():  # builder.py: the momentum update, then the keys
                for pk, pq in zip(model.encoder_k.parameters(), model.encoder_q.parameters()):
                    pk.mul_(args.ema).add_(pq.detach(), alpha=1 - args.ema)
                k = shuffled_keys(model.encoder_k, views[1])                              # [b, D]
    if args.method == "moco":
        pairs, draws = [(z, k, model.queue)], None
        pool_classes = torch.where(model.queue_ids >= 0, classes[model.queue_ids], -1)   # [K]
    else:  # view v's anchors against the bank of the other view (CMC: L and ab), IR's its own
        z, bank = z.view(len(ids), -1, args.feature_dim), model.bank               # [b, views, D]
        pairs = [(z[:, v], bank[ids, -1 - v], bank[:, -1 - v]) for v in range(z.shape[1])]
        lo, hi = ring_bounds(len(bank), args.ring_lower, args.ring_upper)
        draws = torch.randint(0, hi - lo, (len(ids), args.num_negatives), device=ids.device)
        pool_classes = classes  # draws: with replacement, the same for CMC's views (NCEAverage)
    terms = [ring_nce_terms(*pair, args.temperature, args.ring_lower, args.ring_upper, draws)
             for pair in pairs]
    loss = sum(t[0].mean() for t in terms)
    stats = ring_monitor(terms, classes[ids], pool_classes)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if args.method == "moco":
        enqueue(model, k, ids)
    else:
        update_bank(model.bank, ids, z, args.bank_momentum)
    return {"loss": loss.detach(), **stats}


@torch.no_grad()
def ring_monitor(terms, labels, pool_classes):
    """fn_rate, fn_rate_hard over the negatives the loss contrasts (the ring or its draws), and
    fn_rate_above over the ranks [0, lo) the ring leaves out above it (NaN when lo = 0)."""
    rates = []
    for _, (ring, rows), (above, above_rows) in terms:
        rates.append(negative_rates(ring, torch.ones_like(ring, dtype=torch.bool), labels,
                                    pool_classes[rows]))
        rates[-1]["fn_rate_above"] = negative_rates(
            above, torch.ones_like(above, dtype=torch.bool), labels, pool_classes[above_rows]
        )["fn_rate"] if above.shape[1] else torch.full(labels.shape, math.nan, device=labels.device)
    return {name: torch.cat([r[name] for r in rates]) for name in rates[0]}


def train_one_epoch(net, model, data, optimizer, scaler, args, epoch, device, dtype):
    """One pass: the epoch's lr (x0.1 at each of --lr_steps: the Ring code's MoCoLRScheduler), each
    step's views and train_step. Returns the epoch's statistics."""
    model.train()  # encoder_k too: its keys use batch statistics, as in MoCo
    lr = args.lr * 0.1 ** sum(epoch >= s for s in args.lr_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    steps = []
    for batch in batches(data, epoch):
        views, _, ids = common.batch_views(batch, data, device)
        steps.append(train_step(net, model, optimizer, scaler, views, ids, data.labels, args,
                                dtype))
    return {**epoch_stats(steps), "lr": lr}


def main(argv=None):
    parser = get_parser()
    args, ckpt, device, dtype = setup(parser, argv, rules)
    history = ckpt["history"] if ckpt else []
    cmc, moco = args.method == "cmc", args.method == "moco"

    # ---- data: the Ring code's augmentation; CMC's crop and flip, then Lab on the device ----
    recipe = {"scale": (0.2, 1.0), "blur_p": args.blur_p, **(
        {"jitter_p": 0.0, "grayscale_p": 0.0, "normalize": None} if cmc else
        {"jitter": (0.4, 0.4, 0.4, 0.4), "jitter_p": 1.0, "grayscale_p": 0.2,
         "normalize": common.normalization(args.norm, args.dataset)})}
    data = load_data(args, parser, device, recipe, 2 if moco else 1,
                     to_input=common.lab_input if cmc else None)
    try:  # the ring must hold candidates: of the queue, or of the bank (a row per image)
        ring_bounds(args.queue_size if moco else len(data.train), args.ring_lower, args.ring_upper)
    except ValueError as err:
        parser.error(f"--ring_lower, --ring_upper: {err}")
    if cmc:  # what an evaluation needs to rebuild the input
        args.input_space, args.lab_mean, args.lab_std = "lab", *map(list, common.LAB_STATS)

    # ---- model (MoCo: shuffle BN, as MoCo; else SyncBN), optimizer, scaler; resume ----
    model = Ring(args, len(data.train)).to(device)
    if world() > 1 and device.type == "cuda" and not moco:
        model.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = restore(ckpt, model, optimizer, scaler, parser)
    net = distribute(model, model.encoder_q, args, device)
    e = model.encoder_q
    backbone = Split(e.l.backbone, e.ab.backbone) if cmc else e.backbone  # for the kNN monitor

    def state(epoch):
        return {"script": parser.prog, "args": vars(args), "epoch": epoch,
                **dict(zip(["backbone", "head"], export(e))), "model": model.state_dict(),
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

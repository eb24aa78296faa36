"""SimCLR with debiased (DCL) and hard (HCL) negatives, in one file.

    python simclr_debiased.py --tau_plus 0.1                  # DCL on STL-10, the original settings
    python simclr_debiased.py --tau_plus 0.1 --beta 1.0         # HCL, the paper's best
    python simclr_debiased.py --tau_plus 0 --beta 0             # plain SimCLR (NT-Xent)
    torchrun --standalone --nproc_per_node 4 simclr_debiased.py --dataset cifar10 --beta 1.0
    python simclr_debiased.py --dataset folder --data_dir DATA --width 8 --epochs 5   # on a CPU

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML 2020);
Chuang et al., "Debiased Contrastive Learning" (NeurIPS 2020, code chingyaoc/DCL); Robinson et
al., "Contrastive Learning with Hard Negative Samples" (ICLR 2021, code joshr17/HCL).

B images give 2B views z (L2-normalised projections). Each view is an anchor, the other view of
its image its positive, the N = 2B - 2 other views its negatives. With s_ij = z_i.z_j / t:

    SimCLR   Ng_i = sum_j exp(s_ij)
    HCL      rew_i = N sum_j softmax_j(beta s_ij) exp(s_ij)       (= sum_j exp(s_ij) at beta = 0)
    DCL/HCL  Ng_i = max((rew_i - tau_plus N exp(s_i+)) / (1 - tau_plus), N exp(-1/t))
    loss     = mean_i -log(exp(s_i+) / (exp(s_i+) + Ng_i))

tau_plus is the class prior, the share of "negatives" of the anchor's own class (metrics.csv
measures it as fn_rate on labelled data), and beta the hardness. Where the floor binds, no
gradient reaches the anchor's negatives (column `clamped`). Under torchrun the negatives are the
global batch (gathered with gradient); --num_chunks splits it into independent losses instead.
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
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import common


def get_parser():
    p = Parser(prog="simclr_debiased.py", description="SimCLR, DCL and HCL.")
    shared_flags(p, dataset="stl10", arch="resnet50", norm="cifar10", blur_p=0.5, epochs=400,
                 lr=1e-3, weight_decay=1e-6, knn_t=0.5)
    g = p.add_argument_group("method")
    g.add_argument("--k", dest="knn_k", type=int, default=argparse.SUPPRESS, help="= --knn_k")
    g.add_argument("--temperature", type=float, default=0.5, help="softmax temperature t")
    g.add_argument("--tau_plus", type=float, default=0.1, help="class prior in [0, 1) (0: SimCLR)")
    g.add_argument("--beta", type=float, default=0.0, help="hardness (0: DCL, 1: HCL)")
    g.add_argument("--hidden_dim", type=int, default=512, help="hidden size of the head")
    g.add_argument("--feature_dim", type=int, default=128, help="projection (loss) dimension")
    g = p.add_argument_group("Nozawa & Sato's runs")
    g.add_argument("--head", default="simclr", choices=["simclr", "nozawa"],
                   help="the head's bias in its last Linear (DCL/HCL) or its first")
    g.add_argument("--optimizer", default="adam", choices=["adam", "larc"],
                   help="Adam at a constant lr, or SGD + LARC with a cosine lr")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="linear warm-up epochs")
    g.add_argument("--num_chunks", type=int, default=1,
                   help="split the global batch into N losses of their own (1: one global loss)")
    return p


def rules(a):
    """The method's flag checks for setup: (condition, message) pairs."""
    n_proc = int(os.environ.get("WORLD_SIZE", 1))
    return [(0 <= a.tau_plus < 1 and a.beta >= 0, "need 0 <= --tau_plus < 1 and --beta >= 0"),
            (a.warmup_epochs < max(a.epochs, 1), "--warmup_epochs must be below --epochs"),
            (a.num_chunks == 1 or a.num_chunks % n_proc == 0 and a.batch_size % a.num_chunks == 0
             and a.batch_size >= 2 * a.num_chunks, "--num_chunks must be 1, or a multiple of the "
             "processes splitting --batch_size into chunks of 2 or more")]


# -------------------------------------------------------------------------------------------------
# Model and loss
# -------------------------------------------------------------------------------------------------

class SimCLR(nn.Module):
    """common.py's ResNet and the head d -> hidden -> BN -> ReLU -> feature_dim, with a bias in its
    last Linear (DCL/HCL) or its first (--head nozawa)."""

    def __init__(self, args):
        super().__init__()
        self.backbone = common.build_backbone(args.arch, args.stem, args.width, args.stem_padding)
        d, h, first = self.backbone.out_dim, args.hidden_dim, args.head == "nozawa"
        self.projector = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(d, h, bias=first)), ("bn1", nn.BatchNorm1d(h)),
            ("relu1", nn.ReLU()), ("linear2", nn.Linear(h, args.feature_dim, bias=not first))]))

    def forward(self, x1, x2):
        # Each view passes alone, as in the original code: BatchNorm statistics per view.
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


def contrastive_loss_terms(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0, gather_negatives=True):
    """(loss [2b], clamped [2b], logits [2b, 2B], negative [2b, 2B]) of this process's anchors
    (rows: view 1, then view 2) against the 2B views of the batch (columns: every view 1, then
    every view 2; the global batch under torch.distributed). The estimator in log space, float32
    (float64 for float64 inputs) outside autocast, finite at any t, with LSE = logsumexp:
      log rew_i = log N + LSE_j (1 + beta) s_ij - LSE_j beta s_ij
      D_i       = log(tau_plus N) + s_i+ - log rew_i
      log Ng_i  = log rew_i + log(1 - e^D_i) - log(1 - tau_plus)     (-inf where D_i >= 0)
      loss_i    = softplus(max(log Ng_i, log N - 1/t) - s_i+)"""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if not (temperature > 0 and 0 <= tau_plus < 1 and beta >= 0):
        raise ValueError(f"need temperature > 0, 0 <= tau_plus < 1, beta >= 0; got {temperature}, "
                         f"{tau_plus}, {beta}")
    with torch.autocast(z1.device.type, enabled=False):
        dtype = torch.promote_types(z1.dtype, torch.float32)
        z1, z2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)      # [b, D]
        all1, all2 = (gather(z1), gather(z2)) if gather_negatives else (z1, z2)            # [B, D]
        b, B, n = len(z1), len(all1), 2 * len(all1) - 2
        if n < 1:
            raise ValueError("need at least 2 images in the batch")
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature           # [2b, 2B]
        pos = (z1 * z2).sum(dim=1).repeat(2) / temperature                                # [2b]
        own = torch.arange(b, device=z1.device) + (rank() * b if gather_negatives else 0)  # [b]
        rows, negative = torch.arange(2 * b, device=z1.device), torch.ones_like(logits).bool()
        negative[rows, torch.cat([own, own + B])] = False                                # self
        negative[rows, torch.cat([own + B, own])] = False                                # positive
        # beta * logits is masked after scaling: 0 * (-inf) would be nan at beta = 0.
        log_rew = math.log(n) + (((1 + beta) * logits).masked_fill(~negative, -math.inf)
                                 .logsumexp(1) - (beta * logits).masked_fill(~negative, -math.inf)
                                 .logsumexp(1))                                        # [2b]
        log_ng = log_rew
        if tau_plus > 0:
            d = math.log(tau_plus * n) + pos - log_rew                                    # [2b]
            d_safe = torch.where(d < 0, d, -1.0)  # no nan gradient from the branch not taken
            log1mexp = torch.where(d_safe > -math.log(2), torch.log(-torch.expm1(d_safe)),
                                   torch.log1p(-torch.exp(d_safe)))              # log(1 - e^d)
            log_ng = torch.where(d < 0, log_rew + log1mexp - math.log1p(-tau_plus), -math.inf)
        floor = math.log(n) - 1.0 / temperature
        clamped = ~(log_ng > floor)                                                       # [2b]
        return F.softplus(torch.where(clamped, floor, log_ng) - pos), clamped, logits, negative


def contrastive_loss(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0, gather_negatives=True):
    """SimCLR / DCL / HCL loss: the mean over the 2B anchors of `contrastive_loss_terms`. Under
    torch.distributed each process passes its rows; the mean of the processes' values is the
    whole batch's loss, each gradient / world size (DDP's average) the whole batch's gradient."""
    return contrastive_loss_terms(z1, z2, temperature, tau_plus, beta, gather_negatives)[0].mean()


@torch.no_grad()
def larc_(optimizer, trust=1e-3, eps=1e-8):
    """NVIDIA Apex's LARC without clipping, on the device: g <- (g + wd p) trust |p| / (|g| +
    wd |p| + eps), left alone where |p| or |g| is 0 (the SGD step then has no weight decay)."""
    for group in optimizer.param_groups:
        wd = group["larc_weight_decay"]
        for p in group["params"]:
            if p.grad is not None:
                p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                scaled = (p.grad + wd * p) * (trust * p_norm / (g_norm + wd * p_norm + eps))
                p.grad.copy_(torch.where((p_norm > 0) & (g_norm > 0), scaled, p.grad))


# -------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------

def make_optimizer(model, args, device):
    """Adam (DCL/HCL), or SGD whose weight decay LARC (larc_) folds into the gradient, except on
    parameters named 'bias' or 'bn' (Nozawa & Sato's filter); fused kernels on GPUs."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay,
                                **fused)
    skip = [p for n, p in model.named_parameters() if "bias" in n or "bn" in n]
    return torch.optim.SGD([
        {"params": [p for p in model.parameters() if all(p is not q for q in skip)],
         "larc_weight_decay": args.weight_decay}, {"params": skip, "larc_weight_decay": 0.0}],
        args.lr, momentum=args.momentum, **fused)


def train_step(net, optimizer, scaler, x1, x2, labels, args, dtype):
    """One step on two views [b, 3, H, W] of b images (labels [b], -1: none): forward per view,
    loss, optimizer step. Returns the loss, the clamped anchors and the negatives monitor."""
    with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype is not None):
        z1, z2 = net(x1, x2)                                                          # [b, D] each
    chunks, one, stats = max(1, args.num_chunks // world()), args.num_chunks == 1, []
    for a, b, y in zip(z1.chunk(chunks), z2.chunk(chunks), labels.chunk(chunks)):
        loss, clamped, logits, negative = contrastive_loss_terms(
            a, b, args.temperature, args.tau_plus, args.beta, gather_negatives=one)
        logits, y, ys = logits.detach(), y.repeat(2), (gather(y) if one else y).repeat(2)
        rates = negative_rates(logits, negative, y, ys)                       # anchors [2b], [2B]
        # HCL's weighting: the share of the reweighted negative mass on the anchor's own class
        mass = ((1 + args.beta) * logits).masked_fill(~negative | (ys < 0), -math.inf).softmax(1)
        rates["fn_weight"] = torch.where(y >= 0, (mass * (y[:, None] == ys)).sum(1), math.nan)
        stats.append({"loss": loss, "clamped": clamped.double(), **rates})
    stats = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
    loss = stats["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.optimizer == "larc":
        scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
        larc_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    return {**stats, "loss": loss.detach()}


def train_one_epoch(net, data, optimizer, scaler, args, epoch, device, dtype):
    """One pass: each step's lr (linear warm-up, then constant for Adam, cosine to 0 for LARC as
    Nozawa & Sato), its two views and train_step. Returns the epoch's statistics."""
    net.train()
    steps, warm = [], args.warmup_epochs
    for step, batch in enumerate(batches(data, epoch)):
        t = epoch + step / len(data.loader)
        lr = args.lr * (min(1.0, t / warm) if warm else 1.0)
        if args.optimizer == "larc" and t >= warm:  # Nozawa & Sato: cosine to 0 after the warm-up
            lr *= 0.5 * (1 + math.cos(math.pi * (t - warm) / (args.epochs - warm)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        (x1, x2), labels, _ = common.batch_views(batch, data, device)
        steps.append(train_step(net, optimizer, scaler, x1, x2, labels, args, dtype))
    stats = epoch_stats(steps)
    if args.tau_plus and stats.get("fn_rate", "") != "" and rank() == 0:  # DCL: prior vs truth
        print(f"--tau_plus {args.tau_plus}: the measured fn_rate is {stats['fn_rate']:.4f}")
    return {**stats, "lr": lr}


def main(argv=None):
    parser = get_parser()
    args, ckpt, device, dtype = setup(parser, argv, rules)
    history = ckpt["history"] if ckpt else []

    # ---- data: two views of each image (DCL/HCL's augmentation; STL-10: train+unlabeled) ----
    recipe = {"blur_p": args.blur_p, "normalize": common.normalization(args.norm, args.dataset)}
    split = "train+unlabeled" if args.dataset == "stl10" else "train"
    data = load_data(args, parser, device, recipe, split=split)

    # ---- model, optimizer, scaler; resume ----
    model = SimCLR(args).to(device)
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

    # ---- training: a row of metrics.csv and last.pt per epoch (--epochs 0: the untrained net) ----
    if args.epochs == 0:
        end_epoch(args, {"epoch": 0, **knn_monitor(model.backbone, data, args, device, dtype)},
                  history, state(0))
    for epoch in range(start, args.epochs):
        start_time = time.time()
        row = {"epoch": epoch + 1, **train_one_epoch(net, data, optimizer, scaler, args, epoch,
                                                     device, dtype)}
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

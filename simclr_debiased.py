"""SimCLR with debiased (DCL) and hard (HCL) negatives, in one file.

    python simclr_debiased.py --tau_plus 0.1 --batch_size 256              # DCL on STL-10 (default)
    python simclr_debiased.py --tau_plus 0.1 --beta 1.0                    # HCL, the paper's best
    python simclr_debiased.py --estimator easy                             # plain SimCLR (NT-Xent)
    torchrun --standalone --nproc_per_node 4 simclr_debiased.py --tau_plus 0.1 --beta 1.0
    python simclr_debiased.py --dataset folder --data_dir ../shared/data/cifar10 \\
        --arch resnet18 --width 16 --batch_size 128 --epochs 5 --workers 2   # CPU-sized
    python simclr_debiased.py --dataset cifar10 --arch resnet18 --stem_padding 3 --head nozawa \\
        --norm none --blur_p 0 --estimator easy --optimizer larc --lr 0.125 --weight_decay 1e-4 \\
        --warmup_epochs 10 --schedule cosine --epochs 500 --negatives local \\
        --batch_size 128 --num_chunks 4          # Nozawa & Sato's K+1 = 32 (4 GPUs x 32) on one GPU

Papers: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
(ICML 2020); Chuang et al., "Debiased Contrastive Learning" (NeurIPS 2020, code chingyaoc/DCL);
Robinson et al., "Contrastive Learning with Hard Negative Samples" (ICLR 2021, code joshr17/HCL).

B images give 2B views z (L2-normalised projections); every view is an anchor, its positive is the
other view of its image and the N = 2B - 2 other views are its negatives. With s_ij = z_i.z_j / t:

    SimCLR   Ng_i = sum_j exp(s_ij)
    HCL      rew_i = N * sum_j softmax_j(beta * s_ij) exp(s_ij)     (= sum_j exp(s_ij) at beta = 0)
    DCL/HCL  Ng_i = max((rew_i - tau_plus * N * exp(s_i+)) / (1 - tau_plus), N * exp(-1/t))
    loss     = mean_i -log(exp(s_i+) / (exp(s_i+) + Ng_i))

tau_plus is the class prior (the chance that a "negative" shares the anchor's class), beta the
hardness. The max with N exp(-1/t) keeps the estimate positive; when it binds, no gradient reaches
that anchor's negatives, so the fraction of such rows is logged. Under torchrun the negatives are
the global batch (gathered with gradient) and N counts it.
"""
import argparse
import math
from collections import OrderedDict
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "simclr_debiased.py"
# Flags a resumed run may change; every other flag is taken from the checkpoint.
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision"}


def build_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="SimCLR with debiased (DCL) and hard (HCL) negatives.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="stl10", choices=common.DATASETS,
                   help="folder: DATA_DIR/train/<class>/* with optional DATA_DIR/test/<class>/*, or a flat folder of images")
    g.add_argument("--data_dir", default="data", help="root of the data; torchvision data sets are downloaded here when missing")
    g.add_argument("--train_split", default=None, choices=["train", "unlabeled", "train+unlabeled"],
                   help="pre-training split (default: train+unlabeled for STL-10, train otherwise)")
    g.add_argument("--subset", type=int, default=0, help="train on N images evenly spaced through the training set (0: all)")
    g.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size (32 also on STL-10, as DCL/HCL)")
    g.add_argument("--blur_p", type=float, default=0.5, help="probability of the Gaussian blur (0 turns it off, as leftthomas/SimCLR)")
    g.add_argument("--norm", default="cifar10", choices=common.NORMALIZATION_CHOICES,
                   help="input normalisation: cifar10 = the constants DCL/HCL used on every data set; auto = the data set's own; none = [0, 1]")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU/process")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=list(common.ARCHS), help="backbone")
    g.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="cifar: 3x3 stride-1 conv, no max-pool")
    g.add_argument("--width", type=int, default=64, help="base channels of the ResNet (64 = standard; 8-16 for CPU runs)")
    g.add_argument("--stem_padding", type=int, default=1, help="padding of the CIFAR stem's 3x3 conv (3 reproduces Nozawa & Sato)")
    g.add_argument("--hidden_dim", type=int, default=512, help="hidden size of the projection head")
    g.add_argument("--feature_dim", type=int, default=128, help="projection (loss) dimension")
    g.add_argument("--head", default="simclr", choices=["simclr", "nozawa"],
                   help="projection head: simclr = Linear(d, hidden, no bias)-BN-ReLU-Linear(hidden, dim) (DCL/HCL); "
                        "nozawa = Linear(d, hidden)-BN-ReLU-Linear(hidden, dim, no bias) (Nozawa & Sato)")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="SyncBatchNorm across processes under torchrun (global-batch BN statistics)")

    g = p.add_argument_group("method")
    g.add_argument("--estimator", default="hard", choices=["hard", "easy"],
                   help="hard: DCL/HCL estimator; easy: plain SimCLR (ignores --tau_plus and --beta)")
    g.add_argument("--debiased", action=argparse.BooleanOptionalAction, default=True,
                   help="DCL's switch as a real boolean (the original's type=bool read 'False' as True); "
                        "--no-debiased is plain SimCLR, the same as --estimator easy")
    g.add_argument("--temperature", type=float, default=0.5, help="softmax temperature t")
    g.add_argument("--tau_plus", type=float, default=0.1, help="class prior tau+ in [0, 1) (0: no debiasing)")
    g.add_argument("--beta", type=float, default=0.0, help="hardness beta >= 0 (0: DCL; 1: HCL's best on STL-10)")
    g.add_argument("--anneal", default="none", choices=["none", "down"],
                   help="down: beta follows linspace(beta, 0, 9), one step every epochs//9 epochs (HCL)")
    g.add_argument("--negatives", default="global", choices=["global", "local"],
                   help="under torchrun: global = the gathered batch of all processes; local = each process's own batch")
    g.add_argument("--num_chunks", type=int, default=1,
                   help="split each process's batch into N chunks, each with its own loss and negatives (K+1 = batch / N) "
                        "while BatchNorm sees the whole batch: one device standing in for N GPUs x K+1 with SyncBN "
                        "(needs --negatives local)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=400, help="total epochs (0: only evaluate the initial model)")
    g.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch of images over all processes (2x views)")
    g.add_argument("--optimizer", default="adam", choices=["adam", "larc"],
                   help="adam (DCL/HCL) or SGD with LARC (Nozawa & Sato; decay skips 'bias'/'bn' parameters)")
    g.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (larc)")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="learning rate after warm-up, set every step")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="linear warm-up from 0, per step")

    g = p.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=common.PRECISIONS,
                   help="autocast for the backbone: auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by the process rank)")
    g.add_argument("--out_dir", default="results/simclr_debiased", help="where args.json, metrics.csv and last.pt go")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs (the total)")
    g.add_argument("--knn_k", "--k", dest="knn_k", type=int, default=200, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.5, help="kNN monitor: weight temperature (DCL/HCL used t = 0.5)")
    g.add_argument("--eval_every", type=int, default=1, help="kNN on the test split every N epochs (0: never)")
    return p


def check_args(parser, args):
    """Reject flag values the loss or the loop cannot use, argparse-style (exit status 2)."""
    if not 0.0 <= args.tau_plus < 1.0:
        parser.error(f"--tau_plus must be in [0, 1), got {args.tau_plus}")
    if args.beta < 0:
        parser.error(f"--beta must be >= 0, got {args.beta}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.batch_size < 2:
        parser.error(f"--batch_size must be >= 2 (each image needs a negative), got {args.batch_size}")
    for name in ("epochs", "subset", "workers", "eval_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.knn_k < 1 or args.knn_t <= 0:
        parser.error(f"--knn_k must be >= 1 and --knn_t > 0, got {args.knn_k} and {args.knn_t}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or not 0 <= args.blur_p <= 1:
        parser.error("--lr must be > 0, --weight_decay and --warmup_epochs >= 0, --blur_p in [0, 1]")
    if args.train_split and args.dataset != "stl10" and args.train_split != "train":
        parser.error(f"--train_split {args.train_split} exists only for --dataset stl10")
    if args.num_chunks < 1:
        parser.error(f"--num_chunks must be >= 1, got {args.num_chunks}")
    if args.num_chunks > 1 and args.negatives != "local":
        parser.error("--num_chunks > 1 gives each chunk its own negatives: add --negatives local")


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class SimCLR(nn.Module):
    """Backbone (CIFAR-stem ResNet) and projection head d -> hidden (no bias) -> BN -> ReLU -> 128,
    or with head="nozawa" d -> hidden (bias) -> BN -> ReLU -> 128 (no bias)."""

    def __init__(self, arch="resnet50", stem="cifar", width=64, hidden_dim=512, feature_dim=128, stem_padding=1,
                 head="simclr"):
        super().__init__()
        self.backbone = common.build_backbone(arch, stem, width, stem_padding)
        if head == "nozawa":
            # Their ProjectionHead, with their module names: "bn1" keeps the head's BN out of the
            # weight decay under --optimizer larc, as their name filter did.
            self.projector = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(self.backbone.out_dim, hidden_dim)), ("bn1", nn.BatchNorm1d(hidden_dim)),
                ("relu1", nn.ReLU(inplace=True)), ("linear2", nn.Linear(hidden_dim, feature_dim, bias=False))]))
        elif head == "simclr":
            self.projector = nn.Sequential(nn.Linear(self.backbone.out_dim, hidden_dim, bias=False),
                                           nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                           nn.Linear(hidden_dim, feature_dim))
        else:
            raise ValueError(f"unknown head {head!r}; choose simclr or nozawa")

    def forward(self, x1, x2):
        # Each view passes on its own, as in the original code: BatchNorm statistics per view.
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


def build_model(args):
    """The model of a run from its arguments (a Namespace or `ckpt["args"]`); evaluation scripts
    rebuild checkpoints with it. `.backbone` gives the features, `.projector` the loss embedding."""
    a = args if isinstance(args, dict) else vars(args)
    return SimCLR(a["arch"], a["stem"], a["width"], a["hidden_dim"], a["feature_dim"], a.get("stem_padding", 1),
                  a.get("head", "simclr"))  # .get: checkpoints from before the flag existed


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------

def _log1mexp(d):
    """log(1 - exp(d)) for d < 0, accurate on both sides of -log 2."""
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def contrastive_loss_terms(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0, estimator="hard", gather=True):
    """Per-anchor losses [2b] and a bool mask of the anchors where the N exp(-1/t) floor binds.

    Log-space form of the DCL/HCL estimator (same value as the official code, no overflow at any
    temperature), computed in float32 (float64 for float64 inputs) outside autocast:
        A_i     = log N + LSE_j((1 + beta) s_ij) - LSE_j(beta s_ij)          log of rew_i
        D_i     = log(tau_plus N) + s_i+ - A_i                                 correction / rew
        logNg_i = A_i + log(1 - exp(D_i)) - log(1 - tau_plus) if D_i < 0 else -inf
        logNg_i = max(logNg_i, log N - 1/t);   loss_i = softplus(logNg_i - s_i+)
    Rows 0..b-1 are view-1 anchors, rows b..2b-1 view-2 anchors. With `gather` under
    torch.distributed the keys are every process's views (gathered with gradient) and N = 2B - 2
    counts the global batch B.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if estimator not in ("hard", "easy"):
        raise ValueError(f"estimator must be 'hard' or 'easy', got {estimator!r}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z1 = F.normalize(z1.to(dtype), dim=1)
        z2 = F.normalize(z2.to(dtype), dim=1)
        rank, world = common.world_info() if gather else (0, 1)
        all1 = common.all_gather_with_grad(z1) if world > 1 else z1
        all2 = common.all_gather_with_grad(z2) if world > 1 else z2
        b, batch = z1.shape[0], all1.shape[0]
        n_neg = 2 * batch - 2
        if n_neg < 1:
            raise ValueError("need at least 2 images in the (global) batch")
        anchors, keys = torch.cat([z1, z2]), torch.cat([all1, all2])
        logits = anchors @ keys.T / temperature                                   # [2b, 2B]
        pos = (z1 * z2).sum(dim=1) / temperature
        pos = torch.cat([pos, pos])                                               # [2b]
        image = torch.arange(b, device=z1.device) + rank * b                      # global image ids
        rows = torch.arange(2 * b, device=z1.device)
        not_negative = torch.zeros_like(logits, dtype=torch.bool)
        not_negative[rows, torch.cat([image, image + batch])] = True              # self
        not_negative[rows, torch.cat([image + batch, image])] = True              # positive
        neg = logits.masked_fill(not_negative, -math.inf)
        if estimator == "easy":
            log_ng = torch.logsumexp(neg, dim=1)
            return F.softplus(log_ng - pos), torch.zeros_like(pos, dtype=torch.bool)
        # beta * logits is masked after scaling: 0 * (-inf) would be nan at beta = 0.
        log_rew = (math.log(n_neg) + torch.logsumexp((1.0 + beta) * neg, dim=1)
                   - torch.logsumexp((beta * logits).masked_fill(not_negative, -math.inf), dim=1))
        if tau_plus > 0:
            d = math.log(tau_plus * n_neg) + pos - log_rew
            valid = d < 0
            d_safe = torch.where(valid, d, torch.full_like(d, -1.0))  # no nan gradients from the other branch
            log_ng = torch.where(valid, log_rew + _log1mexp(d_safe) - math.log1p(-tau_plus),
                                 torch.full_like(d, -math.inf))
        else:
            log_ng = log_rew
        floor = math.log(n_neg) - 1.0 / temperature
        clamped = ~(log_ng > floor)
        log_ng = torch.where(clamped, torch.full_like(log_ng, floor), log_ng)
        return F.softplus(log_ng - pos), clamped


def contrastive_loss(z1, z2, temperature=0.5, tau_plus=0.0, beta=0.0, estimator="hard", gather=True):
    """SimCLR / DCL / HCL loss, mean over the 2B anchors (see `contrastive_loss_terms`).

    estimator="easy" is NT-Xent; "hard" with beta = 0 is DCL, with beta = 0 and tau_plus = 0
    exactly SimCLR. Under torch.distributed each process passes its own rows: the mean of the
    per-process values is the loss of the whole batch, and each process's gradient divided by the
    world size (DDP's averaging) is the whole-batch gradient for its rows.
    """
    return contrastive_loss_terms(z1, z2, temperature, tau_plus, beta, estimator, gather)[0].mean()


def chunked_loss_terms(z1, z2, num_chunks=1, temperature=0.5, tau_plus=0.0, beta=0.0, estimator="hard", gather=True):
    """`contrastive_loss_terms` on each of `num_chunks` equal slices of the batch, each slice its
    own negatives (never gathered): K+1 = b / num_chunks. The mean of the returned per-anchor
    losses is the mean of the chunk losses, which is what DDP's gradient averaging gives on
    num_chunks GPUs that each compute their own loss (Nozawa & Sato's 4 x K+1)."""
    if num_chunks == 1:
        return contrastive_loss_terms(z1, z2, temperature, tau_plus, beta, estimator, gather)
    if z1.shape[0] % num_chunks or z1.shape[0] // num_chunks < 2:
        raise ValueError(f"a batch of {z1.shape[0]} does not split into {num_chunks} chunks of >= 2")
    pieces = [contrastive_loss_terms(a, b, temperature, tau_plus, beta, estimator, gather=False)
              for a, b in zip(z1.chunk(num_chunks), z2.chunk(num_chunks))]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def beta_for_epoch(beta, epoch, epochs, anneal):
    """HCL's `--anneal down`: after every epochs//9-th epoch beta takes the next value of
    linspace(beta, 0, 9) (the first is beta itself). `epoch` counts from 0."""
    if anneal == "none":
        return beta
    steps_done = min(epoch // max(epochs // 9, 1), 9)
    return beta if steps_done == 0 else beta * (1.0 - (steps_done - 1) / 8.0)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def build_optimizer(model, args):
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # LARC folds the weight decay into the gradient itself (common.larc_), so SGD runs without it.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if ("bias" in name or "bn" in name) else decay).append(param)
    return torch.optim.SGD([{"params": decay, "larc_weight_decay": args.weight_decay},
                            {"params": no_decay, "larc_weight_decay": 0.0}],
                           lr=args.lr, momentum=args.momentum, weight_decay=0.0)


def train_one_epoch(model, loader, optimizer, scaler, args, epoch, beta, dist_info, precision):
    """One pass over `loader`; returns the mean loss, clamped fraction and learning rate."""
    model.train()
    device, steps = dist_info.device, len(loader)
    bar = common.progress_bar(steps, f"epoch {epoch + 1}/{args.epochs}", dist_info.is_main)
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss, clamped anchors
    lr = args.lr
    for step, (x1, x2, _, _) in enumerate(loader):
        lr = common.learning_rate(args.lr, epoch + step / steps, args.epochs, args.warmup_epochs, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        with common.autocast(device, precision):
            z1, z2 = model(x1, x2)
        estimator = args.estimator if args.debiased else "easy"
        terms, clamped = chunked_loss_terms(z1, z2, args.num_chunks, args.temperature, args.tau_plus, beta, estimator,
                                            gather=args.negatives == "global")
        loss = terms.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.optimizer == "larc":
            scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
            common.larc_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        sums += torch.stack([loss.detach().double(), clamped.sum().double()])
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.4f}", lr=f"{lr:.3g}")
    if bar is not None:
        bar.close()
    if dist_info.world_size > 1:
        dist.all_reduce(sums)
    anchors = steps * dist_info.world_size * 2 * loader.batch_size
    return {"loss": sums[0].item() / (steps * dist_info.world_size), "clamped_fraction": sums[1].item() / anchors,
            "lr": lr}


def build_data(args, dist_info):
    """Training set (two views), and the kNN memory and test sets (None when unlabelled/absent)."""
    normalize = common.resolve_normalization(args.norm, args.dataset)
    augment = common.train_transform(args.crop_size, blur_p=args.blur_p, normalize=normalize)
    plain = common.eval_transform(normalize, size=args.crop_size if args.dataset == "folder" else None)
    split = args.train_split or common.default_train_split(args.dataset)
    with common.main_process_first(dist_info):  # rank 0 downloads; the others then find the files
        train_set = common.subset(common.build_dataset(args.dataset, args.data_dir, split), args.subset)
        memory_set = common.build_dataset(args.dataset, args.data_dir, "train", plain)
        test_set = common.build_dataset(args.dataset, args.data_dir, "test", plain)
    memory_set = common.subset(memory_set, args.subset)
    if test_set is None or common.num_classes(memory_set) == 0:
        memory_set = test_set = None
    return common.TwoViews(train_set, augment), memory_set, test_set


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    with common.exit_on_user_error(SCRIPT):
        train(args, common.explicit_flags(parser, argv))


def train(args, explicit=()):
    dist_info = common.setup_distributed()
    device, is_main = dist_info.device, dist_info.is_main
    args, ckpt = common.load_run(args, explicit, SCRIPT, MAY_CHANGE_ON_RESUME)
    per_rank_batch = common.per_process_batch(args.batch_size, dist_info)
    if args.negatives == "local" and per_rank_batch < 2:
        raise common.UserError("--negatives local needs at least 2 images per process")
    if per_rank_batch % args.num_chunks or per_rank_batch // args.num_chunks < 2:
        raise common.UserError(f"{per_rank_batch} images per process do not split into --num_chunks "
                               f"{args.num_chunks} chunks of at least 2")
    precision = common.resolve_precision(args.precision, device)
    common.seed_everything(args.seed + dist_info.rank)

    train_set, memory_set, test_set = build_data(args, dist_info)
    if len(train_set) // dist_info.world_size < per_rank_batch:
        raise common.UserError(f"the training set has {len(train_set)} images, fewer than one batch of "
                               f"{args.batch_size}; lower --batch_size or raise --subset")
    loader = common.train_loader(train_set, per_rank_batch, dist_info, args.workers, args.seed)

    model = common.sync_batchnorm(build_model(args).to(device), dist_info, args.sync_bn)
    optimizer = build_optimizer(model, args)
    scaler = common.grad_scaler(device, precision)
    start_epoch = common.restore_training(ckpt, model, optimizer, scaler, dist_info) if ckpt is not None else 0
    net = common.data_parallel(model, dist_info)

    metrics = None
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        common.write_args(args, args.out_dir)
        metrics = common.MetricsCSV(os.path.join(args.out_dir, "metrics.csv"),
                                    ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1",
                                     "knn_top5", "beta", "clamped_fraction"],
                                    resume_epoch=start_epoch if ckpt is not None else None)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{SCRIPT}: {len(train_set)} training images, {dist_info.world_size} process(es) x "
              f"{per_rank_batch} images, {n_params / 1e6:.2f}M parameters, {precision} on {device}, "
              f"epochs {start_epoch}..{args.epochs}")
        if memory_set is None and args.eval_every:
            print("note: no labelled test split, so no kNN monitor")

    def knn():
        model.eval()
        return common.knn_monitor(model.backbone, memory_set, test_set, dist_info, args.knn_k, args.knn_t,
                                  per_rank_batch, args.workers, precision, is_main)

    def save(epoch):
        common.save_training_checkpoint(os.path.join(args.out_dir, "last.pt"), SCRIPT, args, epoch, model,
                                        optimizer, scaler, dist_info)

    if args.epochs == 0 and ckpt is None:  # evaluate the untrained model (a baseline)
        row = {"epoch": 0}
        if memory_set is not None:
            row["knn_top1"], row["knn_top5"] = knn()
        if is_main:
            metrics.write(row)
            print(f"epoch 0 (untrained): kNN top-1 {row.get('knn_top1', float('nan')):.2f} "
                  f"top-5 {row.get('knn_top5', float('nan')):.2f}")
        save(0)

    if ckpt is not None and start_epoch >= args.epochs and is_main:
        print(f"the checkpoint has already trained {start_epoch} epochs; give --epochs above that to continue")
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        beta = beta_for_epoch(args.beta, epoch, args.epochs, args.anneal)
        start = time.time()
        stats = train_one_epoch(net, loader, optimizer, scaler, args, epoch, beta, dist_info, precision)
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": stats["lr"], "epoch_seconds": seconds,
               "images_per_sec": len(loader) * args.batch_size / seconds, "beta": beta,
               "clamped_fraction": stats["clamped_fraction"]}
        last = epoch + 1 == args.epochs
        if memory_set is not None and args.eval_every and ((epoch + 1) % args.eval_every == 0 or last):
            row["knn_top1"], row["knn_top5"] = knn()
        if is_main:
            metrics.write(row)
            knn_text = f" kNN top-1 {row['knn_top1']:.2f} top-5 {row['knn_top5']:.2f}" if "knn_top1" in row else ""
            print(f"epoch {epoch + 1}/{args.epochs} loss {stats['loss']:.4f} clamped "
                  f"{stats['clamped_fraction']:.3f} {row['images_per_sec']:.0f} img/s{knn_text}")
        save(epoch + 1)
    common.cleanup_distributed()


if __name__ == "__main__":
    main()

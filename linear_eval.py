"""Evaluate any checkpoint of this project: linear probe, kNN and Nozawa & Sato's mean classifier.

    python linear_eval.py runs/hcl/last.pt                           # the protocol of the script's paper
    python linear_eval.py runs/hcl/last.pt --protocol dcl --bn_train # DCL/HCL's linear.py, BatchNorm in train mode
    python linear_eval.py runs/moco/last.pt --protocol moco          # MoCo's main_lincls.py (lr 30, steps 60/80)
    python linear_eval.py runs/x/last.pt --protocol nozawa --no_head # Nozawa & Sato, raw encoder features
    python linear_eval.py runs/x/last.pt --augment none --cache_dir runs/features   # fast path
    torchrun --standalone --nproc_per_node 4 linear_eval.py runs/hcl/last.pt --protocol nozawa

The backbone is rebuilt from `ckpt["args"]` (`common.build_backbone`) and loaded from
`ckpt["backbone"]`; the projection head, when the protocol reads it, comes from the training
script's own `build_model(args)`. The backbone is frozen and in eval mode (BatchNorm statistics
frozen) unless `--bn_train`. Three numbers are reported on the test split, top-1 and top-5:
- linear probe: nn.Linear(d, C) trained with the protocol's optimiser (presets below, every knob
  overridable); the FINAL-epoch accuracy. The best epoch (selected on the test set, as
  leftthomas/SimCLR and Nozawa & Sato reported) only with --report_best, and labelled so.
- kNN (Wu et al. 2018): cosine similarity to the training features, k = 200 neighbours weighted
  by exp(sim / t), summed per class.
- mean classifier (Nozawa & Sato 2021): mu_c = mean of the L2-normalised training features of
  class c, NOT re-normalised; predict argmax_c normalize(z) . mu_c.
kNN and the mean classifier use the probe's features of the checkpoint as saved (eval mode).

Without training augmentation the features are computed once (kept in memory, and on disk with
--cache_dir) and the linear layer trains on the tensors; with augmentation every epoch passes the
images through the frozen backbone again. Results go to eval.json next to the checkpoint (--out).

Text checkpoints: a training script that defines its own `eval_datasets(args, train_augment,
data_dir, checkpoint)` supplies the data sets (and their `collate_fn`); its `build_model(args).backbone` is
the encoder. Image scripts use `common.eval_datasets`.
"""
import argparse
import copy
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

import common

SCRIPT = "linear_eval.py"

# Each protocol as its paper's code evaluated (specs: simclr_debiased.md 4.2, moco_mochi.md 4,
# bound_and_nlp.md 4). "run" augmentation = the training run's own SimCLR augmentation (one view);
# "crop_flip" = main_lincls.py's RandomResizedCrop + horizontal flip. BatchNorm is frozen in all
# three by default; DCL/HCL's original left it in train mode (--bn_train).
PROTOCOLS = {
    "dcl": dict(optimizer="adam", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-6,
                schedule="constant", milestones=[], lr_decay=0.1, epochs=100, batch_size=512,
                augment="run", features="backbone", normalize=False, drop_last=False, init="default",
                knn_t=0.5, mean_view="plain"),
    "moco": dict(optimizer="sgd", lr=30.0, momentum=0.9, nesterov=False, weight_decay=0.0,
                 schedule="step", milestones=[60, 80], lr_decay=0.1, epochs=100, batch_size=256,
                 augment="crop_flip", features="backbone", normalize=False, drop_last=False, init="normal",
                 knn_t=0.1, mean_view="plain"),
    # Nozawa & Sato: 4 processes x 512 images per step for CIFAR (a global batch of 2048 at lr 0.3),
    # one GPU x 512 and 20 epochs for AG News ("text").
    "nozawa": dict(optimizer="sgd", lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.0,
                   schedule="cosine", milestones=[], lr_decay=0.1, epochs=100, batch_size=2048,
                   augment="run", features="head", normalize=True, drop_last=True, init="default",
                   knn_t=0.1, mean_view="augmented", text=dict(epochs=20, batch_size=512)),
}
# --protocol auto: the protocol of the paper behind the script that wrote the checkpoint; MoCo's
# (the common frozen-BatchNorm SGD probe) for scripts whose paper has none here.
AUTO_PROTOCOL = {"simclr_debiased.py": "dcl", "moco_mochi.py": "moco", "nlp_similar_words.py": "nozawa"}
SETTINGS = tuple(k for k in PROTOCOLS["dcl"])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default except None: the protocol's preset fills those, and their help lists it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def preset_help(name, text):
    values = ", ".join(f"{p} {json.dumps(PROTOCOLS[p][name])}" for p in PROTOCOLS)
    return f"{text} (default per protocol: {values})"


def build_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="Linear probe, kNN and mean classifier of a checkpoint.",
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a last.pt written by one of the project's training scripts")
    p.add_argument("--protocol", default="auto", choices=["auto", *PROTOCOLS],
                   help="preset: dcl = DCL/HCL linear.py, moco = MoCo main_lincls.py, nozawa = Nozawa & Sato; "
                        "auto = the one of the script that wrote the checkpoint (moco for others)")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help="root of the data (default: the training run's --data_dir)")
    g.add_argument("--subset", type=int, default=0,
                   help="use N training images evenly spaced through the split (0: all)")
    g.add_argument("--test_subset", type=int, default=0,
                   help="use N test images evenly spaced through the split (0: all)")
    g.add_argument("--augment", default=None, choices=["none", "run", "crop_flip"],
                   help=preset_help("augment", "training images for the probe: none = plain (features computed "
                                               "once), run = the run's SimCLR augmentation, crop_flip = random "
                                               "resized crop + flip"))
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")

    g = p.add_argument_group("features")
    g.add_argument("--features", default=None, choices=["backbone", "head"],
                   help=preset_help("features", "backbone = pooled encoder output; head = projection-head output"))
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help=preset_help("normalize", "L2-normalise the probe's input features"))
    g.add_argument("--no_head", action="store_true",
                   help="raw encoder features (= --features backbone --no-normalize; Nozawa & Sato's 'w/o' variant)")
    g.add_argument("--bn_train", action="store_true",
                   help="BatchNorm of the frozen backbone in train mode while the probe trains (running statistics "
                        "follow the labelled data and are used at test time), as DCL/HCL's linear.py did")
    g.add_argument("--cache_dir", default=None,
                   help="keep the plain train/test features here and reuse them on the next run with the same "
                        "checkpoint, data and feature settings")
    g.add_argument("--recompute_features", action="store_true",
                   help="without augmentation, still pass the training images through the backbone every epoch "
                        "(the slow path; for benchmarks and checks)")
    g.add_argument("--feature_batch_size", type=int, default=512,
                   help="images per process and step when extracting features")

    g = p.add_argument_group("linear probe")
    g.add_argument("--epochs", type=int, default=None,
                   help=preset_help("epochs", "training epochs (nozawa on text: 20)"))
    g.add_argument("--batch_size", type=int, default=None,
                   help=preset_help("batch_size", "GLOBAL batch over all processes (nozawa on text: 512)"))
    g.add_argument("--optimizer", default=None, choices=["sgd", "adam"], help=preset_help("optimizer", "optimiser"))
    g.add_argument("--lr", type=float, default=None, help=preset_help("lr", "learning rate"))
    g.add_argument("--momentum", type=float, default=None,
                   help=preset_help("momentum", "SGD momentum (ignored by adam)"))
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=preset_help("nesterov", "Nesterov momentum (sgd)"))
    g.add_argument("--weight_decay", type=float, default=None, help=preset_help("weight_decay", "weight decay"))
    g.add_argument("--schedule", default=None, choices=["constant", "step", "cosine"],
                   help=preset_help("schedule", "learning rate per epoch: step = x lr_decay at each milestone; "
                                                "cosine = lr * (1 + cos(pi * epoch / epochs)) / 2"))
    g.add_argument("--milestones", type=int, nargs="*", default=None,
                   help=preset_help("milestones", "epochs of the step schedule"))
    g.add_argument("--lr_decay", type=float, default=None, help=preset_help("lr_decay", "factor at each milestone"))
    g.add_argument("--drop_last", action=argparse.BooleanOptionalAction, default=None,
                   help=preset_help("drop_last", "drop the last incomplete batch of every epoch"))
    g.add_argument("--init", default=None, choices=["default", "normal"],
                   help=preset_help("init", "linear layer: default = nn.Linear's; normal = N(0, 0.01) weights, "
                                            "zero bias"))
    g.add_argument("--eval_every", type=int, default=1, help="test the probe every N epochs (and after the last)")
    g.add_argument("--report_best", action="store_true",
                   help="also print and save the best test accuracy over epochs, SELECTED ON THE TEST SET "
                        "(optimistic; leftthomas/SimCLR and Nozawa & Sato reported it)")

    g = p.add_argument_group("kNN and mean classifier")
    g.add_argument("--knn_k", type=int, default=200, help="kNN neighbours")
    g.add_argument("--knn_t", type=float, default=None, help=preset_help("knn_t", "kNN weight temperature"))
    g.add_argument("--mean_view", default=None, choices=["plain", "augmented"],
                   help=preset_help("mean_view", "training images for the class means: plain, or one view under the "
                                                 "run's augmentation (Nozawa & Sato)"))

    g = p.add_argument_group("system")
    g.add_argument("--precision", default="fp32", choices=common.PRECISIONS,
                   help="autocast for the backbone (fp32 as the originals; bf16 is faster on recent GPUs)")
    g.add_argument("--seed", type=int, default=0, help="random seed (offset by the process rank for augmentation)")
    g.add_argument("--out", default=None, help="the results file (default: eval.json next to the checkpoint)")
    return p


def check_args(parser, args):
    """Reject values no protocol can use, argparse-style (exit status 2)."""
    for name in ("subset", "test_subset", "workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("epochs", "batch_size", "feature_batch_size", "eval_every", "knn_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.knn_t is not None and args.knn_t <= 0:
        parser.error(f"--knn_t must be > 0, got {args.knn_t}")
    for name in ("weight_decay", "momentum", "lr_decay"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.milestones and any(b <= a for a, b in zip(args.milestones, args.milestones[1:])):
        parser.error(f"--milestones must increase, got {args.milestones}")
    if args.no_head and args.features == "head":
        parser.error("--no_head contradicts --features head")


def resolve_settings(args, protocol, text):
    """The protocol's preset, overridden by every flag given (flags left at None keep the preset)."""
    preset = dict(PROTOCOLS[protocol])
    modality = preset.pop("text", {})
    if text:
        preset.update(modality)
    if args.no_head:
        preset.update(features="backbone", normalize=False)
    settings = {name: (preset[name] if getattr(args, name) is None else getattr(args, name)) for name in SETTINGS}
    settings.update(protocol=protocol, bn_train=args.bn_train, knn_k=args.knn_k)
    if settings["nesterov"] and (settings["optimizer"] != "sgd" or settings["momentum"] <= 0):
        raise common.UserError("--nesterov needs --optimizer sgd and --momentum > 0")
    return settings


# ------------------------------------------------------------------------------------------------
# The evaluation functions (api.md 4): tensors in, a fraction in [0, 1] out
# ------------------------------------------------------------------------------------------------

def _as_inputs(train_features, train_labels, test_features, test_labels):
    train_x, test_x = torch.as_tensor(train_features), torch.as_tensor(test_features)
    train_y, test_y = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if not train_x.is_floating_point():
        train_x, test_x = train_x.float(), test_x.float()
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError("there must be one label per feature row")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("empty features")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return train_x, train_y, test_x.to(train_x.dtype), test_y, num_classes


def _check_topk(topk):
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk}")


def class_means(features, labels, num_classes):
    """[C, D] means of the L2-normalised features per class, NOT re-normalised (Nozawa & Sato's
    mean classifier); a class without examples gets a zero mean."""
    return common.class_means(torch.as_tensor(features), torch.as_tensor(labels).long(), num_classes)


def mean_scores(train_features, train_labels, test_features, num_classes):
    """normalize(z) . mu_c for every test row and class: [N_test, C]."""
    return F.normalize(test_features, dim=1) @ class_means(train_features, train_labels, num_classes).T


def mean_classifier_accuracy(train_features, train_labels, test_features, test_labels, topk=1):
    """Fraction of test points whose label is among the `topk` classes with the largest
    normalize(z) . mu_c (mu_c from `class_means` of the training features)."""
    _check_topk(topk)
    train_x, train_y, test_x, test_y, c = _as_inputs(train_features, train_labels, test_features, test_labels)
    scores = mean_scores(train_x, train_y, test_x, c)
    return common.topk_correct(scores, test_y, ks=(topk,))[0] / test_y.shape[0]


def knn_scores(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1):
    """Weighted kNN class scores [N_test, C] on cosine similarity (features normalised here)."""
    return common.knn_predict(F.normalize(test_features, dim=1), F.normalize(train_features, dim=1),
                              train_labels, num_classes, k, temperature)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=0.1, topk=1):
    """Fraction of test points whose label is among the `topk` classes of the weighted kNN vote:
    the k most cosine-similar training points, each weighted exp(sim / temperature), summed per
    class."""
    _check_topk(topk)
    if not isinstance(k, int) or k < 1 or not temperature > 0:
        raise ValueError(f"k must be a positive integer and temperature > 0, got {k} and {temperature}")
    train_x, train_y, test_x, test_y, c = _as_inputs(train_features, train_labels, test_features, test_labels)
    scores = knn_scores(train_x, train_y, test_x, c, k, temperature)
    return common.topk_correct(scores, test_y, ks=(topk,))[0] / test_y.shape[0]


def percent_topk(scores, labels, ks=(1, 5)):
    """Top-k accuracies in percent (k capped at the number of classes)."""
    return [100.0 * c / labels.shape[0] for c in common.topk_correct(scores, labels, ks)]


# ------------------------------------------------------------------------------------------------
# Checkpoint, encoder, data
# ------------------------------------------------------------------------------------------------

class FeatureEncoder(nn.Module):
    """The backbone, optionally followed by the projection head, optionally L2-normalised."""

    def __init__(self, backbone, projector=None, normalize=False):
        super().__init__()
        self.backbone, self.projector, self.normalize = backbone, projector, normalize

    def forward(self, x):
        h = self.backbone(x)
        if self.projector is not None:
            h = self.projector(h)
        return F.normalize(h.float(), dim=1) if self.normalize else h


def build_encoder(ckpt, module, features, normalize):
    """The frozen feature encoder. Image backbones are rebuilt from the arguments with
    common.build_backbone (no need for the training script); the head, and a script's own
    (non-ResNet) backbone, come from the script's build_model via common.model_from_checkpoint.
    Either way the backbone is loaded from ckpt["backbone"]."""
    own_backbone = module is not None and hasattr(module, "eval_datasets")
    projector = None
    if features == "head" or own_backbone:
        model = common.model_from_checkpoint(ckpt)
        backbone, projector = model.backbone, (model.projector if features == "head" else None)
    else:
        try:
            backbone = common.backbone_from_args(ckpt["args"])
        except (KeyError, ValueError) as err:
            raise common.UserError(f"cannot rebuild the backbone from the checkpoint's arguments: {err}") from None
    try:
        backbone.load_state_dict(ckpt["backbone"])
    except RuntimeError as err:
        raise common.UserError(f"ckpt['backbone'] does not fit the backbone of {ckpt['script']}: "
                               f"{str(err).splitlines()[0]}") from None
    encoder = FeatureEncoder(backbone, projector, normalize).eval()
    encoder.requires_grad_(False)
    return encoder


def crop_flip(dataset):
    """A copy of a plain image data set with MoCo main_lincls's training augmentation in front of
    its own transform: RandomResizedCrop to the evaluation size (scale 0.08-1) and a flip. The
    plain transform then only converts and normalises (its resize is a no-op at that size)."""
    if not hasattr(dataset, "transform") or getattr(dataset, "collate_fn", None) is not None:
        raise common.UserError("--augment crop_flip needs an image data set")
    size = dataset[0][0].shape[-1]
    augmented = copy.copy(dataset)
    augmented.transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                              dataset.transform])
    return augmented


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def features_of(encoder, dataset, dist_info, args, precision, collate_fn, desc):
    """Features (float32, as the encoder returns them) and labels of a whole data set, in order, on
    every rank: each rank encodes every world_size-th item and the pieces are gathered back."""
    loader = common.eval_loader(dataset, args.feature_batch_size, args.workers, dist_info.device, dist_info,
                                collate_fn=collate_fn)
    bar = common.progress_bar(len(loader), desc, dist_info.is_main)
    x, y = common.extract_features(encoder, loader, dist_info.device, precision, bar, normalize=False)
    if bar is not None:
        bar.close()
    return common.gather_in_order(x.float(), len(dataset)), common.gather_in_order(y, len(dataset))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(args, ckpt, settings, train, test, classes, precision):
    """What the plain features depend on: the checkpoint's bytes (weights, and the arguments that
    fix the transform), the encoder's output, the images and the precision."""
    root = args.data_dir or ckpt["args"].get("data_dir", "")
    return {"checkpoint_sha256": file_sha256(args.checkpoint), "features": settings["features"],
            "normalize": settings["normalize"], "data_dir": os.path.abspath(root) if root else "",
            "subset": args.subset, "test_subset": args.test_subset, "num_train": len(train), "num_test": len(test),
            "classes": list(classes), "precision": precision}


def plain_features(encoder, train, test, dist_info, args, precision, collate_fn, key):
    """Train and test features of the plain images, computed once; with --cache_dir read from or
    written to a file named by a hash of everything they depend on."""
    path = None
    if args.cache_dir:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = os.path.join(args.cache_dir, f"features-{name}.pt")
        cached = None
        if os.path.isfile(path):
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache file is recomputed, not an error
                cached = None
        valid = isinstance(cached, dict) and cached.get("key") == key
        # Every rank must take the same path, or the gathers below would wait forever.
        flag = torch.tensor([int(valid)], device=dist_info.device)
        if dist_info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            device = dist_info.device
            return ([cached[k].to(device) for k in ("train", "train_labels", "test", "test_labels")], True)
    train_x, train_y = features_of(encoder, train, dist_info, args, precision, collate_fn, "features (train)")
    test_x, test_y = features_of(encoder, test, dist_info, args, precision, collate_fn, "features (test)")
    if path is not None and dist_info.is_main:
        common.save_checkpoint({"key": key, "train": train_x.cpu(), "train_labels": train_y.cpu(),
                                "test": test_x.cpu(), "test_labels": test_y.cpu()}, path)
    return [train_x, train_y, test_x, test_y], False


def average_buffers(module, world_size):
    """Average BatchNorm running statistics over the ranks (--bn_train: each rank updated its own)."""
    if world_size > 1:
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= world_size


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------

def epoch_learning_rate(settings, epoch):
    """The learning rate of epoch `epoch` (from 0), set once per epoch as all three originals did."""
    lr = settings["lr"]
    if settings["schedule"] == "step":
        return lr * settings["lr_decay"] ** sum(epoch >= m for m in settings["milestones"])
    if settings["schedule"] == "cosine":  # CosineAnnealingLR(T_max=epochs, eta_min=0), stepped per epoch
        return common.learning_rate(lr, epoch, settings["epochs"], 0.0, "cosine")
    return lr


def build_probe(dim, num_classes, settings, seed):
    """nn.Linear initialised from `seed` alone, so that the probe starts from the same weights
    whatever drew random numbers before (augmentation) and however many processes run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(dim, num_classes)
        if settings["init"] == "normal":  # main_lincls.py
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
    return linear


def build_optimizer(params, settings):
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"], nesterov=settings["nesterov"],
                           weight_decay=settings["weight_decay"])


def probe_sampler(n, dist_info, seed, drop_last):
    """The order of the training items, which depends only on (seed, epoch): the cached and the
    recomputing paths see the same batches. Under torchrun the ranks' batches together are the
    single-process batch (DistributedSampler interleaves the permutation)."""
    return DistributedSampler(range(n), num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                              seed=seed, drop_last=drop_last)


def cached_batches(features, labels, sampler, batch_size, drop_last):
    order = torch.tensor(list(sampler), dtype=torch.long, device=features.device)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield features[idx], labels[idx]


def image_batches(encoder, loader, device, precision):
    for batch in loader:
        with torch.no_grad(), common.autocast(device, precision):
            features = encoder(batch[0].to(device, non_blocking=True))
        yield features.float(), torch.as_tensor(batch[1]).to(device)


def train_probe(encoder, settings, train_feats, train_view, test_features, dist_info, args, precision, collate_fn,
                num_classes, dim):
    """Train nn.Linear(dim, num_classes) on frozen features; returns (per-epoch history, probe).

    train_feats: the plain (features, labels) when the probe trains on the cached tensors; else
    None, and `train_view` (a data set) goes through the backbone every epoch. test_features():
    the test (features, labels) to score the probe with (recomputed under --bn_train, since the
    BatchNorm statistics then change)."""
    device, world = dist_info.device, dist_info.world_size
    per_rank, drop_last = settings["batch_size"] // world, settings["drop_last"]
    n = len(train_view) if train_feats is None else train_feats[0].shape[0]
    sampler = probe_sampler(n, dist_info, args.seed, drop_last)
    steps = len(sampler) // per_rank if drop_last else -(-len(sampler) // per_rank)
    if steps == 0:
        raise common.UserError(f"{n} training items make no full batch of {settings['batch_size']} with "
                               f"--drop_last; lower --batch_size or raise --subset")
    loader = None
    if train_feats is None:
        loader = DataLoader(train_view, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", drop_last=drop_last, collate_fn=collate_fn)
    linear = build_probe(dim, num_classes, settings, args.seed).to(device)
    net = linear
    if world > 1:  # averages the gradients: the ranks' batches together are the global batch
        net = nn.parallel.DistributedDataParallel(linear, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(linear.parameters(), settings)
    history, epochs = [], settings["epochs"]
    bar = common.progress_bar(epochs * steps, "linear probe", dist_info.is_main)
    for epoch in range(epochs):
        start = time.time()
        lr = epoch_learning_rate(settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        # DCL/HCL called net.train() on the whole model: BatchNorm then normalises with batch
        # statistics and updates its running statistics from the labelled data.
        encoder.train(settings["bn_train"])
        batches = (image_batches(encoder, loader, device, precision) if loader is not None
                   else cached_batches(*train_feats, sampler, per_rank, drop_last))
        sums = torch.zeros(2, device=device, dtype=torch.float64)  # loss, steps
        for features, labels in batches:
            loss = F.cross_entropy(net(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach().double(), torch.ones((), device=device, dtype=torch.float64)])
            if bar is not None:
                bar.update(1)
        encoder.eval()
        if world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "lr": lr, "loss": sums[0].item() / max(sums[1].item(), 1.0)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            test_x, test_y = test_features()
            with torch.no_grad():
                row["top1"], row["top5"] = percent_topk(linear(test_x), test_y)
        row["seconds"] = time.time() - start
        history.append(row)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{row['loss']:.4f}", top1=f"{row.get('top1', float('nan')):.2f}")
    if bar is not None:
        bar.close()
    return history, linear


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    with common.exit_on_user_error(SCRIPT):
        return evaluate(args)


def evaluate(args):
    """The whole evaluation; returns what it writes to eval.json."""
    started = time.time()
    dist_info = common.setup_distributed()
    device, is_main, world = dist_info.device, dist_info.is_main, dist_info.world_size
    ckpt = common.load_checkpoint(args.checkpoint, keys=("args", "epoch", "backbone", "model"))
    script = os.path.basename(ckpt["script"])
    module = common.training_module(ckpt)
    protocol = AUTO_PROTOCOL.get(script, "moco") if args.protocol == "auto" else args.protocol
    precision = common.resolve_precision(args.precision, device)
    common.seed_everything(args.seed + dist_info.rank)  # augmentation differs per rank, as in training

    # Data: the training script's own eval_datasets (text) or common's; rank 0 downloads first.
    with common.main_process_first(dist_info):
        train, test = common.run_datasets(ckpt, train_augment=False, data_dir=args.data_dir)
    if test is None:
        root = args.data_dir or ckpt["args"].get("data_dir")
        raise common.UserError(f"no labelled test split in {root} (expected {root}/test/<class>/*)")
    collate_fn = getattr(train, "collate_fn", None)
    classes = list(getattr(train, "classes", []) or [])
    test_classes = list(getattr(test, "classes", []) or [])
    if classes and test_classes and classes != test_classes:
        raise common.UserError(f"the test split's classes {test_classes} differ from the training split's {classes}; "
                               f"the probe can only predict the training classes")
    settings = resolve_settings(args, protocol, text=collate_fn is not None)
    if settings["batch_size"] % world:
        raise common.UserError(f"--batch_size {settings['batch_size']} (global) is not divisible by the {world} processes")
    views = {}
    with common.main_process_first(dist_info):
        if settings["augment"] == "run" or settings["mean_view"] == "augmented":
            views["run"] = common.subset(common.run_datasets(ckpt, train_augment=True, data_dir=args.data_dir)[0],
                                       args.subset)
        if settings["augment"] == "crop_flip":
            views["crop_flip"] = common.subset(crop_flip(train), args.subset)
    train, test = common.subset(train, args.subset), common.subset(test, args.test_subset)
    # Plain images and a frozen backbone: the features never change, so the probe can train on them.
    cached_probe = settings["augment"] == "none" and not args.recompute_features and not args.bn_train
    settings["cached_features"] = cached_probe

    encoder = build_encoder(ckpt, module, settings["features"], settings["normalize"]).to(device)
    if is_main:
        print(f"{SCRIPT}: {args.checkpoint} ({script}, epoch {ckpt['epoch']}), protocol {protocol}, "
              f"{len(train)} train / {len(test)} test items, {settings['features']} features, "
              f"{precision} on {device}, {world} process(es)")

    t = time.time()
    key = cache_key(args, ckpt, settings, train, test, classes, precision) if args.cache_dir else None
    (train_x, train_y, test_x, test_y), from_cache = plain_features(encoder, train, test, dist_info, args, precision,
                                                                    collate_fn, key)
    n_classes = max(len(classes), int(train_y.max()) + 1)
    if int(test_y.max()) >= n_classes or int(test_y.min()) < 0 or int(train_y.min()) < 0:
        raise common.UserError(f"the test labels go up to {int(test_y.max())} but the training split has {n_classes} "
                               f"classes (or some items are unlabelled); the probe cannot predict them")
    # kNN and the mean classifier: the checkpoint as saved, on the same features as the probe.
    knn = percent_topk(knn_scores(train_x, train_y, test_x, n_classes, settings["knn_k"], settings["knn_t"]), test_y)
    mean_x, mean_y = train_x, train_y
    if settings["mean_view"] == "augmented":
        mean_x, mean_y = features_of(encoder, views["run"], dist_info, args, precision, collate_fn,
                                     "features (augmented train)")
    mean = percent_topk(mean_scores(mean_x, mean_y, test_x, n_classes), test_y)
    feature_seconds = time.time() - t

    def test_features():
        if not settings["bn_train"]:
            return test_x, test_y
        average_buffers(encoder, world)  # each rank updated its own running statistics
        return features_of(encoder, test, dist_info, args, precision, collate_fn, "features (test)")

    t = time.time()
    history, _ = train_probe(encoder, settings, (train_x, train_y) if cached_probe else None,
                             None if cached_probe else views.get(settings["augment"], train), test_features,
                             dist_info, args, precision, collate_fn, n_classes, test_x.shape[1])
    probe_seconds = time.time() - t

    final = history[-1]
    results = {
        "checkpoint": os.path.abspath(args.checkpoint), "script": script, "checkpoint_epoch": ckpt["epoch"],
        "protocol": protocol, "units": "percent of the test split",
        "linear": {"top1": final["top1"], "top5": final["top5"], "epoch": final["epoch"], "history": history},
        "knn": {"top1": knn[0], "top5": knn[1], "k": settings["knn_k"], "temperature": settings["knn_t"]},
        "mean_classifier": {"top1": mean[0], "top5": mean[1], "train_view": settings["mean_view"]},
        "settings": settings, "args": vars(args),
        "data": {"num_train": len(train), "num_test": len(test), "num_classes": n_classes, "classes": classes,
                 "feature_dim": int(test_x.shape[1])},
        "timing": {"feature_seconds": feature_seconds, "probe_seconds": probe_seconds,
                   "total_seconds": time.time() - started, "features_from_cache": from_cache},
        "system": {"world_size": world, "device": str(device), "precision": precision,
                   "torch": torch.__version__},
    }
    tested = [row for row in history if "top1" in row]
    if args.report_best:
        best = max(tested, key=lambda row: row["top1"])
        results["linear_best_epoch_test_selected"] = {"top1": best["top1"], "top5": best["top5"],
                                                      "epoch": best["epoch"]}
    if is_main:
        print(f"linear probe (final epoch {final['epoch']}): top-1 {final['top1']:.2f} top-5 {final['top5']:.2f}")
        print(f"kNN (k={settings['knn_k']}, t={settings['knn_t']}): top-1 {knn[0]:.2f} top-5 {knn[1]:.2f}")
        print(f"mean classifier ({settings['mean_view']} train view): top-1 {mean[0]:.2f} top-5 {mean[1]:.2f}")
        if args.report_best:
            best = results["linear_best_epoch_test_selected"]
            print(f"linear probe, best epoch {best['epoch']} SELECTED ON THE TEST SET (optimistic): "
                  f"top-1 {best['top1']:.2f} top-5 {best['top5']:.2f}")
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval.json")
        common.write_text(out, json.dumps(results, indent=2) + "\n")
        print(f"wrote {out} (features {feature_seconds:.1f} s, probe {probe_seconds:.1f} s)")
    common.cleanup_distributed()
    return results


if __name__ == "__main__":
    main()

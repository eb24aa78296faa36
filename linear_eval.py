"""Evaluate a checkpoint of this project: linear probe, kNN and Nozawa & Sato's mean classifier.

    python linear_eval.py runs/hcl/last.pt                   # the run's paper's protocol
    python linear_eval.py runs/hcl/last.pt --protocol dcl --bn_train  # DCL/HCL's BN in train mode
    python linear_eval.py runs/moco/last.pt --protocol moco  # main_lincls.py (lr 30, x0.1 at 60/80)
    python linear_eval.py runs/k32/last.pt --protocol nozawa --no_head  # Nozawa & Sato, backbone
    python linear_eval.py runs/x/last.pt --augment none      # features once, probe on the tensors
    torchrun --standalone --nproc_per_node 4 linear_eval.py runs/hcl/last.pt --protocol nozawa

The checkpoint alone rebuilds the encoder (no training script is imported): images
`common.build_backbone(args.arch, args.stem, args.width, args.stem_padding)` + ckpt["backbone"];
text (nlp_similar_words.py) nn.EmbeddingBag(len(vocab) + 1, dim, mode="mean") + ckpt["backbone"];
the projection head from ckpt["head"] = {"layout", "state"}. The data come from ckpt["args"]
(dataset, data_dir, norm, crop_size, blur_p; text: data_dir/{train,test}.csv and the run's
erase/replace augmentation). The encoder is frozen and in eval mode (BatchNorm statistics frozen)
unless --bn_train. Three numbers on the test split, top-1 and top-5 (percent):
- linear probe: nn.Linear(d, C) with the protocol's optimiser (presets below, every knob
  overridable); the FINAL-epoch accuracy. The best epoch (selected on the test set, as
  leftthomas/SimCLR and Nozawa & Sato reported: their "highest_val_acc") only with --report_best.
- kNN (Wu et al. 2018): cosine similarity, k = 200 neighbours weighted exp(sim / t), per class.
- mean classifier (Nozawa & Sato 2021): mu_c = mean of the L2-normalised training features of
  class c, NOT re-normalised; predict argmax_c normalize(z) . mu_c. Under `nozawa` it reads the
  head output (also with --no_head, as the paper's "mu acc"); otherwise the probe's features.
Features are computed once per run and kept in memory; with training augmentation the probe
passes the augmented images through the frozen encoder every epoch. Each item's augmentation is
drawn from a generator seeded by (--seed, epoch, item index), so any number of processes (and
DataLoader workers) see the inputs of one process. Results: eval_<protocol>.json next to the
checkpoint (eval_<protocol>_no_head.json with --no_head; --out elsewhere).
"""
import argparse
import copy
import csv
import hashlib
import html
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

import common

SCRIPT = "linear_eval.py"
# Each protocol as its paper's code evaluated (specs: simclr_debiased.md 4, moco_mochi.md,
# bound_and_nlp.md 4). augment: "run" = the run's own training augmentation (one view),
# "crop_flip" = main_lincls.py's. kNN: DCL/HCL main.py k = 200 weighted by exp(sim / 0.5) (their
# training temperature); MoCo's CIFAR demo knn_k = 200, knn_t = 0.1; Nozawa & Sato have no kNN:
# k = 200, t = 0.1 as the MoCo demo and lightly's benchmarks.
PROTOCOLS = {
    "dcl": dict(optimizer="adam", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=1e-6,
                schedule="constant", milestones=[], lr_decay=0.1, epochs=100, batch_size=512,
                augment="run", features="backbone", normalize=False, drop_last=False,
                init="default", knn_k=200, knn_t=0.5, mean_view="plain"),
    "moco": dict(optimizer="sgd", lr=30.0, momentum=0.9, nesterov=False, weight_decay=0.0,
                 schedule="step", milestones=[60, 80], lr_decay=0.1, epochs=100, batch_size=256,
                 augment="crop_flip", features="backbone", normalize=False, drop_last=False,
                 init="normal", knn_k=200, knn_t=0.1, mean_view="plain"),
    # Nozawa & Sato: 4 processes x 512 per step for CIFAR (global 2048 at lr 0.3); one GPU x 512,
    # 20 epochs for text.
    "nozawa": dict(optimizer="sgd", lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.0,
                   schedule="cosine", milestones=[], lr_decay=0.1, epochs=100, batch_size=2048,
                   augment="run", features="head", normalize=True, drop_last=True,
                   init="default", knn_k=200, knn_t=0.1, mean_view="augmented"),
}
TEXT_NOZAWA = dict(epochs=20, batch_size=512)
SETTINGS = tuple(PROTOCOLS["dcl"])


def auto_protocol(ckpt):
    """The protocol of the paper behind the run: Nozawa & Sato's for their head and for text."""
    script, a = ckpt["script"], ckpt["args"]
    if script == "nlp_similar_words.py" or a.get("head") == "nozawa":
        return "nozawa"
    return "dcl" if script == "simclr_debiased.py" else "moco"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit 2, from rank 0 alone)."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kwargs})

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # None defaults come from the protocol's preset
        return action.help if action.default is None else super()._get_help_string(action)


def preset(name, text):
    values = ", ".join(f"{p} {json.dumps(PROTOCOLS[p][name])}" for p in PROTOCOLS)
    return f"{text} (preset: {values})"


def get_parser():
    p = Parser(prog=SCRIPT, description="Linear probe, kNN and mean classifier of a checkpoint.",
               formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a last.pt written by one of the project's training scripts")
    p.add_argument("--protocol", default="auto", choices=["auto", *PROTOCOLS],
                   help="dcl = DCL/HCL linear.py, moco = MoCo main_lincls.py, nozawa = Nozawa & "
                        "Sato; auto = nozawa for their head (--head nozawa) and text, dcl for "
                        "simclr_debiased.py, else moco")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help="root of the data (default: the run's)")
    g.add_argument("--subset", type=int, default=0, help="N training items evenly spaced (0: all)")
    g.add_argument("--test_subset", type=int, default=0, help="N test items evenly spaced (0: all)")
    g.add_argument("--augment", default=None, choices=["none", "run", "crop_flip"],
                   help=preset("augment", "probe training inputs: plain, the run's augmentation, "
                                          "crop + flip"))
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g = p.add_argument_group("features")
    g.add_argument("--features", default=None, choices=["backbone", "head"],
                   help=preset("features", "probe input"))
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help=preset("normalize", "L2-normalise the probe's input"))
    g.add_argument("--no_head", action="store_true", help="raw encoder features for probe and kNN "
                   "(= --features backbone --no-normalize; Nozawa & Sato's 'w/o')")
    g.add_argument("--bn_train", action="store_true", help="encoder BatchNorm in train mode while "
                   "the probe trains (statistics follow the labelled data, used at test time), as "
                   "DCL/HCL's linear.py")
    g.add_argument("--feature_batch_size", type=int, default=512,
                   help="items per process and step for features")
    g = p.add_argument_group("linear probe")
    g.add_argument("--epochs", type=int, default=None,
                   help=preset("epochs", "epochs (nozawa on text: 20)"))
    g.add_argument("--batch_size", type=int, default=None,
                   help=preset("batch_size", "GLOBAL batch over all processes (nozawa on text: "
                                             "512)"))
    g.add_argument("--optimizer", default=None, choices=["sgd", "adam"],
                   help=preset("optimizer", "optimiser"))
    g.add_argument("--lr", type=float, default=None, help=preset("lr", "learning rate"))
    g.add_argument("--momentum", type=float, default=None, help=preset("momentum", "SGD momentum"))
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=preset("nesterov", "Nesterov momentum"))
    g.add_argument("--weight_decay", type=float, default=None,
                   help=preset("weight_decay", "weight decay"))
    g.add_argument("--schedule", default=None, choices=["constant", "step", "cosine"],
                   help=preset("schedule", "lr per epoch: step = x lr_decay at milestones, cosine "
                                           "to 0"))
    g.add_argument("--milestones", type=int, nargs="*", default=None,
                   help=preset("milestones", "epochs, counted from 0 as main_lincls.py, from which "
                                             "the lr is multiplied by --lr_decay once more"))
    g.add_argument("--lr_decay", type=float, default=None,
                   help=preset("lr_decay", "factor at each milestone"))
    g.add_argument("--drop_last", action=argparse.BooleanOptionalAction, default=None,
                   help=preset("drop_last", "drop the last incomplete batch"))
    g.add_argument("--init", default=None, choices=["default", "normal"],
                   help=preset("init", "normal = N(0, 0.01) weights, zero bias (main_lincls.py)"))
    g.add_argument("--eval_every", type=int, default=1,
                   help="test the probe every N epochs (and after the last)")
    g.add_argument("--report_best", action="store_true", help="also report the best epoch, "
                   "SELECTED ON THE TEST SET (optimistic; the 'highest_val_acc' of "
                   "leftthomas/SimCLR and Nozawa & Sato)")
    g = p.add_argument_group("kNN and mean classifier")
    g.add_argument("--knn_k", type=int, default=None, help=preset("knn_k", "kNN neighbours"))
    g.add_argument("--knn_t", type=float, default=None, help=preset("knn_t", "kNN temperature"))
    g.add_argument("--mean_view", default=None, choices=["plain", "augmented"],
                   help=preset("mean_view", "training inputs of the class means: plain or one "
                                            "augmented view"))
    g = p.add_argument_group("system")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast of the encoder (fp16 on a CPU: very slow)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed of the probe, its batches and every augmentation draw")
    g.add_argument("--out", default=None, help="results file (default: eval_<protocol>.json, "
                   "eval_<protocol>_no_head.json with --no_head, next to the checkpoint)")
    return p


def finite(value, low, high=math.inf, low_open=False, high_open=False):
    """value is None (the preset's) or a finite number in the interval."""
    return value is None or (math.isfinite(value) and (value > low if low_open else value >= low)
                             and (value < high if high_open else value <= high))


def check_args(parser, a):
    """Flag values that make no sense whatever the checkpoint: one line, exit status 2."""
    counts = (a.epochs, a.batch_size, a.feature_batch_size, a.eval_every, a.knn_k)
    for ok, message in [
            (min(a.subset, a.test_subset, a.workers) >= 0,
             "--subset, --test_subset and --workers must be >= 0"),
            (all(v is None or v >= 1 for v in counts),
             "--epochs, --batch_size, --feature_batch_size, --eval_every, --knn_k must be >= 1"),
            (finite(a.lr, 0, low_open=True), f"--lr must be finite and > 0, got {a.lr}"),
            (finite(a.knn_t, 0, low_open=True), f"--knn_t must be finite and > 0, got {a.knn_t}"),
            (finite(a.momentum, 0, 1, high_open=True),
             f"--momentum must be in [0, 1), got {a.momentum}"),
            (finite(a.weight_decay, 0), f"--weight_decay must be finite and >= 0, got "
                                        f"{a.weight_decay}"),
            (finite(a.lr_decay, 0, 1, low_open=True),
             f"--lr_decay must be in (0, 1], got {a.lr_decay}"),
            (not a.milestones or min(a.milestones) >= 1,
             f"--milestones must be epochs >= 1 (counted from 0), got {a.milestones}"),
            (not a.milestones or all(x < y for x, y in zip(a.milestones, a.milestones[1:])),
             f"--milestones must increase, got {a.milestones}"),
            (not (a.no_head and a.features == "head"), "--no_head contradicts --features head")]:
        if not ok:
            parser.error(message)


def check_settings(parser, a, s, text):
    """The resolved settings (preset + flags) against each other and the checkpoint's kind."""
    if s["nesterov"] and (s["optimizer"] != "sgd" or s["momentum"] <= 0):
        parser.error("--nesterov needs --optimizer sgd and --momentum > 0")
    if text and s["augment"] == "crop_flip":
        parser.error("--augment crop_flip needs an image checkpoint")
    if a.milestones is not None and s["schedule"] != "step":
        parser.error(f"--milestones needs --schedule step (the {s['protocol']} preset's schedule "
                     f"is {s['schedule']})")
    if a.milestones and a.milestones[-1] >= s["epochs"]:
        parser.error(f"--milestones {a.milestones[-1]} is never reached in {s['epochs']} epochs "
                     f"(counted from 0)")


def resolve_settings(args, protocol, text=False):
    """The protocol's preset, overridden by every flag given (flags left at None keep it)."""
    p = dict(PROTOCOLS[protocol], **(TEXT_NOZAWA if text and protocol == "nozawa" else {}))
    if args.no_head:
        p.update(features="backbone", normalize=False)
    s = {name: (p[name] if getattr(args, name, None) is None else getattr(args, name))
         for name in SETTINGS}
    # The mean classifier of Nozawa & Sato reads the head output, whatever the probe reads.
    s.update(protocol=protocol, bn_train=args.bn_train,
             mean_features="head" if protocol == "nozawa" else s["features"])
    return s


def output_path(args, protocol):
    """--out, else eval_<protocol>[_no_head].json beside the checkpoint: the README's two
    evaluations of one run (its protocol; nozawa --no_head) keep both results."""
    if args.out:
        return args.out
    name = f"eval_{protocol}{'_no_head' if args.no_head else ''}.json"
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name)


# ------------------------------------------------------------------------------------------------
# The evaluation functions (api.md 4): tensors in, a fraction in [0, 1] out
# ------------------------------------------------------------------------------------------------

def _inputs(train_features, train_labels, test_features, test_labels, topk):
    x, q = torch.as_tensor(train_features), torch.as_tensor(test_features)
    y, qy = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    x = x if x.is_floating_point() else x.float()
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(x.shape)} and "
                         f"{tuple(q.shape)}")
    if y.shape != x.shape[:1] or qy.shape != q.shape[:1] or x.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError("there must be one label per feature row, and at least one row")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk}")
    return x, y, q.to(x.dtype), qy, int(max(y.max(), qy.max())) + 1


def topk_hits(scores, labels, ks=(1, 5)):
    """Number of rows whose label is among the k highest scores, for each k (capped at C)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    return [int((ranked[:, :k] == labels[:, None]).any(dim=1).sum()) for k in ks]


def class_means(features, labels, num_classes):
    """[C, D] means of the L2-normalised features per class, NOT re-normalised (Nozawa & Sato's
    mean classifier); a class without examples gets a zero mean."""
    z = F.normalize(torch.as_tensor(features), dim=1)
    labels = torch.as_tensor(labels).long().to(z.device)
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(z.dtype)
    return sums / counts[:, None]


def mean_scores(train_features, train_labels, test_features, num_classes):
    """normalize(z) . mu_c for every test row and class: [N_test, C]."""
    mu = class_means(train_features, train_labels, num_classes)
    return F.normalize(test_features, dim=1) @ mu.T


def mean_classifier_accuracy(train_features, train_labels, test_features, test_labels, topk=1):
    """Fraction of test points whose label is among the `topk` classes with the largest
    normalize(z) . mu_c (mu_c from `class_means` of the training features)."""
    x, y, q, qy, c = _inputs(train_features, train_labels, test_features, test_labels, topk)
    return topk_hits(mean_scores(x, y, q, c), qy, (topk,))[0] / qy.shape[0]


def knn_scores(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1):
    """Weighted kNN class scores [N_test, C]: the k most cosine-similar training rows vote
    exp(sim / t)."""
    sims = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T
    sim, idx = sims.topk(min(k, train_features.shape[0]), dim=1)
    votes = sim.new_zeros(sim.shape[0], num_classes)
    return votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, temperature=0.1,
                 topk=1):
    """Fraction of test points whose label is among the `topk` classes of the weighted kNN vote."""
    if not isinstance(k, int) or k < 1 or not temperature > 0:
        raise ValueError(f"k must be a positive integer and temperature > 0, got {k} and "
                         f"{temperature}")
    x, y, q, qy, c = _inputs(train_features, train_labels, test_features, test_labels, topk)
    return topk_hits(knn_scores(x, y, q, c, k, temperature), qy, (topk,))[0] / qy.shape[0]


def percent(scores, labels):
    return [100.0 * h / labels.shape[0] for h in topk_hits(scores, labels)]


# ------------------------------------------------------------------------------------------------
# Text (nlp_similar_words.py checkpoints): copies of its functions (the same code, line breaks
# apart), kept so by tests/test_eval_copies.py
# ------------------------------------------------------------------------------------------------

def tokenize(text):
    """torchtext's legacy `basic_english`: lower-case; pad ' . , ( ) ! ? with spaces; drop ";
    turn ; : and <br /> into spaces; split on whitespace. Applied in torchtext's order."""
    rules = ((r"'", " '  "), (r'"', ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "),
             (r"\(", " ( "), (r"\)", " ) "), (r"!", " ! "), (r"\?", " ? "), (r";", " "),
             (r":", " "), (r"\s+", " "))
    text = text.lower()
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text.split()


def clean_ag_news(text):
    """Undo AG News's escaping leftovers (optional; the original pipeline kept them): HTML entities
    with or without their '&' (`#39;` -> ', `#36;` -> $, `&lt;` -> <), `\\$` -> $, and the other
    backslashes (lost line breaks) -> spaces."""
    text = re.sub(r"&?#(\d+);", lambda m: html.unescape(f"&#{m.group(1)};"), text)
    text = re.sub(r"&(lt|gt|amp|quot);", lambda m: html.unescape(m.group(0)), text)
    return text.replace("\\$", "$").replace("\\", " ")


def read_ag_news(path):
    """(texts, labels) of an AG News CSV: no header, a class 1..C, then text columns (title,
    description) joined by a space; labels 0..C-1. FileNotFoundError / ValueError name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected an AG News CSV: class, title, "
                                f"description)")
    texts, labels, columns = [], [], None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                columns = columns or len(row)
                if len(row) < 2 or len(row) != columns:
                    raise ValueError(f"{path} line {line}: {len(row)} column(s); expected the "
                                     f"same number on every row, at least 2 (class, title, "
                                     f"description for AG News)")
                if not row[0].strip().isdigit() or int(row[0]) < 1:
                    raise ValueError(f"{path} line {line}: the class {row[0][:20]!r} is not an "
                                     f"integer >= 1")
                texts.append(" ".join(row[1:]))
                labels.append(int(row[0]) - 1)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a UTF-8 CSV file ({err})") from None
    if not texts:
        raise ValueError(f"{path} holds no documents")
    return texts, labels


def encode(texts, vocab):
    """Token ids of every text, concatenated: (ids LongTensor [total], offsets LongTensor [n + 1]).
    Words outside `vocab` map to its last entry (<unk>)."""
    stoi = {w: i for i, w in enumerate(vocab)}
    unk, ids, offsets = len(vocab) - 1, [], [0]
    for text in texts:
        ids.extend(stoi.get(t, unk) for t in tokenize(text))
        offsets.append(len(ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def erase(tokens, ratio):
    """Drop each token (1-D LongTensor) independently with probability `ratio`; order is kept.
    Random numbers from torch's RNG; the indexing runs in numpy (several times faster per
    document)."""
    keep = torch.rand(tokens.shape[0], dtype=torch.float64).numpy() >= ratio
    return torch.from_numpy(tokens.numpy()[keep])


def replace(tokens, table, ratio):
    """Replace each token independently with probability `ratio` by table[token, r], r uniform in
    0..k-1 (torch's RNG); the kept tokens come first, in order, then the replacements, in order.
    The length is kept; identity rows make some replacements no-ops."""
    ids = tokens.numpy()
    keep = torch.rand(ids.shape[0], dtype=torch.float64).numpy() >= ratio
    masked = ids[~keep]
    pick = torch.randint(table.shape[1], (masked.shape[0],)).numpy()
    return torch.from_numpy(np.concatenate([ids[keep], table.numpy()[masked, pick]]))


# ------------------------------------------------------------------------------------------------
# Checkpoint -> encoder and data sets (bound.py holds VERBATIM copies: tests/test_eval_copies.py)
# ------------------------------------------------------------------------------------------------

class Documents(Dataset):
    """(token ids, label) per document; `transform` (erase/replace) applied on every access."""

    def __init__(self, texts, labels, vocab, transform=None):
        ids, offsets = encode(texts, vocab)
        self.docs = [ids[offsets[i]:offsets[i + 1]].clone() for i in range(len(texts))]
        self.targets, self.transform, self.pad = list(labels), transform, len(vocab)

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return (self.transform(self.docs[i]) if self.transform else self.docs[i]), self.targets[i]

    def collate(self, batch):  # right-pad with len(vocab); an all-padding row is an empty document
        width = max([1] + [len(t) for t, _ in batch])
        out = torch.full((len(batch), width), self.pad, dtype=torch.long)
        for i, (t, _) in enumerate(batch):
            out[i, :len(t)] = t
        return out, torch.tensor([y for _, y in batch])


class TextAugment:
    def __init__(self, kind, ratio, table):
        self.kind, self.ratio, self.table = kind, ratio, table

    def __call__(self, tokens):
        if self.kind == "erase":
            return erase(tokens, self.ratio)
        return replace(tokens, self.table, self.ratio)


class BagOfWords(nn.Module):
    """nlp_similar_words.py's encoder: the mean of the word embeddings ([B, L] padded with
    len(vocab))."""

    def __init__(self, num_words, dim):
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_words + 1, dim, mode="mean", padding_idx=num_words)

    def forward(self, x):
        return self.embedding(x)


def load_run(path, parser):
    """The checkpoint, read with weights_only=True (tensors and plain Python values only). A file
    that is missing, damaged, foreign or incomplete ends with one line saying what is wrong."""
    if not os.path.isfile(path):
        parser.error(f"{path} is not a file" if os.path.exists(path) else f"{path} does not exist")
    if not os.access(path, os.R_OK):
        parser.error(f"{path} cannot be read (permission denied)")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, EOF, OS, key... errors, whatever the damage
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found and zipfile.is_zipfile(path):
            parser.error(f"{path} holds Python objects other than tensors, numbers, strings, "
                         f"lists and dicts ({found.group(1)}), which no checkpoint of this "
                         f"project holds; not loaded, since unpickling them could run code")
        parser.error(f"{path} is not a checkpoint (not written by torch.save, or damaged)")
    if not isinstance(ckpt, dict):
        parser.error(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this project (a "
                     f"dict with script, args, backbone, head)")
    missing = [repr(k) for k in ("script", "args", "backbone", "head") if k not in ckpt]
    if missing:
        parser.error(f"{path} lacks {', '.join(missing)}: not a checkpoint of this project's "
                     f"training scripts")
    if not isinstance(ckpt["args"], dict) or not isinstance(ckpt["script"], str):
        parser.error(f"{path}: its 'args' is not a dict or its 'script' not a string")
    if ckpt["script"] == "nlp_similar_words.py":
        missing = [repr(k) for k in ("vocab", "classes") if k not in ckpt]
    else:
        missing = [f"args['{k}']" for k in ("dataset", "data_dir", "arch") if k not in ckpt["args"]]
    if missing:
        parser.error(f"{path} lacks {', '.join(missing)}: cannot rebuild its encoder and data")
    return ckpt


def load_state(module, state, what):
    """module.load_state_dict(state), or ValueError "does not fit WHAT: DETAIL" on one line (the
    caller puts the checkpoint's path in front)."""
    if not isinstance(state, dict):
        raise ValueError(f"does not fit {what}: its weights are a {type(state).__name__}, not a "
                         f"state dict")
    try:
        module.load_state_dict(state)
    except Exception as err:  # RuntimeError for size mismatches, missing or unexpected keys
        details = [line.strip().rstrip(".") for line in str(err).splitlines()[1:] if line.strip()]
        detail = details[0] if details else str(err).strip().split("\n")[0]
        detail = detail if len(detail) <= 240 else detail[:240] + "..."
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise ValueError(f"does not fit {what}: {detail}{more}") from None


def build_head(head):
    """nn.Sequential from ckpt["head"] = {"layout": [[name, kind, sizes...]], "state": ...}."""
    make = {"linear": lambda i, o, b: nn.Linear(i, o, bias=b),
            "bn": lambda n, a: nn.BatchNorm1d(n, affine=a), "relu": nn.ReLU}
    try:
        layers = OrderedDict((name, make[kind](*sizes)) for name, kind, *sizes in head["layout"])
    except Exception as err:  # not a dict, an unknown layer kind, sizes that make no layer...
        raise ValueError(f"has a projection head layout that builds no head ({err!r})") from None
    module = nn.Sequential(layers)
    load_state(module, head.get("state"), "the projection head its layout describes")
    return module


class Encoder(nn.Module):
    """Backbone, optionally the projection head, optionally L2-normalised (float32 out)."""

    def __init__(self, backbone, head=None, normalize=False):
        super().__init__()
        self.backbone, self.head, self.normalize = backbone, head, normalize

    def forward(self, x):
        h = self.backbone(x)
        h = (self.head(h) if self.head is not None else h).float()
        return F.normalize(h, dim=1) if self.normalize else h


def build_encoder(ckpt, features, normalize):
    """The frozen encoder of a checkpoint, rebuilt without its training script. ValueError says
    what in the checkpoint does not fit (without the path: the caller puts it in front)."""
    a = ckpt["args"]
    if ckpt["script"] == "nlp_similar_words.py":
        weight = ckpt["backbone"].get("embedding.weight") if isinstance(ckpt["backbone"], dict) \
            else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("lacks backbone['embedding.weight'] (the word embeddings)")
        backbone = BagOfWords(len(ckpt["vocab"]), weight.shape[1])
    else:
        try:
            backbone = common.build_backbone(a["arch"], a.get("stem", "cifar"), a.get("width", 64),
                                             a.get("stem_padding", 1))
        except Exception as err:  # an unknown arch, a width that is not a number...
            raise ValueError(f"has arguments from which common.build_backbone builds no backbone "
                             f"({err!r})") from None
    load_state(backbone, ckpt["backbone"], "the backbone its arguments describe")
    head = build_head(ckpt["head"]) if features == "head" else None
    return Encoder(backbone, head, normalize).eval().requires_grad_(False)


def image_error(err):
    """The one line `cannot read image PATH: ...` of a common.ImageList OSError, also when a
    DataLoader worker raised it (torch re-raises it with the worker's traceback in the message);
    None for any other error."""
    found = re.findall(r"cannot read image [^\n]*", str(err))
    return found[-1].strip() if found else None


class LabInput:
    """ring_nce.py's CMC input: an RGB transform (tensor in [0, 1]), then common.lab_input with the
    run's `lab_mean` and `lab_std` (its checkpoint's args)."""

    def __init__(self, transform, mean, std):
        self.transform, self.stats = transform, (mean, std)

    def __call__(self, img):
        return common.lab_input(self.transform(img), self.stats)


def build_data(ckpt, data_dir, views=()):
    """{"train", "test", *views} data sets of (input, label), and the collate function (text) or
    None: plain train/test, "run"/"test_run" = train/test under the run's own augmentation (one
    fresh draw per access), "crop_flip" = train under random resized crop + flip (images)."""
    a = ckpt["args"]
    root = data_dir or a["data_dir"]
    if ckpt["script"] == "nlp_similar_words.py":
        files = [os.path.join(root, f"{split}.csv") for split in ("train", "test")]
        if not all(os.path.isfile(f) for f in files):
            raise FileNotFoundError(f"{root} needs train.csv and test.csv (AG News format)")
        vocab, texts = list(ckpt["vocab"]), [read_ag_news(f) for f in files]
        if a.get("clean_text"):
            texts = [([clean_ag_news(t) for t in x], y) for x, y in texts]
        data = {"train": Documents(*texts[0], vocab), "test": Documents(*texts[1], vocab)}
        for name in set(views) & {"run", "test_run"}:
            data[name] = copy.copy(data["test" if name == "test_run" else "train"])
            data[name].transform = TextAugment(a["augmentation"], a["mask_ratio"],
                                               ckpt.get("replace_ids"))
        return data, data["train"].collate
    lab = a.get("input_space") == "lab"  # ring_nce.py's CMC: Lab input, trained on crop + flip
    norm = None if lab else common.normalization(a.get("norm", "cifar10"), a["dataset"])
    crop = a.get("crop_size", 32)
    plain = common.eval_transform(norm, size=crop if a["dataset"] == "folder" else None)
    if lab:
        run = common.train_transform(crop, (0.2, 1.0), jitter_p=0, grayscale_p=0, blur_p=0,
                                     normalize=None)
    else:
        run = common.train_transform(crop, blur_p=a.get("blur_p", 0.5), normalize=norm)
    size = crop if a["dataset"] == "folder" else (96 if a["dataset"] == "stl10" else 32)
    flip = transforms.Compose([transforms.RandomResizedCrop(size),
                               transforms.RandomHorizontalFlip(), plain])
    if lab:
        plain, run, flip = (LabInput(t, a["lab_mean"], a["lab_std"]) for t in (plain, run, flip))
    make = {"train": ("train", plain), "test": ("test", plain), "run": ("train", run),
            "test_run": ("test", run), "crop_flip": ("train", flip)}
    data = {name: common.build_dataset(a["dataset"], root, split, t)
            for name, (split, t) in make.items() if name in ("train", "test") or name in views}
    if data["test"] is None or common.num_classes(data["train"]) == 0:
        raise FileNotFoundError(f"no labelled train and test splits in {root} (expected "
                                f"{root}/test/<class>/*)")
    if list(data["train"].classes) != list(data["test"].classes):
        raise ValueError(f"the test classes {data['test'].classes} differ from the training "
                         f"classes")
    return data, None


class PerItemDraws(Dataset):
    """A data set whose item i draws its augmentation from torch's RNG seeded by (seed, stream, i),
    the caller's RNG state restored afterwards: an item's draw depends on the item and the stream
    (the probe's epoch; "mean" for the mean classifier's view) alone, not on the process or the
    DataLoader worker that reads it, so torchrun's N processes see one process's inputs."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.stream = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        key = hashlib.blake2b(f"{self.seed}/{self.stream}/{i}".encode(), digest_size=8).digest()
        cpu = torch.random.default_generator  # torch.manual_seed would also seed every device
        state = cpu.get_state()
        cpu.manual_seed(int.from_bytes(key, "little"))
        try:
            return self.dataset[i]
        finally:
            cpu.set_state(state)


# ------------------------------------------------------------------------------------------------
# Features and the probe
# ------------------------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device): under torchrun join the process group (NCCL on GPUs, gloo on
    CPU)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


@torch.no_grad()
def features_of(encoder, dataset, batch_size, workers, device, collate=None, dtype=None):
    """(features [N, D] float32, labels [N]) of a data set, in order, on every process: each
    process encodes every world-th item and the pieces are gathered back into place."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    part = Subset(dataset, range(rank, len(dataset), world))
    xs, ys = [], []
    for x, y in DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=collate):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            xs.append(encoder(x.to(device)).float())
        ys.append(torch.as_tensor(y).to(device))
    x, y = torch.cat(xs), torch.cat(ys)
    if world == 1:
        return x, y
    rows = -(-len(dataset) // world)  # pad every share to `rows`, gather, interleave back
    x = torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])
    y = torch.cat([y, y.new_zeros(rows - y.shape[0])])
    out_x = [torch.empty_like(x) for _ in range(world)]
    out_y = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(out_x, x)
    dist.all_gather(out_y, y)
    x = torch.stack(out_x, 1).reshape(world * rows, -1)[:len(dataset)]
    return x, torch.stack(out_y, 1).reshape(-1)[:len(dataset)]


def epoch_lr(s, epoch):
    """The learning rate of epoch `epoch` (from 0), set once per epoch as the three originals
    did."""
    if s["schedule"] == "step":  # main_lincls.py adjust_learning_rate: x0.1 once epoch >= m
        return s["lr"] * s["lr_decay"] ** sum(epoch >= m for m in s["milestones"])
    if s["schedule"] == "cosine":  # CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch
        return s["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / s["epochs"]))
    return s["lr"]


def build_probe(dim, num_classes, s, seed):
    """nn.Linear initialised from `seed` alone (the same start however many processes run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(dim, num_classes)
        if s["init"] == "normal":  # main_lincls.py
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
    return linear


def probe_steps(n, s, world):
    """Optimiser steps per epoch for n training items (0: the settings cannot train)."""
    per_rank, batch = (n // world if s["drop_last"] else -(-n // world)), s["batch_size"] // world
    return per_rank // batch if s["drop_last"] else -(-per_rank // batch)


def make_optimizer(params, s):
    if s["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=s["lr"], weight_decay=s["weight_decay"])
    return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                           weight_decay=s["weight_decay"])


def train_probe(encoder, s, train, test_x, test_y, num_classes, device, seed, workers=0,
                collate=None, eval_every=1, dtype=None, retest=None):
    """Train nn.Linear(D, C) on frozen features; returns (per-epoch history, probe).

    train: a (features, labels) pair, the probe then trains on the tensors; or a data set whose
    items go through `encoder` every epoch (augmented inputs; a PerItemDraws draws them per
    epoch). Under torchrun the processes' batches together are the single-process batch and DDP
    averages the gradients. retest(): new test features (--bn_train changes the encoder's
    BatchNorm statistics)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_rank, drop = s["batch_size"] // world, s["drop_last"]
    on_tensors = isinstance(train, (tuple, list))
    n = train[0].shape[0] if on_tensors else len(train)
    sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=drop)
    loader = None if on_tensors else DataLoader(train, batch_size=per_rank, sampler=sampler,
                                                num_workers=workers, collate_fn=collate,
                                                drop_last=drop)
    linear = build_probe(test_x.shape[1], num_classes, s, seed).to(device)
    net = linear if world == 1 else nn.parallel.DistributedDataParallel(
        linear, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer, history = make_optimizer(linear.parameters(), s), []
    for epoch in range(s["epochs"]):
        start, lr = time.time(), epoch_lr(s, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        if isinstance(train, PerItemDraws):
            train.stream = epoch  # before the loader starts its workers: they copy the data set
        encoder.train(s["bn_train"])  # DCL/HCL's net.train(): BN uses and updates batch statistics
        if on_tensors:
            order = torch.tensor(list(sampler), device=device)
            stop = len(order) - len(order) % per_rank if drop else len(order)
            batches = ((train[0][i], train[1][i]) for i in order[:stop].split(per_rank))
        else:
            batches = loader
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for x, y in batches:
            if not on_tensors:
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                                     enabled=dtype is not None):
                    x = encoder(x.to(device)).float()
            loss = F.cross_entropy(net(x), torch.as_tensor(y).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach().double(), sums.new_ones(())])
        encoder.eval()
        if world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "lr": lr, "loss": sums[0].item() / max(sums[1].item(), 1.0)}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == s["epochs"]:
            if retest is not None:
                test_x, test_y = retest()
            with torch.no_grad():
                row["top1"], row["top5"] = percent(linear(test_x), test_y)
        history.append(dict(row, seconds=time.time() - start))
    return history, linear


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def prepare(args, parser):
    """Checkpoint, settings, output path, processes, data and encoders: every refusal (one line,
    exit status 2) comes here, before any compute."""
    ckpt = load_run(args.checkpoint, parser)
    text = ckpt["script"] == "nlp_similar_words.py"
    protocol = auto_protocol(ckpt) if args.protocol == "auto" else args.protocol
    s = resolve_settings(args, protocol, text)
    check_settings(parser, args, s, text)
    try:
        encoders = [build_encoder(ckpt, s["features"], s["normalize"]),
                    build_encoder(ckpt, s["mean_features"], True)]
    except ValueError as err:
        parser.error(f"{args.checkpoint} {err}")
    out = output_path(args, protocol)
    if not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK) or os.path.isdir(out):
        parser.error(f"cannot write --out {out}")
    rank, world, device = setup_distributed()
    if s["batch_size"] % world:
        parser.error(f"--batch_size {s['batch_size']} (global) is not divisible by {world} "
                     f"processes")
    if args.precision == "fp16" and device.type == "cpu" and rank == 0:
        print(f"{SCRIPT}: warning: --precision fp16 on a CPU: float16 autocast is very slow there "
              f"(fp32 or bf16 are not); running anyway", file=sys.stderr)
    views = {s["augment"], "run" if s["mean_view"] == "augmented" else ""}
    try:
        data, collate = build_data(ckpt, args.data_dir, views)
    except (OSError, ValueError) as err:
        parser.error(" ".join(str(err).split()))
    data = {k: common.subset(v, args.test_subset if k.startswith("test") else args.subset)
            for k, v in data.items()}
    data.update({k: PerItemDraws(v, args.seed) for k, v in data.items()
                 if k in ("run", "test_run", "crop_flip")})
    if probe_steps(len(data["train"]), s, world) == 0:
        parser.error(f"{len(data['train'])} training items make no full batch of "
                     f"{s['batch_size']} with drop_last; lower --batch_size or use --no-drop_last")
    encoders = [encoder.to(device) for encoder in encoders]
    return ckpt, s, out, (rank, world, device), data, collate, encoders


def run(args, s, system, data, collate, encoders):
    """kNN, mean classifier and linear probe: (knn, mean, history, data sizes, seconds)."""
    rank, world, device = system
    encoder, mean_encoder = encoders
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    torch.manual_seed(args.seed)

    def feats(enc, name):
        return features_of(enc, data[name], args.feature_batch_size, args.workers, device, collate,
                           dtype)

    t = time.time()
    train_x, train_y = feats(encoder, "train")
    test_x, test_y = feats(encoder, "test")
    classes = max(int(train_y.max()), int(test_y.max())) + 1
    knn = percent(knn_scores(train_x, train_y, test_x, classes, s["knn_k"], s["knn_t"]), test_y)
    same = s["mean_features"] == s["features"]
    mean_test = (test_x, test_y) if same else feats(mean_encoder, "test")
    if s["mean_view"] == "augmented":
        data["run"].stream = "mean"  # its own draws, apart from the probe's epochs
        mean_train = feats(mean_encoder, "run")
    else:
        mean_train = (train_x, train_y) if same else feats(mean_encoder, "train")
    mean = percent(mean_scores(*mean_train, mean_test[0], classes), mean_test[1])
    seconds = {"feature_seconds": time.time() - t}

    t = time.time()
    on_tensors = s["augment"] == "none" and not s["bn_train"]
    train = (train_x, train_y) if on_tensors else data["train" if s["augment"] == "none"
                                                       else s["augment"]]
    retest = (lambda: feats(encoder, "test")) if s["bn_train"] else None
    history, _ = train_probe(encoder, s, train, test_x, test_y, classes, device, args.seed,
                             args.workers, collate, args.eval_every, dtype, retest)
    seconds["probe_seconds"] = time.time() - t
    sizes = {"num_train": len(data["train"]), "num_test": len(data["test"]),
             "num_classes": classes, "feature_dim": int(test_x.shape[1])}
    return knn, mean, history, sizes, seconds


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    started = time.time()
    ckpt, s, out, system, data, collate, encoders = prepare(args, parser)
    rank, world, device = system
    try:
        knn, mean, history, sizes, seconds = run(args, s, system, data, collate, encoders)
    except OSError as err:  # a corrupt or truncated image: one line naming the file
        message = image_error(err)
        if message is None:
            raise
        parser.error(message)
    final = history[-1]
    results = {
        "checkpoint": os.path.abspath(args.checkpoint), "script": ckpt["script"],
        "checkpoint_epoch": ckpt.get("epoch"), "protocol": s["protocol"],
        "units": "percent of the test split",
        "linear": {"top1": final["top1"], "top5": final["top5"], "epoch": final["epoch"],
                   "history": history},
        "knn": {"top1": knn[0], "top5": knn[1], "k": s["knn_k"], "temperature": s["knn_t"]},
        "mean_classifier": {"top1": mean[0], "top5": mean[1], "train_view": s["mean_view"],
                            "features": s["mean_features"]},
        "settings": s, "args": vars(args), "data": sizes,
        "timing": dict(seconds, total_seconds=time.time() - started),
        "system": {"world_size": world, "device": str(device), "precision": args.precision,
                   "torch": torch.__version__}}
    if args.report_best:
        best = max((r for r in history if "top1" in r), key=lambda r: r["top1"])
        results["linear_best_epoch_test_selected"] = {k: best[k] for k in ("top1", "top5", "epoch")}
    if rank == 0:
        print(f"{SCRIPT}: {args.checkpoint} ({ckpt['script']}, epoch {ckpt.get('epoch')}), "
              f"protocol {s['protocol']}, {sizes['num_train']} train / {sizes['num_test']} test, "
              f"{world} process(es) on {device}")
        print(f"linear probe (final epoch {final['epoch']}): top-1 {final['top1']:.2f} "
              f"top-5 {final['top5']:.2f}")
        print(f"kNN (k={s['knn_k']}, t={s['knn_t']}): top-1 {knn[0]:.2f} top-5 {knn[1]:.2f}")
        print(f"mean classifier ({s['mean_features']}, {s['mean_view']} train view): top-1 "
              f"{mean[0]:.2f} top-5 {mean[1]:.2f}")
        if args.report_best:
            b = results["linear_best_epoch_test_selected"]
            print(f"linear probe, best epoch {b['epoch']} SELECTED ON THE TEST SET: top-1 "
                  f"{b['top1']:.2f}")
        with open(out + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(out + ".tmp", out)
        print(f"wrote {out}")
    if world > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()

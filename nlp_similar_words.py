"""AG News with erase / similar-word replace views: Nozawa & Sato's text experiment, in one file.

    python nlp_similar_words.py --data_dir data/ag_news_csv --vectors crawl-300d-2M.vec   # replace
    python nlp_similar_words.py --data_dir data/ag_news_csv --augmentation erase --batch_size 16
    torchrun --standalone --nproc_per_node 2 nlp_similar_words.py --augmentation erase
    python nlp_similar_words.py --augmentation erase --batch_size 256 --epochs 10 --workers 0  # CPU

K. Nozawa and I. Sato, "Understanding Negative Samples in Instance Discriminative Self-supervised
Representation Learning" (NeurIPS 2021; code nzw0301/Understanding-Negative-Samples). Data:
DATA_DIR/train.csv and test.csv of AG News (no header: class 1..C, title, description).

A document is the bag of its vocabulary ids (basic_english tokens seen >= 5 times in train.csv,
"<unk>" last); the encoder f is the mean of its word embeddings (dimension 50), the head g
50 -> 50 -> BN -> ReLU -> 50 (no bias). A view changes each token with probability mask_ratio =
0.2: erase drops it; replace appends, after the kept tokens, one of its 5 most cosine-similar
vocabulary words under pre-trained word vectors (uniformly; --vectors, or a saved --replace_ids).
B documents give 2B views z = g(f(x)) / |g(f(x))|; each is an anchor i, the other view of its
document its positive i+, the 2B - 2 other views its negatives. With s_ij = z_i.z_j / t, t = 0.5:

    NT-Xent   loss = mean_i -log(exp(s_i+) / sum_{j != i} exp(s_ij))    (Chen et al. 2020, eq. 1)

SGD (momentum 0.9) under Apex's LARC (trust 1e-3, no clipping): per tensor w, g <- (g + wd w)
1e-3 |w| / (|g| + wd |w| + 1e-8); lr 1.0 sqrt(B) (or B / 256), linear warm-up from 0 over 2 epochs,
then cosine to 0, per step. Under torchrun the views are gathered with gradient (B: the global
batch, as on the original's one GPU). metrics.csv: mean_top1, the mean classifier (paper Sec. 5.2:
mu_c = the mean z of ONE AUGMENTED VIEW of the training documents of class c, not re-normalised;
clean test documents go to argmax_c z.mu_c); fn_rate (fn_rate_hard), the share of an anchor's
negatives (of its 1% most similar ones) of its class.
"""
import argparse
import csv
import datetime
import html
import json
import math
import os
import re
import sys
import time
from collections import Counter, OrderedDict
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

NEIGHBOURS = 5  # columns of the similar-word table (nlp_construct_similar_data.py's top_k)


def get_parser():
    p = Parser(prog="nlp_similar_words.py", description="Nozawa & Sato's AG News NT-Xent runs.")
    g = p.add_argument_group("data and views")
    g.add_argument("--data_dir", default="data/ag_news_csv", help="train.csv and test.csv")
    g.add_argument("--min_freq", type=int, default=5, help="least count of a vocabulary word")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced documents")
    g.add_argument("--clean_text", action="store_true", help="undo #39; &lt; \\ leftovers")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g.add_argument("--augmentation", default="replace", choices=["replace", "erase"])
    g.add_argument("--mask_ratio", type=float, default=0.2, help="P(a token changes), in [0, 1)")
    g.add_argument("--vectors", default="", help="word vectors (fastText .vec, GloVe .txt)")
    g.add_argument("--replace_ids", default="", help="or a saved similar-word table .npy [|V|, 5]")
    g = p.add_argument_group("model, loss and training")
    g.add_argument("--embedding_dim", type=int, default=50, help="word-embedding and head size")
    g.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature t")
    g.add_argument("--epochs", type=int, default=100, help="total epochs (0: the untrained net)")
    g.add_argument("--batch_size", type=int, default=512, help="GLOBAL batch of documents (K+1)")
    g.add_argument("--lr", type=float, default=1.0, help="base lr, times sqrt(B) or B / 256")
    g.add_argument("--lr_scaling", default="sqrt", choices=["sqrt", "linear"], help="of the lr")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=0.0, help="weight decay (inside LARC)")
    g.add_argument("--warmup_epochs", type=float, default=2.0, help="linear warm-up, then cosine")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast: auto is bf16 (or fp16) on GPUs, fp32 on CPUs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=7, help="random seed (offset by rank)")
    g.add_argument("--out_dir", default="runs/nlp_similar_words", help="metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue this last.pt up to --epochs")
    g.add_argument("--eval_every", type=int, default=1, help="mean classifier every N epochs")
    return p


def rules(a):
    """The script's flag checks for setup: (condition, message) pairs."""
    return [(0 <= a.mask_ratio < 1, f"--mask_ratio must be in [0, 1), got {a.mask_ratio}"),
            (not (a.vectors and a.replace_ids), "give --vectors or --replace_ids, not both"),
            (a.augmentation == "replace" or not (a.vectors or a.replace_ids),
             "--vectors and --replace_ids are for --augmentation replace"),
            (a.augmentation == "erase" or a.vectors or a.replace_ids, "--augmentation replace "
             "needs --vectors FILE or --replace_ids FILE (or use --augmentation erase)")]


# -------------------------------------------------------------------------------------------------
# Text: tokeniser, vocabulary, AG News files, word vectors, views (linear_eval.py and bound.py
# hold copies of tokenize, clean_ag_news, read_ag_news, encode, erase and replace)
# -------------------------------------------------------------------------------------------------

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


def build_vocab(texts, min_freq=5, unk="<unk>"):
    """Words occurring at least `min_freq` times, by frequency descending, ties alphabetical, then
    `unk` last (torchtext's legacy Vocab with specials_first=False; a literal `unk` token in the
    corpus is not counted). `texts`: strings (tokenised here) or token lists."""
    counts = Counter()
    for text in texts:
        counts.update(tokenize(text) if isinstance(text, str) else text)
    counts.pop(unk, None)
    kept = sorted((w for w, c in counts.items() if c >= max(min_freq, 1)),
                  key=lambda w: (-counts[w], w))
    return kept + [unk]


def encode(texts, vocab):
    """Token ids of every text, concatenated: (ids LongTensor [total], offsets LongTensor [n + 1]).
    Words outside `vocab` map to its last entry (<unk>)."""
    stoi = {w: i for i, w in enumerate(vocab)}
    unk, ids, offsets = len(vocab) - 1, [], [0]
    for text in texts:
        ids.extend(stoi.get(t, unk) for t in tokenize(text))
        offsets.append(len(ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


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
                    raise ValueError(f"{path} line {line}: {len(row)} column(s); expected the same "
                                     f"number on every row, at least 2 (class, title, description "
                                     f"for AG News)")
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


def read_vectors(path, vocab=None):
    """(words in file order, float64 array [n, dim]) of a fastText `.vec` (first line `count dim`,
    never taken for a word) or GloVe (no header) text file. Only lines of `vocab` words are parsed
    (all when None); the first vector of a duplicated word wins. Errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"word-vector file {path} does not exist")
    keep = None if vocab is None else set(vocab)
    words, rows, seen, dim = [], [], set(), None
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if line == 1 and len(raw.split()) == 2 and all(f.isdigit() for f in raw.split()):
                dim = int(raw.split()[1])  # fastText header
                continue
            cut = raw.find(b" ")  # split off the word only: most lines are not kept
            word = (raw[:cut] if cut > 0 else raw.strip()).decode("utf-8", "replace")
            if not word or (keep is not None and word not in keep) or word in seen:
                continue
            try:
                values = np.array(raw[cut + 1:].split() if cut > 0 else [], dtype=np.float64)
            except ValueError:
                raise ValueError(f"{path} line {line}: the values of {word!r} are not numbers") \
                    from None
            dim = dim or len(values)
            if len(values) != dim or dim == 0:
                raise ValueError(f"{path} line {line}: {word!r} has {len(values)} values, but the "
                                 f"file's dimension is {dim} (inconsistent dimensions)")
            words.append(word)
            rows.append(values)
            seen.add(word)
    if dim is None:
        raise ValueError(f"{path} holds no word vectors")
    return words, (np.stack(rows) if rows else np.zeros((0, dim)))


@torch.no_grad()
def similar_words(vocab, words, vectors, k=5, device="cpu", skip=("<unk>",),
                  block_elements=2 ** 24):
    """The similar-word table, int64 [len(vocab), k]: row i holds the ids of the k words most
    cosine-similar to vocab[i] among the vocabulary words with a vector (itself excluded), in
    ascending similarity (last = nearest). Words without a vector and `skip` get their own id k
    times. float64 similarities, `block_elements` at a time (never the full matrix)."""
    stoi = {w: i for i, w in enumerate(vocab)}
    found = {}
    for r, w in enumerate(words):
        if w in stoi and w not in skip and w not in found:
            found[w] = r
    table = np.repeat(np.arange(len(vocab), dtype=np.int64)[:, None], k, axis=1)
    m = len(found)
    if 0 < m <= k:
        raise ValueError(f"only {m} vocabulary words have vectors; {k} neighbours need at least "
                         f"{k + 1}")
    ids = torch.tensor([stoi[w] for w in found])
    x = torch.as_tensor(np.asarray(vectors)[list(found.values())], dtype=torch.float64,
                        device=device)
    x = F.normalize(x, dim=1)                                                       # [m, dim]
    block = max(1, block_elements // max(m, 1))
    for start in range(0, m, block):
        sim = x[start:start + block] @ x.T                                          # [b, m]
        b = torch.arange(sim.shape[0], device=device)
        sim[b, b + start] = -math.inf                                               # not itself
        nearest = sim.topk(k, dim=1).indices.flip(1).cpu()                  # [b, k] ascending
        table[ids[start:start + len(b)].numpy()] = ids[nearest].numpy()
    return table


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


class TextDataset(Dataset):
    """Documents as 1-D LongTensors of ids: items (view_1, ..., view_views, label), each view a new
    draw of `transform` (erase or replace with their settings bound by functools.partial, for
    DataLoader workers to pickle; None: the document). `collate` right-pads every tensor column
    with `pad_id` = len(vocab), which EmbeddingBag leaves out."""

    def __init__(self, ids, offsets, targets, pad_id, transform=None, views=1):
        self.ids, self.offsets, self.targets = ids, offsets.tolist(), list(targets)
        self.pad_id, self.transform, self.views = pad_id, transform, views

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        tokens = self.ids[self.offsets[index]:self.offsets[index + 1]]
        draw = (lambda: self.transform(tokens)) if self.transform is not None else tokens.clone
        return (*[draw() for _ in range(self.views)], self.targets[index])

    def collate(self, batch):
        def pad(column):
            longest = max([1] + [len(t) for t in column])
            out = torch.full((len(column), longest), self.pad_id, dtype=torch.long)
            for i, t in enumerate(column):
                out[i, :len(t)] = t
            return out
        return tuple(pad(c) if torch.is_tensor(c[0]) else torch.tensor(c) for c in zip(*batch))


def load_text(args, parser, device, ckpt):
    """AG News as the run trains on it (--subset: N documents evenly spaced through train.csv),
    with one-line errors: vocab, table (the similar-word table; None for erase), classes, loader
    and sampler (pairs of views of this process's share of each batch), one_view (training
    documents, one augmented view: the mean classifier's train side), test (clean documents)."""
    try:
        (texts, labels), (test_texts, test_labels) = (
            read_ag_news(os.path.join(args.data_dir, f)) for f in ("train.csv", "test.csv"))
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if 0 < args.subset < len(texts):
        keep = [i * len(texts) // args.subset for i in range(args.subset)]
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    texts, test_texts = ([clean_ag_news(t) for t in x] if args.clean_text else x
                         for x in (texts, test_texts))
    vocab = build_vocab(texts, args.min_freq)
    for ok, message in [
            (len(vocab) > 1, f"no word occurs {args.min_freq} times in the training documents"),
            (not ckpt or ckpt.get("vocab") == vocab, "not the vocabulary of the checkpoint"),
            (len(texts) >= args.batch_size, f"{len(texts)} documents < --batch_size")]:
        if not ok:
            parser.error(message)
    table = replace_table(args, parser, vocab, ckpt, device)
    view = partial(erase, ratio=args.mask_ratio) if table is None else \
        partial(replace, table=table, ratio=args.mask_ratio)
    ids, offsets = encode(texts, vocab)
    pairs = TextDataset(ids, offsets, labels, len(vocab), view, views=2)
    sampler = DistributedSampler(pairs, world(), rank(), seed=args.seed, drop_last=True)
    # Workers start anew each epoch, seeded from torch's RNG: a resumed run draws the same views.
    loader = DataLoader(pairs, args.batch_size // world(), sampler=sampler, drop_last=True,
                        num_workers=args.workers, collate_fn=pairs.collate,
                        pin_memory=device.type == "cuda")
    one_view = TextDataset(ids, offsets, labels, len(vocab), view)
    test = TextDataset(*encode(test_texts, vocab), test_labels, len(vocab))
    classes = [str(c) for c in range(max(labels + test_labels) + 1)]
    return SimpleNamespace(vocab=vocab, table=table, classes=classes, loader=loader,
                           sampler=sampler, one_view=one_view, test=test)


def replace_table(args, parser, vocab, ckpt, device):
    """The similar-word table of --augmentation replace (None for erase): the checkpoint's, the
    --replace_ids file's or computed from --vectors; checked, and saved as replace_ids.npy."""
    if args.augmentation == "erase":
        return None
    source = "the checkpoint" if ckpt else args.replace_ids or args.vectors
    try:
        if ckpt:
            table = ckpt.get("replace_ids")
        elif args.replace_ids:
            table = torch.from_numpy(np.load(args.replace_ids, allow_pickle=False))
        else:
            words, vectors = read_vectors(args.vectors, vocab)
            table = torch.from_numpy(similar_words(vocab, words, vectors, NEIGHBOURS, device))
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"cannot use {source}: {err}")
    if not (torch.is_tensor(table) and table.shape == (len(vocab), NEIGHBOURS)
            and table.dtype == torch.int64 and 0 <= table.min() <= table.max() < len(vocab)):
        parser.error(f"{source}: expected an int64 table [{len(vocab)}, {NEIGHBOURS}] of ids of "
                     f"this vocabulary")
    if rank() == 0:
        np.save(os.path.join(args.out_dir, "replace_ids.npy"), table.numpy())
    return table


# -------------------------------------------------------------------------------------------------
# Model and loss
# -------------------------------------------------------------------------------------------------

class ContrastiveFastText(nn.Module):
    """The original's: the backbone is fastText-style, the mean of a document's word embeddings
    (N(0, 1) init) of a LongTensor [B, L] padded with `num_words` (left out of the mean; an empty
    document gives 0); the head dim -> dim -> BN -> ReLU -> dim (no bias)."""

    def __init__(self, num_words, dim=50):
        super().__init__()
        self.backbone = nn.Sequential(OrderedDict(embedding=nn.EmbeddingBag(
            num_words + 1, dim, mode="mean", padding_idx=num_words)))
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim),
                                       nn.ReLU(inplace=True), nn.Linear(dim, dim, bias=False))

    def forward(self, x1, x2):
        # Each view passes on its own, as in the original code: BatchNorm statistics per view.
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


def nt_xent(z1, z2, temperature=0.5, gather_negatives=True):
    """NT-Xent of the docstring: (loss, the mean over this process's 2b anchors; logits [2b, 2B];
    negative [2b, 2B], the pairs the loss contrasts: neither the anchor nor its positive). Rows:
    view-1 anchors, then view 2; columns: every process's view 1, then view 2 (gather_negatives
    under torch.distributed: the processes' mean loss is the global loss, grad / world size its
    gradient). float32 (float64 for float64 inputs), outside autocast."""
    with torch.autocast(z1.device.type, enabled=False):
        dtype = torch.promote_types(z1.dtype, torch.float32)
        z1, z2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)      # [b, D]
        all1, all2 = (gather(z1), gather(z2)) if gather_negatives else (z1, z2)            # [B, D]
        b, B = len(z1), len(all1)
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature           # [2b, 2B]
        own = torch.arange(b, device=z1.device) + (rank() * b if gather_negatives else 0)  # [b]
        rows, positive = torch.arange(2 * b, device=z1.device), torch.cat([own + B, own])  # [2b]
        itself = torch.zeros_like(logits, dtype=torch.bool)
        itself[rows, torch.cat([own, own + B])] = True                                   # [2b, 2B]
        loss = F.cross_entropy(logits.masked_fill(itself, -math.inf), positive)          # 0-dim
        negative = ~itself
        negative[rows, positive] = False                                                 # 2B - 2
        return loss, logits, negative


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
    """SGD (no Nesterov) on every parameter, whose weight decay larc_ folds into the gradients (the
    original's SGD decayed every parameter, and Apex's LARC takes it over); fused on GPUs."""
    group = {"params": list(model.parameters()), "larc_weight_decay": args.weight_decay}
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.SGD([group], args.lr, momentum=args.momentum, **fused)


def learning_rate(args, step, steps_per_epoch):
    """The lr of global step `step` (from 0), as the original's loop sets it: base = lr sqrt(B)
    (or lr B / 256); linear warm-up s / W * base up to step W = warmup_epochs * steps_per_epoch;
    then torch's CosineAnnealingLR over T - W steps (T = all steps), stepped after each step past
    W: step s > W runs at base (1 + cos(pi (s - W - 1) / (T - W))) / 2."""
    base = args.lr * (math.sqrt(args.batch_size) if args.lr_scaling == "sqrt"
                      else args.batch_size / 256)
    warm, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if step <= warm:
        return step / warm * base if warm > 0 else base
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm - 1) / (total - warm)))


def train_step(net, optimizer, scaler, x1, x2, labels, args, dtype):
    """One step on two views [b, L] (token ids padded with |V|) of b documents of classes labels
    [b]: forward per view, NT-Xent (float32), LARC, SGD step. Returns the loss and the negatives
    monitor per anchor (detached)."""
    with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype is not None):
        z1, z2 = net(x1, x2)                                                          # [b, D] each
    loss, logits, negative = nt_xent(z1, z2, args.temperature)
    rates = negative_rates(logits.detach(), negative, labels.repeat(2), gather(labels).repeat(2))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
    larc_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.detach(), **rates}


def train_one_epoch(net, data, optimizer, scaler, args, epoch, device, dtype):
    """One pass: each step's lr, its two views and train_step; returns the epoch's statistics."""
    net.train()
    data.sampler.set_epoch(epoch)
    steps, n = [], len(data.loader)
    bar = tqdm(data.loader, f"epoch {epoch + 1}", leave=False, disable=rank() > 0)
    for step, (x1, x2, labels) in enumerate(bar):
        lr = learning_rate(args, epoch * n + step, n)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2, labels = (t.to(device, non_blocking=True) for t in (x1, x2, labels))
        steps.append(train_step(net, optimizer, scaler, x1, x2, labels, args, dtype))
    return {**epoch_stats(steps), "lr": lr}


@torch.no_grad()
def mean_classifier(embed, train_set, test_set, batch_size, device, dtype=None, workers=0, seed=0):
    """Top-1 (%) of Nozawa & Sato's mean classifier: mu_c = mean of the L2-normalised `embed`
    outputs of `train_set` items of class c (ONE draw of its transform: one augmented view per
    document), not re-normalised; `test_set` (clean) items go to argmax_c z.mu_c. The transform
    draws from torch's RNG seeded with `seed` inside fork_rng: evaluating never changes training."""
    def features(data):
        feats, labels = [], []
        for x, y in DataLoader(data, batch_size, num_workers=workers, collate_fn=data.collate):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                feats.append(F.normalize(embed(x.to(device)).float(), dim=1))
            labels.append(y.to(device))
        return torch.cat(feats), torch.cat(labels)

    with torch.random.fork_rng(devices=[]):  # (a DataLoader draws a seed from the global RNG too)
        torch.manual_seed(seed)
        z, y = features(train_set)                                                   # [n, d], [n]
        classes = int(max(y.max(), max(test_set.targets))) + 1
        means = torch.zeros(classes, z.shape[1], device=device).index_add_(0, y, z)  # [C, d]
        means /= torch.bincount(y, minlength=classes).clamp(min=1)[:, None]  # not re-normalised
        z, y = features(test_set)
    return 100.0 * ((z @ means.T).argmax(dim=1) == y).double().mean().item()


def main(argv=None):
    parser = get_parser()
    args, ckpt, device, dtype = setup(parser, argv, rules)
    history = ckpt["history"] if ckpt else []

    # ---- documents, vocabulary, similar-word table; two views of each document ----
    data = load_text(args, parser, device, ckpt)

    # ---- model, optimizer (SGD under LARC), scaler; resume ----
    model = ContrastiveFastText(len(data.vocab), args.embedding_dim).to(device)
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
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "vocab": data.vocab, "replace_ids": data.table, "classes": data.classes}

    def evaluate(epoch):  # rank 0 alone, the others wait in end_epoch; the original's batch 1024
        if rank() > 0:
            return {}
        model.eval()
        return {"mean_top1": mean_classifier(lambda x: model.projector(model.backbone(x)),
                                             data.one_view, data.test, 1024, device, dtype,
                                             args.workers, seed=args.seed + epoch)}

    # ---- training: a row of metrics.csv and last.pt per epoch (--epochs 0: the untrained net) ----
    if args.epochs == 0:
        end_epoch(args, {"epoch": 0, **evaluate(0)}, history, state(0))
    for epoch in range(start, args.epochs):
        start_time = time.time()
        row = {"epoch": epoch + 1, **train_one_epoch(net, data, optimizer, scaler, args, epoch,
                                                     device, dtype)}
        row["epoch_seconds"] = time.time() - start_time
        row["images_per_sec"] = len(data.loader) * args.batch_size / row["epoch_seconds"]  # docs
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            row.update(evaluate(epoch + 1))
        end_epoch(args, row, history, state(epoch + 1))
    if world() > 1:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------
# simclr_debiased.py's harness, word for word (tests/test_copies.py), less its image pieces
# -------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit 2, from rank 0 alone)."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kwargs})

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


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

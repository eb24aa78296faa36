"""AG News with erase / similar-word replace augmentations: the text experiment of Nozawa & Sato.

    python nlp_similar_words.py --data_dir data/ag_news_csv --vectors crawl-300d-2M.vec        # replace
    python nlp_similar_words.py --data_dir data/ag_news_csv --replace_ids ag_replace_ids.npy   # a saved table
    python nlp_similar_words.py --data_dir data/ag_news_csv --augmentation erase --batch_size 16
    torchrun --standalone --nproc_per_node 2 nlp_similar_words.py --augmentation erase
    python nlp_similar_words.py --augmentation erase --batch_size 256 --epochs 10 --workers 0   # CPU-sized

Paper: K. Nozawa and I. Sato, "Understanding Negative Samples in Instance Discriminative
Self-supervised Representation Learning" (NeurIPS 2021; code nzw0301/Understanding-Negative-Samples).
Data: DATA_DIR/train.csv and test.csv of AG News (no header: class 1..4, title, description) and
an optional classes.txt (one class name a line).

A document is the bag of its vocabulary ids (basic_english tokens seen >= 5 times in train.csv,
"<unk>" last); the encoder is the mean of its word embeddings (EmbeddingBag, dimension 50), the head
50 -> 50 -> BN -> ReLU -> 50 (no bias). Two views per document, each token changed independently
with probability mask_ratio = 0.2: erase drops it; replace swaps it for one of its 5 most
cosine-similar vocabulary words under pre-trained word vectors (uniformly), appended after the kept
tokens. The similar-word table (int64 [|V|, 5], ascending similarity; identity rows for <unk> and
words without a vector) comes from --vectors at start-up and is saved in last.pt and replace_ids.npy.

Loss: NT-Xent (Chen et al. 2020, eq. 1), t = 0.5. B documents give 2B views z (L2-normalised head
outputs); each is an anchor whose positive is the other view of its document and whose negatives
are the 2B - 2 other views; with s_ij = z_i.z_j / t,   loss = mean_i -log(exp(s_i+) / sum_{j!=i} exp(s_ij)).
Under torchrun the views are gathered with gradient: B is the global batch. SGD + LARC (trust 1e-3),
lr * sqrt(B) (or * B / 256), warm-up then cosine. Every epoch the mean classifier (paper Sec. 5.2):
mu_c = mean normalised head output of ONE AUGMENTED VIEW of each training document of class c (not
re-normalised); clean test documents are classified by argmax_c z.mu_c.
"""
import argparse
import csv
import html
import json
import math
import os
import re
import time
from collections import Counter
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

SCRIPT = "nlp_similar_words.py"
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision",
                        "eval_batch_size"}
NEIGHBOURS = 5  # columns of the similar-word table


def get_parser():
    p = argparse.ArgumentParser(prog=SCRIPT, description="AG News contrastive learning, erase / replace augmentation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data/ag_news_csv", help="folder with train.csv and test.csv")
    g.add_argument("--min_freq", type=int, default=5, help="minimum count of a vocabulary word in train.csv")
    g.add_argument("--subset", type=int, default=0, help="train on N evenly spaced documents (0: all)")
    g.add_argument("--clean_text", action="store_true", help="undo AG News's #39; / &lt; / backslash leftovers")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g = p.add_argument_group("augmentation")
    g.add_argument("--augmentation", default="replace", choices=["replace", "erase"], help="text augmentation")
    g.add_argument("--mask_ratio", type=float, default=0.2, help="probability that a token changes, in [0, 1)")
    g.add_argument("--vectors", default="", help="word vectors (fastText .vec or GloVe .txt) for replace")
    g.add_argument("--replace_ids", default="", help="or a similar-word table .npy [|V|, 5] for replace")
    g = p.add_argument_group("model and loss")
    g.add_argument("--embedding_dim", type=int, default=50, help="word-embedding and head dimension")
    g.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature t")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True, help="SyncBatchNorm on GPUs")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="total epochs (0: evaluate the untrained model)")
    g.add_argument("--batch_size", type=int, default=512, help="GLOBAL batch of documents (K+1) over all processes")
    g.add_argument("--lr", type=float, default=1.0, help="base learning rate, scaled by --lr_scaling")
    g.add_argument("--lr_scaling", default="sqrt", choices=["sqrt", "linear"], help="lr*sqrt(B) or lr*B/256")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=0.0, help="weight decay (inside LARC)")
    g.add_argument("--warmup_epochs", type=float, default=2.0, help="linear warm-up epochs, then cosine")
    g = p.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="model autocast")
    g.add_argument("--seed", type=int, default=7, help="random seed (offset by rank)")
    g.add_argument("--out_dir", default="results/nlp_similar_words", help="args.json, metrics.csv, last.pt")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs")
    g.add_argument("--eval_every", type=int, default=1, help="mean classifier every N epochs (0: never)")
    g.add_argument("--eval_batch_size", type=int, default=1024, help="batch of the mean-classifier passes")
    return p


def check_args(parser, a):
    finite = all(math.isfinite(v) for v in (a.lr, a.weight_decay, a.temperature, a.momentum, a.warmup_epochs))
    for ok, message in [
            (finite, "--lr, --weight_decay, --temperature, --momentum and --warmup_epochs must be finite"),
            (0 <= a.mask_ratio < 1, f"--mask_ratio must be in [0, 1), got {a.mask_ratio}"),
            (a.temperature > 0 and a.lr > 0, "--temperature and --lr must be > 0"),
            (a.weight_decay >= 0 and a.warmup_epochs >= 0, "--weight_decay and --warmup_epochs must be >= 0"),
            (a.batch_size >= 2, f"--batch_size must be >= 2 (each document needs a negative), got {a.batch_size}"),
            (a.min_freq >= 1 and a.embedding_dim >= 1 and a.eval_batch_size >= 1,
             "--min_freq, --embedding_dim and --eval_batch_size must be >= 1"),
            (min(a.epochs, a.subset, a.workers, a.eval_every) >= 0, "--epochs, --subset, --workers, --eval_every >= 0"),
            (not (a.vectors and a.replace_ids), "give --vectors or --replace_ids, not both"),
            (a.augmentation == "replace" or not (a.vectors or a.replace_ids),
             "--vectors and --replace_ids are for --augmentation replace"),
            (a.augmentation == "erase" or a.vectors or a.replace_ids or a.resume,
             "--augmentation replace needs --vectors FILE or --replace_ids FILE (or use --augmentation erase)")]:
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
# Text: tokeniser, vocabulary, AG News CSV files (linear_eval.py and bound.py hold copies)
# ------------------------------------------------------------------------------------------------

def tokenize(text):
    """torchtext's legacy `basic_english`: lower-case; pad ' . , ( ) ! ? with spaces; drop ";
    turn ; : and <br /> into spaces; split on whitespace. Applied in torchtext's order."""
    rules = ((r"'", " '  "), (r'"', ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "), (r"\(", " ( "),
             (r"\)", " ) "), (r"!", " ! "), (r"\?", " ? "), (r";", " "), (r":", " "), (r"\s+", " "))
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
    kept = sorted((w for w, c in counts.items() if c >= max(min_freq, 1)), key=lambda w: (-counts[w], w))
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
        raise FileNotFoundError(f"{path} does not exist (expected an AG News CSV: class, title, description)")
    texts, labels, columns = [], [], None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                columns = columns or len(row)
                if len(row) < 2 or len(row) != columns:
                    raise ValueError(f"{path} line {line}: {len(row)} column(s); expected the same number on "
                                     f"every row, at least 2 (class, title, description for AG News)")
                if not row[0].strip().isdigit() or int(row[0]) < 1:
                    raise ValueError(f"{path} line {line}: the class {row[0][:20]!r} is not an integer >= 1")
                texts.append(" ".join(row[1:]))
                labels.append(int(row[0]) - 1)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a UTF-8 CSV file ({err})") from None
    if not texts:
        raise ValueError(f"{path} holds no documents")
    return texts, labels


# ------------------------------------------------------------------------------------------------
# Word vectors and the similar-word table
# ------------------------------------------------------------------------------------------------

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
                raise ValueError(f"{path} line {line}: the values of {word!r} are not numbers") from None
            dim = dim or len(values)
            if len(values) != dim or dim == 0:
                raise ValueError(f"{path} line {line}: {word!r} has {len(values)} values, but the file's "
                                 f"dimension is {dim} (inconsistent dimensions)")
            words.append(word)
            rows.append(values)
            seen.add(word)
    if dim is None:
        raise ValueError(f"{path} holds no word vectors")
    return words, (np.stack(rows) if rows else np.zeros((0, dim)))


@torch.no_grad()
def similar_words(vocab, words, vectors, k=5, device="cpu", skip=("<unk>",), block_elements=2 ** 24):
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
    if m == 0:
        return table
    if m <= k:
        raise ValueError(f"only {m} vocabulary words have vectors; {k} neighbours need at least {k + 1}")
    ids = torch.tensor([stoi[w] for w in found])
    x = torch.as_tensor(np.asarray(vectors)[list(found.values())], dtype=torch.float64, device=device)
    x = F.normalize(x, dim=1)                                                       # [m, dim]
    block = max(1, block_elements // m)
    for start in range(0, m, block):
        sim = x[start:start + block] @ x.T                                        # [b, m]
        b = sim.shape[0]
        sim[torch.arange(b, device=device), torch.arange(start, start + b, device=device)] = -math.inf  # not itself
        nearest = sim.topk(k, dim=1).indices.flip(1).cpu()                         # [b, k] ascending
        table[ids[start:start + b].numpy()] = ids[nearest].numpy()
    return table


# ------------------------------------------------------------------------------------------------
# Augmentations and the data set (erase and replace are copied by linear_eval.py and bound.py).
# They draw from torch's RNG, which PyTorch seeds differently in every DataLoader worker.
# ------------------------------------------------------------------------------------------------

def erase(tokens, ratio):
    """Drop each token (1-D LongTensor) independently with probability `ratio`; order is kept.
    Random numbers from torch's RNG; the indexing runs in numpy (several times faster per document)."""
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
    """Documents as 1-D LongTensors of ids: items (tokens, label), or with `views` = 2 the training
    pair (view_1, view_2, label, index); `transform` (erase or replace with their settings bound by
    functools.partial, picklable for DataLoader workers; or None) draws anew on every access.
    `collate` right-pads every tensor column with `pad_id` = len(vocab) (EmbeddingBag skips it)."""

    def __init__(self, ids, offsets, targets, pad_id, transform=None, views=1):
        self.ids, self.offsets, self.targets = ids, offsets.tolist(), list(targets)
        self.pad_id, self.transform, self.views = pad_id, transform, views

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        tokens = self.ids[self.offsets[index]:self.offsets[index + 1]]
        draw = (lambda: self.transform(tokens)) if self.transform is not None else tokens.clone
        return (draw(), self.targets[index]) if self.views == 1 else (draw(), draw(), self.targets[index], index)

    def collate(self, batch):
        def pad(column):
            out = torch.full((len(column), max([1] + [len(t) for t in column])), self.pad_id, dtype=torch.long)
            for i, t in enumerate(column):
                out[i, :len(t)] = t
            return out
        return tuple(pad(c) if torch.is_tensor(c[0]) else torch.tensor(c) for c in zip(*batch))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class BagOfEmbeddings(nn.Module):
    """fastText-style encoder: the mean of a document's word embeddings. Input LongTensor [B, L]
    padded with `num_words` (left out of the mean; an empty document gives 0). N(0, 1) init."""

    def __init__(self, num_words, dim=50):
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_words + 1, dim, mode="mean", padding_idx=num_words)
        self.out_dim = dim

    def forward(self, tokens):
        return self.embedding(tokens)


class ContrastiveFastText(nn.Module):
    """Encoder and head dim -> dim -> BN -> ReLU -> dim (no bias), as the original's."""

    def __init__(self, num_words, dim=50):
        super().__init__()
        self.backbone = BagOfEmbeddings(num_words, dim)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, dim, bias=False))

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

def nt_xent(z1, z2, temperature=0.5, gather=True):
    """NT-Xent of the docstring, the mean over this process's 2b anchors, in float32 (float64 for
    float64 inputs) log space, outside autocast. Rows 0..b-1 are view-1 anchors, b..2b-1 view-2.
    With `gather` under torch.distributed the keys are every process's views (B = global batch):
    the mean of the per-process values is the global loss, grad / world size its gradient."""
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)       # [b, D]
        all1, all2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather else (z1, z2)  # [B, D]
        b, B = z1.shape[0], all1.shape[0]
        first = dist.get_rank() * b if gather and world() > 1 else 0                        # this rank's 1st doc
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).T / temperature             # [2b, 2B]
        doc = torch.arange(b, device=z1.device) + first                                    # [b] global ids
        self_mask = torch.zeros_like(logits, dtype=torch.bool)                             # [2b, 2B]
        self_mask[torch.arange(2 * b, device=z1.device), torch.cat([doc, doc + B])] = True
        positive = torch.cat([doc + B, doc])                                               # [2b] the other view
        return F.cross_entropy(logits.masked_fill(self_mask, -math.inf), positive)         # 2B - 2 negatives


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

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


def learning_rate(args, epoch_float):
    """The original's: base lr * sqrt(B) (or * B / 256); linear warm-up from 0, then cosine to 0."""
    base = args.lr * (math.sqrt(args.batch_size) if args.lr_scaling == "sqrt" else args.batch_size / 256)
    if epoch_float < args.warmup_epochs:
        return base * epoch_float / args.warmup_epochs
    progress = (epoch_float - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_one_epoch(net, loader, optimizer, scaler, args, epoch, device, dtype):
    """One pass over `loader`: returns (mean loss, last lr, first non-finite step or -1)."""
    net.train()
    steps = len(loader)
    total = torch.zeros((), device=device, dtype=torch.float64)
    first_bad = torch.full((), -1, device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False) if is_master() else None
    for step, (x1, x2, _, _) in enumerate(loader):
        lr = learning_rate(args, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z1, z2 = net(x1, x2)
        loss = nt_xent(z1, z2, args.temperature)  # float32, outside autocast, global negatives
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
        larc_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach().double()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world() > 1:
        dist.all_reduce(total)  # a non-finite loss on any rank shows on every rank, so all stop together
    return total.item() / (steps * world()), lr, int(first_bad)


@torch.no_grad()
def mean_classifier(embed, train_set, test_set, batch_size, device, dtype=None, workers=0, seed=0):
    """Top-1 (%) of Nozawa & Sato's mean classifier: mu_c = mean of the L2-normalised `embed`
    outputs of `train_set` items of class c (ONE draw of its transform: one augmented view per
    document), not re-normalised; `test_set` (clean) items go to argmax_c z.mu_c. The transform
    draws from torch's RNG seeded with `seed` inside fork_rng: evaluating never changes training.
    One process computes it all (an epoch's forward passes without the backward)."""
    def features(dataset):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=dataset.collate)
        feats, labels = [], []
        for x, y in loader:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                feats.append(F.normalize(embed(x.to(device)).float(), dim=1))
            labels.append(y.to(device))
        return torch.cat(feats), torch.cat(labels)

    with torch.random.fork_rng(devices=[]):  # (a DataLoader draws a seed from the global RNG too)
        torch.manual_seed(seed)
        z, y = features(train_set)                                                        # [n, d], [n]
        classes = int(max(y.max(), max(test_set.targets))) + 1
        means = torch.zeros(classes, z.shape[1], device=device).index_add_(0, y, z)      # [C, d]
        means /= torch.bincount(y, minlength=classes).clamp(min=1)[:, None]               # not re-normalised
        z, y = features(test_set)
    return 100.0 * ((z @ means.T).argmax(dim=1) == y).double().mean().item()


# ------------------------------------------------------------------------------------------------
# Checkpoints and metrics (the same in every training script)
# ------------------------------------------------------------------------------------------------

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
    """Append one row to metrics.csv (header first): epoch, loss, lr, images_per_sec (DOCUMENTS per
    second here, the shared column name), epoch_seconds, mean_top1 (mean classifier, %)."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, columns)
        if new:
            writer.writeheader()
        writer.writerow({c: (f"{row[c]:.6g}" if isinstance(row.get(c), float) else row.get(c, "")) for c in columns})


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def read_corpus(data_dir, subset=0, clean_text=False):
    """train.csv (`subset` documents evenly spaced through it, as common.subset; 0: all) and
    test.csv of `data_dir`: (train texts, train labels, test texts, test labels, class names)."""
    train_texts, train_labels = read_ag_news(os.path.join(data_dir, "train.csv"))
    test_texts, test_labels = read_ag_news(os.path.join(data_dir, "test.csv"))
    if 0 < subset < len(train_texts):
        keep = [i * len(train_texts) // subset for i in range(subset)]
        train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
    if clean_text:
        train_texts, test_texts = [clean_ag_news(t) for t in train_texts], [clean_ag_news(t) for t in test_texts]
    classes = [str(c) for c in range(max(train_labels + test_labels) + 1)]
    if os.path.isfile(os.path.join(data_dir, "classes.txt")):
        with open(os.path.join(data_dir, "classes.txt"), encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        classes = names if len(names) == len(classes) else classes
    return train_texts, train_labels, test_texts, test_labels, classes


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, SCRIPT, parser)
        if any(k not in ckpt for k in ("args", "epoch", "model", "optimizer", "scaler", "rng", "vocab", "replace_ids")):
            parser.error(f"{args.resume} lacks entries of a {SCRIPT} checkpoint")
        args = resumed_args(parser, argv, args, ckpt)

    # ---- processes, precision, seeds ----
    rank, n_proc, device = setup_distributed()
    master = rank == 0
    if args.batch_size % n_proc or args.batch_size // n_proc < 1:
        parser.error(f"--batch_size {args.batch_size} (global) must split evenly into {n_proc} process(es)")
    batch = args.batch_size // n_proc
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---- documents and vocabulary ----
    try:
        train_texts, train_labels, test_texts, test_labels, classes = read_corpus(args.data_dir, args.subset,
                                                                                  args.clean_text)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    vocab = build_vocab(train_texts, args.min_freq)
    if len(vocab) == 1:
        parser.error(f"no word occurs {args.min_freq} times in the {len(train_texts)} training documents")
    if ckpt is not None and ckpt["vocab"] != vocab:
        parser.error(f"the training documents of {args.data_dir} give another vocabulary than the checkpoint's")
    if len(train_texts) < args.batch_size:
        parser.error(f"{len(train_texts)} training documents are fewer than one batch of {args.batch_size}")
    args.vocab_size = len(vocab)

    # ---- output directory (checked before any compute) ----
    columns = ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "mean_top1"]
    metrics_path, ckpt_path = os.path.join(args.out_dir, "metrics.csv"), os.path.join(args.out_dir, "last.pt")
    start_epoch = ckpt["epoch"] if ckpt is not None else 0
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

    # ---- the similar-word table (replace) ----
    table = None
    if args.augmentation == "replace":
        source = "the checkpoint" if ckpt is not None else args.replace_ids or args.vectors
        try:
            if ckpt is not None:
                table = ckpt["replace_ids"]
            elif args.replace_ids:
                table = torch.from_numpy(np.load(args.replace_ids, allow_pickle=False))
            else:
                table = torch.from_numpy(similar_words(vocab, *read_vectors(args.vectors, vocab), NEIGHBOURS, device))
        except (OSError, ValueError) as err:
            parser.error(f"cannot use {source}: {err}")
        if not (torch.is_tensor(table) and table.shape == (len(vocab), NEIGHBOURS) and table.dtype == torch.int64
                and (table.numel() == 0 or 0 <= table.min() <= table.max() < len(vocab))):
            parser.error(f"{source}: expected an int64 table [{len(vocab)}, {NEIGHBOURS}] of ids of this vocabulary")
        if master:
            np.save(os.path.join(args.out_dir, "replace_ids.npy"), table.numpy())
    ratio = args.mask_ratio
    augment = partial(erase, ratio=ratio) if table is None else partial(replace, table=table, ratio=ratio)

    # ---- data sets: training pairs, one augmented view (mean classifier), clean test ----
    ids, offsets = encode(train_texts, vocab)
    pairs = TextDataset(ids, offsets, train_labels, len(vocab), augment, views=2)
    one_view = TextDataset(ids, offsets, train_labels, len(vocab), augment)
    test_set = TextDataset(*encode(test_texts, vocab), test_labels, len(vocab))
    sampler = DistributedSampler(pairs, n_proc, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(pairs, batch_size=batch, sampler=sampler, num_workers=args.workers, collate_fn=pairs.collate,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)

    # ---- model, optimizer (SGD under LARC, which holds the weight decay), scaler, resume ----
    model = ContrastiveFastText(len(vocab), args.embedding_dim).to(device)
    if n_proc > 1 and device.type == "cuda" and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "larc_weight_decay": args.weight_decay}],
                                lr=args.lr, momentum=args.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] and scaler.is_enabled():  # a bf16/fp32 run saved a disabled scaler's empty state
            scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == n_proc:
            torch.set_rng_state(ckpt["rng"][rank][0])
            if device.type == "cuda" and ckpt["rng"][rank][1].numel():
                torch.cuda.set_rng_state(ckpt["rng"][rank][1])
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if n_proc > 1 else model
    if master:
        print(f"{SCRIPT}: {len(pairs)} training / {len(test_set)} test documents, {len(vocab)} words, "
              f"{args.augmentation} {args.mask_ratio}, {n_proc} process(es) x {batch}, {precision} on {device}")

    def save(epoch):
        state = {"script": SCRIPT, "args": vars(args), "epoch": epoch, "backbone": model.backbone.state_dict(),
                 "head": {"layout": head_layout(model.projector), "state": model.projector.state_dict()},
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": rng_states(), "world_size": n_proc, "vocab": vocab, "replace_ids": table, "classes": classes}
        if master:
            save_checkpoint(state, ckpt_path)

    def evaluate(row):  # on the master only; the other processes wait in save()
        if master:
            model.eval()
            row["mean_top1"] = mean_classifier(lambda x: model.projector(model.backbone(x)), one_view, test_set,
                                               args.eval_batch_size, device, dtype, args.workers,
                                               seed=args.seed + row["epoch"])

    # ---- training loop ----
    if args.epochs == 0 and ckpt is None:  # the untrained network: a baseline
        row = {"epoch": 0}
        evaluate(row)
        if master:
            write_metrics(metrics_path, row, columns)
            print(f"epoch 0 (untrained): mean-classifier top-1 {row['mean_top1']:.2f}")
        save(0)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        start = time.time()
        loss, lr, bad_step = train_one_epoch(net, loader, optimizer, scaler, args, epoch, device, dtype)
        if not math.isfinite(loss):
            raise SystemExit(f"{SCRIPT}: error: non-finite loss at epoch {epoch + 1}, step {bad_step + 1} "
                             f"(of this process); {ckpt_path} still holds epoch {epoch}")
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr, "epoch_seconds": seconds,
               "images_per_sec": len(loader) * args.batch_size / seconds}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            evaluate(row)
        if master:
            write_metrics(metrics_path, row, columns)
            print(f"epoch {epoch + 1}/{args.epochs} loss {loss:.4f} {row['images_per_sec']:.0f} docs/s "
                  f"mean-classifier top-1 {row.get('mean_top1', float('nan')):.2f}")
        save(epoch + 1)
    if n_proc > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

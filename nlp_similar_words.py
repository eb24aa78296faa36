"""AG News with similar-word replacement: the text experiment of Nozawa & Sato, in one file.

    python nlp_similar_words.py build --vectors crawl-300d-2M.vec --train data/ag_news_csv/train.csv \\
        --out ag_replace_ids.npy                                    # the similar-word table
    python nlp_similar_words.py train --data_dir data/ag_news_csv --replace_ids ag_replace_ids.npy
    python nlp_similar_words.py train --data_dir data/ag_news_csv --augmentation erase --batch_size 16
    torchrun --standalone --nproc_per_node 2 nlp_similar_words.py train --augmentation erase
    python nlp_similar_words.py train --data_dir ../shared/data/ag_news --split carved \\
        --vectors ../shared/data/word_vectors/glove.6B.50d.10k.txt --batch_size 256 --epochs 10 \\
        --workers 0 --out_dir runs/ag_cpu                          # CPU-sized, without train.csv

Paper: K. Nozawa and I. Sato, "Understanding Negative Samples in Instance Discriminative
Self-supervised Representation Learning" (NeurIPS 2021; code nzw0301/Understanding-Negative-Samples).

A document is the bag of its vocabulary ids; the encoder is fastText-like, the mean of the word
embeddings (EmbeddingBag, dimension 50), followed by the head 50 -> 50 -> BN -> ReLU -> 50 (no
bias). Two views of each document come from one of two augmentations, applied to each token
independently with probability mask_ratio = 0.2:
    erase     the token is dropped;
    replace   the token becomes one of its 5 most cosine-similar vocabulary words under pre-trained
              word vectors (uniformly chosen); replaced tokens go after the kept ones (length kept).
The loss is NT-Xent at t = 0.5 (simclr_debiased.contrastive_loss, estimator "easy"); SGD with LARC,
warm-up then cosine. After every epoch, the mean classifier (class means of the normalised head
outputs of one augmented view of each training document, not re-normalised) is scored on the
test split. `build` writes the similar-word table as the original code did: int64 (|V|, 5), columns
in ascending similarity, the row of a word without a vector (and of <unk>) is its own id 5 times.
"""
import argparse
import contextlib
import csv
import html
import math
import os
import re
import sys
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

import common
from simclr_debiased import contrastive_loss

SCRIPT = "nlp_similar_words.py"
# Flags a resumed run may change; every other flag is taken from the checkpoint.
MAY_CHANGE_ON_RESUME = {"epochs", "out_dir", "resume", "data_dir", "workers", "eval_every", "precision",
                        "eval_batch_size"}


# ------------------------------------------------------------------------------------------------
# Text: tokeniser, vocabulary, AG News CSV files
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
    """(texts, labels) of an AG News-style CSV: no header, a class 1..C, then text columns (title,
    description) joined by a space; labels become 0..C-1. Errors name the file and line."""
    if not os.path.isfile(path):
        raise common.UserError(f"{path} does not exist (expected an AG News CSV: class, title, description)")
    texts, labels, columns = [], [], None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                columns = columns or len(row)
                if len(row) < 2 or len(row) != columns:
                    raise common.UserError(f"{path} line {line}: {len(row)} column(s); expected the same number on "
                                           f"every row, at least 2 (class, title, description for AG News)")
                if not row[0].strip().isdigit() or int(row[0]) < 1:
                    raise common.UserError(f"{path} line {line}: the class {row[0][:20]!r} is not an integer >= 1 "
                                           f"(AG News CSVs have no header)")
                texts.append(" ".join(row[1:]))
                labels.append(int(row[0]) - 1)
    except (UnicodeDecodeError, csv.Error) as err:
        raise common.UserError(f"{path} is not a UTF-8 CSV file ({err})") from None
    return texts, labels


def carve_split(labels, every=5):
    """Deterministic stratified split of one labelled file: within each class, in file order, every
    `every`-th document (positions every-1, 2*every-1, ...) is held out for testing.
    Returns (train indices, test indices), both in file order."""
    seen, train, test = Counter(), [], []
    for i, y in enumerate(labels):
        (test if seen[y] % every == every - 1 else train).append(i)
        seen[y] += 1
    return train, test


def load_corpus(data_dir, split="auto", clean_text=False, subset=0):
    """The train and test documents of `data_dir` (train.csv, test.csv, optional classes.txt).
    split: original (both files), carved (train and test carved out of test.csv by `carve_split`;
    for when train.csv is not available), auto (original if train.csv exists, else carved).
    subset: keep N training documents evenly spaced through the split (0: all).
    Returns a namespace: split (resolved), train_texts, train_labels, test_texts, test_labels, classes."""
    test_texts, test_labels = read_ag_news(os.path.join(data_dir, "test.csv"))
    if split == "auto":
        split = "original" if os.path.isfile(os.path.join(data_dir, "train.csv")) else "carved"
    if split == "original":
        train_texts, train_labels = read_ag_news(os.path.join(data_dir, "train.csv"))
    else:
        train_idx, test_idx = carve_split(test_labels)
        train_texts, train_labels = [test_texts[i] for i in train_idx], [test_labels[i] for i in train_idx]
        test_texts, test_labels = [test_texts[i] for i in test_idx], [test_labels[i] for i in test_idx]
    keep = common.evenly_spaced(len(train_texts), subset)
    train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
    if not train_texts or not test_texts:
        raise common.UserError(f"the {split} split of {data_dir} has {len(train_texts)} training and "
                               f"{len(test_texts)} test documents; both must be non-empty")
    if clean_text:
        train_texts, test_texts = [clean_ag_news(t) for t in train_texts], [clean_ag_news(t) for t in test_texts]
    n_classes = max(train_labels + test_labels) + 1
    classes = [str(c) for c in range(n_classes)]
    names = os.path.join(data_dir, "classes.txt")
    if os.path.isfile(names):
        with open(names, encoding="utf-8") as f:
            listed = [line.strip() for line in f if line.strip()]
        classes = listed if len(listed) == n_classes else classes
    return SimpleNamespace(split=split, train_texts=train_texts, train_labels=train_labels,
                           test_texts=test_texts, test_labels=test_labels, classes=classes)


# ------------------------------------------------------------------------------------------------
# Word vectors and the similar-word table
# ------------------------------------------------------------------------------------------------

def read_vectors(path, vocab=None, progress=False):
    """Word vectors of a fastText `.vec` (first line `count dim`) or GloVe (no header) text file.

    Streams the file line by line and parses only the lines of `vocab` words (all words when None),
    so a 2M x 300 file costs memory for the kept words alone. The header is recognised as a first
    line of exactly two integers and never becomes a word. The first occurrence of a duplicated word
    wins. A kept line whose number of values differs from the dimension is an error (UserError).
    Returns (words in file order, float64 array [len(words), dim]).
    """
    if not os.path.isfile(path):
        raise common.UserError(f"word-vector file {path} does not exist")
    keep = None if vocab is None else set(vocab)
    words, rows, seen, dim = [], [], set(), None
    bar = common.progress_bar(round(os.path.getsize(path) / 2 ** 20, 1), "reading vectors (MiB)", progress)
    pending = 0
    with open(path, "rb") as f, (bar if bar is not None else contextlib.nullcontext()):  # tqdm closes on exit
        for line, raw in enumerate(f, 1):
            pending += len(raw)
            if bar is not None and pending > 2 ** 24:
                bar.update(round(pending / 2 ** 20, 1))
                pending = 0
            if line == 1:
                fields = raw.split()
                if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                    dim = int(fields[1])  # fastText header: count dim
                    continue
            cut = raw.find(b" ")
            word = (raw[:cut] if cut > 0 else raw.strip()).decode("utf-8", "replace")
            if not word or (keep is not None and word not in keep) or word in seen:
                continue
            try:
                values = np.array(raw[cut + 1:].split() if cut > 0 else [], dtype=np.float64)
            except ValueError:
                raise common.UserError(f"{path} line {line}: the values of {word!r} are not numbers") from None
            if dim is None:
                dim = len(values)
            if len(values) != dim or dim == 0:
                raise common.UserError(f"{path} line {line}: {word!r} has {len(values)} values, but the file's "
                                       f"dimension is {dim} (inconsistent dimensions)")
            words.append(word)
            rows.append(values)
            seen.add(word)
        if bar is not None:
            bar.update(round(pending / 2 ** 20, 1))
    if dim is None:
        raise common.UserError(f"{path} holds no word vectors")
    return words, (np.stack(rows) if rows else np.zeros((0, dim)))


@torch.no_grad()
def similar_words(vocab, words, vectors, k=5, device=None, block_size=None, skip=("<unk>",)):
    """The similar-word table: int64 [len(vocab), k].

    Row i holds the vocabulary ids of the k words most cosine-similar to vocab[i] among the
    vocabulary words that have a vector (itself excluded), in ascending similarity (last = nearest).
    A word without a vector, and the words in `skip`, get their own id k times. Similarities are
    float64 and computed `block_size` rows at a time on `device` (default: a block of about 128 MiB),
    never as the full matrix. Exact ties are broken arbitrarily (as the original's argsort).
    """
    stoi = {w: i for i, w in enumerate(vocab)}
    rows, ids, seen = [], [], set()
    for r, w in enumerate(words):
        if w in stoi and w not in skip and w not in seen:  # the first vector of a duplicated word
            rows.append(r)
            ids.append(stoi[w])
            seen.add(w)
    table = np.repeat(np.arange(len(vocab), dtype=np.int64)[:, None], k, axis=1)
    m = len(rows)
    if m == 0:
        return table
    if m <= k:
        raise ValueError(f"only {m} vocabulary words have vectors; {k} neighbours need at least {k + 1}")
    device = torch.device(device or "cpu")
    x = F.normalize(torch.as_tensor(np.asarray(vectors)[rows], dtype=torch.float64, device=device), dim=1)
    id_of = torch.tensor(ids, dtype=torch.long)
    block = block_size or max(1, 2 ** 24 // m)
    for start in range(0, m, block):
        sim = x[start:start + block] @ x.T                                    # [b, m] float64
        b = sim.shape[0]
        sim[torch.arange(b, device=device), torch.arange(start, start + b, device=device)] = -math.inf
        nearest = sim.topk(k, dim=1).indices.flip(1).cpu()                   # ascending similarity
        table[id_of[start:start + b].numpy()] = id_of[nearest].numpy()
    return table


def check_replace_ids(table, vocab_size, source):
    """A similar-word table as an int64 LongTensor, after checking its shape and ids."""
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] != vocab_size or table.shape[1] < 1 or table.dtype.kind not in "iu":
        raise common.UserError(f"{source}: expected an integer table of shape ({vocab_size}, k) for the "
                               f"{vocab_size}-word vocabulary, got {table.dtype} {tuple(table.shape)}; "
                               f"build it from the same training data with `{SCRIPT} build`")
    if table.size and (table.min() < 0 or table.max() >= vocab_size):
        raise common.UserError(f"{source}: ids outside [0, {vocab_size})")
    return torch.from_numpy(table.astype(np.int64))


def load_replace_ids(path, vocab_size):
    """Read and check a table written by `build` (or by the original code)."""
    if not os.path.isfile(path):
        raise common.UserError(f"similar-word table {path} does not exist")
    try:
        table = np.load(path, allow_pickle=False)
    except Exception as err:
        raise common.UserError(f"cannot read {path} as a .npy array ({type(err).__name__})") from None
    return check_replace_ids(table, vocab_size, path)


# ------------------------------------------------------------------------------------------------
# Augmentations and data sets
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


class Augment:
    """The run's augmentation as a picklable callable (DataLoader workers). Randomness comes from
    torch's global RNG, which PyTorch seeds differently in every worker."""

    def __init__(self, kind, ratio, table=None):
        if kind not in ("erase", "replace"):
            raise ValueError(f"augmentation must be erase or replace, got {kind!r}")
        if kind == "replace" and table is None:
            raise ValueError("replace needs the similar-word table")
        self.kind, self.ratio, self.table = kind, ratio, table

    def __call__(self, tokens):
        return erase(tokens, self.ratio) if self.kind == "erase" else replace(tokens, self.table, self.ratio)


def pad_batch(sequences, pad_id):
    """Right-pad 1-D LongTensors with `pad_id` into [B, L], L >= 1 (an all-padding row is an empty
    document; EmbeddingBag gives it a zero vector)."""
    length = max([1] + [s.shape[0] for s in sequences])
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :s.shape[0]] = s
    return out


class TextDataset(Dataset):
    """Documents as 1-D LongTensors of vocabulary ids with their labels: items (tokens, label).
    `transform` (the run's erase/replace augmentation, or None) is applied to the tokens on every
    access, like an image data set's transform. `collate_fn` pads every tensor column of a batch
    with `pad_id` (= vocabulary size) and stacks the others, so it also batches
    `common.TwoViews(dataset, transform)` items (view_1, view_2, label, index)."""

    def __init__(self, ids, offsets, targets, classes, pad_id, transform=None):
        self.ids, self.offsets, self.targets = ids, [int(o) for o in offsets], list(targets)
        self.classes, self.pad_id, self.transform = list(classes), pad_id, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        tokens = self.ids[self.offsets[index]:self.offsets[index + 1]]  # a view: transform copies, else clone
        return (self.transform(tokens) if self.transform is not None else tokens.clone()), self.targets[index]

    def with_transform(self, transform):
        """The same documents under another augmentation (None: clean)."""
        return TextDataset(self.ids, self.offsets, self.targets, self.classes, self.pad_id, transform)

    def collate_fn(self, batch):
        return tuple(pad_batch(column, self.pad_id) if torch.is_tensor(column[0]) else torch.tensor(column)
                     for column in zip(*batch))


def make_datasets(corpus, vocab, transform=None):
    """(train, test) TextDatasets of a corpus (`load_corpus`) under `vocab`; train items transformed."""
    train = TextDataset(*encode(corpus.train_texts, vocab), corpus.train_labels, corpus.classes, len(vocab), transform)
    test = TextDataset(*encode(corpus.test_texts, vocab), corpus.test_labels, corpus.classes, len(vocab))
    return train, test


def eval_datasets(args, train_augment=False, data_dir=None, checkpoint=None):
    """The labelled (train, test) TextDatasets of a run, from its arguments (`ckpt["args"]`), for
    linear_eval.py and bound.py. Test documents clean; train documents clean or, with
    `train_augment`, under the run's own augmentation (`train.transform`, a fresh draw on every
    access; `test.with_transform(train.transform)` gives augmented test documents). Items
    (tokens, label); `collate_fn` gives (LongTensor [B, L] padded with len(vocab), labels).

    The vocabulary is rebuilt from the data (it is deterministic) and checked against the run's:
    the checkpoint's `vocab`, else <out_dir>/vocab.txt when it exists, else only its size. The
    replace table is the checkpoint's `replace_ids`, else <out_dir>/replace_ids.npy, else the
    --replace_ids file the run was given (common.run_datasets passes the checkpoint, so a run
    directory that moved still works).
    """
    a = args if isinstance(args, dict) else vars(args)
    vocab = checkpoint.get("vocab") if checkpoint else None
    replace_ids = checkpoint.get("replace_ids") if checkpoint else None
    corpus = load_corpus(data_dir or a["data_dir"], a["split"], a.get("clean_text", False), a.get("subset", 0))
    rebuilt = build_vocab(corpus.train_texts, a["min_freq"])
    saved = os.path.join(a.get("out_dir", ""), "vocab.txt")
    if vocab is None and os.path.isfile(saved):
        with open(saved, encoding="utf-8") as f:
            vocab = f.read().split("\n")[:-1]
    if (vocab is not None and list(vocab) != rebuilt) or len(rebuilt) != a["vocab_size"]:
        raise common.UserError(f"the training documents of {data_dir or a['data_dir']} ({a['split']} split) do not "
                               f"give the run's vocabulary; is it the data the run was trained on?")
    augment = None
    if train_augment:
        table = None
        if a["augmentation"] == "replace":
            if replace_ids is not None:
                table = check_replace_ids(replace_ids, len(rebuilt), "replace_ids")
            else:
                candidates = [os.path.join(a.get("out_dir", ""), "replace_ids.npy"), a.get("replace_ids") or ""]
                path = next((p for p in candidates if p and os.path.isfile(p)), None)
                if path is None:
                    raise common.UserError("the run's similar-word table was not found (looked for "
                                           f"{', '.join(p for p in candidates if p)}); pass replace_ids=ckpt['replace_ids']")
                table = load_replace_ids(path, len(rebuilt))
        augment = Augment(a["augmentation"], a["mask_ratio"], table)
    return make_datasets(corpus, rebuilt, augment)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class BagOfEmbeddings(nn.Module):
    """fastText-style encoder: the mean of the word embeddings of a document. Input: LongTensor
    [B, L] padded with `num_words` (padding is left out of the mean; an empty document gives 0).
    Embeddings N(0, 1) as nn.EmbeddingBag's default (the original's)."""

    def __init__(self, num_words, dim=50):
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_words + 1, dim, mode="mean", padding_idx=num_words)
        self.out_dim, self.pad_id = dim, num_words

    def forward(self, tokens):
        return self.embedding(tokens)


class ContrastiveFastText(nn.Module):
    """Encoder and head dim -> dim -> BN -> ReLU -> dim (no bias), as `ContrastiveFastText`."""

    def __init__(self, num_words, dim=50):
        super().__init__()
        self.backbone = BagOfEmbeddings(num_words, dim)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, dim, bias=False))

    def forward(self, x1, x2):
        # Each view passes on its own, as in the original code: BatchNorm statistics per view.
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


def build_model(args):
    """The model of a run from its arguments (a Namespace or `ckpt["args"]`, which hold the
    vocabulary size); evaluation scripts rebuild checkpoints with it."""
    a = args if isinstance(args, dict) else vars(args)
    return ContrastiveFastText(a["vocab_size"], a["embedding_dim"])


# ------------------------------------------------------------------------------------------------
# Mean classifier
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def mean_classifier_accuracy(model, train_set, test_set, dist_info, batch_size=1024, workers=0,
                             precision="fp32", seed=0):
    """Top-1 accuracy (percent) of Nozawa & Sato's mean classifier on `test_set`.

    Head outputs, L2-normalised; mu_c = mean over the class's `train_set` items (one draw of their
    augmentation), not re-normalised; prediction argmax_c z . mu_c. The augmentation draws from a
    torch RNG seeded with `seed` and restored afterwards, so evaluating never changes training.
    Items are split over the ranks; every rank returns the same number. The caller sets eval mode.
    """
    device = dist_info.device

    def embed(tokens):
        return model.projector(model.backbone(tokens))

    with torch.random.fork_rng(devices=[]):  # (a DataLoader draws its workers' seeds from this RNG too)
        torch.manual_seed(seed)
        loader = common.eval_loader(train_set, batch_size, workers, device, dist_info)
        features, labels = common.extract_features(embed, loader, device, precision)
        features = common.gather_in_order(features, len(train_set))
        means = common.class_means(features, common.gather_in_order(labels, len(train_set)), len(train_set.classes))
        loader = common.eval_loader(test_set, batch_size, workers, device, dist_info)
        features, labels = common.extract_features(embed, loader, device, precision)
    counts = torch.tensor([common.topk_correct(features @ means.T, labels, ks=(1,))[0], labels.shape[0]],
                          device=device, dtype=torch.float64)
    if dist_info.world_size > 1:
        dist.all_reduce(counts)
    return 100.0 * counts[0].item() / counts[1].item()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def scaled_lr(base_lr, batch_size, scaling):
    """The original's `calculate_initial_lr`: base * B / 256 (linear) or base * sqrt(B)."""
    return base_lr * batch_size / 256 if scaling == "linear" else base_lr * math.sqrt(batch_size)


def build_optimizer(model, args):
    # SGD with LARC (common.larc_ folds the weight decay, applied to every parameter as in the
    # original NLP code, into the gradient, so SGD itself runs without it).
    return torch.optim.SGD([{"params": list(model.parameters()), "larc_weight_decay": args.weight_decay}],
                           lr=scaled_lr(args.lr, args.batch_size, args.lr_scaling), momentum=args.momentum,
                           weight_decay=0.0)


def train_one_epoch(model, loader, optimizer, scaler, args, epoch, dist_info, precision):
    """One pass over `loader`; returns the mean loss and the last learning rate."""
    model.train()
    device, steps = dist_info.device, len(loader)
    base_lr = scaled_lr(args.lr, args.batch_size, args.lr_scaling)
    bar = common.progress_bar(steps, f"epoch {epoch + 1}/{args.epochs}", dist_info.is_main)
    total, lr = torch.zeros((), device=device, dtype=torch.float64), base_lr
    for step, (x1, x2, _, _) in enumerate(loader):
        lr = common.learning_rate(base_lr, epoch + step / steps, args.epochs, args.warmup_epochs, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        with common.autocast(device, precision):
            z1, z2 = model(x1, x2)
        loss = contrastive_loss(z1, z2, args.temperature, estimator="easy")  # float32, outside autocast
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the trust ratio needs the true gradient norms
        common.larc_(optimizer, args.trust_coefficient)
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach().double()
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{total.item() / (step + 1):.4f}", lr=f"{lr:.3g}")
    if bar is not None:
        bar.close()
    if dist_info.world_size > 1:
        dist.all_reduce(total)
    return {"loss": total.item() / (steps * dist_info.world_size), "lr": lr}


def similar_word_table(args, vocab, device):
    """The replace table of a new run: from --replace_ids, or computed from --vectors."""
    if args.replace_ids:
        return load_replace_ids(args.replace_ids, len(vocab))
    if not args.vectors:
        raise common.UserError("--augmentation replace needs the similar-word table: --replace_ids FILE (from "
                               f"`{SCRIPT} build`) or --vectors FILE; or use --augmentation erase")
    words, vectors = read_vectors(args.vectors, vocab, progress=sys.stderr.isatty())
    try:
        return torch.from_numpy(similar_words(vocab, words, vectors, args.k, device))
    except ValueError as err:
        raise common.UserError(f"{args.vectors}: {err}") from None


def train(args, explicit=()):
    dist_info = common.setup_distributed()
    device, is_main = dist_info.device, dist_info.is_main
    args, ckpt = common.load_run(args, explicit, SCRIPT, MAY_CHANGE_ON_RESUME,
                                 keys=("args", "epoch", "backbone", "model", "optimizer", "vocab"))
    per_rank_batch = common.per_process_batch(args.batch_size, dist_info)
    precision = common.resolve_precision(args.precision, device)
    common.seed_everything(args.seed + dist_info.rank)

    corpus = load_corpus(args.data_dir, args.split, args.clean_text, args.subset)
    args.split = corpus.split  # auto -> the split used, so that evaluation finds the same documents
    vocab = build_vocab(corpus.train_texts, args.min_freq)
    if len(vocab) == 1:
        raise common.UserError(f"no word occurs {args.min_freq} times in the {len(corpus.train_texts)} training "
                               f"documents of {args.data_dir}: the corpus is empty for --min_freq {args.min_freq}")
    if ckpt is not None and ckpt["vocab"] != vocab:
        raise common.UserError(f"the training documents of {args.data_dir} give another vocabulary than the checkpoint's")
    args.vocab_size = len(vocab)
    table = None
    if args.augmentation == "replace":
        table = ckpt["replace_ids"] if ckpt is not None else similar_word_table(args, vocab, device)
    augment = Augment(args.augmentation, args.mask_ratio, table)
    documents, test_set = make_datasets(corpus, vocab)
    if len(documents) // dist_info.world_size < per_rank_batch:
        raise common.UserError(f"the training split has {len(documents)} documents, fewer than one batch of "
                               f"{args.batch_size}; lower --batch_size")
    loader = common.train_loader(common.TwoViews(documents, augment), per_rank_batch, dist_info, args.workers,
                                 args.seed, collate_fn=documents.collate_fn)
    mean_train_set = documents.with_transform(augment)  # one augmented view per document (the original)

    model = common.sync_batchnorm(build_model(args).to(device), dist_info, args.sync_bn)
    optimizer = build_optimizer(model, args)
    scaler = common.grad_scaler(device, precision)
    start_epoch = common.restore_training(ckpt, model, optimizer, scaler, dist_info) if ckpt is not None else 0
    net = common.data_parallel(model, dist_info)

    metrics = None
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        common.write_args(args, args.out_dir)
        common.write_text(os.path.join(args.out_dir, "vocab.txt"), "".join(w + "\n" for w in vocab))
        if table is not None:
            with common.atomic_path(os.path.join(args.out_dir, "replace_ids.npy")) as tmp:
                np.save(tmp, table.numpy())
        metrics = common.MetricsCSV(os.path.join(args.out_dir, "metrics.csv"),
                                    ["epoch", "loss", "lr", "docs_per_sec", "epoch_seconds", "mean_top1"],
                                    resume_epoch=start_epoch if ckpt is not None else None)
        print(f"{SCRIPT}: {len(documents)} training / {len(test_set)} test documents ({corpus.split} split), "
              f"{len(vocab)} words, {args.augmentation} {args.mask_ratio}, {dist_info.world_size} process(es) x "
              f"{per_rank_batch} documents, lr {scaled_lr(args.lr, args.batch_size, args.lr_scaling):.4g}, "
              f"{precision} on {device}, epochs {start_epoch}..{args.epochs}")

    def evaluate(epoch):
        model.eval()
        return mean_classifier_accuracy(model, mean_train_set, test_set, dist_info, args.eval_batch_size,
                                        args.workers, precision, seed=args.seed + 1000 * epoch + dist_info.rank)

    def save(epoch):
        common.save_training_checkpoint(os.path.join(args.out_dir, "last.pt"), SCRIPT, args, epoch, model,
                                        optimizer, scaler, dist_info, vocab=vocab, replace_ids=table,
                                        classes=corpus.classes)

    if args.epochs == 0 and ckpt is None:  # evaluate the untrained model (a baseline)
        row = {"epoch": 0, "mean_top1": evaluate(0)}
        if is_main:
            metrics.write(row)
            print(f"epoch 0 (untrained): mean-classifier top-1 {row['mean_top1']:.2f}")
        save(0)
    if ckpt is not None and start_epoch >= args.epochs and is_main:
        print(f"the checkpoint has already trained {start_epoch} epochs; give --epochs above that to continue")
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        start = time.time()
        stats = train_one_epoch(net, loader, optimizer, scaler, args, epoch, dist_info, precision)
        seconds = time.time() - start
        row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": stats["lr"], "epoch_seconds": seconds,
               "docs_per_sec": len(loader) * args.batch_size / seconds}
        if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            row["mean_top1"] = evaluate(epoch + 1)
        if is_main:
            metrics.write(row)
            acc = f" mean-classifier top-1 {row['mean_top1']:.2f}" if "mean_top1" in row else ""
            print(f"epoch {epoch + 1}/{args.epochs} loss {stats['loss']:.4f} {row['docs_per_sec']:.0f} docs/s{acc}")
        save(epoch + 1)
    common.cleanup_distributed()


# ------------------------------------------------------------------------------------------------
# `build`: the similar-word table
# ------------------------------------------------------------------------------------------------

def build(args):
    """Vocabulary of the training CSV, vectors of its words, top-k neighbours, saved as .npy."""
    texts, labels = read_ag_news(args.train)
    if args.split == "carved":
        texts = [texts[i] for i in carve_split(labels)[0]]
    if args.clean_text:
        texts = [clean_ag_news(t) for t in texts]
    vocab = build_vocab(texts, args.min_freq)
    if len(vocab) == 1:
        raise common.UserError(f"no word occurs {args.min_freq} times in the {len(texts)} training documents of "
                               f"{args.train}: the corpus is empty for --min_freq {args.min_freq}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    start = time.time()
    words, vectors = read_vectors(args.vectors, vocab, progress=sys.stderr.isatty())
    read_seconds = time.time() - start
    try:
        table = similar_words(vocab, words, vectors, args.k, device, args.block_size or None)
    except ValueError as err:
        raise common.UserError(f"{args.vectors}: {err}") from None
    with common.atomic_path(args.out) as tmp, open(tmp, "wb") as f:
        np.save(f, table)
    print(f"{SCRIPT}: {len(texts)} training documents, vocabulary {len(vocab)} words (min count {args.min_freq}), "
          f"{len(words)} with a vector of dimension {vectors.shape[1]}; read in {read_seconds:.1f} s, neighbours in "
          f"{time.time() - start - read_seconds:.1f} s on {device}; wrote {args.out} (int64 {table.shape})")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser():
    """The parser and its two sub-parsers, {"build": ..., "train": ...}."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog=SCRIPT, formatter_class=fmt,
                                description="AG News contrastive learning with erase / similar-word replace "
                                            "augmentations (Nozawa & Sato, NeurIPS 2021).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,train}")

    b = sub.add_parser("build", formatter_class=fmt, help="write the similar-word table (ag_replace_ids.npy)",
                       description="Top-k cosine neighbours of every vocabulary word among the vocabulary words "
                                   "that have a pre-trained vector; int64 (|V|, k), ascending similarity.")
    g = b.add_argument_group("data")
    g.add_argument("--vectors", required=True, help="fastText .vec (header line) or GloVe .txt (no header) word vectors")
    g.add_argument("--train", default="data/ag_news_csv/train.csv", help="AG News training CSV: the vocabulary's documents")
    g.add_argument("--split", default="original", choices=["original", "carved"],
                   help="original: every row of --train; carved: --train is test.csv and the vocabulary comes from "
                        "its carved training part (what `train --split carved` trains on)")
    g.add_argument("--clean_text", action="store_true", help="undo AG News's #39; / &lt; / backslash leftovers (as `train --clean_text`)")
    g.add_argument("--min_freq", type=int, default=5, help="minimum count of a vocabulary word")
    g = b.add_argument_group("table")
    g.add_argument("--k", type=int, default=5, help="neighbours per word")
    g.add_argument("--out", default="ag_replace_ids.npy", help="output .npy file")
    g.add_argument("--device", default="auto", help="device of the similarity blocks (auto: cuda if available)")
    g.add_argument("--block_size", type=int, default=0, help="rows per similarity block (0: about 128 MiB of float64)")

    t = sub.add_parser("train", formatter_class=fmt, help="contrastive pre-training of the fastText-style encoder",
                       description="SimCLR (NT-Xent) on AG News with erase or replace augmentation; "
                                   "mean-classifier test accuracy every epoch.")
    g = t.add_argument_group("data")
    g.add_argument("--data_dir", default="data/ag_news_csv", help="folder with train.csv, test.csv (and classes.txt)")
    g.add_argument("--split", default="auto", choices=["auto", "original", "carved"],
                   help="original: train.csv / test.csv; carved: within each class of test.csv every 5th document "
                        "is held out for testing, the rest is the training split; auto: original when train.csv "
                        "exists (args.json records the resolved split)")
    g.add_argument("--clean_text", action="store_true", help="undo AG News's #39; / &lt; / backslash leftovers before "
                                                             "tokenising (the original kept them)")
    g.add_argument("--min_freq", type=int, default=5, help="minimum count of a vocabulary word in the training split")
    g.add_argument("--subset", type=int, default=0,
                   help="train on N documents evenly spaced through the training split (0: all); the vocabulary comes from them")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per process")
    g = t.add_argument_group("augmentation")
    g.add_argument("--augmentation", default="replace", choices=["replace", "erase"], help="text augmentation of both views")
    g.add_argument("--mask_ratio", type=float, default=0.2, help="probability that a token is erased / replaced, in [0, 1)")
    g.add_argument("--replace_ids", default="", help="similar-word table from `build` (replace)")
    g.add_argument("--vectors", default="", help="or: word vectors to compute the table from at start-up (replace)")
    g.add_argument("--k", type=int, default=5, help="neighbours per word when computing the table from --vectors")
    g = t.add_argument_group("model and loss")
    g.add_argument("--embedding_dim", type=int, default=50, help="word-embedding and head dimension")
    g.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature t")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="SyncBatchNorm across GPU processes under torchrun")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="total epochs (0: only evaluate the initial model)")
    g.add_argument("--batch_size", type=int, default=512, help="GLOBAL batch of documents (K+1) over all processes")
    g.add_argument("--lr", type=float, default=1.0, help="base learning rate, scaled by --lr_scaling")
    g.add_argument("--lr_scaling", default="sqrt", choices=["linear", "sqrt"],
                   help="sqrt: lr * sqrt(batch) (the original yaml's default); linear: lr * batch / 256 "
                        "(the paper's grid tried both, with --lr 1.0 and 0.1)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=0.0, help="weight decay (folded into LARC)")
    g.add_argument("--trust_coefficient", type=float, default=1e-3, help="LARC trust coefficient")
    g.add_argument("--warmup_epochs", type=float, default=2.0, help="linear warm-up from 0, per step; then cosine to 0")
    g = t.add_argument_group("system and logging")
    g.add_argument("--precision", default="auto", choices=common.PRECISIONS,
                   help="autocast for the model: auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    g.add_argument("--seed", type=int, default=7, help="random seed (offset by the process rank)")
    g.add_argument("--out_dir", default="results/nlp_similar_words",
                   help="where args.json, metrics.csv, last.pt, vocab.txt and replace_ids.npy go")
    g.add_argument("--resume", default="", help="continue from this last.pt up to --epochs (the total)")
    g.add_argument("--eval_every", type=int, default=1, help="mean classifier on the test split every N epochs (0: never)")
    g.add_argument("--eval_batch_size", type=int, default=1024, help="batch of the mean-classifier feature passes")
    return p, {"build": b, "train": t}


def check_args(parser, args):
    """Reject flag values the loop cannot use, argparse-style (exit status 2)."""
    if args.min_freq < 1 or args.k < 1:
        parser.error(f"--min_freq and --k must be >= 1, got {args.min_freq} and {args.k}")
    if args.command == "build":
        if args.block_size < 0:
            parser.error(f"--block_size must be >= 0, got {args.block_size}")
        return
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.batch_size < 2:
        parser.error(f"--batch_size must be >= 2 (each document needs a negative), got {args.batch_size}")
    for name in ("epochs", "workers", "eval_every", "subset"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or args.trust_coefficient <= 0:
        parser.error("--lr and --trust_coefficient must be > 0, --weight_decay and --warmup_epochs >= 0")
    if args.embedding_dim < 1 or args.eval_batch_size < 1:
        parser.error("--embedding_dim and --eval_batch_size must be >= 1")
    if args.replace_ids and args.vectors:
        parser.error("give --replace_ids or --vectors, not both")
    if (args.replace_ids or args.vectors) and args.augmentation != "replace":
        parser.error("--replace_ids and --vectors are for --augmentation replace")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    check_args(commands[args.command], args)
    with common.exit_on_user_error(SCRIPT):
        if args.command == "build":
            build(args)
        else:
            train(args, common.explicit_flags(commands["train"], argv[argv.index("train") + 1:]))


if __name__ == "__main__":
    main()

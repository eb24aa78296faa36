"""nlp_similar_words.py: tokeniser, vocabulary, AG News CSV, word vectors, the similar-word table,
the two text augmentations, the model, and `train` end to end on a split carved out of
../shared/data/ag_news/test.csv (the AG News train.csv is not available offline)."""
import copy
import csv
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import common
import nlp_similar_words as nlp
from conftest import DATA, assert_one_line_error, run_script

AG = os.path.join(DATA, "ag_news")
GLOVE = os.path.join(DATA, "word_vectors", "glove.6B.50d.10k.txt")
TRAIN = ["train", "--data_dir", AG, "--batch_size", "128", "--workers", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Tokeniser, vocabulary, CSV
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,tokens", [
    ('He said "Hi!" (twice); it\'s 3.5: ok<br />Yes, no?',
     ["he", "said", "hi", "!", "(", "twice", ")", "it", "'", "s", "3", ".", "5", "ok", "yes", ",", "no", "?"]),
    ("A\tB\n  C   D ", ["a", "b", "c", "d"]),
    ("<BR />x<br/>y", ["x<br/>y"]),                       # lower-cased first; only "<br />" is a break
    ("U.S.-based firm's #36;10 it#39;s a\\b", ["u", ".", "s", ".", "-based", "firm", "'", "s", "#36", "10",
                                               "it#39", "s", "a\\b"]),
    ("", []),
])
def test_tokenize_follows_basic_english(text, tokens):
    assert nlp.tokenize(text) == tokens


def test_clean_ag_news_undoes_the_escaping_leftovers():
    assert nlp.clean_ag_news("it#39;s  #36;10 &lt;TXN.N&gt; \\$1B second\\team #151; &amp;") == \
        "it's  $10 <TXN.N> $1B second team \u2014 &"


def test_build_vocab_order_min_count_and_unk():
    texts = ["b a c a b a d", "c b <unk> <unk> e", ["e", "d", "a"]]  # strings or token lists
    # counts: a 4, b 3, c 2, d 2, e 2; <unk> is not counted
    assert nlp.build_vocab(texts, min_freq=2) == ["a", "b", "c", "d", "e", "<unk>"]
    assert nlp.build_vocab(texts, min_freq=3) == ["a", "b", "<unk>"]
    assert nlp.build_vocab(texts, min_freq=5) == ["<unk>"]
    assert nlp.build_vocab(["Zeta, alpha."], min_freq=1) == [",", ".", "alpha", "zeta", "<unk>"]
    ids, offsets = nlp.encode(["a zzz b", "", "e"], ["a", "b", "e", "<unk>"])
    assert ids.tolist() == [0, 3, 1, 2] and offsets.tolist() == [0, 3, 3, 4]


def test_read_ag_news(tmp_path):
    path = write(tmp_path / "x.csv", '"1","Title one","Desc with ""quotes"", commas and a back\\slash"\n'
                                     '\n"3","T2","D2"\n')
    texts, labels = nlp.read_ag_news(path)
    assert texts == ['Title one Desc with "quotes", commas and a back\\slash', "T2 D2"] and labels == [0, 2]
    texts, labels = nlp.read_ag_news(os.path.join(AG, "test.csv"))
    assert len(texts) == 7600 and sorted(set(labels)) == [0, 1, 2, 3]
    assert labels[:3] == [2, 3, 3] and texts[0].startswith("Fears for T N pension after talks Unions representing")


@pytest.mark.parametrize("content,fragment", [
    ('"1","title","description"\n"2","only a title"\n', "line 2: 2 column(s)"),
    ("1\ta tab-separated row\n", "line 1: 1 column(s)"),
    ("class,title,description\n1,a,b\n", "line 1: the class 'class' is not an integer"),
    ('"0","a","b"\n', "not an integer >= 1"),
])
def test_read_ag_news_rejects_wrong_columns(tmp_path, content, fragment):
    with pytest.raises(common.UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        nlp.read_ag_news(write(tmp_path / "bad.csv", content))


def test_carve_split_is_stratified_and_deterministic():
    labels = nlp.read_ag_news(os.path.join(AG, "test.csv"))[1]
    train, test = nlp.carve_split(labels)
    assert len(train) == 6080 and len(test) == 1520 and sorted(train + test) == list(range(7600))
    for c in range(4):
        rows = [i for i, y in enumerate(labels) if y == c]
        assert [i for i in test if labels[i] == c] == rows[4::5]  # the 5th, 10th, ... of each class
        assert sum(labels[i] == c for i in train) == 1520
    assert nlp.carve_split([0, 1, 0, 0, 1, 0, 0, 1], every=2) == ([0, 1, 3, 6, 7], [2, 4, 5])


def test_load_corpus_splits_and_classes(tmp_path):
    carved = nlp.load_corpus(AG)  # no train.csv here: auto -> carved
    assert carved.split == "carved" and len(carved.train_texts) == 6080 and len(carved.test_texts) == 1520
    assert carved.classes == ["World", "Sports", "Business", "Sci/Tech"]
    write(tmp_path / "train.csv", '"1","a","b"\n"2","c","d#39;s"\n')
    write(tmp_path / "test.csv", '"2","e","f"\n')
    original = nlp.load_corpus(str(tmp_path), clean_text=True)
    assert original.split == "original" and original.train_texts == ["a b", "c d's"] and original.test_labels == [1]
    assert original.classes == ["0", "1"]


# ------------------------------------------------------------------------------------------------
# Word vectors and the similar-word table
# ------------------------------------------------------------------------------------------------

def test_vec_header_never_becomes_a_word(tmp_path):
    # The header "3 2" starts with "3", a vocabulary word (the original code relied on it not being one).
    path = write(tmp_path / "v.vec", "3 2\nthe 0.5 -1\n3 1.25 2 \nzebra 0 1\n")
    words, vectors = nlp.read_vectors(path, vocab=["3", "the"])
    assert words == ["the", "3"] and vectors.dtype == np.float64
    np.testing.assert_array_equal(vectors, [[0.5, -1.0], [1.25, 2.0]])
    words, _ = nlp.read_vectors(path)
    assert words == ["the", "3", "zebra"]


def test_glove_without_header_duplicates_and_filter(tmp_path):
    path = write(tmp_path / "g.txt", "2 0.1 0.2 0.3\nthe 1 2 3\nof 4 5 6\nthe 7 8 9\n")  # no header, a number word
    words, vectors = nlp.read_vectors(path)
    assert words == ["2", "the", "of"]  # "2 0.1 0.2 0.3" is a word line, the first "the" wins
    np.testing.assert_array_equal(vectors[1], [1.0, 2.0, 3.0])
    words, vectors = nlp.read_vectors(GLOVE, vocab=["monday", "the", "notaword"])
    assert words == ["the", "monday"] and vectors.shape == (2, 50) and vectors[0, 0] == 0.418


@pytest.mark.parametrize("content,fragment", [
    ("the 0.1 0.2\nof 0.3\n", "line 2: 'of' has 1 values, but the file's dimension is 2"),
    ("10 3\nthe 0.1 0.2\n", "line 2: 'the' has 2 values, but the file's dimension is 3"),
    ("the 0.1 x\n", "line 1: the values of 'the' are not numbers"),
    ("", "holds no word vectors"),
])
def test_read_vectors_errors(tmp_path, content, fragment):
    with pytest.raises(common.UserError, match=fragment):
        nlp.read_vectors(write(tmp_path / "bad.vec", content), vocab=["the", "of"])
    # lines of words outside the vocabulary are not parsed, so they cannot be wrong
    assert nlp.read_vectors(write(tmp_path / "ok.vec", "the 1 2\nother 3\nof 4 5\n"), vocab=["the", "of"])[0] == ["the", "of"]


def reference_table(vocab, words, vectors, k):
    """The original code, densely: float64 cosine matrix of vocabulary words with vectors, minus 2 on
    the diagonal, argsort, last k; identity rows for the others (and <unk>)."""
    stoi = {w: i for i, w in enumerate(vocab)}
    found = [(w, v) for w, v in zip(words, vectors) if w in stoi and w != "<unk>"]
    x = np.array([v for _, v in found], dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    top = np.argsort(x @ x.T - 2 * np.eye(len(x)), axis=1)[:, -k:]
    table = np.repeat(np.arange(len(vocab))[:, None], k, axis=1)
    for row, (w, _) in enumerate(found):
        table[stoi[w]] = [stoi[found[j][0]] for j in top[row]]
    return table


@pytest.mark.parametrize("block_size", [None, 1, 7, 1000])
def test_blocked_topk_equals_dense_float64_reference(block_size):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(80)] + ["<unk>"]
    # words in the vector file: 60 of the vocabulary (in another order), 30 distractors and <unk>
    words = [f"w{i}" for i in rng.permutation(80)[:60]] + [f"x{i}" for i in range(30)] + ["<unk>"]
    words = [words[i] for i in rng.permutation(len(words))]
    vectors = rng.normal(size=(len(words), 16))
    table = nlp.similar_words(vocab, words, vectors, k=5, block_size=block_size)
    assert table.dtype == np.int64 and table.shape == (81, 5)
    np.testing.assert_array_equal(table, reference_table(vocab, words, vectors, 5))
    missing = [i for i, w in enumerate(vocab) if w not in words or w == "<unk>"]
    assert len(missing) == 21
    for i in range(81):
        assert (table[i] == i).all() if i in missing else (i not in table[i] and not set(table[i]) & set(missing))


def test_last_column_is_the_nearest_and_clusters():
    angles = {"a": 0, "b": 10, "c": 25, "d": 45, "e": 70, "f": 100, "g": 180}
    vocab = list(angles) + ["<unk>"]
    vectors = [[math.cos(math.radians(t)), math.sin(math.radians(t))] for t in angles.values()]
    table = nlp.similar_words(vocab, list(angles), vectors, k=5)
    named = [[vocab[j] for j in row] for row in table]
    assert named[0] == ["f", "e", "d", "c", "b"]        # ascending similarity: b (10 degrees) last
    assert named[6] == ["b", "c", "d", "e", "f"]        # g at 180 degrees: f is the nearest
    assert named[7] == ["<unk>"] * 5
    # synthetic clusters: every neighbour is in the word's own cluster
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    words = [f"c{c}_{i}" for c in range(3) for i in range(8)]
    vectors = np.repeat(centres, 8, axis=0) + 0.05 * rng.normal(size=(24, 16))
    table = nlp.similar_words(words, words, vectors, k=5)
    assert all(words[j][:2] == words[i][:2] for i in range(24) for j in table[i])
    with pytest.raises(ValueError, match="only 3 vocabulary words have vectors"):
        nlp.similar_words(words, words[:3], vectors[:3], k=5)
    assert (nlp.similar_words(words, ["nothing"], [[1.0]], k=2) == np.arange(24)[:, None]).all()


def test_build_on_real_glove_finds_checkable_neighbours(tmp_path, capsys):
    out = tmp_path / "ag_replace_ids.npy"
    nlp.main(["build", "--vectors", GLOVE, "--train", os.path.join(AG, "test.csv"), "--split", "carved",
              "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    table = np.load(out)
    vocab = nlp.build_vocab(nlp.load_corpus(AG, "carved").train_texts)
    assert table.dtype == np.int64 and table.shape == (len(vocab), 5) == (5706, 5)
    names = {w: [vocab[j] for j in table[i]] for i, w in enumerate(vocab)}
    days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    for day in days:
        assert set(names[day][1:]) <= set(days) - {day}, (day, names[day])  # the 4 nearest are days
    assert names["saturday"][-1] == "sunday" and names["sunday"][-1] == "saturday"
    months = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
              "november", "december"]
    assert set(names["january"]) <= set(months) and set(names["two"]) <= {"three", "four", "five", "six", "seven", "eight"}
    for word in ("#39", "<unk>"):  # not in GloVe (#39 is AG News's broken apostrophe), and the unknown word
        assert names[word] == [word] * 5
    ident = (table == np.arange(len(vocab))[:, None]).all(axis=1)
    assert 900 < ident.sum() < 1100 and not any(i in table[i] for i in np.flatnonzero(~ident))


# ------------------------------------------------------------------------------------------------
# Augmentations, data sets, model
# ------------------------------------------------------------------------------------------------

def test_ratio_zero_is_the_identity_and_lengths():
    torch.manual_seed(0)
    tokens = torch.randint(50, (300,))
    table = torch.randint(50, (50, 5))
    assert torch.equal(nlp.erase(tokens, 0.0), tokens) and torch.equal(nlp.replace(tokens, table, 0.0), tokens)
    for ratio in (0.2, 0.5, 0.9):
        assert nlp.replace(tokens, table, ratio).shape == tokens.shape
        assert nlp.erase(tokens, ratio).shape[0] <= tokens.shape[0]
    empty = torch.zeros(0, dtype=torch.long)
    assert nlp.replace(empty, table, 0.2).shape == (0,) and nlp.erase(empty, 0.2).shape == (0,)


def test_changed_fraction_matches_the_ratio():
    n, k, ratio = 20000, 5, 0.2
    sigma4 = 4 * math.sqrt(n * ratio * (1 - ratio))
    tokens = torch.arange(n)
    table = n + torch.arange(n * k).view(n, k)  # candidate ids that reveal their source and column
    torch.manual_seed(1)
    out = nlp.replace(tokens, table, ratio)
    replaced = out >= n
    masked = int(replaced.sum())
    assert abs(masked - n * ratio) < sigma4
    assert not replaced[: n - masked].any()                      # kept tokens first ...
    kept = out[: n - masked]
    assert torch.equal(kept, kept.sort().values)                 # ... in their order
    source, column = (out[replaced] - n) // k, (out[replaced] - n) % k
    assert torch.equal(source, source.sort().values)             # replacements in their tokens' order
    assert sorted(kept.tolist() + source.tolist()) == list(range(n))
    counts = torch.bincount(column, minlength=k).double()
    assert ((counts - masked / k).abs() < 4 * math.sqrt(masked / k)).all()  # uniform over the k candidates
    erased = n - nlp.erase(tokens, ratio).shape[0]
    assert abs(erased - n * ratio) < sigma4
    torch.manual_seed(2)
    out = nlp.replace(tokens[:200], table, 0.9999)               # (the original asserts ratio < 1)
    assert (out >= n).all() and all(int(o) in table[int(t)] for o, t in zip(out, tokens[:200]))


def test_augmentation_is_seeded_by_torch_and_differs_per_worker():
    tokens, table = torch.arange(100), torch.randint(100, (100, 5))
    torch.manual_seed(3)
    a = nlp.replace(tokens, table, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, nlp.replace(tokens, table, 0.3))
    assert not torch.equal(a, nlp.replace(tokens, table, 0.3))
    # Spec pitfall 9: DataLoader workers must not replay one random stream. Eight identical documents,
    # two workers, one batch of 4 each: the two batches must differ.
    ids = torch.arange(40).repeat(8)
    dataset = nlp.TextDataset(ids, range(0, 321, 40), [0] * 8, ["x"], 40, nlp.Augment("erase", 0.5))
    torch.manual_seed(0)
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=dataset.collate_fn))
    assert len(batches) == 2 and not torch.equal(batches[0][0], batches[1][0])


def test_text_dataset_and_collate():
    ids, offsets = nlp.encode(["b a", "", "a a a c"], ["a", "b", "<unk>"])
    dataset = nlp.TextDataset(ids, offsets, [1, 0, 1], ["x", "y"], pad_id=3)
    tokens, labels = dataset.collate_fn([dataset[i] for i in range(3)])
    assert tokens.tolist() == [[1, 0, 3, 3], [3, 3, 3, 3], [0, 0, 0, 2]] and labels.tolist() == [1, 0, 1]
    pairs = common.TwoViews(dataset, nlp.Augment("erase", 0.0))
    x1, x2, labels, index = dataset.collate_fn([pairs[2], pairs[1]])
    assert torch.equal(x1, x2) and x1.tolist() == [[0, 0, 0, 2]] + [[3] * 4] and index.tolist() == [2, 1]
    assert dataset.collate_fn([dataset[1]])[0].tolist() == [[3]]  # an empty batch still has one column
    changed = dataset.with_transform(nlp.Augment("replace", 0.9999, torch.tensor([[1], [0], [2]])))
    assert changed[0][0].tolist() == [0, 1] and dataset[0][0].tolist() == [1, 0] and len(changed) == 3


def test_model_mean_excludes_padding_and_empty_documents_are_zero():
    model = nlp.build_model({"vocab_size": 10, "embedding_dim": 4})
    weight = model.backbone.embedding.weight
    x = torch.tensor([[1, 2, 10, 10], [10, 10, 10, 10], [3, 3, 3, 4]])
    out = model.backbone(x)
    torch.testing.assert_close(out[0], weight[[1, 2]].mean(0))
    torch.testing.assert_close(out[2], weight[[3, 3, 3, 4]].mean(0))
    assert (out[1] == 0).all() and (weight[10] == 0).all() and model.backbone.out_dim == 4
    out.sum().backward()
    assert (weight.grad[10] == 0).all()
    head = model.projector
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].bias is not None and head[3].bias is None and head[3].weight.shape == (4, 4)
    z1, z2 = model(x, x[:2])
    assert z1.shape == (3, 4) and z2.shape == (2, 4)


def test_mean_classifier_matches_a_dense_reference():
    torch.manual_seed(0)
    ids, offsets = nlp.encode(["a b", "b c", "c d", "d a", "a", "c", "b d"], ["a", "b", "c", "d", "<unk>"])
    docs = nlp.TextDataset(ids, offsets, [0, 0, 1, 1, 2, 2, 1], ["p", "q", "r"], pad_id=5)
    model = nlp.build_model({"vocab_size": 5, "embedding_dim": 3}).eval()
    dist_info = common.setup_distributed()
    state = torch.get_rng_state()
    acc = nlp.mean_classifier_accuracy(model, docs, docs, dist_info, batch_size=3, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # evaluation leaves the training RNG alone
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.projector(model.backbone(docs.collate_fn([docs[i] for i in range(7)])[0])), dim=1).double()
    labels = torch.tensor(docs.targets)
    mu = torch.stack([z[labels == c].mean(0) for c in range(3)])  # not re-normalised
    assert acc == pytest.approx(100.0 * ((z @ mu.T).argmax(1) == labels).double().mean().item())


# ------------------------------------------------------------------------------------------------
# `train` end to end on the carved AG News split
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """3 epochs of the replace augmentation with the real GloVe vectors (table computed at start-up)."""
    out = tmp_path_factory.mktemp("nlp") / "run3"
    nlp.main([*TRAIN, "--vectors", GLOVE, "--epochs", "3", "--out_dir", str(out)])
    return out


def test_train_writes_the_run_directory_and_learns(run3, tmp_path):
    rows = read_csv(run3 / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for column in ("loss", "lr", "docs_per_sec", "epoch_seconds", "mean_top1"):
        assert all(r[column] != "" for r in rows), column
    baseline = tmp_path / "untrained"
    nlp.main([*TRAIN, "--vectors", GLOVE, "--epochs", "0", "--out_dir", str(baseline)])
    untrained = float(read_csv(baseline / "metrics.csv")[0]["mean_top1"])
    trained = float(rows[-1]["mean_top1"])
    # chance is 25 %; measured: untrained 34.3, after 3 epochs 63.6 (deterministic on the CPU)
    assert trained > 55 and trained > untrained + 20, (untrained, [r["mean_top1"] for r in rows])
    assert float(rows[0]["loss"]) > float(rows[-1]["loss"])
    args = json.loads((run3 / "args.json").read_text())
    assert args["split"] == "carved" and args["vocab_size"] == 5706 and args["lr_scaling"] == "sqrt"
    assert (run3 / "vocab.txt").read_text(encoding="utf-8").split("\n")[:3] == [".", "the", ","]


def test_resume_continues_exactly(run3, tmp_path):
    resumed = tmp_path / "resumed"
    nlp.main([*TRAIN, "--vectors", GLOVE, "--epochs", "2", "--out_dir", str(resumed)])
    nlp.main(["train", "--resume", str(resumed / "last.pt"), "--epochs", "3"])
    a = torch.load(resumed / "last.pt", weights_only=True)
    b = torch.load(run3 / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows, straight = read_csv(resumed / "metrics.csv"), read_csv(run3 / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [(r["loss"], r["mean_top1"]) for r in rows] == [(r["loss"], r["mean_top1"]) for r in straight]


def test_checkpoint_interface_for_the_evaluation_scripts(run3, tmp_path):
    ckpt = torch.load(run3 / "last.pt", weights_only=True)
    assert ckpt["script"] == "nlp_similar_words.py" and ckpt["epoch"] == 3 and len(ckpt["rng"]) == 1
    for key in ("args", "backbone", "model", "optimizer", "scaler", "vocab", "replace_ids", "classes"):
        assert key in ckpt, key
    vocab, table = ckpt["vocab"], ckpt["replace_ids"]
    assert len(vocab) == ckpt["args"]["vocab_size"] and vocab[-1] == "<unk>" and table.shape == (len(vocab), 5)
    np.testing.assert_array_equal(np.load(run3 / "replace_ids.npy"), table.numpy())
    model = common.model_from_checkpoint(ckpt)  # what linear_eval.py and bound.py do
    assert not model.training and torch.equal(model.backbone.embedding.weight, ckpt["backbone"]["embedding.weight"])
    train, test = nlp.eval_datasets(ckpt["args"], train_augment=True)  # vocabulary and table from the run dir
    assert len(train) == 6080 and len(test) == 1520 and train.classes[1] == "Sports" and len(train.targets) == 6080
    clean = train.with_transform(None)
    assert all(train[i][0].shape == clean[i][0].shape for i in range(50))  # replace keeps the length
    assert sum(not torch.equal(train[i][0], clean[i][0]) for i in range(50)) > 25
    augmented_test = copy.copy(test)  # how bound.py augments the test split: the train split's transform
    augmented_test.transform = train.transform
    assert sum(not torch.equal(augmented_test[i][0], test[i][0]) for i in range(50)) > 25
    x, y = test.collate_fn([test[i] for i in range(8)])
    assert x.dtype == torch.long and x.shape[0] == 8 and y.tolist() == test.targets[:8]
    with torch.no_grad():
        assert model.projector(model.backbone(x)).shape == (8, 50)
    # a moved run directory: the vocabulary and table come from the checkpoint instead
    moved = dict(ckpt["args"], out_dir=str(tmp_path / "gone"), replace_ids="")
    with pytest.raises(common.UserError, match="similar-word table was not found"):
        nlp.eval_datasets(moved, train_augment=True)
    train2, _ = common.run_datasets(dict(ckpt, args=moved), train_augment=True)  # what the evaluators call
    assert torch.equal(train2.with_transform(None)[5][0], clean[5][0])
    with pytest.raises(common.UserError, match="do not give the run's vocabulary"):
        nlp.eval_datasets(moved, checkpoint={"vocab": vocab[1:]})


def ddp_worker(rank, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    nlp.main(argv)


def test_two_processes_erase_bf16(tmp_path):
    # The torchrun code path (gloo, DDP, gathered negatives, the mean classifier split over ranks) in
    # two processes forked from this one, which saves the two fresh torch imports of torchrun.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    argv = [*TRAIN, "--augmentation", "erase", "--precision", "bf16", "--epochs", "1", "--out_dir", str(out)]
    mp.start_processes(ddp_worker, args=(port, argv), nprocs=2, start_method="fork")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["replace_ids"] is None
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seed offset by rank
    row = read_csv(out / "metrics.csv")[0]
    assert float(row["mean_top1"]) > 25 and 0 < float(row["loss"]) < 10
    train, _ = nlp.eval_datasets(ckpt["args"], train_augment=True)
    assert train.transform.kind == "erase"
    assert all(train[i][0].shape[0] <= train.with_transform(None)[i][0].shape[0] for i in range(50))


# ------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line
# ------------------------------------------------------------------------------------------------

def assert_exit_2(argv, fragment, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        nlp.main(argv)
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.splitlines()]  # what a terminal shows after progress bars
    lines = [line for line in lines if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("nlp_similar_words.py") and ": error: " in lines[-1] and fragment in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err


@pytest.fixture
def tiny(tmp_path):
    """A one-document training CSV with 'the' and 'of' twice each, and an AG News-like data dir."""
    corpus = write(tmp_path / "train.csv", '"1","the of","the of"\n')
    data = tmp_path / "data"
    data.mkdir()
    write(data / "test.csv", "")
    return corpus, str(data)


def test_bad_input_exits_with_one_line(tiny, tmp_path, capsys):
    corpus, empty_dir = tiny
    bad_vec = write(tmp_path / "bad.vec", "the 0.1 0.2\nof 0.3\n")
    build = ["build", "--train", corpus, "--min_freq", "1", "--out", str(tmp_path / "t.npy")]
    assert_exit_2([*build, "--vectors", bad_vec], "inconsistent dimensions", capsys)
    assert_exit_2([*build, "--vectors", str(tmp_path / "missing.vec")], "does not exist", capsys)
    assert_exit_2(["build", "--train", write(tmp_path / "empty.csv", ""), "--vectors", GLOVE], "the corpus is empty", capsys)
    assert_exit_2(["build", "--train", write(tmp_path / "cols.csv", '"1","a","b"\n"2","c"\n'), "--vectors", GLOVE],
                  "line 2: 2 column(s)", capsys)
    assert_exit_2(["train", "--data_dir", empty_dir], "0 training and 0 test documents", capsys)
    assert_exit_2(["train", "--data_dir", str(tmp_path / "nowhere")], "test.csv does not exist", capsys)
    out = ["--out_dir", str(tmp_path / "run")]
    assert_exit_2([*TRAIN, *out], "needs the similar-word table", capsys)
    assert_exit_2([*TRAIN, *out, "--mask_ratio", "1"], "--mask_ratio must be in [0, 1)", capsys)
    assert_exit_2([*TRAIN, *out, "--augmentation", "swap"], "invalid choice", capsys)
    assert_exit_2([*TRAIN, *out, "--replace_ids", x := str(tmp_path / "t.npy"), "--vectors", GLOVE], "not both", capsys)
    np.save(x, np.zeros((3, 5), dtype=np.int64))
    assert_exit_2([*TRAIN, *out, "--replace_ids", x], "expected an integer table of shape (5706, k)", capsys)
    assert_exit_2([*TRAIN, *out, "--augmentation", "erase", "--batch_size", "8000"], "fewer than one batch", capsys)
    assert_exit_2([*TRAIN, *out, "--augmentation", "erase", "--vectors", GLOVE], "are for --augmentation replace", capsys)


def test_bad_checkpoints(run3, tmp_path, capsys):
    last = str(run3 / "last.pt")
    assert_exit_2(["train", "--resume", last, "--augmentation", "erase", "--out_dir", str(tmp_path / "x")],
                  "--augmentation erase differs from the checkpoint's replace", capsys)
    ckpt = torch.load(last, weights_only=True)
    ckpt["script"] = "simclr_debiased.py"
    torch.save(ckpt, tmp_path / "other.pt")
    assert_exit_2(["train", "--resume", str(tmp_path / "other.pt")], "written by simclr_debiased.py", capsys)


def test_bad_input_as_a_process_and_import_without_side_effects(tiny, tmp_path):
    # One fresh interpreter (a torch import costs seconds): importing the script parses nothing, loads
    # nothing and starts no process group; then a bad vector file seen from the shell: exit status 2,
    # one line on stderr, no traceback.
    bad_vec = write(tmp_path / "bad.vec", "the 0.1 0.2\nof 0.3\n")
    code = ("import sys, nlp_similar_words; import torch.distributed as d; assert not d.is_initialized(); "
            "print(sorted(m for m in ('nlp_similar_words', 'common', 'simclr_debiased') if m in sys.modules), "
            "flush=True); sys.argv[0] = 'nlp_similar_words.py'; nlp_similar_words.main()")
    result = run_script("-c", code, "build", "--train", tiny[0], "--min_freq", "1", "--vectors", bad_vec,
                        "--out", str(tmp_path / "t.npy"))
    assert result.stdout.strip() == "['common', 'nlp_similar_words', 'simclr_debiased']", result.stderr
    result.stderr = "\n".join(line.split("\r")[-1] for line in result.stderr.splitlines())  # as a terminal shows it
    assert_one_line_error(result, "line 2: 'of' has 1 values")


def test_help(capsys):
    for argv in (["--help"], ["train", "--help"], ["build", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            nlp.main(argv)
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "GLOBAL batch" in text and "--mask_ratio" in text and "--vectors" in text and "carved" in text


def test_subset_keeps_evenly_spaced_training_documents():
    full = nlp.load_corpus(AG, "carved")
    part = nlp.load_corpus(AG, "carved", subset=600)
    assert len(part.train_texts) == 600 and part.test_texts == full.test_texts
    assert part.train_texts[1] == full.train_texts[len(full.train_texts) // 600]
    assert sorted(set(part.train_labels)) == [0, 1, 2, 3]  # the carved split is class-sorted: every class stays


def test_less_common_train_and_build_flags(tmp_path):
    out = tmp_path / "flags"
    nlp.main([*TRAIN, "--augmentation", "erase", "--subset", "512", "--epochs", "1", "--embedding_dim", "16",
              "--lr_scaling", "linear", "--trust_coefficient", "0.002", "--eval_batch_size", "100", "--clean_text",
              "--out_dir", str(out)])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["backbone"]["embedding.weight"].shape[1] == 16 and ckpt["model"]["projector.3.weight"].shape == (16, 16)
    assert ckpt["args"]["trust_coefficient"] == 0.002 and ckpt["args"]["clean_text"] is True
    # --lr_scaling linear: lr x B / 256; the last step of the only epoch is still in the 2-epoch warm-up
    assert float(read_csv(out / "metrics.csv")[0]["lr"]) < 1.0 * 128 / 256
    vocab_clean = nlp.build_vocab([nlp.clean_ag_news(t) for t in nlp.load_corpus(AG, "carved", subset=512).train_texts])
    assert ckpt["vocab"] == vocab_clean  # --clean_text changed the vocabulary the run used
    table = tmp_path / "t.npy"
    nlp.main(["build", "--vectors", GLOVE, "--train", os.path.join(AG, "test.csv"), "--split", "carved", "--block_size",
              "7", "--device", "cpu", "--out", str(table)])
    reference = tmp_path / "r.npy"
    nlp.main(["build", "--vectors", GLOVE, "--train", os.path.join(AG, "test.csv"), "--split", "carved", "--out",
              str(reference)])
    np.testing.assert_array_equal(np.load(table), np.load(reference))  # blocks of 7 rows give the same table

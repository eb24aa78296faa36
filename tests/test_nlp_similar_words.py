"""nlp_similar_words.py: text pieces, similar-word table, augmentations, NT-Xent, the mean
classifier, and the script end to end on the generated `ag_news` / `word_vectors` fixtures."""
import csv
import json
import math
import os
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import nlp_similar_words as nlp
from conftest import assert_one_line_error, run_script

FAST = ["--batch_size", "32", "--workers", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,tokens", [
    ('He said "Hi!" (twice); it\'s 3.5: ok<br />Yes, no?',
     ["he", "said", "hi", "!", "(", "twice", ")", "it", "'", "s", "3", ".", "5", "ok", "yes", ",", "no", "?"]),
    ("A\tB\n  C   D ", ["a", "b", "c", "d"]),
    ("<BR />x<br/>y", ["x<br/>y"]),                       # lower-cased first; only "<br />" is a break
    ("firm's #36;10 it#39;s a\\b", ["firm", "'", "s", "#36", "10", "it#39", "s", "a\\b"]),
    ("", []),
])
def test_tokenize_follows_basic_english(text, tokens):
    assert nlp.tokenize(text) == tokens


def test_clean_vocab_and_encode():
    assert nlp.clean_ag_news("it#39;s #36;10 &lt;TXN.N&gt; \\$1B second\\team &amp;") == "it's $10 <TXN.N> $1B second team &"
    texts = ["b a c a b a d", "c b <unk> <unk> e", ["e", "d", "a"]]  # counts a 4, b 3, c 2, d 2, e 2
    assert nlp.build_vocab(texts, min_freq=2) == ["a", "b", "c", "d", "e", "<unk>"]
    assert nlp.build_vocab(texts, min_freq=3) == ["a", "b", "<unk>"]
    ids, offsets = nlp.encode(["a zzz b", "", "e"], ["a", "b", "e", "<unk>"])
    assert ids.tolist() == [0, 3, 1, 2] and offsets.tolist() == [0, 3, 3, 4]


def test_read_ag_news_and_its_errors(tmp_path):
    path = write(tmp_path / "x.csv", '"1","Title one","Desc, ""quoted"""\n\n"3","T2","D2"\n')
    assert nlp.read_ag_news(path) == (['Title one Desc, "quoted"', "T2 D2"], [0, 2])
    for content, fragment in [('"1","a","b"\n"2","c"\n', "line 2: 2 column(s)"), ("class,a,b\n", "line 1: the class"),
                              ('"0","a","b"\n', "not an integer >= 1"), ("", "holds no documents")]:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            nlp.read_ag_news(write(tmp_path / "bad.csv", content))
    with pytest.raises(FileNotFoundError, match="nowhere.csv does not exist"):
        nlp.read_ag_news(str(tmp_path / "nowhere.csv"))


# ------------------------------------------------------------------------------------------------
# Word vectors and the similar-word table
# ------------------------------------------------------------------------------------------------

def test_read_vectors(tmp_path):
    # the header "3 2" starts with "3", a vocabulary word: it must still not become one
    path = write(tmp_path / "v.vec", "3 2\nthe 0.5 -1\n3 1.25 2 \nzebra 0 1\nthe 9 9\n")
    words, vectors = nlp.read_vectors(path, vocab=["3", "the"])
    assert words == ["the", "3"] and vectors.dtype == np.float64
    np.testing.assert_array_equal(vectors, [[0.5, -1.0], [1.25, 2.0]])  # the first "the" wins
    assert nlp.read_vectors(path)[0] == ["the", "3", "zebra"]
    assert nlp.read_vectors(write(tmp_path / "g.txt", "2 0.1 0.2 0.3\nof 4 5 6\n"))[0] == ["2", "of"]  # GloVe
    for content, fragment in [("the 0.1 0.2\nof 0.3\n", "line 2: 'of' has 1 values"),
                              ("the 0.1 x\n", "line 1: the values of 'the' are not numbers"), ("", "no word vectors")]:
        with pytest.raises(ValueError, match=fragment):
            nlp.read_vectors(write(tmp_path / "bad.vec", content), vocab=["the", "of"])


def reference_table(vocab, words, vectors, k):
    """The original code, densely: float64 cosines of the vocabulary words with vectors, -2 on the
    diagonal, argsort, last k; identity rows for the others and <unk>."""
    stoi = {w: i for i, w in enumerate(vocab)}
    found = [(w, v) for w, v in zip(words, vectors) if w in stoi and w != "<unk>"]
    x = np.array([v for _, v in found], dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    top = np.argsort(x @ x.T - 2 * np.eye(len(x)), axis=1)[:, -k:]
    table = np.repeat(np.arange(len(vocab))[:, None], k, axis=1)
    for row, (w, _) in enumerate(found):
        table[stoi[w]] = [stoi[found[j][0]] for j in top[row]]
    return table


@pytest.mark.parametrize("block_elements", [1, 7 * 61, 2 ** 24])
def test_blocked_topk_equals_dense_reference(block_elements):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(80)] + ["<unk>"]
    words = [f"w{i}" for i in rng.permutation(80)[:60]] + [f"x{i}" for i in range(30)] + ["<unk>"]
    words = [words[i] for i in rng.permutation(len(words))]
    vectors = rng.normal(size=(len(words), 16))
    table = nlp.similar_words(vocab, words, vectors, k=5, block_elements=block_elements)
    assert table.dtype == np.int64 and table.shape == (81, 5)
    np.testing.assert_array_equal(table, reference_table(vocab, words, vectors, 5))
    missing = [i for i, w in enumerate(vocab) if w not in words or w == "<unk>"]
    for i in range(81):
        assert (table[i] == i).all() if i in missing else (i not in table[i] and not set(table[i]) & set(missing))


def test_last_column_is_the_nearest_and_clusters(word_vectors):
    angles = {"a": 0, "b": 10, "c": 25, "d": 45, "e": 70, "f": 100, "g": 180}
    vocab = list(angles) + ["<unk>"]
    vectors = [[math.cos(math.radians(t)), math.sin(math.radians(t))] for t in angles.values()]
    named = [[vocab[j] for j in row] for row in nlp.similar_words(vocab, list(angles), vectors)]
    assert named[0] == ["f", "e", "d", "c", "b"] and named[6] == ["b", "c", "d", "e", "f"] and named[7] == ["<unk>"] * 5
    from conftest import TOPICS
    vocab = [w for topic in TOPICS for w in topic] + ["absent", "<unk>"]
    table = nlp.similar_words(vocab, *nlp.read_vectors(word_vectors, vocab))
    for i, w in enumerate(vocab[:-2]):  # the fixture's topics are clusters of 6 words: 5 neighbours each
        assert sorted(table[i]) == sorted(j for j in range(i // 6 * 6, i // 6 * 6 + 6) if j != i)
    assert (table[-2:] == np.arange(len(vocab) - 2, len(vocab))[:, None]).all()
    with pytest.raises(ValueError, match="only 3 vocabulary words have vectors"):
        nlp.similar_words(vocab, vocab[:3], np.eye(3), k=5)


# ------------------------------------------------------------------------------------------------
# Augmentations, data set, model
# ------------------------------------------------------------------------------------------------

def test_erase_and_replace():
    n, k, ratio = 20000, 5, 0.2
    sigma4 = 4 * math.sqrt(n * ratio * (1 - ratio))
    tokens, table = torch.arange(n), n + torch.arange(n * k).view(n, k)  # candidates reveal source and column
    assert torch.equal(nlp.erase(tokens, 0.0), tokens) and torch.equal(nlp.replace(tokens, table, 0.0), tokens)
    torch.manual_seed(1)
    out = nlp.replace(tokens, table, ratio)
    replaced = out >= n
    masked = int(replaced.sum())
    assert out.shape == tokens.shape and abs(masked - n * ratio) < sigma4
    assert not replaced[: n - masked].any() and torch.equal(out[: n - masked], out[: n - masked].sort().values)
    source, column = (out[replaced] - n) // k, (out[replaced] - n) % k
    assert torch.equal(source, source.sort().values)  # replacements after the kept tokens, in order
    assert sorted(out[: n - masked].tolist() + source.tolist()) == list(range(n))
    assert ((torch.bincount(column, minlength=k) - masked / k).abs() < 4 * math.sqrt(masked / k)).all()
    kept = nlp.erase(tokens, ratio)
    assert abs(n - kept.shape[0] - n * ratio) < sigma4 and torch.equal(kept, kept.sort().values)
    out = nlp.replace(tokens[:200], table, 0.9999)
    assert (out >= n).all()
    torch.manual_seed(3)
    a = nlp.replace(tokens, table, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, nlp.replace(tokens, table, 0.3))
    # DataLoader workers must not replay one random stream: 8 identical documents, 2 workers
    dataset = nlp.TextDataset(torch.arange(40).repeat(8), torch.arange(0, 321, 40), [0] * 8, 40, partial(nlp.erase, ratio=0.5))
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=dataset.collate))
    assert not torch.equal(batches[0][0], batches[1][0])


def test_dataset_padding_and_model():
    ids, offsets = nlp.encode(["b a", "", "a a a c"], ["a", "b", "c", "<unk>"])
    dataset = nlp.TextDataset(ids, offsets, [1, 0, 1], pad_id=4)
    tokens, labels = dataset.collate([dataset[i] for i in range(3)])
    assert tokens.tolist() == [[1, 0, 4, 4], [4, 4, 4, 4], [0, 0, 0, 2]] and labels.tolist() == [1, 0, 1]
    pairs = nlp.TextDataset(ids, offsets, [1, 0, 1], 4, partial(nlp.erase, ratio=0.0), views=2)
    x1, x2, labels, index = pairs.collate([pairs[2], pairs[1]])
    assert torch.equal(x1, x2) and x1.tolist() == [[0, 0, 0, 2], [4] * 4] and index.tolist() == [2, 1]
    model = nlp.ContrastiveFastText(4, 3)
    weight = model.backbone.embedding.weight
    out = model.backbone(tokens)
    torch.testing.assert_close(out[0], weight[[1, 0]].mean(0))       # the padding id 4 is left out
    torch.testing.assert_close(out[2], weight[[0, 0, 0, 2]].mean(0))
    assert (out[1] == 0).all() and (weight[4] == 0).all()
    assert nlp.head_layout(model.projector) == [["0", "linear", 3, 3, True], ["1", "bn", 3, True], ["2", "relu"],
                                                ["3", "linear", 3, 3, False]]


# ------------------------------------------------------------------------------------------------
# NT-Xent
# ------------------------------------------------------------------------------------------------

def loop_nt_xent(z1, z2, t):
    """SimCLR's loss with Python loops in float64: 2B anchors, 2B - 2 negatives each."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    b, total = z1.shape[0], 0.0
    for i in range(2 * b):
        positive = (i + b) % (2 * b)
        denominator = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * b) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / t) / denominator)
    return total / (2 * b)


@pytest.mark.parametrize("b,t", [(2, 0.5), (5, 0.5), (4, 0.1)])
def test_nt_xent_equals_a_loop_and_gradcheck(b, t):
    g = torch.Generator().manual_seed(b)
    z1, z2 = torch.randn(b, 6, generator=g), torch.randn(b, 6, generator=g)
    assert nlp.nt_xent(z1, z2, t).item() == pytest.approx(loop_nt_xent(z1, z2, t), rel=1e-5)
    assert nlp.nt_xent(z1, z2, t).dtype == torch.float32
    a, c = z1.double().requires_grad_(True), z2.double().requires_grad_(True)
    assert nlp.nt_xent(a, c, t).item() == pytest.approx(loop_nt_xent(z1, z2, t), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: nlp.nt_xent(x, y, t), (a, c))
    # closed form: identical views, orthogonal documents -> log(e^(1/t) + 2B - 2) - 1/t
    eye = torch.eye(b, 8, dtype=torch.float64)
    assert nlp.nt_xent(eye, eye, t).item() == pytest.approx(math.log(math.exp(1 / t) + 2 * b - 2) - 1 / t, rel=1e-6)


def test_larc_and_learning_rate():
    p, zero = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.zeros(2))
    p.grad, zero.grad = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    optimizer = torch.optim.SGD([{"params": [p, zero], "larc_weight_decay": 0.1}], lr=1.0)
    nlp.larc_(optimizer)
    # (g + wd p) * trust ||p|| / (||g|| + wd ||p|| + eps) = ([0, 2] + [0.3, 0.4]) * 1e-3 * 5 / 2.5
    torch.testing.assert_close(p.grad, torch.tensor([0.3, 2.4]) * 2e-3)
    assert zero.grad.tolist() == [1.0, 1.0]  # a zero weight keeps its gradient
    args = nlp.get_parser().parse_args(["--batch_size", "64", "--epochs", "10", "--warmup_epochs", "2"])
    assert nlp.learning_rate(args, 1.0) == pytest.approx(0.5 * 8.0)   # warm-up: half of 1.0 * sqrt(64)
    assert nlp.learning_rate(args, 6.0) == pytest.approx(0.5 * 8.0)   # cosine: half-way from epoch 2 to 10
    args.lr_scaling = "linear"
    assert nlp.learning_rate(args, 2.0) == pytest.approx(64 / 256) and nlp.learning_rate(args, 10.0) == 0


# ------------------------------------------------------------------------------------------------
# Mean classifier
# ------------------------------------------------------------------------------------------------

def is_subsequence(short, long):
    it = iter(long)
    return all(token in it for token in short)


def test_mean_classifier_uses_one_augmented_view_of_train_and_clean_test():
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 30, (12,), generator=gen) for _ in range(24)]
    labels = [i % 3 for i in range(24)]
    offsets = torch.tensor([0] + [12 * (i + 1) for i in range(24)])
    train = nlp.TextDataset(torch.cat(docs), offsets, labels, 30, partial(nlp.erase, ratio=0.3))
    test = nlp.TextDataset(torch.cat(docs[:12]), offsets[:13], labels[:12], 30)
    fed, weights = [], torch.randn(31, 5, generator=gen)

    def encoder(x):  # records every padded batch it sees; features = sum of word vectors
        fed.append(x.clone())
        return (weights[x] * (x != 30)[..., None]).sum(1)

    state = torch.get_rng_state()
    acc = nlp.mean_classifier(encoder, train, test, batch_size=5, device=torch.device("cpu"), seed=4)
    assert torch.equal(state, torch.get_rng_state())  # evaluating leaves the training RNG alone
    seen = [row[row != 30] for batch in fed for row in batch]
    assert len(seen) == 24 + 12
    train_seen, test_seen = seen[:24], seen[24:]
    # train side: one erase draw per document (a sub-sequence, mostly shorter); test side: clean
    assert sum(len(s) < 12 for s in train_seen) >= 18
    assert all(is_subsequence(s.tolist(), d.tolist()) for s, d in zip(train_seen, docs))
    assert all(torch.equal(s, d) for s, d in zip(test_seen, docs))
    # the number: mu_c = mean of normalised train features, not re-normalised; argmax z . mu_c
    z = torch.stack([F.normalize(encoder(s[None]), dim=1)[0] for s in train_seen])
    mu = torch.stack([z[torch.tensor(labels) == c].mean(0) for c in range(3)])
    zt = F.normalize(torch.stack([encoder(d[None])[0] for d in docs[:12]]), dim=1)
    assert acc == pytest.approx(100 * ((zt @ mu.T).argmax(1) == torch.tensor(labels[:12])).double().mean().item())
    fed.clear()
    assert nlp.mean_classifier(encoder, train, test, 5, torch.device("cpu"), seed=4) == acc  # seeded


# ------------------------------------------------------------------------------------------------
# The script end to end
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run3(tmp_path_factory, ag_news, word_vectors):
    """3 epochs of replace with the fixture's word vectors (table computed at start-up)."""
    out = tmp_path_factory.mktemp("nlp") / "run3"
    nlp.main(["--data_dir", ag_news, "--vectors", word_vectors, *FAST, "--epochs", "3", "--out_dir", str(out)])
    return out


def test_run_directory_checkpoint_contract_and_learning(run3, ag_news, word_vectors, tmp_path):
    rows = read_csv(run3 / "metrics.csv")
    assert list(rows[0]) == ["epoch", "loss", "lr", "images_per_sec", "epoch_seconds", "mean_top1"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and all(v != "" for r in rows for v in r.values())
    ckpt = torch.load(run3 / "last.pt", weights_only=True)
    args, vocab = ckpt["args"], ckpt["vocab"]
    assert ckpt["script"] == "nlp_similar_words.py" and ckpt["epoch"] == 3 and ckpt["world_size"] == 1
    for key in ("data_dir", "min_freq", "augmentation", "mask_ratio", "embedding_dim", "vocab_size", "subset", "clean_text"):
        assert key in args, key
    texts = nlp.read_ag_news(os.path.join(ag_news, "train.csv"))[0]
    assert vocab == nlp.build_vocab(texts, 5) and vocab[-1] == "<unk>" and args["vocab_size"] == len(vocab)
    assert ckpt["classes"] == ["0", "1", "2", "3"] and json.loads((run3 / "args.json").read_text()) == args
    table = ckpt["replace_ids"]
    assert table.dtype == torch.int64 and table.shape == (len(vocab), 5)
    np.testing.assert_array_equal(table.numpy(), nlp.similar_words(vocab, *nlp.read_vectors(word_vectors, vocab)))
    np.testing.assert_array_equal(np.load(run3 / "replace_ids.npy"), table.numpy())
    # What linear_eval.py and bound.py do, without this script: rebuild backbone and head
    backbone = nn.Module()
    backbone.embedding = nn.EmbeddingBag(len(vocab) + 1, args["embedding_dim"], mode="mean", padding_idx=len(vocab))
    backbone.load_state_dict(ckpt["backbone"])
    layers = {"linear": lambda i, o, b: nn.Linear(i, o, bias=b), "bn": lambda n, a: nn.BatchNorm1d(n, affine=a),
              "relu": nn.ReLU}
    head = nn.Sequential(*[layers[kind](*sizes) for _, kind, *sizes in ckpt["head"]["layout"]])
    head.load_state_dict(ckpt["head"]["state"])
    model = nlp.ContrastiveFastText(len(vocab), args["embedding_dim"])
    model.load_state_dict(ckpt["model"])
    x = torch.tensor([[0, 3, len(vocab)], [5, len(vocab), len(vocab)]])
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(backbone.embedding(x)), model.eval().projector(model.backbone(x)))
    # it learns: the mean classifier beats the untrained network (measured: 70.0 untrained, then 75/92.5/100)
    nlp.main(["--data_dir", ag_news, "--vectors", word_vectors, *FAST, "--epochs", "0", "--out_dir", str(tmp_path)])
    untrained = read_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in untrained] == ["0"] and untrained[0]["loss"] == ""
    assert float(rows[-1]["mean_top1"]) >= 90 > float(untrained[0]["mean_top1"])
    assert float(rows[0]["loss"]) > float(rows[-1]["loss"])


def test_resume_is_exact(run3, ag_news, word_vectors, tmp_path):
    nlp.main(["--data_dir", ag_news, "--vectors", word_vectors, *FAST, "--epochs", "2", "--out_dir", str(tmp_path)])
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("3,9,9,9,9,9\n")  # a row after the checkpoint's epoch (a crashed run) is dropped
    nlp.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "3"])
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path, run3))
    assert a["epoch"] == b["epoch"] == 3
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(a["rng"][0][0], b["rng"][0][0])
    strip = [{k: v for k, v in r.items() if k not in ("images_per_sec", "epoch_seconds")} for r in read_csv(run3 / "metrics.csv")]
    assert [{k: v for k, v in r.items() if k in strip[0]} for r in read_csv(tmp_path / "metrics.csv")] == strip


def test_erase_subset_clean_text_and_a_non_finite_loss(ag_news, tmp_path, monkeypatch, capsys):
    calls = []

    def nan_on_step_7(z1, z2, t):
        calls.append(1)
        loss = nlp.F.cross_entropy(z1 @ z2.T, torch.arange(z1.shape[0]))
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(nlp, "nt_xent", nan_on_step_7)
    argv = ["--data_dir", ag_news, "--augmentation", "erase", "--subset", "96", "--clean_text", "--embedding_dim", "8",
            *FAST, "--epochs", "4", "--eval_every", "0", "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="non-finite loss at epoch 3, step 1 .* still holds epoch 2"):
        nlp.main(argv)  # 96 documents, 3 steps per epoch: the 7th step is epoch 3, step 1
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["replace_ids"] is None and ckpt["backbone"]["embedding.weight"].shape[1] == 8
    assert ckpt["args"]["clean_text"] and ckpt["args"]["subset"] == 96
    assert [r["mean_top1"] for r in read_csv(tmp_path / "metrics.csv")] == ["", ""]


# ------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line
# ------------------------------------------------------------------------------------------------

def assert_exit_2(argv, fragment, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        nlp.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("nlp_similar_words.py: error: ") and fragment in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err


@pytest.mark.parametrize("flags,fragment", [
    (["--mask_ratio", "1"], "--mask_ratio must be in [0, 1)"),
    (["--lr", "nan"], "must be finite"),
    (["--temperature", "0"], "--temperature and --lr must be > 0"),
    (["--batch_size", "1"], "--batch_size must be >= 2"),
    (["--embedding_dim", "0"], "--embedding_dim"),
    (["--augmentation", "swap"], "invalid choice"),
    (["--augmentation", "replace"], "needs --vectors FILE or --replace_ids FILE"),
    (["--vectors", "v.txt", "--replace_ids", "t.npy"], "not both"),
    (["--augmentation", "erase", "--vectors", "v.txt"], "are for --augmentation replace"),
    (["--augmentation", "erase", "--batch_size", "512"], "160 training documents are fewer than one batch of 512"),
    (["--augmentation", "erase", "--min_freq", "1000"], "no word occurs 1000 times"),
    (["--vectors", "/nowhere/v.txt"], "/nowhere/v.txt does not exist"),
])
def test_bad_flags(flags, fragment, ag_news, tmp_path, capsys):
    assert_exit_2(["--data_dir", ag_news, *FAST, "--out_dir", str(tmp_path), *flags], fragment, capsys)


def test_bad_data_tables_checkpoints_and_out_dir(run3, ag_news, word_vectors, tmp_path, capsys):
    erase = ["--augmentation", "erase", *FAST, "--out_dir", str(tmp_path / "out")]
    (tmp_path / "half").mkdir()
    write(tmp_path / "half" / "train.csv", open(os.path.join(ag_news, "train.csv")).read())
    assert_exit_2(["--data_dir", str(tmp_path / "half"), *erase], "half/test.csv does not exist", capsys)
    assert_exit_2(["--data_dir", str(tmp_path), *erase], "train.csv does not exist", capsys)
    np.save(tmp_path / "t.npy", np.zeros((3, 5), dtype=np.int64))
    assert_exit_2(["--data_dir", ag_news, "--replace_ids", str(tmp_path / "t.npy"), *FAST, "--out_dir", str(tmp_path)],
                  "expected an int64 table [36, 5]", capsys)
    write(tmp_path / "junk.npy", "not numpy")
    assert_exit_2(["--data_dir", ag_news, "--replace_ids", str(tmp_path / "junk.npy"), *FAST, "--out_dir",
                   str(tmp_path)], "cannot use", capsys)
    assert_exit_2(["--data_dir", ag_news, *erase[:-1], str(tmp_path / "junk.npy" / "sub")], "cannot write to --out_dir", capsys)
    assert_exit_2(["--resume", str(tmp_path / "junk.npy")], "cannot read checkpoint", capsys)
    ckpt = torch.load(run3 / "last.pt", weights_only=True)
    torch.save(dict(ckpt, script="simclr_debiased.py"), tmp_path / "other.pt")
    assert_exit_2(["--resume", str(tmp_path / "other.pt")], "is not a checkpoint of nlp_similar_words.py", capsys)
    torch.save({"script": "nlp_similar_words.py"}, tmp_path / "empty.pt")
    assert_exit_2(["--resume", str(tmp_path / "empty.pt")], "lacks entries", capsys)
    assert_exit_2(["--resume", str(run3 / "last.pt"), "--mask_ratio", "0.5", "--out_dir", str(tmp_path)],
                  "--mask_ratio 0.5 differs from the checkpoint's 0.2", capsys)
    assert_exit_2(["--resume", str(run3 / "last.pt"), "--data_dir", str(tmp_path / "half"), "--out_dir", str(tmp_path)],
                  "test.csv does not exist", capsys)


def test_as_a_process_import_has_no_side_effects(tmp_path):
    # One fresh interpreter (a torch import costs seconds): importing parses nothing, loads nothing and
    # starts no process group; then a bad vector file seen from the shell: exit 2, one line, no traceback.
    write(tmp_path / "train.csv", '"1","the of the of the of the","of of"\n' * 3)
    write(tmp_path / "test.csv", '"2","the","of"\n')
    code = ("import sys, nlp_similar_words as m; import torch.distributed as d; assert not d.is_initialized(); "
            "print(sorted(k for k in ('common', 'simclr_debiased') if k in sys.modules), flush=True); "
            "sys.argv[0] = 'nlp_similar_words.py'; m.main()")
    result = run_script("-c", code, "--data_dir", str(tmp_path), "--min_freq", "1", "--batch_size", "2",
                        "--vectors", write(tmp_path / "bad.vec", "the 0.1 0.2\nof 0.3\n"), "--out_dir", str(tmp_path))
    assert result.stdout.strip() == "[]", result.stderr
    assert_one_line_error(result, "bad.vec line 2: 'of' has 1 values")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        nlp.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "GLOBAL batch" in out and "--mask_ratio" in out



def test_the_script_feeds_the_mean_classifier_augmented_train_and_clean_test(ag_news, tmp_path, monkeypatch):
    fed, real = [], nlp.mean_classifier

    def recording(embed, *args, **kwargs):
        return real(lambda x: fed.append(x.clone()) or embed(x), *args, **kwargs)

    monkeypatch.setattr(nlp, "mean_classifier", recording)
    nlp.main(["--data_dir", ag_news, "--augmentation", "erase", *FAST, "--epochs", "0", "--out_dir", str(tmp_path)])
    vocab = torch.load(tmp_path / "last.pt", weights_only=True)["vocab"]
    clean = [[nlp.encode([text], vocab)[0] for text in nlp.read_ag_news(os.path.join(ag_news, name))[0]]
             for name in ("train.csv", "test.csv")]
    seen = [row[row != len(vocab)] for batch in fed for row in batch]  # padding id = len(vocab)
    assert len(seen) == len(clean[0]) + len(clean[1])
    train_seen, test_seen = seen[:len(clean[0])], seen[len(clean[0]):]
    assert all(is_subsequence(s.tolist(), d.tolist()) for s, d in zip(train_seen, clean[0]))
    assert sum(len(s) < len(d) for s, d in zip(train_seen, clean[0])) > 0.8 * len(clean[0])  # one erase draw each
    assert all(torch.equal(s, d) for s, d in zip(test_seen, clean[1]))

"""nlp_similar_words.py's pieces: text, the similar-word table against a dense reference written
from Nozawa & Sato's nlp_construct_similar_data.py, the views, the data set and model, NT-Xent
against a loop, LARC against its formula, the mean classifier against a plain reimplementation.
(The training step: test_nlp_step.py; the script end to end: test_nlp_script.py.)"""
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import nlp_similar_words as nlp
from conftest import TOPICS


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# -------------------------------------------------------------------------------------------------
# Text
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,tokens", [
    ('He said "Hi!" (twice); it\'s 3.5: ok<br />Yes, no?',
     ["he", "said", "hi", "!", "(", "twice", ")", "it", "'", "s", "3", ".", "5", "ok", "yes", ",",
      "no", "?"]),
    ("A\tB\n  C   D ", ["a", "b", "c", "d"]),
    ("<BR />x<br/>y", ["x<br/>y"]),                 # lower-cased first; only "<br />" is a break
    ("firm's #36;10 it#39;s a\\b", ["firm", "'", "s", "#36", "10", "it#39", "s", "a\\b"]),
    ("", []),
])
def test_tokenize_follows_basic_english(text, tokens):
    assert nlp.tokenize(text) == tokens


def test_clean_vocab_and_encode():
    assert nlp.clean_ag_news("it#39;s #36;10 &lt;TXN.N&gt; \\$1B second\\team &amp;") == \
        "it's $10 <TXN.N> $1B second team &"
    texts = ["b a c a b a d", "c b <unk> <unk> e", ["e", "d", "a"]]  # a 4, b 3, c 2, d 2, e 2
    assert nlp.build_vocab(texts, min_freq=2) == ["a", "b", "c", "d", "e", "<unk>"]
    assert nlp.build_vocab(texts, min_freq=3) == ["a", "b", "<unk>"]
    ids, offsets = nlp.encode(["a zzz b", "", "e"], ["a", "b", "e", "<unk>"])
    assert ids.tolist() == [0, 3, 1, 2] and offsets.tolist() == [0, 3, 3, 4]


def test_read_ag_news_and_its_errors(tmp_path):
    path = write(tmp_path / "x.csv", '"1","Title one","Desc, ""quoted"""\n\n"3","T2","D2"\n')
    assert nlp.read_ag_news(path) == (['Title one Desc, "quoted"', "T2 D2"], [0, 2])
    for content, fragment in [('"1","a","b"\n"2","c"\n', "line 2: 2 column(s)"),
                              ("class,a,b\n", "line 1: the class"),
                              ('"0","a","b"\n', "not an integer >= 1"), ("", "holds no documents")]:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            nlp.read_ag_news(write(tmp_path / "bad.csv", content))
    with pytest.raises(FileNotFoundError, match="nowhere.csv does not exist"):
        nlp.read_ag_news(str(tmp_path / "nowhere.csv"))


# -------------------------------------------------------------------------------------------------
# Word vectors and the similar-word table
# -------------------------------------------------------------------------------------------------

def test_read_vectors(tmp_path):
    # the header "3 2" starts with "3", a vocabulary word: it must still not become one
    path = write(tmp_path / "v.vec", "3 2\nthe 0.5 -1\n3 1.25 2 \nzebra 0 1\nthe 9 9\n")
    words, vectors = nlp.read_vectors(path, vocab=["3", "the"])
    assert words == ["the", "3"] and vectors.dtype == np.float64
    np.testing.assert_array_equal(vectors, [[0.5, -1.0], [1.25, 2.0]])  # the first "the" wins
    assert nlp.read_vectors(path)[0] == ["the", "3", "zebra"]
    glove = write(tmp_path / "g.txt", "2 0.1 0.2 0.3\nof 4 5 6\n")
    assert nlp.read_vectors(glove)[0] == ["2", "of"]
    for content, fragment in [("the 0.1 0.2\nof 0.3\n", "line 2: 'of' has 1 values"),
                              ("the 0.1 x\n", "line 1: the values of 'the' are not numbers"),
                              ("", "no word vectors")]:
        with pytest.raises(ValueError, match=fragment):
            nlp.read_vectors(write(tmp_path / "bad.vec", content), vocab=["the", "of"])


def reference_table(vocab, words, vectors, k):
    """nzw0301/Understanding-Negative-Samples code/nlp_construct_similar_data.py:40-61, densely:
    float64 cosines of the vocabulary words with vectors (file order), -2 on the diagonal,
    argsort, the last k; identity rows for the other words (and <unk>, which no file holds)."""
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
        assert (table[i] == i).all() if i in missing else \
            (i not in table[i] and not set(table[i]) & set(missing))


def test_last_column_is_the_nearest_and_clusters(word_vectors):
    angles = {"a": 0, "b": 10, "c": 25, "d": 45, "e": 70, "f": 100, "g": 180}
    vocab = list(angles) + ["<unk>"]
    vectors = [[math.cos(math.radians(t)), math.sin(math.radians(t))] for t in angles.values()]
    named = [[vocab[j] for j in row] for row in nlp.similar_words(vocab, list(angles), vectors)]
    assert named[0] == ["f", "e", "d", "c", "b"] and named[6] == ["b", "c", "d", "e", "f"]
    assert named[7] == ["<unk>"] * 5
    vocab = [w for topic in TOPICS for w in topic] + ["absent", "<unk>"]
    table = nlp.similar_words(vocab, *nlp.read_vectors(word_vectors, vocab))
    for i, w in enumerate(vocab[:-2]):  # the fixture's topics: clusters of 6 words, 5 neighbours
        assert sorted(table[i]) == sorted(j for j in range(i // 6 * 6, i // 6 * 6 + 6) if j != i)
    assert (table[-2:] == np.arange(len(vocab) - 2, len(vocab))[:, None]).all()
    with pytest.raises(ValueError, match="only 3 vocabulary words have vectors"):
        nlp.similar_words(vocab, vocab[:3], np.eye(3), k=5)
    none = nlp.similar_words(vocab, [], np.zeros((0, 3)))  # no vectors at all: identity rows
    assert (none == np.arange(len(vocab))[:, None]).all() and none.shape == (len(vocab), 5)


# -------------------------------------------------------------------------------------------------
# Views, data set, model
# -------------------------------------------------------------------------------------------------

def test_erase_and_replace():
    """Nozawa & Sato's BaseCollate (code/src/data/ag_news.py:155-181): each token changes with
    probability mask_ratio, independently; kept tokens in order, then the replacements, each
    table[w, r] with r uniform over the 5 columns."""
    n, k, ratio = 20000, 5, 0.2
    sigma4 = 4 * math.sqrt(n * ratio * (1 - ratio))
    tokens, table = torch.arange(n), n + torch.arange(n * k).view(n, k)  # reveal source, column
    assert torch.equal(nlp.erase(tokens, 0.0), tokens)
    assert torch.equal(nlp.replace(tokens, table, 0.0), tokens)
    torch.manual_seed(1)
    out = nlp.replace(tokens, table, ratio)
    replaced = out >= n
    masked = int(replaced.sum())
    assert out.shape == tokens.shape and abs(masked - n * ratio) < sigma4
    assert not replaced[: n - masked].any()
    assert torch.equal(out[: n - masked], out[: n - masked].sort().values)
    source, column = (out[replaced] - n) // k, (out[replaced] - n) % k
    assert torch.equal(source, source.sort().values)  # replacements after the kept tokens, in order
    assert sorted(out[: n - masked].tolist() + source.tolist()) == list(range(n))
    counts = torch.bincount(column, minlength=k)
    assert ((counts - masked / k).abs() < 4 * math.sqrt(masked / k)).all()
    kept = nlp.erase(tokens, ratio)
    assert abs(n - kept.shape[0] - n * ratio) < sigma4 and torch.equal(kept, kept.sort().values)
    assert (nlp.replace(tokens[:200], table, 0.9999) >= n).all()
    torch.manual_seed(3)
    a = nlp.replace(tokens, table, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, nlp.replace(tokens, table, 0.3))
    # DataLoader workers must not replay one random stream: 8 identical documents, 2 workers
    dataset = nlp.TextDataset(torch.arange(40).repeat(8), torch.arange(0, 321, 40), [0] * 8, 40,
                              partial(nlp.erase, ratio=0.5))
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=dataset.collate))
    assert not torch.equal(batches[0][0], batches[1][0])


def test_dataset_padding_two_independent_views_and_model():
    ids, offsets = nlp.encode(["b a", "", "a a a c"], ["a", "b", "c", "<unk>"])
    dataset = nlp.TextDataset(ids, offsets, [1, 0, 1], pad_id=4)
    tokens, labels = dataset.collate([dataset[i] for i in range(3)])
    assert tokens.tolist() == [[1, 0, 4, 4], [4, 4, 4, 4], [0, 0, 0, 2]]
    assert labels.tolist() == [1, 0, 1]
    pairs = nlp.TextDataset(ids, offsets, [1, 0, 1], 4, partial(nlp.erase, ratio=0.0), views=2)
    x1, x2, labels = pairs.collate([pairs[2], pairs[1]])
    assert torch.equal(x1, x2) and x1.tolist() == [[0, 0, 0, 2], [4] * 4]
    assert labels.tolist() == [1, 0]
    long = nlp.TextDataset(torch.arange(60), torch.tensor([0, 60]), [3], 60,
                           partial(nlp.erase, ratio=0.5), views=2)
    a, b, label = long[0]  # two independent draws of one document
    assert not torch.equal(a, b) and label == 3
    model = nlp.ContrastiveFastText(4, 3)
    weight = model.backbone.embedding.weight
    out = model.backbone(tokens)
    torch.testing.assert_close(out[0], weight[[1, 0]].mean(0))       # the padding id 4 is left out
    torch.testing.assert_close(out[2], weight[[0, 0, 0, 2]].mean(0))
    assert (out[1] == 0).all() and (weight[4] == 0).all()
    assert nlp.head_layout(model.projector) == [
        ["0", "linear", 3, 3, True], ["1", "bn", 3, True], ["2", "relu"],
        ["3", "linear", 3, 3, False]]


# -------------------------------------------------------------------------------------------------
# NT-Xent and LARC
# -------------------------------------------------------------------------------------------------

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
    loss, logits, negative = nlp.nt_xent(z1, z2, t)
    assert loss.item() == pytest.approx(loop_nt_xent(z1, z2, t), rel=1e-5)
    assert loss.dtype == torch.float32 and logits.shape == negative.shape == (2 * b, 2 * b)
    # negatives: every column but the anchor and its other view
    expected = ~torch.eye(2 * b, dtype=torch.bool) & ~torch.eye(2 * b, dtype=torch.bool).roll(b, 1)
    assert torch.equal(negative, expected) and (negative.sum(1) == 2 * b - 2).all()
    a, c = z1.double().requires_grad_(True), z2.double().requires_grad_(True)
    assert nlp.nt_xent(a, c, t)[0].item() == pytest.approx(loop_nt_xent(z1, z2, t), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: nlp.nt_xent(x, y, t)[0], (a, c))
    # closed form: identical views, orthogonal documents -> log(e^(1/t) + 2B - 2) - 1/t
    eye = torch.eye(b, 8, dtype=torch.float64)
    assert nlp.nt_xent(eye, eye, t)[0].item() == \
        pytest.approx(math.log(math.exp(1 / t) + 2 * b - 2) - 1 / t, rel=1e-6)


def test_larc_against_its_formula():
    p, zero = nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.zeros(2))
    p.grad, zero.grad = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    optimizer = torch.optim.SGD([{"params": [p, zero], "larc_weight_decay": 0.1}], lr=1.0)
    nlp.larc_(optimizer)
    # (g + wd p) * trust ||p|| / (||g|| + wd ||p|| + eps) = ([0, 2] + [0.3, 0.4]) * 1e-3 * 5 / 2.5
    torch.testing.assert_close(p.grad, torch.tensor([0.3, 2.4]) * 2e-3)
    assert zero.grad.tolist() == [1.0, 1.0]  # a zero weight keeps its gradient


# -------------------------------------------------------------------------------------------------
# Mean classifier
# -------------------------------------------------------------------------------------------------

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
    acc = nlp.mean_classifier(encoder, train, test, batch_size=5, device=torch.device("cpu"),
                              seed=4)
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
    hits = (zt @ mu.T).argmax(1) == torch.tensor(labels[:12])
    assert acc == pytest.approx(100 * hits.double().mean().item())
    fed.clear()
    assert nlp.mean_classifier(encoder, train, test, 5, torch.device("cpu"), seed=4) == acc

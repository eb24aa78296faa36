"""The harness (distributed set-up, gathers, AMP choice, data loading, kNN monitor, negatives
monitor, checkpoints, resume, metrics) is the same in every training script, word for word: each
script reads and copies on its own, and the copies must not drift. Here: the copies are identical
(the whole harness block, and every function two scripts both define), and the harness behaves
as it should (tested once, on simclr_debiased.py's copy, since all copies are the same text)."""
import ast
import math
import os

import numpy as np
import pytest
import torch

import simclr_debiased as h
from conftest import ROOT, TRAINING_SCRIPTS

MARKER = "# The harness: the same in every training script, word for word (tests/test_copies.py)"


def source(script):
    with open(os.path.join(ROOT, script + ".py")) as f:
        return f.read()


def harness(script):
    """The harness block: from the dashed line above MARKER to the end of the file."""
    text = source(script)
    assert MARKER in text, f"{script}.py has no harness marker"
    start = text.rindex("\n", 0, text.rindex("\n", 0, text.index(MARKER)))
    return text[start + 1:]


def definitions(script):
    """{name: source} of the top-level functions, classes and assignments of a script."""
    text = source(script)
    out = {}
    for node in ast.parse(text).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:
            out[name] = ast.get_source_segment(text, node)
    return out


@pytest.mark.parametrize("script", TRAINING_SCRIPTS[1:])
def test_every_training_script_has_the_harness_word_for_word(script):
    assert harness(script) == harness("simclr_debiased"), f"{script}.py's harness differs"


def test_the_text_script_shares_every_harness_piece_it_needs():
    """nlp_similar_words.py trains on text: the image pieces (flags, data, kNN) do not apply; the
    rest of the harness is there, word for word."""
    shared = definitions("simclr_debiased")
    mine = definitions("nlp_similar_words")
    needed = ["Parser", "MAY_CHANGE", "POSITIVE", "setup", "rank", "world", "GatherLayer", "gather",
              "negative_rates", "epoch_stats", "restore", "distribute", "head_layout", "end_epoch"]
    for name in needed:
        assert mine.get(name) == shared[name], f"nlp_similar_words.py's {name} differs or is missing"


OWN = {"get_parser", "rules", "make_optimizer", "train_step", "train_one_epoch", "main"}  # each its own


def test_no_piece_two_scripts_define_differs():
    """A function, class or constant defined in two scripts (shuffle BN and the EMA update in
    moco_mochi.py and ring_nce.py, ...) is a deliberate copy: its source is identical."""
    scripts = [*TRAINING_SCRIPTS, "nlp_similar_words"]
    defs = {s: definitions(s) for s in scripts}
    for i, a in enumerate(scripts):
        for b in scripts[i + 1:]:
            for name in defs[a].keys() & defs[b].keys() - OWN:
                assert defs[a][name] == defs[b][name], f"{name} differs in {a}.py and {b}.py"


# -------------------------------------------------------------------------------------------------
# The harness's behaviour
# -------------------------------------------------------------------------------------------------

def test_one_process_gather_and_world():
    assert h.world() == 1 and h.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert h.gather(x) is x


def test_head_layout_rebuilds_the_head():
    from collections import OrderedDict
    head = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.BatchNorm1d(5, affine=False),
                               torch.nn.ReLU(), torch.nn.Linear(5, 3))
    layout = h.head_layout(head)
    assert layout == [["0", "linear", 6, 5, False], ["1", "bn", 5, False], ["2", "relu"],
                      ["3", "linear", 5, 3, True]]
    make = {"linear": lambda i, o, b: torch.nn.Linear(i, o, bias=b), "relu": torch.nn.ReLU,
            "bn": lambda n, affine: torch.nn.BatchNorm1d(n, affine=affine)}
    rebuilt = torch.nn.Sequential(OrderedDict((n, make[k](*a)) for n, k, *a in layout))
    rebuilt.load_state_dict(head.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(rebuilt.eval()(x), head.eval()(x))


class Vectors(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.tensor(np.asarray(x), dtype=torch.float32), [int(v) for v in y]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Identity(torch.nn.Identity):
    out_dim = 5


def knn(bank, bank_y, test, test_y, k, t, to_input=lambda x: x):
    data = h.argparse.Namespace(memory=Vectors(bank, bank_y), test=Vectors(test, test_y),
                                to_input=to_input)
    args = h.argparse.Namespace(knn_k=k, knn_t=t, batch_size=8, workers=0)
    return h.knn_monitor(Identity(), data, args, torch.device("cpu"), None)


def knn_reference(bank, bank_labels, test, k, t, classes):
    """One test point at a time in float64: cosine similarity, the k nearest vote exp(sim / t)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), classes))
    for i, x in enumerate(test):
        sims = bank @ x
        for j in np.argsort(-sims, kind="stable")[:k]:
            scores[i, bank_labels[j]] += math.exp(sims[j] / t)
    return scores


def test_knn_monitor_against_loop_reference():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(7, 5))
    bank_y, test_y = rng.integers(0, 7, 60), rng.integers(0, 7, 37)
    bank = centres[bank_y] + 1.5 * rng.normal(size=(60, 5))
    test = centres[test_y] + 1.5 * rng.normal(size=(37, 5))
    ranked = np.argsort(-knn_reference(bank, bank_y, test, 7, 0.1, 7), axis=1, kind="stable")
    ours = knn(bank, bank_y, test, test_y, 7, 0.1)
    assert ours["knn_top1"] == pytest.approx(100 * np.mean(ranked[:, 0] == test_y))
    # top-5 with k = 40, where every class has votes (classes without votes tie at 0)
    ranked = np.argsort(-knn_reference(bank, bank_y, test, 40, 0.1, 7), axis=1, kind="stable")
    ours = knn(bank, bank_y, test, test_y, 40, 0.1)
    assert ours["knn_top5"] == pytest.approx(100 * np.mean((ranked[:, :5] == test_y[:, None]).any(1)))
    assert 0 < ours["knn_top1"] < ours["knn_top5"] < 100
    # k = 1: the label of the nearest bank point
    nearest = np.argmax(test @ (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T, axis=1)
    assert knn(bank, bank_y, test, test_y, 1, 10.0)["knn_top1"] == pytest.approx(
        100 * np.mean(bank_y[nearest] == test_y))
    # the images go through to_input (CMC's Lab) first: a map that stretches two axes changes it
    stretched = knn(bank, bank_y, test, test_y, 40, 0.1, to_input=lambda x: x * torch.tensor([9, 1, 1, 1, .1]))
    assert stretched != ours


def test_knn_votes_are_exponential_weights():
    """Two class-0 neighbours at similarity 0.5 against one class-1 neighbour at 0.9, t = 0.1:
    exp weights give class 1 (e^9 > 2 e^5); plain similarities would give class 0 (0.9 < 1.0)."""
    bank = np.array([[0.5, math.sqrt(0.75), 0, 0, 0], [0.5, -math.sqrt(0.75), 0, 0, 0],
                     [0.9, math.sqrt(0.19), 0, 0, 0]])
    assert knn(bank, [0, 0, 1], [[1.0, 0, 0, 0, 0]], [1], 3, 0.1)["knn_top1"] == 100.0
    assert knn(bank, [0, 0, 1], [[1.0, 0, 0, 0, 0]], [1], 3, 10.0)["knn_top1"] == 0.0


def test_negative_rates_exact_values():
    """Anchor 0 (class 0): negatives at columns 1-4 with classes 0, 1, 0, -1 (unknown: left out):
    fn_rate 2/3; its most similar negative (column 3, class 0): fn_rate_hard 1. Anchor 1 (class 1):
    its negatives are all unknown: NaN. Anchor 2 (unknown class): NaN."""
    sim = torch.tensor([[9.0, 0.1, 0.5, 0.8, 0.99], [0.0, 0.2, 0.3, 0.1, 0.0], [0.0] * 5])
    negative = torch.tensor([[False, True, True, True, True], [False, False, False, False, True],
                             [True] * 5])
    labels, cand = torch.tensor([0, 1, -1]), torch.tensor([0, 0, 1, 0, -1])
    rates = h.negative_rates(sim, negative, labels, cand)
    assert rates["fn_rate"][0].item() == pytest.approx(2 / 3)
    assert rates["fn_rate_hard"][0].item() == 1.0
    assert rates["fn_rate"][1:].isnan().all() and rates["fn_rate_hard"][1:].isnan().all()
    # candidate labels per anchor [a, m] (IR's drawn rows) give the same as the shared row
    again = h.negative_rates(sim, negative, labels, cand.expand(3, 5))
    torch.testing.assert_close(again["fn_rate"], rates["fn_rate"], equal_nan=True)


def test_negative_rates_one_percent_rule():
    """250 negatives: the hard set is the 2 most similar (1% of 250, rounded down); 99 negatives:
    1 (at least one). The 2 most similar here are of classes 0 and 1: fn_rate_hard 1/2."""
    torch.manual_seed(0)
    sim = torch.rand(1, 251) * 0.5
    sim[0, 10], sim[0, 20], sim[0, 30] = 0.9, 0.8, 0.7
    cand = torch.ones(251, dtype=torch.long)
    cand[10], cand[30], cand[0] = 0, 0, 0
    negative = torch.ones(1, 251, dtype=torch.bool)
    negative[0, 0] = False  # the positive
    rates = h.negative_rates(sim, negative, torch.tensor([0]), cand)
    assert rates["fn_rate"].item() == pytest.approx(2 / 250) and rates["fn_rate_hard"].item() == 0.5
    negative[0, 100:] = False  # 99 negatives left: only the most similar one (class 0)
    assert h.negative_rates(sim, negative, torch.tensor([0]), cand)["fn_rate_hard"].item() == 1.0


def test_epoch_stats_means_counts_and_empties():
    nan = math.nan
    steps = [{"loss": torch.tensor(1.0), "fn_rate": torch.tensor([0.5, nan]), "x": torch.tensor([nan])},
             {"loss": torch.tensor(2.0), "fn_rate": torch.tensor([0.0, 0.25, 1.0]), "x": torch.tensor([nan])}]
    out = h.epoch_stats(steps)
    assert out == {"loss": 1.5, "fn_rate": pytest.approx(1.75 / 4), "x": ""}
    assert math.isnan(h.epoch_stats([{"loss": torch.tensor(nan)}, {"loss": torch.tensor(1.0)}])["loss"])


def test_end_epoch_writes_metrics_and_an_atomic_checkpoint(tmp_path, monkeypatch, capsys):
    args = h.argparse.Namespace(out_dir=str(tmp_path))
    history = []
    h.end_epoch(args, {"epoch": 1, "loss": 2.0, "fn_rate": ""}, history, {"w": torch.ones(2)})
    torch.manual_seed(7)
    h.end_epoch(args, {"epoch": 2, "loss": 1.5, "knn_top1": 40.0}, history, {"w": torch.zeros(2)})
    expected = torch.rand(3)  # what the run draws next: a resume must draw the same
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "metrics.csv"]  # no temporary file left
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,loss,fn_rate,knn_top1", "1,2,,", "2,1.5,,40"]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(ckpt["w"], torch.zeros(2)) and [r["epoch"] for r in ckpt["history"]] == [1, 2]
    torch.manual_seed(8)
    torch.set_rng_state(ckpt["rng"][0][0])
    assert len(ckpt["rng"]) == 1 and torch.equal(torch.rand(3), expected)
    # a crash while writing leaves the last checkpoint whole
    monkeypatch.setattr(h.torch, "save", lambda obj, path: open(path, "wb").write(b"half") and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        h.end_epoch(args, {"epoch": 3, "loss": 1.0}, history, {"w": torch.full((2,), 3.0)})
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.zeros(2))
    # a non-finite loss stops the run, says which checkpoint stays, and writes nothing
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        h.end_epoch(args, {"epoch": 4, "loss": math.nan}, history[:2], {"w": torch.ones(2)})
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == f"non-finite loss in epoch 4; {tmp_path}/last.pt keeps epoch 2"
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.zeros(2))
    with pytest.raises(SystemExit):
        h.end_epoch(h.argparse.Namespace(out_dir=str(tmp_path / "new")), {"epoch": 1, "loss": math.inf}, [], {})
    assert capsys.readouterr().err.strip() == "non-finite loss in epoch 1; no last.pt written"

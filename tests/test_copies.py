"""The pieces every training script repeats (distributed set-up, gathers, kNN monitor, checkpoints,
resume) are deliberate copies, so that each script reads and copies on its own. They must not
drift: their source is identical in every training script, and the copy's behaviour is tested here
(and, for the gathers and the kNN monitor under two processes, in test_simclr_distributed.py)."""
import argparse
import importlib
import inspect
import math
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, TRAINING_SCRIPTS

SHARED = ["setup_distributed", "world", "is_master", "GatherLayer", "gather_with_grad", "concat_all_gather",
          "head_layout", "knn_monitor", "save_checkpoint", "load_checkpoint", "resumed_args", "rng_states"]
# The text training script has no kNN monitor (it scores a mean classifier instead).
TEXT_SHARED = [name for name in SHARED if name != "knn_monitor"]
SCRIPTS = [s for s in TRAINING_SCRIPTS if os.path.exists(os.path.join(ROOT, s + ".py"))]


def test_every_training_script_exists():
    assert SCRIPTS == TRAINING_SCRIPTS


@pytest.mark.parametrize("name", SHARED)
def test_copies_are_identical(name):
    reference = inspect.getsource(getattr(importlib.import_module("simclr_debiased"), name))
    for script in SCRIPTS + ["nlp_similar_words"]:
        module = importlib.import_module(script)
        if script == "nlp_similar_words" and name not in TEXT_SHARED:
            continue
        assert hasattr(module, name), f"{script}.py has no {name}"
        assert inspect.getsource(getattr(module, name)) == reference, f"{script}.py's {name} differs from simclr_debiased.py's"


@pytest.fixture(params=SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


def test_single_process_helpers(script):
    rank, world, device = script.setup_distributed()
    assert (rank, world, device.type) == (0, 1, "cuda" if torch.cuda.is_available() else "cpu")
    assert script.world() == 1 and script.is_master()
    x = torch.randn(3, 2, requires_grad=True)
    assert script.gather_with_grad(x) is x and script.concat_all_gather(x) is x


def test_head_layout_rebuilds_the_head(script):
    from collections import OrderedDict
    head = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.BatchNorm1d(5, affine=False),
                               torch.nn.ReLU(), torch.nn.Linear(5, 3))
    layout = script.head_layout(head)
    assert layout == [["0", "linear", 6, 5, False], ["1", "bn", 5, False], ["2", "relu"], ["3", "linear", 5, 3, True]]
    # what an evaluation script does with it
    make = {"linear": lambda i, o, b: torch.nn.Linear(i, o, bias=b), "bn": torch.nn.BatchNorm1d, "relu": torch.nn.ReLU}
    rebuilt = torch.nn.Sequential(OrderedDict((n, make[k](*a) if k != "bn" else make[k](a[0], affine=a[1]))
                                              for n, k, *a in layout))
    rebuilt.load_state_dict(head.state_dict())
    x = torch.randn(4, 6)
    head.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), head(x))
    with pytest.raises(TypeError):
        script.head_layout(torch.nn.Sequential(torch.nn.Tanh()))


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


class Vectors(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.tensor(x, dtype=torch.float32), [int(v) for v in y]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Identity(torch.nn.Identity):
    out_dim = 5


def test_knn_monitor_against_loop_reference(script):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 5))
    bank_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 37)
    bank = centres[bank_y] + 1.5 * rng.normal(size=(60, 5))
    test = centres[test_y] + 1.5 * rng.normal(size=(37, 5))
    scores = knn_reference(bank, bank_y, test, 7, 0.1, 4)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    top1 = 100 * np.mean(ranked[:, 0] == test_y)
    top2 = 100 * np.mean((ranked[:, :2] == test_y[:, None]).any(1))
    top1_ours, top5_ours = script.knn_monitor(Identity(), Vectors(bank, bank_y), Vectors(test, test_y), k=7, t=0.1,
                                              batch_size=8, workers=0, device=torch.device("cpu"), dtype=None)
    assert top1_ours == pytest.approx(top1) and 0 < top1 < 100
    assert top5_ours == pytest.approx(100 * np.mean((ranked[:, :5] == test_y[:, None]).any(1)))
    # k = 1: the label of the nearest bank point; a larger temperature changes the weights only
    nearest = np.argmax((test / np.linalg.norm(test, axis=1, keepdims=True)) @
                        (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T, axis=1)
    k1 = script.knn_monitor(Identity(), Vectors(bank, bank_y), Vectors(test, test_y), 1, 10.0, 8, 0,
                            torch.device("cpu"), None)[0]
    assert k1 == pytest.approx(100 * np.mean(bank_y[nearest] == test_y))
    assert top2 <= top5_ours


def test_knn_votes_are_exponential_weights(script):
    """Two class-0 neighbours at similarity 0.5 against one class-1 neighbour at 0.9, t = 0.1:
    exp weights give class 1 (e^9 > 2 e^5); plain similarities would give class 0 (0.9 < 1.0)."""
    angle = lambda c: [c, math.sqrt(1 - c * c), 0, 0, 0]
    bank = np.array([angle(0.5), angle(0.5), angle(0.9)]) * [1, 1, 1, 1, 1]
    bank[1, 1] *= -1
    args = (Identity(), Vectors(bank, [0, 0, 1]), Vectors(np.array([[1.0, 0, 0, 0, 0]]), [1]), 3, 0.1, 8, 0,
            torch.device("cpu"), None)
    assert script.knn_monitor(*args) == (100.0, 100.0)


def test_checkpoints_are_atomic_and_checked(script, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="x")
    path = str(tmp_path / "last.pt")
    state = {"script": "a.py", "args": {"lr": 0.1}, "epoch": 3, "w": torch.arange(4.0), "rng": [[torch.zeros(2)]]}
    script.save_checkpoint(state, path)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    loaded = script.load_checkpoint(path, "a.py", parser)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))
    for bad, message in [(str(tmp_path / "missing.pt"), "cannot read checkpoint"), (path, "not a checkpoint of b.py")]:
        with pytest.raises(SystemExit) as exit_info:
            script.load_checkpoint(bad, "b.py", parser)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(open(path, "rb").read()[:50])
    with pytest.raises(SystemExit):
        script.load_checkpoint(str(tmp_path / "junk.pt"), "a.py", parser)
    torch.save({"script": "a.py", "f": np.float64}, tmp_path / "unsafe.pt")  # not loadable with weights_only
    with pytest.raises(SystemExit):
        script.load_checkpoint(str(tmp_path / "unsafe.pt"), "a.py", parser)


def test_resumed_args(script, tmp_path, capsys):
    def parser():
        p = argparse.ArgumentParser(prog="x")
        for name, default in (("--epochs", 10), ("--lr", 0.1), ("--workers", 4)):
            p.add_argument(name, type=type(default), default=default)
        p.add_argument("--out_dir", default="runs/a")
        p.add_argument("--resume", default="")
        return p
    ckpt = {"args": {"epochs": 10, "lr": 0.5, "workers": 4, "out_dir": "runs/a", "resume": ""}}
    resume = str(tmp_path / "run" / "last.pt")
    argv = ["--resume", resume, "--epochs", "20", "--lr", "0.5"]
    merged = script.resumed_args(parser(), argv, parser().parse_args(argv), ckpt)
    assert merged.epochs == 20 and merged.lr == 0.5 and merged.workers == 4  # the checkpoint's lr, not the default
    assert merged.out_dir == str(tmp_path / "run") and merged.resume == resume
    if "epochs" in script.MAY_CHANGE_ON_RESUME and "lr" not in script.MAY_CHANGE_ON_RESUME:
        argv = ["--resume", resume, "--lr", "0.2"]
        with pytest.raises(SystemExit) as exit_info:
            script.resumed_args(parser(), argv, parser().parse_args(argv), ckpt)
        assert exit_info.value.code == 2 and "--lr 0.2 differs from the checkpoint's 0.5" in capsys.readouterr().err


def test_rng_states_restore_the_stream(script):
    torch.manual_seed(5)
    states = script.rng_states()
    expected = torch.rand(3)
    torch.manual_seed(6)
    torch.set_rng_state(states[0][0])
    assert len(states) == 1 and torch.equal(torch.rand(3), expected)

"""linear_eval.py: the evaluation functions against float64 loop references, the probe on separable
features, the schedules, end to end on a tiny simclr_debiased.py checkpoint of ../shared/data/cifar10
(every protocol, cached and recomputed, torchrun), the text-script contract, and bad input."""
import argparse
import importlib
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import common
import linear_eval
from conftest import CIFAR, ROOT, assert_one_line_error, run_script

# A probe run small enough for the CPU: 64 training and 50 test images, 2 epochs of 2 batches.
SMALL = ["--subset", "64", "--test_subset", "50", "--epochs", "2", "--batch_size", "32", "--workers", "0",
         "--feature_batch_size", "64"]


# ------------------------------------------------------------------------------------------------
# float64 loop references
# ------------------------------------------------------------------------------------------------

def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def ranked_correct(scores, label, topk):
    order = sorted(range(len(scores)), key=lambda c: -scores[c])
    return label in order[:topk]


def knn_reference(train, train_labels, test, test_labels, k, t, topk, num_classes):
    correct = 0
    bank = [unit(list(map(float, row))) for row in train]
    for x, label in zip(test, test_labels):
        q = unit(list(map(float, x)))
        sims = [sum(a * b for a, b in zip(q, row)) for row in bank]
        neighbours = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        scores = [0.0] * num_classes
        for j in neighbours:
            scores[int(train_labels[j])] += math.exp(sims[j] / t)
        correct += ranked_correct(scores, int(label), topk)
    return correct / len(test)


def means_reference(train, train_labels, num_classes):
    dim = len(train[0])
    sums, counts = [[0.0] * dim for _ in range(num_classes)], [0] * num_classes
    for row, label in zip(train, train_labels):
        z = unit(list(map(float, row)))
        for d in range(dim):
            sums[int(label)][d] += z[d]
        counts[int(label)] += 1
    return [[s / max(n, 1) for s in sums[c]] for c, n in enumerate(counts)]


def mean_classifier_reference(train, train_labels, test, test_labels, topk, num_classes):
    mu = means_reference(train, train_labels, num_classes)
    correct = 0
    for x, label in zip(test, test_labels):
        z = unit(list(map(float, x)))
        scores = [sum(a * b for a, b in zip(z, m)) for m in mu]
        correct += ranked_correct(scores, int(label), topk)
    return correct / len(test)


def random_problem(seed, n_train=60, n_test=25, dim=6, classes=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    train_labels, test_labels = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    train = centres[train_labels] + 1.2 * rng.normal(size=(n_train, dim))
    test = centres[test_labels] + 1.2 * rng.normal(size=(n_test, dim))
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("seed,k,t,topk", [(0, 1, 0.1, 1), (1, 7, 0.1, 1), (2, 7, 0.5, 1), (3, 60, 0.07, 1),
                                           (4, 60, 0.1, 2), (5, 60, 1.0, 3)])
def test_knn_accuracy_against_loop_reference(seed, k, t, topk):
    # topk > 1 only with k = every training point, so that no class has a zero score (ties).
    train, train_labels, test, test_labels = random_problem(seed)
    got = linear_eval.knn_accuracy(torch.tensor(train), torch.tensor(train_labels), torch.tensor(test),
                                   torch.tensor(test_labels), k=k, temperature=t, topk=topk)
    assert got == knn_reference(train, train_labels, test, test_labels, k, t, topk, 4)
    assert 0.0 <= got <= 1.0


@pytest.mark.parametrize("seed,topk", [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_class_means_and_mean_classifier_against_loop_reference(seed, topk):
    train, train_labels, test, test_labels = random_problem(seed)
    means = linear_eval.class_means(torch.tensor(train), torch.tensor(train_labels), 5)
    assert means.dtype == torch.float64 and means.shape == (5, 6)
    np.testing.assert_allclose(means.numpy(), np.array(means_reference(train, train_labels, 5)), rtol=1e-12, atol=1e-15)
    assert torch.all(means[4] == 0)  # a class without examples
    got = linear_eval.mean_classifier_accuracy(train, train_labels, test, test_labels, topk=topk)  # numpy works too
    assert got == mean_classifier_reference(train, train_labels, test, test_labels, topk, 4)


def test_class_means_are_not_renormalised():
    # Class 0: two unit vectors at +-60 degrees, mean (0.5, 0) (length 0.5, direction 0 degrees).
    # Class 1: twice the unit vector at 30 degrees, mean length 1. A test point at 0 degrees scores
    # 0.5 against class 0 and cos 30 = 0.866 against class 1, so the mean classifier says class 1;
    # re-normalised means would score 1 vs 0.866 and say class 0.
    a, b = math.radians(60), math.radians(30)
    train = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)],
                          [math.cos(b), math.sin(b)], [2 * math.cos(b), 2 * math.sin(b)]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    test, test_labels = torch.tensor([[3.0, 0.0]], dtype=torch.float64), torch.tensor([1])
    means = linear_eval.class_means(train, labels, 2)
    torch.testing.assert_close(means, torch.tensor([[0.5, 0.0], [math.cos(b), math.sin(b)]], dtype=torch.float64))
    assert linear_eval.mean_classifier_accuracy(train, labels, test, test_labels) == 1.0
    renormalised = torch.nn.functional.normalize(means, dim=1)
    assert int((torch.nn.functional.normalize(test, dim=1) @ renormalised.T).argmax()) == 0  # the case matters


def test_topk_one_is_top1_and_topk_all_is_one():
    train, train_labels, test, test_labels = random_problem(7)
    x, y, q, qy = map(torch.tensor, (train, train_labels, test, test_labels))
    scores = common.knn_predict(torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(x, dim=1), y, 4,
                                k=9, temperature=0.1)
    assert linear_eval.knn_accuracy(x, y, q, qy, k=9, topk=1) == float((scores.argmax(1) == qy).double().mean())
    mu = linear_eval.class_means(x, y, 4)
    top1 = float(((torch.nn.functional.normalize(q, dim=1) @ mu.T).argmax(1) == qy).double().mean())
    assert linear_eval.mean_classifier_accuracy(x, y, q, qy, topk=1) == top1 < 1.0
    assert linear_eval.mean_classifier_accuracy(x, y, q, qy, topk=4) == 1.0
    assert linear_eval.knn_accuracy(x, y, q, qy, k=60, topk=4) == 1.0


def test_invalid_arguments_raise_value_error():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="topk"):
        linear_eval.knn_accuracy(x, y, x, y, topk=0)
    with pytest.raises(ValueError, match="temperature"):
        linear_eval.knn_accuracy(x, y, x, y, temperature=0.0)
    with pytest.raises(ValueError, match="same D"):
        linear_eval.mean_classifier_accuracy(x, y, torch.randn(5, 4), y)
    with pytest.raises(ValueError, match="one label per"):
        linear_eval.mean_classifier_accuracy(x, y[:3], x, y)


# ------------------------------------------------------------------------------------------------
# The probe, the presets and the schedules
# ------------------------------------------------------------------------------------------------

def probe_args(**overrides):
    values = {name: None for name in linear_eval.SETTINGS}
    values.update(no_head=False, bn_train=False, knn_k=200, seed=0, eval_every=1, workers=0)
    values.update(overrides)
    return argparse.Namespace(**values)


def separable(n, seed, classes=10, dim=16):
    centres = 2.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % classes
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), labels


@pytest.mark.parametrize("protocol", ["dcl", "moco", "nozawa"])
def test_probe_separates_separable_features(protocol):
    train, test = separable(1000, 1), separable(500, 2)
    args = probe_args(epochs=20, batch_size=50)
    settings = linear_eval.resolve_settings(args, protocol, text=False)
    if protocol == "moco":
        settings["milestones"] = [12, 16]
    info = common.Distributed(0, 0, 1, torch.device("cpu"))
    history, probe = linear_eval.train_probe(torch.nn.Identity(), settings, train, None, lambda: test, info, args,
                                             "fp32", None, 10, 16)
    assert [row["epoch"] for row in history] == list(range(1, 21))
    assert history[-1]["top1"] >= 99.0 and history[0]["loss"] > history[-1]["loss"]
    assert float((probe(test[0]).argmax(1) == test[1]).double().mean()) * 100 == history[-1]["top1"]
    assert history[-1]["lr"] == pytest.approx(linear_eval.epoch_learning_rate(settings, 19))
    assert linear_eval.mean_classifier_accuracy(*train, *test) >= 0.99
    assert linear_eval.knn_accuracy(*train, *test) >= 0.99


def test_presets_and_overrides():
    dcl = linear_eval.resolve_settings(probe_args(), "dcl", text=False)
    assert (dcl["optimizer"], dcl["lr"], dcl["weight_decay"], dcl["batch_size"], dcl["epochs"], dcl["augment"],
            dcl["features"], dcl["normalize"], dcl["bn_train"]) == ("adam", 1e-3, 1e-6, 512, 100, "run", "backbone",
                                                                   False, False)
    moco = linear_eval.resolve_settings(probe_args(lr=10.0, milestones=[30]), "moco", text=False)
    assert (moco["optimizer"], moco["lr"], moco["momentum"], moco["weight_decay"], moco["schedule"],
            moco["milestones"], moco["init"]) == ("sgd", 10.0, 0.9, 0.0, "step", [30], "normal")
    nozawa = linear_eval.resolve_settings(probe_args(), "nozawa", text=False)
    assert (nozawa["lr"], nozawa["nesterov"], nozawa["schedule"], nozawa["batch_size"], nozawa["epochs"],
            nozawa["features"], nozawa["normalize"], nozawa["mean_view"]) == (0.3, True, "cosine", 2048, 100, "head",
                                                                              True, "augmented")
    text = linear_eval.resolve_settings(probe_args(), "nozawa", text=True)
    assert (text["epochs"], text["batch_size"]) == (20, 512)
    raw = linear_eval.resolve_settings(probe_args(no_head=True), "nozawa", text=False)
    assert (raw["features"], raw["normalize"]) == ("backbone", False)
    assert linear_eval.resolve_settings(probe_args(no_head=True, normalize=True), "nozawa", text=False)["normalize"]
    with pytest.raises(common.UserError, match="--nesterov needs"):
        linear_eval.resolve_settings(probe_args(optimizer="adam"), "nozawa", text=False)


def test_schedules_match_torch_schedulers():
    settings = linear_eval.resolve_settings(probe_args(), "moco", text=False)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=30.0)
    steps = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[60, 80], gamma=0.1)
    cosine_settings = linear_eval.resolve_settings(probe_args(), "nozawa", text=False)
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=100, eta_min=0)
    for epoch in range(100):
        assert linear_eval.epoch_learning_rate(settings, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert linear_eval.epoch_learning_rate(cosine_settings, epoch) == pytest.approx(opt2.param_groups[0]["lr"],
                                                                                       rel=1e-9, abs=1e-15)
        opt.step()
        steps.step()
        opt2.step()
        cosine.step()
    assert linear_eval.epoch_learning_rate(linear_eval.resolve_settings(probe_args(), "dcl", text=False), 99) == 1e-3


# ------------------------------------------------------------------------------------------------
# End to end on a tiny simclr_debiased.py checkpoint
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cifar_dir):
    import simclr_debiased
    out = tmp_path_factory.mktemp("linear_eval") / "run"
    simclr_debiased.main(["--dataset", "folder", "--data_dir", cifar_dir, "--arch", "resnet18", "--width", "8",
                          "--batch_size", "32", "--subset", "32", "--workers", "0", "--epochs", "1", "--eval_every", "0",
                          "--out_dir", str(out)])
    return out / "last.pt"


def evaluate(ckpt, *flags, out=None):
    argv = [str(ckpt), *SMALL, *flags] + (["--out", str(out)] if out else [])
    return linear_eval.main(argv)


def check_results(results, protocol, cached, epochs=2):
    assert results["protocol"] == protocol and results["script"] == "simclr_debiased.py"
    assert results["settings"]["cached_features"] is cached
    assert results["data"] == {"num_train": 64, "num_test": 50, "num_classes": 10, "feature_dim": results["data"]["feature_dim"],
                               "classes": sorted(os.listdir(os.path.join(CIFAR, "train")))}
    history = results["linear"]["history"]
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    assert results["linear"]["top1"] == history[-1]["top1"] and results["linear"]["epoch"] == epochs
    for block in (results["linear"], results["knn"], results["mean_classifier"]):
        assert 0.0 <= block["top1"] <= block["top5"] <= 100.0
        assert block["top1"] * 50 / 100 == pytest.approx(round(block["top1"] * 50 / 100))  # whole test images
    assert all(math.isfinite(row["loss"]) for row in history)
    assert "linear_best_epoch_test_selected" not in results


@pytest.mark.parametrize("protocol,dim,view", [("dcl", 64, "plain"), ("moco", 64, "plain"), ("nozawa", 128, "augmented")])
def test_every_protocol_with_augmentation(checkpoint, tmp_path, protocol, dim, view):
    results = evaluate(checkpoint, "--protocol", protocol, out=tmp_path / "eval.json")
    check_results(results, protocol, cached=False)
    assert results["settings"]["augment"] == {"dcl": "run", "moco": "crop_flip", "nozawa": "run"}[protocol]
    assert results["data"]["feature_dim"] == dim and results["mean_classifier"]["train_view"] == view
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(results))
    assert os.listdir(tmp_path) == ["eval.json"]  # no temporary file left behind


@pytest.mark.parametrize("protocol,flags,dim", [("dcl", [], 64), ("moco", [], 64), ("nozawa", ["--no_head"], 64),
                                                ("nozawa", [], 128)])
def test_every_protocol_cached(checkpoint, tmp_path, protocol, flags, dim):
    results = evaluate(checkpoint, "--protocol", protocol, "--augment", "none", *flags, out=tmp_path / "a.json")
    check_results(results, protocol, cached=True)
    assert results["data"]["feature_dim"] == dim and not results["timing"]["features_from_cache"]


def test_cached_features_equal_recomputed(checkpoint, tmp_path):
    cache = ["--cache_dir", str(tmp_path / "cache")]
    cached = evaluate(checkpoint, "--protocol", "dcl", "--augment", "none", "--report_best", *cache, out=tmp_path / "a.json")
    # The second run reads the plain features (kNN, mean classifier) from the cache file, but
    # passes the training images through the backbone again every epoch for the probe.
    slow = evaluate(checkpoint, "--protocol", "dcl", "--augment", "none", "--recompute_features", *cache,
                    out=tmp_path / "b.json")
    assert cached["settings"]["cached_features"] and not slow["settings"]["cached_features"]
    assert not cached["timing"]["features_from_cache"] and slow["timing"]["features_from_cache"]
    assert len(os.listdir(tmp_path / "cache")) == 1 and slow["knn"] == cached["knn"]
    assert slow["mean_classifier"] == cached["mean_classifier"]
    a, b = cached["linear"]["history"], slow["linear"]["history"]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    assert [(r["top1"], r["top5"]) for r in a] == [(r["top1"], r["top5"]) for r in b]
    best = cached["linear_best_epoch_test_selected"]
    assert best["top1"] == max(r["top1"] for r in a) and a[best["epoch"] - 1]["top1"] == best["top1"]
    assert "linear_best_epoch_test_selected" not in slow


def test_bn_train_and_default_output_path(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "last.pt")
    frozen = evaluate(run / "last.pt", "--protocol", "dcl", "--augment", "none", "--epochs", "1")
    assert json.loads((run / "eval.json").read_text())["settings"]["bn_train"] is False
    bn = evaluate(run / "last.pt", "--protocol", "dcl", "--augment", "none", "--bn_train", "--report_best", "--epochs", "1")
    out = capsys.readouterr().out
    assert "SELECTED ON THE TEST SET" in out and "linear probe (final epoch 1)" in out
    assert bn["settings"]["bn_train"] and not bn["settings"]["cached_features"]
    # BatchNorm on batch statistics gives other features, hence another loss; kNN is unaffected.
    assert bn["linear"]["history"][0]["loss"] != pytest.approx(frozen["linear"]["history"][0]["loss"], rel=1e-6)
    assert bn["knn"] == frozen["knn"]
    assert json.loads((run / "eval.json").read_text())["settings"]["bn_train"] is True


def test_torchrun_two_processes_equal_one(checkpoint, tmp_path):
    flags = [*SMALL, "--protocol", "nozawa", "--augment", "none"]
    one = linear_eval.main([str(checkpoint), *flags, "--out", str(tmp_path / "one.json")])
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "linear_eval.py",
                        str(checkpoint), *flags, "--out", str(tmp_path / "two.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("linear probe (final epoch") == 1  # only rank 0 prints
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["system"]["world_size"] == 2 and two["knn"] == one["knn"]
    # The ranks' batches together are the single-process batch and the gradients are averaged.
    np.testing.assert_allclose([r["loss"] for r in two["linear"]["history"]],
                               [r["loss"] for r in one["linear"]["history"]], rtol=1e-5)
    assert two["linear"]["top1"] == one["linear"]["top1"]


# ------------------------------------------------------------------------------------------------
# Other training scripts and the text contract
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["moco_mochi.py", "ring_nce.py", "nnclr_kmclr.py"])
def test_checkpoints_of_other_training_scripts(script, tmp_path, cifar_dir):
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.skip(f"{script} does not exist yet")
    module = importlib.import_module(os.path.splitext(script)[0])
    out = tmp_path / "run"
    try:  # the flags api.md section 1 gives every training script
        module.main(["--dataset", "folder", "--data_dir", cifar_dir, "--arch", "resnet18", "--width", "8",
                     "--batch_size", "32", "--subset", "64", "--workers", "0", "--epochs", "1", "--eval_every", "0",
                     "--out_dir", str(out)])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    results = evaluate(out / "last.pt", "--augment", "none", "--protocol", "nozawa", out=tmp_path / "eval.json")
    assert results["script"] == script and 0 <= results["linear"]["top1"] <= 100
    assert 0 <= results["knn"]["top1"] <= 100 and 0 <= results["mean_classifier"]["top1"] <= 100


FAKE_TEXT_SCRIPT = '''
"""A stand-in for nlp_similar_words.py: the contract linear_eval.py relies on for text checkpoints."""
import torch
import torch.nn as nn
from torch.utils.data import Dataset


class Model(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.backbone = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim, bias=False))


def build_model(args):
    return Model(args["vocab"], args["dim"])


class Docs(Dataset):
    """Class c draws 80% of its tokens from its own 10 topic words; token 0 is padding."""

    def __init__(self, n, seed, augment):
        g = torch.Generator().manual_seed(seed)
        self.targets, self.docs, self.augment = [i % 4 for i in range(n)], [], augment
        self.classes = ["World", "Sports", "Business", "Sci/Tech"]
        for label in self.targets:
            length = int(torch.randint(5, 12, (1,), generator=g))
            topic = 1 + 10 * label + torch.randint(0, 10, (length,), generator=g)
            shared = 41 + torch.randint(0, 10, (length,), generator=g)
            self.docs.append(torch.where(torch.rand(length, generator=g) < 0.8, topic, shared))

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        doc = self.docs[i]
        if self.augment:  # erase 20% of the tokens (torch's RNG: seeded by the caller)
            keep = torch.rand(len(doc)) >= 0.2
            doc = doc[keep] if keep.any() else doc[:1]
        return doc, self.targets[i]

    @staticmethod
    def collate_fn(batch):
        docs, labels = zip(*batch)
        return nn.utils.rnn.pad_sequence(docs, batch_first=True), torch.tensor(labels)


def eval_datasets(args, train_augment=False, data_dir=None, checkpoint=None):
    return Docs(400, 1, train_augment), Docs(120, 2, False)
'''


def test_text_checkpoints_use_the_scripts_own_data(tmp_path, monkeypatch):
    (tmp_path / "fake_text_ssl.py").write_text(FAKE_TEXT_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fake_text_ssl")
    torch.manual_seed(0)
    model = module.build_model({"vocab": 51, "dim": 16})
    common.save_checkpoint({"script": "fake_text_ssl.py", "args": {"vocab": 51, "dim": 16}, "epoch": 0,
                            "backbone": model.backbone.state_dict(), "model": model.state_dict()}, str(tmp_path / "last.pt"))
    common_flags = [str(tmp_path / "last.pt"), "--workers", "0", "--batch_size", "200", "--lr", "2.0"]
    raw = linear_eval.main(common_flags + ["--protocol", "nozawa", "--no_head", "--augment", "none"])
    assert raw["settings"]["epochs"] == 20 and raw["settings"]["cached_features"]  # the text preset
    assert raw["data"] == {"num_train": 400, "num_test": 120, "num_classes": 4, "feature_dim": 16,
                           "classes": ["World", "Sports", "Business", "Sci/Tech"]}
    # Untrained bags of embeddings of topic words: easy for the probe and kNN; the mean classifier
    # (Nozawa & Sato: class means of one augmented view, 20% of the tokens erased) is a bit worse.
    assert raw["linear"]["top1"] >= 95 and raw["knn"]["top1"] >= 95 and raw["mean_classifier"]["top1"] >= 80
    head = linear_eval.main(common_flags + ["--protocol", "nozawa", "--epochs", "3", "--subset", "200"])
    assert head["settings"]["augment"] == "run" and not head["settings"]["cached_features"]
    assert head["data"]["num_train"] == 200 and head["mean_classifier"]["train_view"] == "augmented"
    assert os.path.exists(tmp_path / "eval.json")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def assert_exit_2(argv, fragment, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        linear_eval.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("linear_eval.py: error: ") and fragment in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err


def test_bad_checkpoints(checkpoint, tmp_path, capsys):
    assert_exit_2([str(tmp_path / "missing.pt")], "does not exist", capsys)
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "foreign.pt")
    assert_exit_2([str(tmp_path / "foreign.pt")], "not a checkpoint of this project", capsys)
    (tmp_path / "cut.pt").write_bytes(checkpoint.read_bytes()[:1000])
    assert_exit_2([str(tmp_path / "cut.pt")], "cannot read checkpoint", capsys)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["args"]["width"] = 16
    torch.save(ckpt, tmp_path / "wider.pt")
    assert_exit_2([str(tmp_path / "wider.pt"), *SMALL, "--augment", "none"], "does not fit", capsys)
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["script"] = "no_such_script.py"
    torch.save(ckpt, tmp_path / "orphan.pt")
    assert_exit_2([str(tmp_path / "orphan.pt"), *SMALL, "--protocol", "nozawa"], "cannot be imported", capsys)


def test_data_with_other_classes(checkpoint, tmp_path, cifar_dir, capsys):
    for split, classes in (("train", ["airplane", "automobile"]), ("test", ["airplane", "bird"])):
        for name in classes:
            os.makedirs(tmp_path / "data" / split / name)
            for i in range(2):
                shutil.copy(os.path.join(cifar_dir, "test", name, f"000{i}.jpg"), tmp_path / "data" / split / name)
    argv = [str(checkpoint), "--data_dir", str(tmp_path / "data"), "--workers", "0", "--out", str(tmp_path / "e.json")]
    assert_exit_2(argv, "the test split's classes ['airplane', 'bird'] differ from the training split's", capsys)
    shutil.rmtree(tmp_path / "data" / "test")
    assert_exit_2(argv, "no labelled test split", capsys)
    assert not os.path.exists(tmp_path / "e.json")


@pytest.mark.parametrize("flags,fragment", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--knn_t", "0"], "--knn_t must be > 0"),
    (["--milestones", "80", "60"], "--milestones must increase"),
    (["--protocol", "simclr"], "invalid choice"),
    (["--no_head", "--features", "head"], "--no_head contradicts"),
])
def test_bad_flags(flags, fragment, capsys):
    assert_exit_2(["ckpt.pt", *flags], fragment, capsys)


def test_bad_input_as_a_process(tmp_path):
    # The contract seen from the shell: exit status 2, one line on stderr, no traceback.
    assert_one_line_error(run_script("linear_eval.py", str(tmp_path / "missing.pt")), "does not exist")


def test_help_shows_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        linear_eval.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "(default: None)" not in text
    assert "GLOBAL batch" in text and "moco 30.0" in text and "nozawa 0.3" in text and "SELECTED ON THE TEST SET" in text


def test_every_probe_flag_reaches_the_settings():
    args = linear_eval.build_parser().parse_args(
        ["x.pt", "--no-nesterov", "--drop_last", "--init", "normal", "--lr_decay", "0.5", "--mean_view", "augmented",
         "--no-normalize", "--optimizer", "sgd"])
    settings = linear_eval.resolve_settings(args, "nozawa", text=False)
    assert (settings["nesterov"], settings["drop_last"], settings["init"], settings["lr_decay"], settings["mean_view"],
            settings["normalize"]) == (False, True, "normal", 0.5, "augmented", False)
    args = linear_eval.build_parser().parse_args(["x.pt", "--no-drop_last", "--normalize", "--nesterov"])
    settings = linear_eval.resolve_settings(args, "nozawa", text=False)
    assert (settings["drop_last"], settings["normalize"], settings["nesterov"]) == (False, True, True)

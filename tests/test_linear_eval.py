"""linear_eval.py: the evaluation functions against float64 loop references; the presets and their
learning rate per epoch against the original scripts; behaviour on hand-made checkpoints (no
training script runs): a text encoder whose augmentation shifts every class onto the next one
tells which inputs the probe and the mean classifier saw; image checkpoints for the frozen
encoder, the augmented probe inputs, the outputs and torchrun = one process (bad input:
test_eval_errors.py)."""
import json
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
import linear_eval
from conftest import FILLER, ROOT, TOPICS, run_script


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


@pytest.mark.parametrize("seed,k,t,topk", [(0, 1, 0.1, 1), (1, 7, 0.1, 1), (2, 7, 0.5, 1),
                                           (3, 60, 0.07, 1), (4, 60, 0.1, 2), (5, 60, 1.0, 3)])
def test_knn_accuracy_against_loop_reference(seed, k, t, topk):
    # topk > 1 only with k = every training point, so that no class has a zero score (ties).
    train, train_labels, test, test_labels = random_problem(seed)
    got = linear_eval.knn_accuracy(torch.tensor(train), torch.tensor(train_labels),
                                   torch.tensor(test), torch.tensor(test_labels), k=k,
                                   temperature=t, topk=topk)
    assert got == knn_reference(train, train_labels, test, test_labels, k, t, topk, 4)


@pytest.mark.parametrize("seed,topk", [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_class_means_and_mean_classifier_against_loop_reference(seed, topk):
    train, train_labels, test, test_labels = random_problem(seed)
    means = linear_eval.class_means(torch.tensor(train), torch.tensor(train_labels), 5)
    np.testing.assert_allclose(means.numpy(), np.array(means_reference(train, train_labels, 5)),
                               rtol=1e-12, atol=1e-15)
    assert torch.all(means[4] == 0)  # a class without examples
    got = linear_eval.mean_classifier_accuracy(train, train_labels, test, test_labels, topk=topk)
    assert got == mean_classifier_reference(train, train_labels, test, test_labels, topk, 4)


def test_class_means_are_not_renormalised():
    # Class 0: two unit vectors at +-60 degrees, mean (0.5, 0) (length 0.5, direction 0 degrees).
    # Class 1: twice the unit vector at 30 degrees, mean length 1. A test point at 0 degrees scores
    # 0.5 against class 0 and cos 30 = 0.866 against class 1, so the mean classifier says class 1;
    # re-normalised means would score 1 vs 0.866 and say class 0.
    a, b = math.radians(60), math.radians(30)
    train = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)],
                          [math.cos(b), math.sin(b)], [2 * math.cos(b), 2 * math.sin(b)]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    test, test_labels = torch.tensor([[3.0, 0.0]], dtype=torch.float64), torch.tensor([1])
    means = linear_eval.class_means(train, labels, 2)
    torch.testing.assert_close(means, torch.tensor([[0.5, 0.0], [math.cos(b), math.sin(b)]],
                                                   dtype=torch.float64))
    assert linear_eval.mean_classifier_accuracy(train, labels, test, test_labels) == 1.0


def test_topk_one_is_top1_and_topk_all_is_one():
    train, train_labels, test, test_labels = random_problem(7)
    x, y, q, qy = map(torch.tensor, (train, train_labels, test, test_labels))
    top1 = mean_classifier_reference(train, train_labels, test, test_labels, 1, 4)
    assert linear_eval.mean_classifier_accuracy(x, y, q, qy, topk=1) == top1 < 1.0
    assert linear_eval.knn_accuracy(x, y, q, qy, k=9, topk=1) == knn_reference(
        train, train_labels, test, test_labels, 9, 0.1, 1, 4) < 1.0
    # every class in the top 4 of 4 classes (k = every point: no class without a vote)
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
# The presets against the original scripts
# ------------------------------------------------------------------------------------------------

def settings(protocol, *flags, text=False):
    args = linear_eval.get_parser().parse_args(["x.pt", *flags])
    return linear_eval.resolve_settings(args, protocol, text)


# (setting, value) as the original code has it:
ORIGINALS = {
    # chingyaoc/DCL linear.py (7d6345f): --batch_size 512 (l. 67), --epochs 100 (l. 68),
    # optim.Adam(fc, lr=1e-3, weight_decay=1e-6) (l. 82), no schedule; the same in joshr17/HCL
    # image/linear.py (7b4647f) l. 72, 73, 90. kNN: DCL main.py --k 200 (l. 117), weights
    # (sim / temperature).exp() (l. 94) with --temperature 0.5 (l. 115).
    "dcl": dict(optimizer="adam", lr=1e-3, weight_decay=1e-6, schedule="constant", epochs=100,
                batch_size=512, knn_k=200, knn_t=0.5),
    # facebookresearch/moco main_lincls.py (78b69ca): --epochs 100 (l. 38), --batch-size 256
    # (l. 42), --lr 30 (l. 47), --schedule [60, 80] (l. 49), --momentum 0.9 (l. 51), --wd 0
    # (l. 53), SGD without Nesterov (l. 214-216), fc N(0, 0.01) and zero bias (l. 152-153).
    # kNN: colab/moco_cifar10_demo.ipynb (branch colab-notebook) knn_k=200, knn_t=0.1.
    "moco": dict(optimizer="sgd", lr=30.0, momentum=0.9, nesterov=False, weight_decay=0.0,
                 schedule="step", milestones=[60, 80], lr_decay=0.1, epochs=100, batch_size=256,
                 init="normal", knn_k=200, knn_t=0.1),
    # nzw0301/Understanding-Negative-Samples (8a6c757): conf/optimizer/linear.yaml momentum 0.9
    # (l. 4), lr 0.3 (l. 6), decay 0 (l. 7); src/eval_utils.py SGD nesterov=True (l. 144-148),
    # CosineAnnealingLR(T_max=epochs, eta_min=0.) (l. 152); conf/experiment/evaluation/cifar/
    # linear.yaml batches 512 per process (x 4 processes) and epochs 100 (l. 3, 6); linear.py
    # train_drop_last=True (l. 69). No kNN there: k = 200, t = 0.1 as MoCo's demo.
    "nozawa": dict(optimizer="sgd", lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.0,
                   schedule="cosine", epochs=100, batch_size=4 * 512, drop_last=True, knn_k=200,
                   knn_t=0.1),
}


@pytest.mark.parametrize("protocol", list(ORIGINALS))
def test_presets_are_the_original_scripts_settings(protocol):
    s = settings(protocol)
    assert {key: s[key] for key in ORIGINALS[protocol]} == ORIGINALS[protocol]
    # Nozawa & Sato's AG News probe: conf/experiment/evaluation/ag_news/linear.yaml l. 3, 6
    text = settings("nozawa", text=True)
    assert (text["epochs"], text["batch_size"]) == (20, 512)


def test_learning_rate_per_epoch_is_the_originals(monkeypatch):
    """The lr each optimiser step used, epoch by epoch, over the presets' full 100 epochs (one
    step per epoch on 8 tensors), against the originals' values."""
    used = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    try:
        x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
        lrs = {}
        for protocol in ORIGINALS:
            used.clear()
            s = settings(protocol, "--batch_size", "8", "--no-drop_last")
            linear_eval.train_probe(nn.Identity(), s, (x, y), x, y, 2, torch.device("cpu"), 0)
            lrs[protocol] = list(used)
    finally:
        hook.remove()
    assert all(len(v) == 100 for v in lrs.values())
    # main_lincls.py adjust_learning_rate (l. 475-479): lr *= 0.1 for each milestone with
    # epoch >= milestone, epochs counted from 0 (l. 280-283)
    moco = {0: 30.0, 59: 30.0, 60: 3.0, 79: 3.0, 80: 0.3, 99: 0.3}
    assert {e: lrs["moco"][e] for e in moco} == pytest.approx(moco, rel=1e-12)
    assert set(lrs["dcl"]) == {1e-3}  # constant (DCL/HCL linear.py have no scheduler)
    # Nozawa & Sato: CosineAnnealingLR(T_max=100, eta_min=0) stepped after each epoch (l. 188)
    probe = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.3, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=0.0)
    reference = []
    for _ in range(100):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs["nozawa"] == pytest.approx(reference, rel=1e-9, abs=1e-15)
    # and by hand: 0.3 (1 + cos(pi e / 100)) / 2 at e = 0, 25, 50
    assert lrs["nozawa"][:51:25] == pytest.approx([0.3, 0.15 * (1 + 0.5 ** 0.5), 0.15])


def test_moco_probe_initialisation():
    # main_lincls.py l. 152-153: weight ~ N(0, 0.01), bias 0; the others keep nn.Linear's init
    probe = linear_eval.build_probe(512, 10, settings("moco"), seed=0)
    assert 0.009 < float(probe.weight.detach().std()) < 0.011 and torch.all(probe.bias == 0)
    default = linear_eval.build_probe(512, 10, settings("dcl"), seed=0)
    assert float(default.weight.detach().std()) > 0.02 and torch.any(default.bias != 0)


def test_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(10, 16, generator=g)
    y = torch.arange(1000) % 10
    x = centres[y] + 0.3 * torch.randn(1000, 16, generator=g)
    for protocol in ("dcl", "moco", "nozawa"):
        s = settings(protocol, "--epochs", "20", "--batch_size", "50")
        s["milestones"] = [12, 16]
        history, probe = linear_eval.train_probe(nn.Identity(), s, (x[:600], y[:600]), x[600:],
                                                 y[600:], 10, torch.device("cpu"), seed=0)
        assert history[-1]["top1"] >= 99.0 and history[0]["loss"] > history[-1]["loss"], protocol


# ------------------------------------------------------------------------------------------------
# Hand-made checkpoints
# ------------------------------------------------------------------------------------------------

VOCAB = [w for topic in TOPICS for w in topic] + FILLER + ["<unk>"]


def text_checkpoint(path, data_dir, embedding, head_weight, table=None, augmentation="erase",
                    mask_ratio=0.0):
    """An nlp_similar_words.py-style checkpoint built by hand (the contract of its "last.pt")."""
    dim = embedding.shape[1]
    head = nn.Sequential(OrderedDict([("0", nn.Linear(dim, head_weight.shape[0]))]))
    head[0].weight.data.copy_(head_weight)
    head[0].bias.data.zero_()
    args = dict(data_dir=data_dir, min_freq=1, augmentation=augmentation, mask_ratio=mask_ratio,
                embedding_dim=dim, vocab_size=len(VOCAB), subset=0, batch_size=16,
                temperature=0.5)
    layout = [["0", "linear", dim, head_weight.shape[0], True]]
    torch.save({"script": "nlp_similar_words.py", "args": args, "epoch": 1, "vocab": VOCAB,
                "replace_ids": table, "classes": ["0", "1", "2", "3"],
                "backbone": {"embedding.weight": embedding},
                "head": {"layout": layout, "state": head.state_dict()}}, path)
    return str(path)


def class_embedding(scale=1.0):
    """Topic words of class c -> scale * e_c; filler, <unk> and padding -> 0."""
    emb = torch.zeros(len(VOCAB) + 1, 4)
    for c, topic in enumerate(TOPICS):
        for w in topic:
            emb[VOCAB.index(w), c] = scale
    return emb


def shift_table():
    """Similar-word table sending each topic word of class c to words of class c + 1 (mod 4)."""
    table = torch.arange(len(VOCAB))[:, None].repeat(1, 5)
    for c, topic in enumerate(TOPICS):
        for w in topic:
            table[VOCAB.index(w)] = torch.tensor([VOCAB.index(x) for x in TOPICS[(c + 1) % 4][:5]])
    return table


@pytest.fixture(scope="module")
def shifted(tmp_path_factory, ag_news):
    """Augmented training documents look like the next class; clean ones like their own."""
    return text_checkpoint(tmp_path_factory.mktemp("shift") / "last.pt", ag_news,
                           class_embedding(), torch.eye(4), shift_table(), "replace", 0.999)


def image_checkpoint(path, data_dir, script="simclr_debiased.py", head="nozawa", stats=False):
    """A checkpoint of a random width-4 ResNet-18 and head; `stats`: random BatchNorm running
    statistics (as a trained network has), so that resetting them would show."""
    g = torch.Generator().manual_seed(0)
    backbone = common.build_backbone("resnet18", "cifar", 4, 1)
    layout = [["linear1", "linear", 32, 16, True], ["bn1", "bn", 16, True], ["relu1", "relu"],
              ["linear2", "linear", 16, 8, False]]
    proj = nn.Sequential(OrderedDict([("linear1", nn.Linear(32, 16)), ("bn1", nn.BatchNorm1d(16)),
                                      ("relu1", nn.ReLU()),
                                      ("linear2", nn.Linear(16, 8, bias=False))]))
    if stats:
        for bn in [m for m in [*backbone.modules(), *proj.modules()]
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
            bn.num_batches_tracked.fill_(100)
    args = dict(dataset="folder", data_dir=data_dir, norm="none", crop_size=16, blur_p=0.0,
                arch="resnet18", stem="cifar", width=4, stem_padding=1, head=head, batch_size=16,
                temperature=0.5)
    torch.save({"script": script, "args": args, "epoch": 1, "backbone": backbone.state_dict(),
                "head": {"layout": layout, "state": proj.state_dict()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory, image_folder):
    return image_checkpoint(tmp_path_factory.mktemp("img") / "last.pt", image_folder)


QUICK = ["--workers", "0", "--batch_size", "32", "--feature_batch_size", "64"]


# ------------------------------------------------------------------------------------------------
# Behaviour on hand-made checkpoints
# ------------------------------------------------------------------------------------------------

def test_text_probe_and_mean_classifier_see_the_augmented_training_documents(shifted, tmp_path):
    # Augmented documents of class c embed as class c + 1: whatever trained on them predicts c - 1
    # for the clean test documents (0 %); on clean training documents everything is 100 %.
    out = str(tmp_path / "eval.json")
    r = linear_eval.main([shifted, "--epochs", "10", "--out", out, *QUICK])  # auto: nozawa
    assert r["linear"]["top1"] < 10 and r["mean_classifier"]["top1"] < 10
    assert r["knn"]["top1"] == 100.0  # kNN: clean training features
    r = linear_eval.main([shifted, "--epochs", "10", "--out", out, "--augment", "none",
                          "--mean_view", "plain", *QUICK])
    assert r["linear"]["top1"] > 90 and r["mean_classifier"]["top1"] == 100.0
    assert json.loads(open(out).read())["linear"]["top1"] > 90


def test_mean_classifier_stays_at_the_head_output_with_no_head(ag_news, tmp_path):
    # The head merges classes 0 and 1: at the head output the mean classifier gets 75 %, on the
    # backbone 100 %. Nozawa & Sato's mu acc is the head's, also with --no_head.
    merge = torch.eye(4)
    merge[0, 1], merge[1, 1] = 1.0, 0.0
    ckpt = text_checkpoint(tmp_path / "last.pt", ag_news, class_embedding(), merge)
    r = linear_eval.main([ckpt, "--protocol", "nozawa", "--no_head", "--epochs", "1", *QUICK])
    assert r["mean_classifier"]["top1"] == 75.0 and r["knn"]["top1"] == 100.0
    r = linear_eval.main([ckpt, "--protocol", "dcl", "--epochs", "1", *QUICK])
    assert r["mean_classifier"]["top1"] == 100.0


def test_the_two_readme_evaluations_keep_both_results(ag_news, tmp_path):
    # `linear_eval.py CKPT` and `linear_eval.py CKPT --protocol nozawa --no_head`: two files
    merge = torch.eye(4)
    merge[0, 1], merge[1, 1] = 1.0, 0.0
    ckpt = text_checkpoint(tmp_path / "last.pt", ag_news, class_embedding(), merge)
    linear_eval.main([ckpt, "--epochs", "2", *QUICK])
    linear_eval.main([ckpt, "--protocol", "nozawa", "--no_head", "--epochs", "2", *QUICK])
    head = json.loads((tmp_path / "eval_nozawa.json").read_text())
    backbone = json.loads((tmp_path / "eval_nozawa_no_head.json").read_text())
    # the head merges two classes: its probe cannot pass 75 %, the backbone's reaches 100 %
    assert head["linear"]["top1"] <= 75.0 < backbone["linear"]["top1"]


def test_nozawa_probe_features_are_l2_normalised(ag_news, tmp_path, monkeypatch):
    ckpt = text_checkpoint(tmp_path / "last.pt", ag_news, class_embedding(3.0), 2 * torch.eye(4))
    fed = []
    real = linear_eval.train_probe

    def recording(encoder, s, train, test_x, *rest, **kw):
        fed.append((train[0], test_x))
        return real(encoder, s, train, test_x, *rest, **kw)

    monkeypatch.setattr(linear_eval, "train_probe", recording)
    linear_eval.main([ckpt, "--protocol", "nozawa", "--augment", "none", "--epochs", "1", *QUICK])
    for x in fed[-1]:
        torch.testing.assert_close(x.norm(dim=1), torch.ones(x.shape[0]))
    linear_eval.main([ckpt, "--protocol", "nozawa", "--no_head", "--augment", "none", "--epochs",
                      "1", *QUICK])
    assert fed[-1][0].norm(dim=1).max() > 1.1  # raw encoder features (3 x the topic share)


def test_image_probe_trains_on_augmented_images(image_ckpt, monkeypatch, tmp_path):
    probe_inputs, state = [], {"probe": False}
    real_build, real_train = linear_eval.build_encoder, linear_eval.train_probe

    def build(*a, **kw):
        encoder = real_build(*a, **kw)
        forward = encoder.forward
        encoder.forward = lambda x: (probe_inputs.append(x.clone()) if state["probe"] else None) \
            or forward(x)
        return encoder

    def train(*a, **kw):
        state["probe"] = True
        try:
            return real_train(*a, **kw)
        finally:
            state["probe"] = False

    monkeypatch.setattr(linear_eval, "build_encoder", build)
    monkeypatch.setattr(linear_eval, "train_probe", train)
    linear_eval.main([image_ckpt, "--epochs", "1", "--out", str(tmp_path / "e.json"), *QUICK])
    data, _ = linear_eval.build_data(torch.load(image_ckpt, weights_only=True), None)
    plain = torch.stack([x for x, _ in data["train"]]).flatten(1)
    seen = torch.cat(probe_inputs).flatten(1)
    assert seen.shape[0] == 64  # every training image once (batches of 32, drop_last)
    identical = (torch.cdist(seen, plain).min(dim=1).values < 1e-6).float().mean()
    assert identical < 0.5, identical  # plain images would all be found


def test_encoder_weights_and_batchnorm_statistics_stay_unless_bn_train(image_folder, tmp_path,
                                                                        monkeypatch):
    """main_lincls.py keeps the model in eval() while the probe trains (l. 326, "it is not
    legitimate to change any part of the pre-trained model"), Nozawa & Sato too (eval_utils.py
    l. 166): every tensor of the encoders, running statistics included, stays bit for bit the
    checkpoint's. DCL/HCL's net.train() (--bn_train) moves the statistics, not the weights."""
    ckpt_path = image_checkpoint(tmp_path / "last.pt", image_folder, stats=True)
    saved = torch.load(ckpt_path, weights_only=True)
    built = []
    real = linear_eval.build_encoder
    monkeypatch.setattr(linear_eval, "build_encoder",
                        lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    for flags in ([], ["--bn_train"]):
        built.clear()
        linear_eval.main([ckpt_path, "--epochs", "2", "--out", str(tmp_path / "e.json"), *QUICK,
                          *flags])
        encoder = built[0]  # the probe's (nozawa: the head output, so backbone and head)
        weights = {**{f"backbone.{k}": v for k, v in saved["backbone"].items()},
                   **{f"head.{k}": v for k, v in saved["head"]["state"].items()}}
        now = encoder.state_dict()
        assert set(now) == set(weights)
        stats = [k for k in weights if "running_" in k or "num_batches" in k]
        moved = [k for k in stats if not torch.equal(now[k], weights[k])]
        assert all(torch.equal(now[k], weights[k]) for k in weights if k not in stats)
        if flags:
            assert len(moved) == len(stats), set(stats) - set(moved)  # every BN layer followed
        else:
            assert moved == []


def test_report_best_is_the_best_final_epoch_of_shorter_runs(image_ckpt, tmp_path):
    # The dcl preset (Adam, constant lr) with the same seed trains identically however many epochs
    # follow: the probe after e epochs of a 3-epoch run is the final probe of an e-epoch run.
    # --report_best must report the best of those (selected on the test set), the default the last.
    finals = []
    for epochs in (1, 2, 3):
        r = linear_eval.main([image_ckpt, "--protocol", "dcl", "--epochs", str(epochs),
                              "--report_best", "--out", str(tmp_path / "e.json"), *QUICK])
        finals.append(r["linear"]["top1"])
    assert [h["top1"] for h in r["linear"]["history"]] == finals
    best = r["linear_best_epoch_test_selected"]
    assert best["top1"] == max(finals) and best["epoch"] == 1 + finals.index(max(finals))
    assert r["linear"]["top1"] == finals[-1]


def test_per_item_draws_do_not_depend_on_order_or_process():
    class Draws(torch.utils.data.Dataset):  # item i: a draw from torch's RNG
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.rand(3), i

    data = linear_eval.PerItemDraws(Draws(), seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    forward = [data[i][0] for i in range(6)]
    backward = [data[i][0] for i in reversed(range(6))][::-1]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert len({tuple(x.tolist()) for x in forward}) == 6  # items differ
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2)  # in workers too
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.stack(forward))
    data.stream = 1  # the next epoch draws anew
    assert not any(torch.equal(data[i][0], forward[i]) for i in range(6))
    assert not torch.equal(linear_eval.PerItemDraws(Draws(), seed=6)[0][0], forward[0])


def test_auto_protocol_follows_the_run(image_folder, tmp_path):
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    cases = [("simclr_debiased.py", "nozawa", "nozawa"), ("simclr_debiased.py", "simclr", "dcl"),
             ("moco_mochi.py", "simclr", "moco"), ("ring_nce.py", "simclr", "moco")]
    for i, (script, head, expected) in enumerate(cases):
        ckpt = load(image_checkpoint(tmp_path / f"{i}.pt", image_folder, script, head))
        assert linear_eval.auto_protocol(ckpt) == expected
    assert linear_eval.auto_protocol({"script": "nlp_similar_words.py", "args": {}}) == "nozawa"


def test_torchrun_two_processes_equal_one_with_the_default_augmentation(image_ckpt, tmp_path):
    # The default protocol here (nozawa): augmented probe inputs every epoch and an augmented
    # view for the class means. One process with 2 DataLoader workers against 2 processes
    # without: every draw must follow the item, not the process or worker that reads it.
    flags = ["--epochs", "2", "--batch_size", "16", "--feature_batch_size", "16"]
    one = linear_eval.main([image_ckpt, "--out", str(tmp_path / "one.json"), "--workers", "2",
                            *flags])
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "linear_eval.py"), image_ckpt, "--workers", "0",
                        "--out", str(tmp_path / "two.json"), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["system"]["world_size"] == 2 and two["settings"]["augment"] == "run"
    assert two["settings"]["mean_view"] == "augmented"
    for key in ("knn", "mean_classifier"):
        assert (two[key]["top1"], two[key]["top5"]) == (one[key]["top1"], one[key]["top5"])
    for a, b in zip(one["linear"]["history"], two["linear"]["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["top1"] == b["top1"]


def test_cmc_checkpoint_is_evaluated_on_its_lab_input(image_folder, tmp_path):
    """ring_nce.py's CMC trains on normalised Lab images: the evaluation must feed the same input
    (the data set's plain view equals ring_nce's own), and then reproduces the run's kNN monitor."""
    import ring_nce
    out = tmp_path / "cmc"
    ring_nce.main(["--dataset", "folder", "--data_dir", image_folder, "--arch", "resnet18",
                   "--width", "4", "--crop_size", "16", "--batch_size", "16", "--workers", "0",
                   "--method", "cmc", "--num_negatives", "32", "--epochs", "1", "--out_dir",
                   str(out)])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    data, _ = linear_eval.build_data(ckpt, None, views=("run",))
    image = common.build_dataset("folder", image_folder, "test")[5][0]
    mean, std = (torch.tensor(ckpt["args"][k])[:, None, None] for k in ("lab_mean", "lab_std"))
    expected = (common.rgb_to_lab(common.eval_transform(None)(image)) - mean) / std
    torch.testing.assert_close(data["test"][5][0], expected)
    assert data["run"][0][0].shape == (3, 16, 16)
    with open(out / "metrics.csv") as f:
        monitor = float(list(__import__("csv").DictReader(f))[-1]["knn_top1"])
    linear_eval.main([str(out / "last.pt"), "--protocol", "moco", "--epochs", "1", "--augment",
                      "none", "--knn_k", "200", "--knn_t", "0.1", "--workers", "0", "--out",
                      str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["knn"]["top1"] == pytest.approx(monitor, abs=1e-6)

"""linear_eval.py: the evaluation functions against float64 loop references; behaviour on
hand-made checkpoints (no training script runs): a text encoder whose augmentation shifts every
class onto the next one tells which inputs the probe and the mean classifier saw; image
checkpoints for the protocols, the augmented probe inputs, torchrun = one process, bad input."""
import json
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

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
    scores = linear_eval.knn_scores(x, y, q, 4, k=9, temperature=0.1)
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
# Hand-made checkpoints
# ------------------------------------------------------------------------------------------------

VOCAB = [w for topic in TOPICS for w in topic] + FILLER + ["<unk>"]


def text_checkpoint(path, data_dir, embedding, head_weight, table=None, augmentation="erase", mask_ratio=0.0):
    """An nlp_similar_words.py-style checkpoint built by hand (the contract of its "last.pt")."""
    dim = embedding.shape[1]
    head = nn.Sequential(OrderedDict([("0", nn.Linear(dim, head_weight.shape[0]))]))
    head[0].weight.data.copy_(head_weight)
    head[0].bias.data.zero_()
    args = dict(data_dir=data_dir, min_freq=1, augmentation=augmentation, mask_ratio=mask_ratio, embedding_dim=dim,
                vocab_size=len(VOCAB), subset=0, batch_size=16, temperature=0.5)
    torch.save({"script": "nlp_similar_words.py", "args": args, "epoch": 1, "vocab": VOCAB, "replace_ids": table,
                "classes": ["0", "1", "2", "3"], "backbone": {"embedding.weight": embedding},
                "head": {"layout": [["0", "linear", dim, head_weight.shape[0], True]], "state": head.state_dict()}}, path)
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
    return text_checkpoint(tmp_path_factory.mktemp("shift") / "last.pt", ag_news, class_embedding(), torch.eye(4),
                           shift_table(), "replace", 0.999)


def image_checkpoint(path, data_dir, script="simclr_debiased.py", head="nozawa"):
    backbone = common.build_backbone("resnet18", "cifar", 4, 1)
    layout = [["linear1", "linear", 32, 16, True], ["bn1", "bn", 16, True], ["relu1", "relu"],
              ["linear2", "linear", 16, 8, False]]
    proj = nn.Sequential(OrderedDict([("linear1", nn.Linear(32, 16)), ("bn1", nn.BatchNorm1d(16)),
                                      ("relu1", nn.ReLU()), ("linear2", nn.Linear(16, 8, bias=False))]))
    args = dict(dataset="folder", data_dir=data_dir, norm="none", crop_size=16, blur_p=0.0, arch="resnet18",
                stem="cifar", width=4, stem_padding=1, head=head, batch_size=16, temperature=0.5)
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
    r = linear_eval.main([shifted, "--epochs", "10", "--out", out, *QUICK])  # nozawa: run augmentation, augmented view
    assert r["protocol"] == "nozawa" and r["settings"]["augment"] == "run" and r["settings"]["mean_view"] == "augmented"
    assert r["linear"]["top1"] < 10 and r["mean_classifier"]["top1"] < 10
    assert r["knn"]["top1"] == 100.0  # kNN: clean training features
    r = linear_eval.main([shifted, "--epochs", "10", "--out", out, "--augment", "none", "--mean_view", "plain", *QUICK])
    assert r["linear"]["top1"] > 90 and r["mean_classifier"]["top1"] == 100.0
    assert json.loads(open(out).read())["linear"]["top1"] == r["linear"]["top1"]


def test_mean_classifier_stays_at_the_head_output_with_no_head(ag_news, tmp_path):
    # The head merges classes 0 and 1: at the head output the mean classifier gets 75 %, on the
    # backbone 100 %. Nozawa & Sato's mu acc is the head's, also with --no_head.
    merge = torch.eye(4)
    merge[0, 1], merge[1, 1] = 1.0, 0.0
    ckpt = text_checkpoint(tmp_path / "last.pt", ag_news, class_embedding(), merge)
    r = linear_eval.main([ckpt, "--protocol", "nozawa", "--no_head", "--epochs", "1", *QUICK])
    assert r["settings"]["features"] == "backbone" and r["mean_classifier"]["features"] == "head"
    assert r["mean_classifier"]["top1"] == 75.0 and r["knn"]["top1"] == 100.0
    r = linear_eval.main([ckpt, "--protocol", "dcl", "--epochs", "1", *QUICK])
    assert r["mean_classifier"]["top1"] == 100.0


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
    linear_eval.main([ckpt, "--protocol", "nozawa", "--no_head", "--augment", "none", "--epochs", "1", *QUICK])
    assert fed[-1][0].norm(dim=1).max() > 1.1  # raw encoder features (3 x the topic share)


def test_image_probe_trains_on_augmented_images(image_ckpt, monkeypatch):
    probe_inputs, state = [], {"probe": False}
    real_build, real_train = linear_eval.build_encoder, linear_eval.train_probe

    def build(*a, **kw):
        encoder = real_build(*a, **kw)
        forward = encoder.forward
        encoder.forward = lambda x: (probe_inputs.append(x.clone()) if state["probe"] else None) or forward(x)
        return encoder

    def train(*a, **kw):
        state["probe"] = True
        try:
            return real_train(*a, **kw)
        finally:
            state["probe"] = False

    monkeypatch.setattr(linear_eval, "build_encoder", build)
    monkeypatch.setattr(linear_eval, "train_probe", train)
    r = linear_eval.main([image_ckpt, "--epochs", "1", *QUICK])
    assert r["protocol"] == "nozawa" and r["settings"]["augment"] == "run"
    data, _ = linear_eval.build_data(torch.load(image_ckpt, weights_only=True), None)
    plain = torch.stack([x for x, _ in data["train"]]).flatten(1)
    seen = torch.cat(probe_inputs).flatten(1)
    assert seen.shape[0] == 64
    identical = (torch.cdist(seen, plain).min(dim=1).values < 1e-6).float().mean()
    assert identical < 0.5, identical  # plain images would all be found


def test_auto_protocol_follows_the_run(image_folder, tmp_path):
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    cases = [("simclr_debiased.py", "nozawa", "nozawa"), ("simclr_debiased.py", "simclr", "dcl"),
             ("moco_mochi.py", "simclr", "moco"), ("ring_nce.py", "simclr", "moco")]
    for i, (script, head, expected) in enumerate(cases):
        ckpt = load(image_checkpoint(tmp_path / f"{i}.pt", image_folder, script, head))
        assert linear_eval.auto_protocol(ckpt) == expected
    assert linear_eval.auto_protocol({"script": "nlp_similar_words.py", "args": {}}) == "nozawa"


def test_moco_probe_initialisation_and_presets():
    args = linear_eval.get_parser().parse_args(["x.pt"])
    moco = linear_eval.resolve_settings(args, "moco")
    probe = linear_eval.build_probe(512, 10, moco, seed=0)
    assert 0.009 < float(probe.weight.detach().std()) < 0.011 and torch.all(probe.bias == 0)
    default = linear_eval.build_probe(512, 10, linear_eval.resolve_settings(args, "dcl"), seed=0)
    assert float(default.weight.detach().std()) > 0.02 and torch.any(default.bias != 0)
    assert (moco["lr"], moco["milestones"], moco["augment"]) == (30.0, [60, 80], "crop_flip")
    noz = linear_eval.resolve_settings(args, "nozawa", text=True)
    assert (noz["epochs"], noz["batch_size"], noz["nesterov"], noz["drop_last"]) == (20, 512, True, True)
    assert [linear_eval.epoch_lr(noz, e) for e in (0, 10)] == [0.3, pytest.approx(0.15)]


def test_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(10, 16, generator=g)
    y = torch.arange(1000) % 10
    x = centres[y] + 0.3 * torch.randn(1000, 16, generator=g)
    args = linear_eval.get_parser().parse_args(["x.pt", "--epochs", "20", "--batch_size", "50"])
    for protocol in ("dcl", "moco", "nozawa"):
        s = linear_eval.resolve_settings(args, protocol)
        s["milestones"] = [12, 16]
        history, probe = linear_eval.train_probe(nn.Identity(), s, (x[:600], y[:600]), x[600:], y[600:], 10,
                                                 torch.device("cpu"), seed=0)
        assert history[-1]["top1"] >= 99.0 and history[0]["loss"] > history[-1]["loss"], protocol
        assert [row["epoch"] for row in history] == list(range(1, 21))


def test_every_protocol_on_an_image_checkpoint(image_ckpt, tmp_path):
    for protocol in ("dcl", "moco"):
        r = linear_eval.main([image_ckpt, "--protocol", protocol, "--epochs", "2", "--report_best", "--bn_train",
                              "--out", str(tmp_path / f"{protocol}.json"), *QUICK])
        assert r["data"]["feature_dim"] == 32 and r["data"]["num_classes"] == 4
        best = r["linear_best_epoch_test_selected"]
        assert best["top1"] == max(h["top1"] for h in r["linear"]["history"])


def test_torchrun_two_processes_equal_one(image_ckpt, tmp_path):
    flags = ["--augment", "none", "--mean_view", "plain", "--epochs", "3", "--workers", "0", "--batch_size", "16"]
    one = linear_eval.main([image_ckpt, "--out", str(tmp_path / "one.json"), *flags])
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "linear_eval.py"), image_ckpt, "--out", str(tmp_path / "two.json"), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["system"]["world_size"] == 2
    for key in ("knn", "mean_classifier"):
        assert (two[key]["top1"], two[key]["top5"]) == (one[key]["top1"], one[key]["top5"])
    for a, b in zip(one["linear"]["history"], two["linear"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["top1"] == b["top1"]


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, before any compute
# ------------------------------------------------------------------------------------------------

def exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        linear_eval.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and fragment in err.splitlines()[-1], err


def test_bad_input(image_ckpt, shifted, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    cases = [([str(tmp_path / "missing.pt")], "cannot read checkpoint"), ([str(junk)], "cannot read checkpoint"),
             ([str(tmp_path / "foreign.pt")], "not a checkpoint of this project"),
             ([image_ckpt, "--data_dir", str(tmp_path / "nowhere")], "no images"),
             ([shifted, "--data_dir", str(tmp_path)], "train.csv"),
             ([image_ckpt, "--out", str(tmp_path / "no" / "dir" / "e.json")], "cannot write --out"),
             ([image_ckpt, "--batch_size", "128"], "make no full batch of 128"),
             ([image_ckpt, "--optimizer", "adam", "--nesterov"], "--nesterov needs"),
             ([image_ckpt, "--lr", "-1"], "--lr"), ([image_ckpt, "--lr", "nan"], "finite"),
             ([image_ckpt, "--epochs", "0"], "--epochs"), ([shifted, "--augment", "crop_flip"], "image checkpoint")]
    for argv, fragment in cases:
        exit_2(argv, fragment, capsys)


def test_cmc_checkpoint_is_evaluated_on_its_lab_input(image_folder, tmp_path):
    """ring_nce.py's CMC trains on normalised Lab images: the evaluation must feed the same input
    (the data set's plain view equals ring_nce's own), and then reproduces the run's kNN monitor."""
    import ring_nce
    out = tmp_path / "cmc"
    ring_nce.main(["--dataset", "folder", "--data_dir", image_folder, "--arch", "resnet18", "--width", "4",
                   "--crop_size", "16", "--batch_size", "16", "--workers", "0", "--method", "cmc",
                   "--num_negatives", "32", "--epochs", "1", "--out_dir", str(out)])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    data, _ = linear_eval.build_data(ckpt, None, views=("run",))
    image = common.build_dataset("folder", image_folder, "test")[5][0]
    expected = ring_nce.ToLab(common.eval_transform(None))(image)
    torch.testing.assert_close(data["test"][5][0], expected)
    assert data["run"][0][0].shape == (3, 16, 16)
    with open(out / "metrics.csv") as f:
        monitor = float(list(__import__("csv").DictReader(f))[-1]["knn_top1"])
    linear_eval.main([str(out / "last.pt"), "--protocol", "moco", "--epochs", "1", "--augment", "none",
                      "--knn_k", "200", "--knn_t", "0.1", "--workers", "0", "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["knn"]["top1"] == pytest.approx(monitor, abs=1e-6)

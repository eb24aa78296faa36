"""common.py: backbones, data, augmentations, schedule, LARC, kNN, checkpoints, CSV, resume args."""
import argparse
import math
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_backbone_is_torchvision_resnet(arch):
    ours = common.build_backbone(arch, stem="imagenet", width=64)
    theirs = getattr(torchvision.models, arch)()
    theirs.fc = torch.nn.Identity()
    ours.load_state_dict(theirs.state_dict())  # same names and shapes
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.out_dim == (2048 if arch == "resnet50" else 512)


def test_cifar_stem_and_width():
    net = common.build_backbone("resnet18", "cifar", width=8)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 64) and net.out_dim == 64
    # the ResNet-50 of DCL/HCL/leftthomas: 23.52M parameters with a 10-class linear layer
    r50 = common.build_backbone("resnet50", "cifar", 64)
    assert sum(p.numel() for p in r50.parameters()) + 2048 * 10 + 10 == pytest.approx(23.52e6, rel=1e-3)
    with pytest.raises(ValueError, match="arch"):
        common.build_backbone("vgg", "cifar")


def test_folder_dataset(cifar_dir):
    train = common.build_dataset("folder", cifar_dir, "train")
    test = common.build_dataset("folder", cifar_dir, "test")
    assert len(train) == 10000 and len(test) == 2000
    assert train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    img, label = train[1500]
    assert img.size == (32, 32) and label == 1
    assert common.num_classes(train) == 10


def test_flat_folder_and_missing_test(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    flat = common.build_dataset("folder", str(tmp_path), "train")
    assert len(flat) == 3 and flat.targets == [-1, -1, -1] and common.num_classes(flat) == 0
    assert common.build_dataset("folder", str(tmp_path), "test") is None


def test_missing_and_unreadable_data(tmp_path):
    with pytest.raises(common.UserError, match="expected .*/train/<class>"):
        common.build_dataset("folder", str(tmp_path / "nowhere"), "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    broken = common.build_dataset("folder", str(tmp_path), "train")
    with pytest.raises(common.UserError, match="cannot read image .*broken.jpg"):
        broken[0]
    with pytest.raises(common.UserError, match="downloading is off; expected .*cifar-10-batches-py"):
        common.build_dataset("cifar10", str(tmp_path), "train", download=False)
    with pytest.raises(common.UserError, match="split"):
        common.build_dataset("cifar10", str(tmp_path), "unlabeled")


def test_subset_is_deterministic_and_spread(cifar_dir):
    train = common.build_dataset("folder", cifar_dir, "train")
    part = common.subset(train, 50)
    assert len(part) == 50 and part.targets == [train.targets[i * 200] for i in range(50)]
    assert sorted(set(part.targets)) == list(range(10))  # every class of a class-sorted folder
    assert common.subset(train, 0) is train and common.subset(train, 10 ** 6) is train


def test_two_views_and_augmentation(cifar_dir):
    train = common.build_dataset("folder", cifar_dir, "train")
    pair = common.TwoViews(train, common.train_transform(32))
    torch.manual_seed(0)
    x1, x2, label, index = pair[1234]
    assert x1.shape == x2.shape == (3, 32, 32) and label == train.targets[1234] and index == 1234
    assert not torch.equal(x1, x2)
    plain = common.eval_transform(common.NORMALIZATION["none"])(train[0][0])
    assert 0.0 <= plain.min() and plain.max() <= 1.0
    assert common.blur_kernel_size(32) == 3 and common.blur_kernel_size(96) == 9 and common.blur_kernel_size(224) == 23
    assert not any(isinstance(t, common.RandomGaussianBlur) for t in common.train_transform(32, blur_p=0).transforms)
    assert common.eval_transform(size=24)(Image.new("RGB", (40, 30))).shape == (3, 24, 24)


def test_blur_matches_opencv_and_uses_torch_rng():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    blur = common.RandomGaussianBlur(3, p=1.0)
    torch.manual_seed(0)
    out = np.asarray(blur(img))
    torch.manual_seed(0)
    sigma = 0.1 + 1.9 * (torch.rand(()).item(), torch.rand(()).item())[1]
    import cv2
    np.testing.assert_array_equal(out, cv2.GaussianBlur(np.asarray(img), (3, 3), sigma))
    torch.manual_seed(1)
    applied = sum(not np.array_equal(np.asarray(common.RandomGaussianBlur(3, p=0.5)(img)), np.asarray(img))
                  for _ in range(400))
    assert 150 < applied < 250


def test_learning_rate_schedule():
    assert common.learning_rate(1.0, 0.0, 10, warmup_epochs=2) == 0.0
    assert common.learning_rate(1.0, 1.0, 10, warmup_epochs=2) == pytest.approx(0.5)
    assert common.learning_rate(1.0, 2.0, 10, warmup_epochs=2) == pytest.approx(1.0)
    assert common.learning_rate(1.0, 6.0, 10, warmup_epochs=2) == pytest.approx(0.5)
    assert common.learning_rate(1.0, 10.0, 10, warmup_epochs=2) == pytest.approx(0.0, abs=1e-15)
    assert common.learning_rate(0.3, 7.5, 10, schedule="constant") == 0.3


def test_larc_against_formula():
    torch.manual_seed(0)
    p1, p2, p3 = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.zeros(2))
    for p in (p1, p2, p3):
        p.grad = torch.randn_like(p)
    expected = []
    for p, wd in ((p1, 1e-4), (p2, 0.0)):
        w, g = p.detach().double(), p.grad.double()
        rate = 1e-3 * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
        expected.append(((g + wd * w) * rate).float())
    zero_grad = p3.grad.clone()
    opt = torch.optim.SGD([{"params": [p1], "larc_weight_decay": 1e-4}, {"params": [p2, p3]}], lr=0.1)
    common.larc_(opt)
    torch.testing.assert_close(p1.grad, expected[0])
    torch.testing.assert_close(p2.grad, expected[1])
    torch.testing.assert_close(p3.grad, zero_grad)  # a zero-norm weight is left alone


def knn_reference(train, train_labels, test, k, t, classes):
    """One test point at a time, in float64 numpy."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), classes))
    for i, x in enumerate(test):
        sims = train @ x
        for j in np.argsort(-sims, kind="stable")[:k]:
            scores[i, train_labels[j]] += math.exp(sims[j] / t)
    return scores


def test_knn_predict_against_loop_reference():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(60, 5)), rng.normal(size=(17, 5))
    labels = rng.integers(0, 4, 60)
    bank = torch.nn.functional.normalize(torch.tensor(train), dim=1)
    queries = torch.nn.functional.normalize(torch.tensor(test), dim=1)
    scores = common.knn_predict(queries, bank, torch.tensor(labels), 4, k=7, temperature=0.1, chunk=5)
    np.testing.assert_allclose(scores.numpy(), knn_reference(train, labels, test, 7, 0.1, 4), rtol=1e-10)
    assert common.topk_correct(scores, torch.tensor([0] * 17), ks=(1, 4)) == [int((scores.argmax(1) == 0).sum()), 17]


def test_checkpoint_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "run" / "last.pt")
    common.save_checkpoint({"script": "x.py", "args": {"a": 1}, "epoch": 3, "backbone": {"w": torch.ones(2)},
                            "rng": [common.get_rng_state()]}, path)
    assert os.listdir(tmp_path / "run") == ["last.pt"]  # no temporary file left behind
    ckpt = common.load_checkpoint(path, "x.py")
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["backbone"]["w"], torch.ones(2))
    with pytest.raises(common.UserError, match="written by x.py, not y.py"):
        common.load_checkpoint(path, "y.py")
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))
    data = open(path, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserError, match="cannot read checkpoint"):
        common.load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(common.UserError, match="not a checkpoint of this project"):
        common.load_checkpoint(str(tmp_path / "foreign.pt"))


def test_rng_state_roundtrip():
    import random
    common.seed_everything(3)
    state = common.get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(()).item())
    common.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == first


def test_metrics_csv_drops_rows_after_resume_epoch(tmp_path):
    path = str(tmp_path / "metrics.csv")
    log = common.MetricsCSV(path, ["epoch", "loss", "knn_top1"])
    for epoch in (1, 2, 3):
        log.write({"epoch": epoch, "loss": 1.0 / epoch})
    common.MetricsCSV(path, ["epoch", "loss", "knn_top1"], resume_epoch=2).write({"epoch": 3, "loss": 0.25, "knn_top1": 50.0})
    lines = open(path).read().splitlines()
    assert lines == ["epoch,loss,knn_top1", "1,1,", "2,0.5,", "3,0.25,50"]


def test_explicit_flags_and_resume_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--knn_k", "--k", dest="knn_k", type=int, default=200)
    parser.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True)
    argv = ["--epochs", "9", "--k", "10", "--no-sync_bn"]
    assert common.explicit_flags(parser, argv) == {"epochs", "knn_k", "sync_bn"}
    args = parser.parse_args(argv)
    saved = {"epochs": 4, "arch": "resnet18", "knn_k": 200, "sync_bn": True}
    with pytest.raises(common.UserError, match="--knn_k 10 differs from the checkpoint's 200"):
        common.resume_args(args, saved, {"epochs", "knn_k"}, may_change={"epochs"})
    merged = common.resume_args(args, saved, {"epochs"}, may_change={"epochs"})
    assert merged.epochs == 9 and merged.arch == "resnet18" and merged.knn_k == 200


def test_class_means_are_not_renormalised():
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    means = common.class_means(features, labels, 3)
    s = 2 ** -0.5
    expected = torch.tensor([[0.5, 0.5], [s / 2, (s - 1) / 2], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(means, expected)

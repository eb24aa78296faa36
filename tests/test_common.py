"""common.py: ResNets, data sets and the SimCLR augmentation."""
import cv2
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
    assert common.build_backbone("resnet18", "cifar", 8, stem_padding=3).conv1.padding == (3, 3)
    # the ResNet-50 of DCL/HCL/leftthomas: 23.52M parameters with a 10-class linear layer
    r50 = common.build_backbone("resnet50", "cifar", 64)
    assert sum(p.numel() for p in r50.parameters()) + 2048 * 10 + 10 == pytest.approx(23.52e6, rel=1e-3)
    for bad in (dict(arch="vgg"), dict(stem="tiny"), dict(width=0)):
        with pytest.raises(ValueError, match="no backbone"):
            common.build_backbone(**{"arch": "resnet18", "stem": "cifar", "width": 8, **bad})


def test_folder_dataset(image_folder):
    train = common.build_dataset("folder", image_folder, "train")
    test = common.build_dataset("folder", image_folder, "test")
    assert len(train) == 64 and len(test) == 32 and train.classes == ["class0", "class1", "class2", "class3"]
    img, label = train[17]
    assert img.size == (16, 16) and label == 1 and train.targets[:17] == [0] * 16 + [1]
    assert common.num_classes(train) == 4


def test_flat_folder_and_missing_test(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    flat = common.build_dataset("folder", str(tmp_path), "train")
    assert len(flat) == 3 and flat.targets == [-1, -1, -1] and common.num_classes(flat) == 0
    assert common.build_dataset("folder", str(tmp_path), "test") is None


def test_missing_and_unreadable_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected .*/train/<class>"):
        common.build_dataset("folder", str(tmp_path / "nowhere"), "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="cannot read image .*broken.jpg"):
        common.build_dataset("folder", str(tmp_path), "train")[0]
    with pytest.raises(FileNotFoundError, match="downloading is off; expected .*cifar-10-batches-py.*download https"):
        common.build_dataset("cifar10", str(tmp_path), "train", download=False)


def test_subset_is_deterministic_and_spread(image_folder):
    train = common.build_dataset("folder", image_folder, "train")
    part = common.subset(train, 8)
    assert len(part) == 8 and part.targets == [train.targets[i * 8] for i in range(8)]
    assert sorted(set(part.targets)) == [0, 1, 2, 3]  # every class of a class-sorted folder
    assert part[3][1] == train[24][1] and part.classes == train.classes
    assert common.subset(train, 0) is train and common.subset(train, 10 ** 6) is train


def test_two_views(image_folder):
    train = common.build_dataset("folder", image_folder, "train")
    pair = common.Views(train, common.train_transform(12))
    torch.manual_seed(0)
    x1, x2, label, index = pair[40]
    assert x1.shape == x2.shape == (3, 12, 12) and label == 2 and index == 40
    assert not torch.equal(x1, x2)  # two independent draws


def test_normalisation_and_eval_transform():
    img = Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8))
    assert torch.equal(common.eval_transform(None)(img), torch.ones(3, 8, 8))
    mean, std = common.NORMALIZATION["cifar10"]
    torch.testing.assert_close(common.eval_transform(common.normalization("cifar10", "stl10"))(img)[:, 0, 0],
                               (1 - torch.tensor(mean)) / torch.tensor(std))
    assert common.normalization("auto", "stl10") == common.NORMALIZATION["stl10"]
    assert common.normalization("auto", "folder") == common.NORMALIZATION["imagenet"]
    assert common.eval_transform(size=24)(Image.new("RGB", (40, 30))).shape == (3, 24, 24)


def draw(transform, img, n, seed=0):
    torch.manual_seed(seed)
    return torch.stack([transform(img) for _ in range(n)])


def test_augmentation_probabilities():
    """Grayscale with p = 0.2, flip with p = 0.5, jitter with p = 0.8, each observed on images
    where that step alone changes the pixels."""
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    no_crop = dict(scale=(1.0, 1.0), blur_p=0, normalize=None)
    out = draw(common.train_transform(8, jitter_p=0, **no_crop), colour, 600)
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.15 < grey.float().mean() < 0.25
    ramp = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8)[None, :, None], (8, 1, 3)))
    out = draw(common.train_transform(8, jitter_p=0, grayscale_p=0, **no_crop), ramp, 600)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert 0.44 < flipped.float().mean() < 0.56
    plain = common.eval_transform(None)(colour)
    out = draw(common.train_transform(8, grayscale_p=0, **no_crop), colour, 600)
    changed = (out - plain.flip(-1)).abs().flatten(1).amax(1).gt(1e-6) & (out - plain).abs().flatten(1).amax(1).gt(1e-6)
    assert 0.75 < changed.float().mean() < 0.85


def test_jitter_strength_and_crop_scale():
    """ColorJitter(0.4, 0.4, 0.4, 0.1) by default: brightness factors reach but stay within [0.6, 1.4];
    crops cover 8% to 100% of the image."""
    steps = common.train_transform(32).transforms
    jitter = steps[2].transforms[0]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    assert steps[0].scale == (0.08, 1.0) and steps[0].size == (32, 32)
    grey = Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8))
    only_brightness = common.train_transform(8, jitter=(0.4, 0, 0, 0), jitter_p=1, grayscale_p=0, scale=(1, 1),
                                             blur_p=0, normalize=None)
    factors = draw(only_brightness, grey, 400)[:, 0, 0, 0] * 255 / 100
    assert 0.6 - 1e-2 < factors.min() < 0.65 and 1.35 < factors.max() < 1.4 + 1e-2


def test_blur_matches_opencv_and_uses_torch_rng():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = np.asarray(common.RandomGaussianBlur(3, p=1.0)(img))
    torch.manual_seed(0)
    torch.rand(())
    sigma = 0.1 + 1.9 * torch.rand(()).item()
    np.testing.assert_array_equal(out, cv2.GaussianBlur(np.asarray(img), (3, 3), sigma))
    torch.manual_seed(1)
    applied = sum(not np.array_equal(np.asarray(common.RandomGaussianBlur(3, p=0.5)(img)), np.asarray(img))
                  for _ in range(400))
    assert 150 < applied < 250
    assert common.blur_kernel_size(32) == 3 and common.blur_kernel_size(96) == 9 and common.blur_kernel_size(224) == 23
    assert not any(isinstance(t, common.RandomGaussianBlur) for t in common.train_transform(32, blur_p=0).transforms)
    assert any(isinstance(t, common.RandomGaussianBlur) and t.p == 0.5 for t in common.train_transform(32).transforms)

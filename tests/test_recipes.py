"""Published constants as literals: the normalisation statistics per data set and the SimCLR
augmentation recipe of common.train_transform's defaults, each compared with the number the
original code wrote (its file and line in a comment), never with a value read from common.py.
The batched path's parity with these laws is in test_batched_augment.py."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms

import common

# Per-channel (mean, std) of [0, 1] pixels, as the original code wrote them.
PUBLISHED_NORMALIZATION = {
    # leftthomas/SimCLR utils.py line 30 (cee178b), chingyaoc/DCL utils.py line 49 (7d6345f),
    # joshr17/HCL image/utils.py line 107 (7b4647f): the CIFAR-10 constants, used on every set
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # mwritescode/nnclr-cifar100 src/data/cifar_100.py lines 11-12 (2ec8e6a): MEAN, STD; also
    # vturrisi/solo-learn solo/data/pretrain_dataloader.py line 208 (9187ea3)
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # the STL-10 train split's statistics as commonly quoted (none of DCL, HCL or the Ring code
    # has its own: they used CIFAR-10's or ImageNet's constants on STL-10)
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    # facebookresearch/moco main_moco.py lines 221-222 (78b69ca): mean=[0.485, 0.456, 0.406],
    # std=[0.229, 0.224, 0.225]; the same in mhw32/contrastive-ring-public src/datasets/datasets.py
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,  # Nozawa & Sato: pixels in [0, 1]
}


def test_published_normalisation_constants():
    assert set(common.NORMALIZATION) == set(PUBLISHED_NORMALIZATION)
    for name, published in PUBLISHED_NORMALIZATION.items():
        ours = common.NORMALIZATION[name]
        if published is None:
            assert ours is None, name
        else:  # exact: these are decimal literals in both places
            assert tuple(map(tuple, ours)) == published, name


@pytest.mark.parametrize("norm,dataset,published", [
    ("auto", "cifar10", "cifar10"), ("auto", "cifar100", "cifar100"), ("auto", "stl10", "stl10"),
    ("auto", "folder", "imagenet"),  # a folder of images: ImageNet's statistics
    ("cifar10", "stl10", "cifar10"),  # DCL/HCL: CIFAR-10's constants on STL-10
    ("none", "cifar10", "none")])
def test_normalization_picks_and_eval_transform_applies(norm, dataset, published):
    """normalization() picks the published pair, and eval_transform applies it: a white image
    becomes (1 - mean) / std per channel, a black one -mean / std."""
    stats_ = PUBLISHED_NORMALIZATION[published]
    picked = common.normalization(norm, dataset)
    to_tensor = common.eval_transform(picked)
    white = to_tensor(Image.new("RGB", (4, 4), (255, 255, 255)))[:, 0, 0]
    black = to_tensor(Image.new("RGB", (4, 4), (0, 0, 0)))[:, 0, 0]
    if stats_ is None:
        assert picked is None and white.tolist() == [1, 1, 1] and black.tolist() == [0, 0, 0]
        return
    mean, std = (torch.tensor(v) for v in stats_)
    torch.testing.assert_close(white, (1 - mean) / std)
    torch.testing.assert_close(black, -mean / std)


def test_simclr_recipe_is_the_dcl_hcl_compose():
    """train_transform(32) holds the steps of DCL utils.py lines 43-49 / HCL image/utils.py lines
    101-107, in that order: RandomResizedCrop(32) with torchvision's defaults, flip p 0.5,
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(p=0.2), Gaussian blur
    (kernel int(0.1 * 32) = 3, p 0.5, sigma U[0.1, 2.0]: their GaussianBlur, lines 24-37),
    ToTensor, Normalize(CIFAR-10)."""
    steps = common.train_transform(32).transforms
    assert [type(t) for t in steps] == [
        transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomApply,
        transforms.RandomGrayscale, common.RandomGaussianBlur, transforms.ToTensor,
        transforms.Normalize]
    crop, flip, jitter, gray, blur, _, norm = steps
    assert tuple(crop.size) == (32, 32) and tuple(crop.scale) == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == transforms.InterpolationMode.BILINEAR
    assert flip.p == 0.5
    assert jitter.p == 0.8 and len(jitter.transforms) == 1
    cj = jitter.transforms[0]
    assert isinstance(cj, transforms.ColorJitter)
    # torchvision: factors ~ U[max(0, 1 - x), 1 + x], hue ~ U[-h, h]
    assert tuple(cj.brightness) == tuple(cj.contrast) == tuple(cj.saturation) == (0.6, 1.4)
    assert tuple(cj.hue) == (-0.1, 0.1)
    assert gray.p == 0.2
    assert blur.p == 0.5 and blur.kernel_size == 3 and tuple(blur.sigma) == (0.1, 2.0)
    assert list(norm.mean) == [0.4914, 0.4822, 0.4465]
    assert list(norm.std) == [0.2023, 0.1994, 0.2010]


def test_recipe_arguments_reach_the_compose():
    """Every argument lands in its step: scale in the crop, jitter strengths in ColorJitter
    (brightness 1.2 -> [0, 2.2]: clamped at 0), each p in its step, blur_p 0 drops the blur,
    normalize None drops Normalize."""
    steps = common.train_transform(40, scale=(0.2, 1.0), jitter=(1.2, 0.0, 0.5, 0.4), jitter_p=0.3,
                                   grayscale_p=0.6, blur_p=0.1,
                                   normalize=((0.1, 0.2, 0.3), (0.5, 0.25, 0.125))).transforms
    crop, flip, jitter, gray, blur, _, norm = steps
    assert tuple(crop.size) == (40, 40) and tuple(crop.scale) == (0.2, 1.0) and flip.p == 0.5
    cj = jitter.transforms[0]
    assert jitter.p == 0.3 and tuple(cj.brightness) == (0.0, 2.2) and cj.contrast is None
    assert tuple(cj.saturation) == (0.5, 1.5) and tuple(cj.hue) == (-0.4, 0.4)
    assert gray.p == 0.6 and blur.p == 0.1 and blur.kernel_size == 5  # 40 // 10 = 4, made odd
    assert list(norm.mean) == [0.1, 0.2, 0.3] and list(norm.std) == [0.5, 0.25, 0.125]
    plain = common.train_transform(32, blur_p=0, normalize=None).transforms
    assert [type(t) for t in plain] == [
        transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomApply,
        transforms.RandomGrayscale, transforms.ToTensor]


def test_blur_kernel_is_ten_percent_of_the_crop_made_odd():
    """google-research/simclr data_util.py (383d414) lines 343-344 and 413: kernel_size =
    height // 10, radius = kernel_size // 2, kernel 2 radius + 1; DCL/HCL int(0.1 * 32) = 3."""
    simclr = {32: 3, 40: 5, 64: 7, 96: 9, 100: 11, 224: 23}
    assert {c: common.blur_kernel_size(c) for c in simclr} == simclr
    assert common.train_transform(96).transforms[4].kernel_size == 9


def recorded_blurs(monkeypatch, blur, n, seed=0):
    """Calls the PIL path's blur step n times on a small image; returns the (kernel, sigma) of
    every cv2.GaussianBlur it made."""
    calls, real = [], cv2.GaussianBlur

    def spy(img, ksize, sigma, *args, **kwargs):
        calls.append((tuple(ksize), sigma))
        return real(img, ksize, sigma, *args, **kwargs)

    monkeypatch.setattr(cv2, "GaussianBlur", spy)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    torch.manual_seed(seed)
    for _ in range(n):
        blur(img)
    return calls


def test_blur_sigma_law_and_rate(monkeypatch):
    """The blur step of train_transform(32): applied with p 0.5 (DCL utils.py line 36: `prob <
    0.5`), a 3 x 3 kernel, sigma ~ U[0.1, 2.0] (line 37: (max - min) * U + min; line 24: min 0.1,
    max 2.0)."""
    n = 4000
    calls = recorded_blurs(monkeypatch, common.train_transform(32).transforms[4], n)
    assert abs(len(calls) / n - 0.5) < 4 * (0.25 / n) ** 0.5
    assert {k for k, _ in calls} == {(3, 3)}
    sigma = np.array([s for _, s in calls])
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3


def test_blur_draws_from_torch_rng_and_matches_opencv():
    """One seeded draw: torch.rand decides (u < p) and gives sigma = 0.1 + 1.9 u'; the pixels are
    cv2.GaussianBlur's with that sigma on the uint8 image."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = np.asarray(common.RandomGaussianBlur(3, p=1.0)(img))
    torch.manual_seed(0)
    torch.rand(())
    sigma = 0.1 + 1.9 * torch.rand(()).item()
    np.testing.assert_array_equal(out, cv2.GaussianBlur(np.asarray(img), (3, 3), sigma))
    torch.manual_seed(0)
    u = torch.rand(()).item()  # 0.4963 with seed 0: below 0.5, above 0.4
    assert 0.4 < u < 0.5
    torch.manual_seed(0)
    assert not np.array_equal(np.asarray(common.RandomGaussianBlur(3, p=0.5)(img)), np.asarray(img))
    torch.manual_seed(0)
    assert common.RandomGaussianBlur(3, p=0.4)(img) is img


def draw(transform, img, n, seed=0):
    torch.manual_seed(seed)
    return torch.stack([transform(img) for _ in range(n)])


def test_pil_path_flip_rate():
    """The PIL path's flip step mirrors half of the views (RandomHorizontalFlip(p=0.5) in DCL/HCL
    utils.py), by behaviour on a horizontal ramp; jitter, grayscale and blur rates, by behaviour,
    are in test_batched_augment.py (test_step_rates_follow_the_pil_path)."""
    flip = common.train_transform(8).transforms[1]
    ramp = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8)[None, :, None], (8, 1, 3)))
    torch.manual_seed(0)
    flipped = [np.asarray(flip(ramp))[0, 0, 0] > 0 for _ in range(2000)]
    assert abs(np.mean(flipped) - 0.5) < 4 * (0.25 / 2000) ** 0.5


def test_pil_path_brightness_reaches_its_range():
    """ColorJitter(0.4, ...) applied: on a grey image brightness alone scales pixels by factors
    that reach, but stay within, [0.6, 1.4]."""
    grey = Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8))
    only_brightness = common.train_transform(8, jitter=(0.4, 0, 0, 0), jitter_p=1, grayscale_p=0,
                                             scale=(1, 1), blur_p=0, normalize=None)
    factors = draw(only_brightness, grey, 400)[:, 0, 0, 0] * 255 / 100
    assert 0.6 - 1e-2 < factors.min() < 0.65 and 1.35 < factors.max() < 1.4 + 1e-2

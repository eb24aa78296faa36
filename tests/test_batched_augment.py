"""common.py's batched augmentation (BatchedAugment, images_as_tensor, --show_aug): the same
arguments as train_transform, the same parameter laws with one draw per image (at the defaults and
at other values of every argument), and each pixel operation against torchvision's functional ops
(and OpenCV / PIL) on single images with the same parameters."""
import inspect
import os
import runpy
import sys

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torchvision import transforms

import common

JITTER = (0.4, 0.4, 0.4, 0.1)
# leftthomas/SimCLR, DCL and HCL utils.py:
# Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# CMC (HobbitLong/CMC, as ring_nce.py runs it): crop scale (0.2, 1) and flip only, Lab input
CMC = dict(scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, normalize=None)


def smooth_images(n, height=16, width=16, seed=0):
    """uint8 [n, 3, height, width]: upsampled colour noise (smooth enough that resampling matters),
    with a few grey pixels and channel ties, which the hue formula treats specially."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, height // 4 + 1, width // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear",
                                        align_corners=False)
    x[:, :, 0, :3] = x[:, :1, 0, :3]  # grey
    x[:, 1, 1, :3] = x[:, 0, 1, :3]  # R = G
    return (255 * x).round().byte()


def params(aug, n, height, width, seed=0, **fixed):
    """sample_params with some entries overridden (e.g. gray=all False) to isolate one operation."""
    p = aug.sample_params(n, height, width, torch.Generator().manual_seed(seed))
    for key, value in fixed.items():
        p[key] = value if torch.is_tensor(value) else torch.full_like(p[key], value)
    return p


def full_box(n, height, width):
    return torch.tensor([0, 0, height, width]).repeat(n, 1)


def ks_critical(n, m, alpha=1e-3):
    """Two-sample KS statistic exceeded with probability alpha under the same law (asymptotic)."""
    return (-0.5 * np.log(alpha / 2) * (n + m) / (n * m)) ** 0.5


# ------------------------------------------------------------------------------------------------
# Output contract and the per-image property
# ------------------------------------------------------------------------------------------------

def test_shapes_ranges_normalisation_and_determinism():
    x = smooth_images(6, 24, 40)
    raw = common.BatchedAugment(20, normalize=None)
    out = raw(x, torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 20, 20) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1  # the PIL path's range with normalize=None
    normed = common.BatchedAugment(20)(x, torch.Generator().manual_seed(1))  # default: CIFAR-10's
    torch.testing.assert_close(normed, transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)(out))
    torch.testing.assert_close(raw(x, torch.Generator().manual_seed(1)), out, rtol=0, atol=0)
    assert not torch.equal(raw(x, torch.Generator().manual_seed(2)), out)
    with pytest.raises(TypeError, match="uint8"):
        raw(x.float())
    for bad in [(0.4, 0.4, 0.4, 0.6), (-0.1, 0.4, 0.4, 0.1)]:  # ColorJitter refuses both too
        with pytest.raises(ValueError, match="hue|brightness"):
            common.BatchedAugment(jitter=bad)
        with pytest.raises(ValueError, match="hue|brightness"):
            common.train_transform(jitter=bad)


def test_every_image_gets_its_own_parameters():
    """256 copies of one image: torchvision's transforms on a batched tensor would give 256 equal
    views (one draw per call); here nearly all views differ, and so does every kind of parameter."""
    x = smooth_images(1).expand(256, -1, -1, -1)
    aug = common.BatchedAugment(16, normalize=None)
    views = aug(x, torch.Generator().manual_seed(0)).flatten(1)
    assert len(torch.unique((views * 1e4).round(), dim=0)) >= 250
    p = aug.sample_params(256, 16, 16, torch.Generator().manual_seed(0))
    assert len(torch.unique(p["box"], dim=0)) > 100
    for key in ("flip", "jitter", "gray", "blur"):
        assert 0 < p[key].float().mean() < 1, key
    assert len(torch.unique(p["factors"][:, 0])) == 256 and len(torch.unique(p["sigma"])) == 256
    assert len(torch.unique(p["order"], dim=0)) == 24


# ------------------------------------------------------------------------------------------------
# One recipe, two paths: train_transform(crop, **recipe) and BatchedAugment(crop, **recipe)
# ------------------------------------------------------------------------------------------------

def test_both_paths_take_the_same_arguments():
    """The training scripts build both paths from one dict: same names, order, defaults, kinds."""
    pil = inspect.signature(common.train_transform).parameters
    batched = dict(inspect.signature(common.BatchedAugment.__init__).parameters)
    batched.pop("self")
    assert list(pil) == list(batched) == ["crop_size", "scale", "jitter", "jitter_p",
                                          "grayscale_p", "blur_p", "normalize"]
    for name, param in pil.items():
        assert (param.default, param.kind) == (batched[name].default, batched[name].kind), name


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.08, 1.0)), (16, 64, (0.08, 1.0)),
                                                (32, 32, (0.2, 1.0)), (32, 32, (0.5, 0.6))])
def test_crop_law_matches_random_resized_crop(height, width, scale):
    """Area fraction, aspect ratio and position of our boxes against the PIL path's own
    RandomResizedCrop (train_transform(32, scale=scale)'s first step, its get_params as its
    forward calls it; 16 x 64 exercises the fallback box): two-sample KS statistics below the
    0.1 % critical value. On square images the areas also keep to `scale` (up to rounding)."""
    aug = common.BatchedAugment(32, scale=scale)
    ours = aug.sample_params(20000, height, width, torch.Generator().manual_seed(0))["box"].double()
    rrc = common.train_transform(32, scale=scale).transforms[0]
    torch.manual_seed(0)
    theirs = torch.tensor([rrc.get_params(torch.empty(3, height, width), rrc.scale, rrc.ratio)
                           for _ in range(4000)]).double()
    laws = {"area": lambda b: b[:, 2] * b[:, 3] / (height * width),
            "log ratio": lambda b: (b[:, 3] / b[:, 2]).log(),
            "top": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
            "left": lambda b: (b[:, 1] + b[:, 3] / 2) / width}
    for name, fn in laws.items():
        assert stats.ks_2samp(fn(ours).numpy(), fn(theirs).numpy()).statistic < 0.035, name
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    if height == width:
        for boxes in (ours, theirs):
            area = laws["area"](boxes)
            assert ((area < scale[0] - 0.02) | (area > scale[1] + 0.02)).double().mean() < 0.01
            assert area.min() < scale[0] + 0.02 and area.max() > scale[1] - 0.02


@pytest.mark.parametrize("jitter,ranges", [
    ((0.4, 0.4, 0.4, 0.1), [(0.6, 1.4)] * 3 + [(-0.1, 0.1)]),  # SimCLR / DCL / HCL / MoCo v2
    ((0.4, 0.4, 0.4, 0.4), [(0.6, 1.4)] * 3 + [(-0.4, 0.4)]),  # the Ring code, InstDisc, MoCo v1
    ((1.2, 0.0, 0.5, 0.4), [(0.0, 2.2), None, (0.5, 1.5), (-0.4, 0.4)]),  # clamp at 0; 0 = off
    (((0.5, 1.5), (0.9, 1.1), 0.0, (-0.2, 0.3)), [(0.5, 1.5), (0.9, 1.1), None, (-0.2, 0.3)])])
def test_jitter_strengths_follow_color_jitter(jitter, ranges):
    """Brightness, contrast, saturation and hue factors of the batched path against those of the
    PIL path's ColorJitter (ColorJitter.get_params on its own ranges, as its forward calls it)
    and against torchvision's documented law: U[max(0, 1 - x), 1 + x], hue U[-h, h], (min, max)
    pairs as given, strength 0 = that operation never runs (batched: its neutral factor)."""
    n, m = 20000, 2000
    ours = common.BatchedAugment(32, jitter=jitter).sample_params(
        n, 32, 32, torch.Generator().manual_seed(0))["factors"].double()
    cj = common.train_transform(32, jitter=jitter).transforms[2].transforms[0]
    torch.manual_seed(0)
    theirs = [cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)[1:]
              for _ in range(m)]
    for i, (name, law) in enumerate(zip(("brightness", "contrast", "saturation", "hue"), ranges)):
        if law is None:
            assert (ours[:, i] == (0.0 if i == 3 else 1.0)).all(), name
            assert all(t[i] is None for t in theirs), name
            continue
        lo, hi = law
        pil = np.array([t[i] for t in theirs])
        assert lo <= ours[:, i].min() < lo + 0.01 and hi - 0.01 < ours[:, i].max() <= hi, name
        assert lo <= pil.min() and pil.max() <= hi, name
        assert stats.kstest(ours[:, i].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, name
        assert stats.ks_2samp(ours[:, i].numpy(), pil).statistic < ks_critical(n, m), name


def pil_step_rates(recipe, n, monkeypatch):
    """How often each random step of train_transform(6, **recipe) acts, by behaviour on a colour
    noise image: jitter changes it, grayscale makes its channels equal, blur calls OpenCV."""
    steps = common.train_transform(6, **recipe).transforms
    blur = [t for t in steps if isinstance(t, common.RandomGaussianBlur)]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    plain = np.asarray(img)
    calls, real = [], cv2.GaussianBlur
    monkeypatch.setattr(cv2, "GaussianBlur", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    jitter = np.mean([not np.array_equal(np.asarray(steps[2](img)), plain) for _ in range(n)])
    gray = np.mean([np.ptp(np.asarray(steps[3](img)).astype(int), axis=2).max() == 0
                    for _ in range(n)])
    for _ in range(n if blur else 0):
        blur[0](img)
    return {"jitter": jitter, "gray": gray, "blur": len(calls) / n}


@pytest.mark.parametrize("recipe", [
    {},  # the defaults: jitter p 0.8, grayscale p 0.2, blur p 0.5 (DCL/HCL utils.py)
    dict(jitter_p=0.3, grayscale_p=0.6, blur_p=0.1),
    dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
    dict(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_p=0.2, blur_p=0.0),  # ring_nce
    CMC])
def test_step_rates_follow_the_pil_path(recipe, monkeypatch):
    """jitter_p, grayscale_p and blur_p (default, other, 0 and 1): the batched draws' rates and the
    PIL path's observed rates both match the literal p, within four standard errors; p = 0 never
    and p = 1 always (exactly)."""
    expected = {**dict(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5), **recipe}  # {}: the defaults
    n, m = 20000, 800
    p = common.BatchedAugment(6, **recipe).sample_params(n, 6, 6, torch.Generator().manual_seed(0))
    pil = pil_step_rates(recipe, m, monkeypatch)
    for key, arg in (("jitter", "jitter_p"), ("gray", "grayscale_p"), ("blur", "blur_p")):
        rate = expected[arg]
        ours = p[key].double().mean().item()
        if rate in (0.0, 1.0):
            assert ours == rate and pil[key] == rate, key
        else:
            assert abs(ours - rate) < 4 * (rate * (1 - rate) / n) ** 0.5, key
            assert abs(pil[key] - rate) < 4 * (rate * (1 - rate) / m) ** 0.5, key
    assert abs(p["flip"].double().mean() - 0.5) < 4 * (0.25 / n) ** 0.5  # flip p 0.5 always


def test_jitter_orders_and_blur_sigma():
    """The order of the four jitter operations is a uniform permutation per image (ColorJitter's
    randperm(4)); blur sigma ~ U[0.1, 2.0] (DCL's GaussianBlur, utils.py lines 24 and 37)."""
    n = 40000
    p = common.BatchedAugment(32).sample_params(n, 32, 32, torch.Generator().manual_seed(0))
    counts = torch.unique(p["order"], dim=0, return_counts=True)[1].double()
    assert len(counts) == 24 and (counts / n - 1 / 24).abs().max() < 0.006
    sigma = p["sigma"].double().numpy()
    assert 0.1 <= sigma.min() < 0.101 and 1.999 < sigma.max() <= 2.0
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).statistic < 0.01


@pytest.mark.parametrize("normalize,mean,std", [
    ("default", CIFAR10_MEAN, CIFAR10_STD),
    (((0.1, 0.2, 0.3), (0.5, 0.25, 0.125)), (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)),
    (None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))])
def test_normalize_on_a_constant_image(normalize, mean, std):
    """A constant colour stays constant through crop, flip and blur (jitter and grayscale off);
    both paths then give (colour / 255 - mean) / std per channel."""
    recipe = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=1.0)
    if normalize != "default":
        recipe["normalize"] = normalize
    colour = (200, 100, 50)
    expected = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
    x = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(16, 3, 20, 20)
    ours = common.BatchedAugment(12, **recipe)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, expected.view(1, 3, 1, 1).expand_as(ours), rtol=0, atol=1e-5)
    pil = common.train_transform(12, **recipe)
    torch.manual_seed(0)
    img = Image.new("RGB", (20, 20), colour)
    theirs = torch.stack([pil(img) for _ in range(8)])
    torch.testing.assert_close(theirs, expected.view(1, 3, 1, 1).expand_as(theirs), rtol=0,
                               atol=1e-6)


def test_cmc_recipe_is_crop_and_flip_only():
    """CMC's recipe: the PIL path holds crop (scale 0.2-1), flip, jitter and grayscale with p 0, no
    blur, no Normalize; neither path changes a constant colour; the batched views of a structured
    image are exactly resized crops, mirrored where flipped (torchvision's functional ops)."""
    steps = common.train_transform(16, **CMC).transforms
    assert [type(t) for t in steps] == [
        transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomApply,
        transforms.RandomGrayscale, transforms.ToTensor]
    assert tuple(steps[0].scale) == (0.2, 1.0) and steps[2].p == 0.0 and steps[3].p == 0.0
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8)
    torch.manual_seed(0)
    pil = common.train_transform(16, **CMC)
    img = Image.new("RGB", (24, 24), tuple(colour.tolist()))
    theirs = torch.stack([pil(img) for _ in range(50)])
    assert torch.equal(theirs, (colour.float() / 255).view(1, 3, 1, 1).expand(50, 3, 16, 16))
    aug = common.BatchedAugment(16, **CMC)
    ours = aug(colour.view(1, 3, 1, 1).expand(64, 3, 24, 24), torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, (colour.float() / 255).view(1, 3, 1, 1).expand_as(ours),
                               rtol=0, atol=1e-6)
    x = smooth_images(16, 24, 24)
    out = aug(x, torch.Generator().manual_seed(1))
    p = aug.sample_params(16, 24, 24, torch.Generator().manual_seed(1))
    for i in range(16):
        top, left, h, w = p["box"][i].tolist()
        ref = TF.resized_crop(x[i].float() / 255, top, left, h, w, [16, 16], antialias=False)
        torch.testing.assert_close(out[i], TF.hflip(ref) if p["flip"][i] else ref, rtol=0,
                                   atol=2e-6)


def test_views_have_the_pil_path_distribution():
    """End to end: the mean and the contrast (std) of each view of one image, over 1,000 views of
    each path, follow the same law (KS statistic below the 0.1 % critical value, 0.087)."""
    img = smooth_images(1, 24, 24, seed=3)
    torch.manual_seed(0)
    pil = common.train_transform(16, normalize=None)
    theirs = torch.stack([pil(Image.fromarray(img[0].permute(1, 2, 0).numpy()))
                          for _ in range(1000)])
    ours = common.BatchedAugment(16, normalize=None)(img.expand(1000, -1, -1, -1),
                                                     torch.Generator().manual_seed(0))
    for name, stat in {"mean": lambda v: v.mean((1, 2, 3)), "std": lambda v: v.std((1, 2, 3)),
                       "saturation": lambda v: (v.amax(1) - v.amin(1)).mean((1, 2))}.items():
        assert stats.ks_2samp(stat(ours).numpy(), stat(theirs).numpy()).statistic < 0.087, name


# ------------------------------------------------------------------------------------------------
# Pixels: each operation against torchvision / OpenCV / PIL on single images, same parameters
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,size", [(16, 16, 32), (48, 40, 16)])
def test_crop_and_flip_match_resized_crop(height, width, size):
    x = smooth_images(64, height, width).float() / 255
    p = params(common.BatchedAugment(size), 64, height, width)
    ours = common.resized_crop(x, p["box"], p["flip"], size)
    for i in range(64):
        top, left, h, w = p["box"][i].tolist()
        ref = TF.resized_crop(x[i], top, left, h, w, [size, size], antialias=False)
        torch.testing.assert_close(ours[i], TF.hflip(ref) if p["flip"][i] else ref, rtol=0,
                                   atol=2e-6)


@pytest.mark.parametrize("op,name,lo,hi", [(0, "brightness", 0.0, 2.0), (1, "contrast", 0.0, 2.0),
                                            (2, "saturation", 0.0, 2.0), (3, "hue", -0.5, 0.5)])
def test_color_ops_match_torchvision(op, name, lo, hi):
    """Blends and hue on float tensors as torchvision's adjust_* (luma weights 0.299 here, 0.2989
    there: within 1e-3); hue over its whole range, with grey pixels and channel ties."""
    x = smooth_images(32).float() / 255
    f = torch.linspace(lo, hi, 32)
    ours = common.COLOR_OPS[op](x.clone(), f.view(-1, 1, 1, 1))
    adjust = getattr(TF, f"adjust_{name}")
    for i in range(32):
        torch.testing.assert_close(ours[i], adjust(x[i], float(f[i])), rtol=0,
                                   atol=1e-5 if op in (0, 3) else 1e-3)


def test_jitter_applies_each_images_own_order():
    """augment() with jitter on and nothing else vs ColorJitter's ops applied in each image's
    order."""
    aug = common.BatchedAugment(16, normalize=None)
    x = smooth_images(64)
    p = params(aug, 64, 16, 16, seed=1, box=full_box(64, 16, 16), flip=False, jitter=True,
               gray=False, blur=False)
    # strong, order-sensitive
    p["factors"] = torch.tensor([[0.6, 1.4, 0.0, 0.1], [1.3, 0.5, 1.8, -0.1]]).repeat(32, 1)
    ours = aug.augment(x, p)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(64):
        ref = x[i].float() / 255
        for op in p["order"][i].tolist():
            ref = ops[op](ref, float(p["factors"][i, op]))
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=2e-3)
    p["jitter"] = torch.arange(64) % 2 == 0  # images without jitter pass unchanged
    torch.testing.assert_close(aug.augment(x, p)[1::2], x[1::2].float() / 255, rtol=0, atol=0)


def test_grayscale_matches_pil_and_torchvision():
    aug = common.BatchedAugment(16, normalize=None)
    x = smooth_images(16)
    p = params(aug, 16, 16, 16, box=full_box(16, 16, 16), flip=False, jitter=False, gray=True,
               blur=False)
    ours = aug.augment(x, p)
    assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 0], ours[:, 2])
    for i in range(16):
        torch.testing.assert_close(ours[i], TF.rgb_to_grayscale(x[i].float() / 255, 3), rtol=0,
                                   atol=1e-3)
        luma = np.asarray(Image.fromarray(x[i].permute(1, 2, 0).numpy()).convert("L"))
        assert np.abs(255 * ours[i, 0].numpy() - luma).max() <= 0.51  # PIL rounds to uint8


@pytest.mark.parametrize("size,k", [(32, 3), (48, 5)])  # SimCLR's kernel: size // 10, made odd
def test_blur_matches_opencv_and_torchvision(size, k):
    """Per-image sigma; OpenCV's default border (BORDER_REFLECT_101)."""
    x = smooth_images(16, size, size).float() / 255
    sigma, mask = torch.linspace(0.1, 2.0, 16), torch.arange(16) % 4 != 0
    ours = common.gaussian_blur(x, sigma, k, mask)
    for i in range(16):
        if not mask[i]:
            assert torch.equal(ours[i], x[i])
            continue
        ref = cv2.GaussianBlur(x[i].permute(1, 2, 0).numpy(), (k, k), float(sigma[i]))
        torch.testing.assert_close(ours[i], torch.from_numpy(ref).permute(2, 0, 1), rtol=0,
                                   atol=1e-5)
        ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2)
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=1e-5)


def test_augment_chains_the_steps_in_train_transform_order():
    """One image through augment() = crop+flip, jitter, grayscale, blur (a 40-px crop: kernel 5,
    SimCLR's 40 // 10 made odd), normalise (CIFAR-10's constants by default) done by hand."""
    aug = common.BatchedAugment(40)
    x = smooth_images(8, 20, 28)
    p = params(aug, 8, 20, 28, seed=4, jitter=True, gray=torch.arange(8) % 2 == 0,
               blur=torch.arange(8) % 3 != 0)
    ours = aug.augment(x, p)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(8):
        top, left, h, w = p["box"][i].tolist()
        v = TF.resized_crop(x[i].float() / 255, top, left, h, w, [40, 40], antialias=False)
        v = TF.hflip(v) if p["flip"][i] else v
        for op in p["order"][i].tolist():
            v = ops[op](v, float(p["factors"][i, op]))
        v = TF.rgb_to_grayscale(v, 3) if p["gray"][i] else v
        v = TF.gaussian_blur(v, [5, 5], [float(p["sigma"][i])] * 2) if p["blur"][i] else v
        torch.testing.assert_close(ours[i], TF.normalize(v, CIFAR10_MEAN, CIFAR10_STD), rtol=0,
                                   atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    aug, x = common.BatchedAugment(32), smooth_images(64, 32, 32)
    p = params(aug, 64, 32, 32)
    on_gpu = aug.cuda().augment(x.cuda(), {k: v.cuda() for k, v in p.items()}).cpu()
    torch.testing.assert_close(on_gpu, aug.cpu().augment(x, p), rtol=0, atol=1e-4)
    out = aug.cuda()(x.cuda(), torch.Generator("cuda").manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.device.type == "cuda"


# ------------------------------------------------------------------------------------------------
# images_as_tensor, --show_aug, the benchmark
# ------------------------------------------------------------------------------------------------

def test_images_as_tensor_on_a_folder(image_folder):
    ds = common.build_dataset("folder", image_folder, "train")
    images, labels = common.images_as_tensor(ds)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == ds.targets
    for i in (0, 37, 63):
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), np.asarray(ds[i][0]))
    part = common.subset(ds, 10)
    sub_images, sub_labels = common.images_as_tensor(part)
    assert torch.equal(sub_images, images[part.indices]) and sub_labels.tolist() == part.targets
    small, _ = common.images_as_tensor(ds, size=8)
    assert small.shape == (64, 3, 8, 8)


def test_images_as_tensor_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(16, 16), (12, 20), (30, 18)]):
        os.makedirs(tmp_path / "train" / "a", exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(tmp_path / "train" / "a" / f"{i}.png")
    ds = common.build_dataset("folder", str(tmp_path), "train")
    with pytest.raises(ValueError, match="size="):
        common.images_as_tensor(ds)
    images, labels = common.images_as_tensor(ds, size=10)
    assert images.shape == (3, 3, 10, 10) and labels.tolist() == [0, 0, 0]
    ref = transforms.Compose([transforms.Resize(10), transforms.CenterCrop(10),
                              transforms.PILToTensor()])
    for i in range(3):
        assert torch.equal(images[i], ref(ds[i][0]))


class ArrayDataset(torch.utils.data.Dataset):
    """A torchvision-style data set: `.data` uint8 (CIFAR: [N, H, W, 3]; STL-10: [N, 3, H, W])."""

    def __init__(self, data, labels, attr="targets"):
        self.data, self.classes = data, ["a", "b"]
        setattr(self, attr, labels)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        a = self.data[i] if self.data.shape[-1] == 3 else self.data[i].transpose(1, 2, 0)
        return Image.fromarray(a), int(getattr(self, "targets", getattr(self, "labels", None))[i])


@pytest.mark.parametrize("layout", ["cifar", "stl10"])
def test_images_as_tensor_reads_data_arrays(layout):
    hwc = smooth_images(12, 8, 8).permute(0, 2, 3, 1).numpy().copy()
    data = hwc if layout == "cifar" else hwc.transpose(0, 3, 1, 2).copy()
    labels = [i % 2 for i in range(12)]
    if layout == "cifar":
        ds = ArrayDataset(data, labels, "targets")
    else:
        ds = ArrayDataset(data, np.array(labels), "labels")
    images, out_labels = common.images_as_tensor(ds)
    assert torch.equal(images, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    assert out_labels.tolist() == labels
    if layout == "cifar":
        ds.targets = labels
        part = common.subset(ds, 5)
        sub, sub_labels = common.images_as_tensor(part)
        assert torch.equal(sub, images[part.indices]) and sub_labels.tolist() == part.targets
    resized, _ = common.images_as_tensor(ds, size=6)
    # a plain list: the PIL path
    generic, _ = common.images_as_tensor([ds[i] for i in range(12)], size=6)
    assert resized.shape == (12, 3, 6, 6) and torch.equal(resized, generic)


def run_common_main(monkeypatch, *argv):
    """`python common.py ARGS` in this process (a subprocess would spend most of its time
    importing torch)."""
    monkeypatch.setattr(sys, "argv", ["common.py", *argv])
    runpy.run_path(common.__file__, run_name="__main__")


def test_show_aug_writes_a_grid(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid.png"
    run_common_main(monkeypatch, "--show_aug", str(out), "--dataset", "folder",
                    "--data_dir", image_folder,
                    "--n", "4", "--rows", "2", "--crop_size", "12")
    zoom = 96 // 16
    assert Image.open(out).size == (4 * (16 * zoom + 2), 5 * (16 * zoom + 2))
    with pytest.raises(SystemExit) as exit_info:
        run_common_main(monkeypatch, "--show_aug", str(out), "--dataset", "folder",
                        "--data_dir", str(tmp_path / "none"))
    assert exit_info.value.code == 2 and "error: no images" in capsys.readouterr().err


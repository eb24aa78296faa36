"""common.py's batched augmentation (BatchedAugment, images_as_tensor, --show_aug): the same
parameter laws as train_transform with one draw per image, and each pixel operation against
torchvision's functional ops (and OpenCV / PIL) on single images with the same parameters."""
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


def smooth_images(n, height=16, width=16, seed=0):
    """uint8 [n, 3, height, width]: upsampled colour noise (smooth enough that resampling matters),
    with a few grey pixels and channel ties, which the hue formula treats specially."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, height // 4 + 1, width // 4 + 1, generator=g)
    x = torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear", align_corners=False)
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


# ------------------------------------------------------------------------------------------------
# Output contract and the per-image property
# ------------------------------------------------------------------------------------------------

def test_shapes_ranges_normalisation_and_determinism():
    x = smooth_images(6, 24, 40)
    raw = common.BatchedAugment(20, normalize=None)
    out = raw(x, torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 20, 20) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1  # the PIL path's range with normalize=None
    pil = common.train_transform(20, normalize=None)(Image.fromarray(x[0].permute(1, 2, 0).numpy()))
    assert pil.shape == (3, 20, 20) and pil.min() >= 0 and pil.max() <= 1
    mean, std = common.NORMALIZATION["cifar10"]
    normed = common.BatchedAugment(20)(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(normed, transforms.Normalize(mean, std)(out))
    torch.testing.assert_close(raw(x, torch.Generator().manual_seed(1)), out, rtol=0, atol=0)
    assert not torch.equal(raw(x, torch.Generator().manual_seed(2)), out)
    with pytest.raises(TypeError, match="uint8"):
        raw(x.float())
    with pytest.raises(ValueError, match="hue"):
        common.BatchedAugment(jitter=(0.4, 0.4, 0.4, 0.6))


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
# Parameter laws: those of train_transform's torchvision transforms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.08, 1.0)), (16, 64, (0.08, 1.0)), (32, 32, (0.5, 0.6))])
def test_crop_law_matches_random_resized_crop(height, width, scale):
    """Area fraction, aspect ratio and position of our boxes against RandomResizedCrop.get_params
    (16 x 64 exercises the fallback box): two-sample KS statistics below the 0.1 % critical value."""
    aug = common.BatchedAugment(32, scale=scale)
    ours = aug.sample_params(20000, height, width, torch.Generator().manual_seed(0))["box"].double()
    torch.manual_seed(0)
    theirs = torch.tensor([transforms.RandomResizedCrop.get_params(torch.empty(3, height, width), scale, (3 / 4, 4 / 3))
                           for _ in range(4000)]).double()
    laws = {"area": lambda b: b[:, 2] * b[:, 3] / (height * width), "log ratio": lambda b: (b[:, 3] / b[:, 2]).log(),
            "top": lambda b: (b[:, 0] + b[:, 2] / 2) / height, "left": lambda b: (b[:, 1] + b[:, 3] / 2) / width}
    for name, fn in laws.items():
        assert stats.ks_2samp(fn(ours).numpy(), fn(theirs).numpy()).statistic < 0.035, name
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= width).all()


def test_rates_factors_orders_and_sigma():
    n, g = 40000, torch.Generator().manual_seed(0)
    p = common.BatchedAugment(32).sample_params(n, 32, 32, g)
    tol = 4 * 0.5 / n ** 0.5  # four standard errors of a rate
    for key, rate in {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.5}.items():
        assert abs(p[key].float().mean() - rate) < tol, key
    q = common.BatchedAugment(32, jitter_p=0.3, grayscale_p=0.6, blur_p=0.1).sample_params(n, 32, 32, g)
    for key, rate in {"jitter": 0.3, "gray": 0.6, "blur": 0.1}.items():
        assert abs(q[key].float().mean() - rate) < tol, key
    # ColorJitter's factor ranges, uniform over them
    cj = transforms.ColorJitter(*JITTER)
    for i, (lo, hi) in enumerate([cj.brightness, cj.contrast, cj.saturation, cj.hue]):
        f = p["factors"][:, i].double().numpy()
        assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
        assert stats.kstest(f, stats.uniform(lo, hi - lo).cdf).statistic < 0.01
    # a uniform random permutation of the four operations per image, as ColorJitter's randperm(4)
    counts = torch.unique(p["order"], dim=0, return_counts=True)[1].double()
    assert len(counts) == 24 and (counts / n - 1 / 24).abs().max() < 0.006
    assert stats.kstest(p["sigma"].double().numpy(), stats.uniform(0.1, 1.9).cdf).statistic < 0.01


def test_views_have_the_pil_path_distribution():
    """End to end: the mean and the contrast (std) of each view of one image, over 1,000 views of
    each path, follow the same law (KS statistic below the 0.1 % critical value, 0.087)."""
    img = smooth_images(1, 24, 24, seed=3)
    torch.manual_seed(0)
    pil = common.train_transform(16, normalize=None)
    theirs = torch.stack([pil(Image.fromarray(img[0].permute(1, 2, 0).numpy())) for _ in range(1000)])
    ours = common.BatchedAugment(16, normalize=None)(img.expand(1000, -1, -1, -1), torch.Generator().manual_seed(0))
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
        torch.testing.assert_close(ours[i], TF.hflip(ref) if p["flip"][i] else ref, rtol=0, atol=2e-6)


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
        torch.testing.assert_close(ours[i], adjust(x[i], float(f[i])), rtol=0, atol=1e-5 if op in (0, 3) else 1e-3)


def test_jitter_applies_each_images_own_order():
    """augment() with jitter on and nothing else vs ColorJitter's ops applied in each image's order."""
    aug = common.BatchedAugment(16, normalize=None)
    x = smooth_images(64)
    p = params(aug, 64, 16, 16, seed=1, box=full_box(64, 16, 16), flip=False, jitter=True, gray=False, blur=False)
    p["factors"] = torch.tensor([[0.6, 1.4, 0.0, 0.1], [1.3, 0.5, 1.8, -0.1]]).repeat(32, 1)  # strong, order-sensitive
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
    p = params(aug, 16, 16, 16, box=full_box(16, 16, 16), flip=False, jitter=False, gray=True, blur=False)
    ours = aug.augment(x, p)
    assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 0], ours[:, 2])
    for i in range(16):
        torch.testing.assert_close(ours[i], TF.rgb_to_grayscale(x[i].float() / 255, 3), rtol=0, atol=1e-3)
        luma = np.asarray(Image.fromarray(x[i].permute(1, 2, 0).numpy()).convert("L"))
        assert np.abs(255 * ours[i, 0].numpy() - luma).max() <= 0.51  # PIL rounds to uint8


@pytest.mark.parametrize("size", [32, 48])
def test_blur_matches_opencv_and_torchvision(size):
    """Per-image sigma; kernel blur_kernel_size(size); OpenCV's default border (BORDER_REFLECT_101)."""
    k = common.blur_kernel_size(size)
    x = smooth_images(16, size, size).float() / 255
    sigma, mask = torch.linspace(0.1, 2.0, 16), torch.arange(16) % 4 != 0
    ours = common.gaussian_blur(x, sigma, k, mask)
    for i in range(16):
        if not mask[i]:
            assert torch.equal(ours[i], x[i])
            continue
        ref = cv2.GaussianBlur(x[i].permute(1, 2, 0).numpy(), (k, k), float(sigma[i]))
        torch.testing.assert_close(ours[i], torch.from_numpy(ref).permute(2, 0, 1), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours[i], TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2), rtol=0, atol=1e-5)


def test_augment_chains_the_steps_in_train_transform_order():
    """One image through augment() = crop+flip, jitter, grayscale, blur, normalise done by hand."""
    aug = common.BatchedAugment(24)
    x = smooth_images(8, 20, 28)
    p = params(aug, 8, 20, 28, seed=4, jitter=True, gray=torch.arange(8) % 2 == 0, blur=torch.arange(8) % 3 != 0)
    ours = aug.augment(x, p)
    mean, std = common.NORMALIZATION["cifar10"]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(8):
        top, left, h, w = p["box"][i].tolist()
        v = TF.resized_crop(x[i].float() / 255, top, left, h, w, [24, 24], antialias=False)
        v = TF.hflip(v) if p["flip"][i] else v
        for op in p["order"][i].tolist():
            v = ops[op](v, float(p["factors"][i, op]))
        v = TF.rgb_to_grayscale(v, 3) if p["gray"][i] else v
        k = common.blur_kernel_size(24)
        v = TF.gaussian_blur(v, [k, k], [float(p["sigma"][i])] * 2) if p["blur"][i] else v
        torch.testing.assert_close(ours[i], TF.normalize(v, mean, std), rtol=0, atol=1e-2)


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
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / f"{i}.png")
    ds = common.build_dataset("folder", str(tmp_path), "train")
    with pytest.raises(ValueError, match="size="):
        common.images_as_tensor(ds)
    images, labels = common.images_as_tensor(ds, size=10)
    assert images.shape == (3, 3, 10, 10) and labels.tolist() == [0, 0, 0]
    ref = transforms.Compose([transforms.Resize(10), transforms.CenterCrop(10), transforms.PILToTensor()])
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
    assert torch.equal(images, torch.from_numpy(hwc).permute(0, 3, 1, 2)) and out_labels.tolist() == labels
    if layout == "cifar":
        ds.targets = labels
        part = common.subset(ds, 5)
        sub, sub_labels = common.images_as_tensor(part)
        assert torch.equal(sub, images[part.indices]) and sub_labels.tolist() == part.targets
    resized, _ = common.images_as_tensor(ds, size=6)
    generic, _ = common.images_as_tensor([ds[i] for i in range(12)], size=6)  # a plain list: the PIL path
    assert resized.shape == (12, 3, 6, 6) and torch.equal(resized, generic)


def run_common_main(monkeypatch, *argv):
    """`python common.py ARGS` in this process (a subprocess would spend most of its time importing torch)."""
    monkeypatch.setattr(sys, "argv", ["common.py", *argv])
    runpy.run_path(common.__file__, run_name="__main__")


def test_show_aug_writes_a_grid(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid.png"
    run_common_main(monkeypatch, "--show_aug", str(out), "--dataset", "folder", "--data_dir", image_folder,
                    "--n", "4", "--rows", "2", "--crop_size", "12")
    zoom = 96 // 16
    assert Image.open(out).size == (4 * (16 * zoom + 2), 5 * (16 * zoom + 2))
    with pytest.raises(SystemExit) as exit_info:
        run_common_main(monkeypatch, "--show_aug", str(out), "--dataset", "folder",
                        "--data_dir", str(tmp_path / "none"))
    assert exit_info.value.code == 2 and "error: no images" in capsys.readouterr().err


def test_benchmark_quick(tmp_path, capsys):
    """benchmarks/augment.py --quick, in this process (its DataLoader workers are forked from it)."""
    sys.path.insert(0, os.path.join(os.path.dirname(common.__file__), "benchmarks"))
    try:
        import augment
    finally:
        sys.path.pop(0)
    csv = tmp_path / "augment.csv"
    rows = augment.main(["--quick", "--csv", str(csv)])
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("path,") and len(lines) == len(rows) + 1 >= 4
    out = capsys.readouterr().out
    assert "PIL per image" in out and "batched" in out
    assert torch.get_num_threads() == 1  # restored

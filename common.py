"""common.py: augmentations, data sets and ResNets, shared by the training scripts. Nothing else.

Everything that decides how a method trains (its model head, loss, distributed loop, AMP,
checkpoints, kNN monitor) lives in the method's own script, so that one file reads top to bottom.
"""
import os
from types import SimpleNamespace

import cv2
import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

# ------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "stl10", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Mean and std per channel; "none" leaves pixels in [0, 1] (Nozawa & Sato's code).
NORMALIZATION = {
    # leftthomas/SimCLR, chingyaoc/DCL and joshr17/HCL utils.py (used on every data set there)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # mwritescode/nnclr-cifar100 src/data/cifar_100.py MEAN/STD; solo-learn's "cifar100"
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # the per-channel statistics of the STL-10 train split, as commonly quoted
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    # torchvision's ImageNet models; facebookresearch/moco main_moco.py; the Ring code
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}


def normalization(norm, dataset):
    """(mean, std) or None; `auto` picks the data set's own statistics (ImageNet's for a folder)."""
    if norm == "auto":
        norm = dataset if dataset in NORMALIZATION else "imagenet"
    return NORMALIZATION[norm]


class ImageList(Dataset):
    """(image, label) pairs read from a list of paths; label -1 where there is none."""

    def __init__(self, paths, labels, classes=(), transform=None):
        self.paths, self.targets = list(paths), list(labels)
        self.classes, self.transform = list(classes), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        # convert() decodes the whole file here (PIL opens lazily): a truncated or corrupt image
        # fails in this try, whatever PIL raises for it, and not later in a transform.
        try:
            with Image.open(self.paths[index]) as img:
                img = img.convert("RGB")
        except Exception as err:  # OSError, SyntaxError, ValueError, DecompressionBombError...
            raise OSError(f"cannot read image {self.paths[index]}: {err}") from None
        return (self.transform(img) if self.transform else img), self.targets[index]


def _images_in(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(directory, f)))


def _folder(data_dir, split):
    """`DATA_DIR/<split>/<class>/*` (labelled), or for `train` a flat folder of images
    (unlabelled)."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        if split == "test":
            return None
        if not (os.path.isdir(data_dir) and _images_in(data_dir)):
            raise FileNotFoundError(f"no images in {data_dir}: expected "
                                    f"{data_dir}/train/<class>/*.jpg (or a folder of images)")
        root = data_dir
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = _images_in(os.path.join(root, name))
        paths, labels = paths + images, labels + [label] * len(images)
    if not classes:
        paths = _images_in(root)
        labels = [-1] * len(paths)
    if not paths:
        raise FileNotFoundError(f"no images under {root} "
                                f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(paths, labels, classes)


_DOWNLOADS = {
    "cifar10": ("cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python/{train, test, meta}",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "stl10": ("stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin}",
              "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
}


def build_dataset(name, data_dir, split="train", transform=None, download=True):
    """(image, label) data set with `.targets` (ints, -1 = unlabelled) and `.classes`.

    name: cifar10 | cifar100 | stl10 | folder; split: train | test (STL-10 also unlabeled and
    train+unlabeled). A folder without `test/` gives None. A torchvision data set missing from
    `data_dir` is downloaded where the network allows; otherwise FileNotFoundError says which
    files are expected where and where to get them.
    """
    if name == "folder":
        dataset = _folder(data_dir, split)
        if dataset is not None:
            dataset.transform = transform
        return dataset

    def make(download_now):
        if name == "stl10":
            ds = torchvision.datasets.STL10(data_dir, split=split, transform=transform,
                                            download=download_now)
            ds.targets = [int(y) for y in ds.labels]
            return ds
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(data_dir, train=split == "train", transform=transform, download=download_now)

    try:
        return make(False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        pass
    files, url = _DOWNLOADS[name]
    reason = "downloading is off"
    if download:
        try:
            os.makedirs(data_dir, exist_ok=True)
            return make(True)
        except Exception as err:  # no network, a full disk, a broken archive: all end the same way
            reason = f"the download failed ({type(err).__name__})"
    raise FileNotFoundError(f"{name} not found in {data_dir} and {reason}; expected "
                            f"{data_dir}/{files}: download {url} and extract it into {data_dir}")


def num_classes(dataset):
    """Number of classes of a labelled data set (0 if unlabelled)."""
    labels = [t for t in dataset.targets if t >= 0]
    return max(len(dataset.classes), max(labels) + 1 if labels else 0)


def subset(dataset, n):
    """n items evenly spaced through the data set (every class of a class-sorted folder keeps its
    share), keeping `.targets` and `.classes`; n = 0 or n >= len keeps the data set itself."""
    if not n or n >= len(dataset):
        return dataset
    indices = [i * len(dataset) // n for i in range(n)]
    part = Subset(dataset, indices)
    part.targets, part.classes = [dataset.targets[i] for i in indices], dataset.classes
    return part


class Views(Dataset):
    """(view_1, ..., view_n, label, index) from an (image, label) data set: n independent draws of
    `transform`. The index lets memory-bank methods address their bank."""

    def __init__(self, dataset, transform, n=2):
        self.dataset, self.transform, self.n = dataset, transform, n
        self.targets, self.classes = dataset.targets, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        img, label = self.dataset[index]
        return (*(self.transform(img) for _ in range(self.n)), label, index)


def run_data(args, recipe, device="cpu", views=2, split="train", to_input=None, rank=0, world=1):
    """A training run's data, from the shared flags (args.dataset, data_dir, subset, crop_size,
    gpu_aug, batch_size, workers, seed): `loader` of this process's share of each global batch
    (a DistributedSampler, `sampler`), drawing `views` views per image with train_transform(
    crop_size, **recipe) in PIL workers, or with gpu_aug only indices: the images, decoded once
    onto `device` (`images`), are augmented there by batch_views with `augment` =
    BatchedAugment(crop_size, **recipe). `labels` [N] on `device` hold every training image's
    class (-1: none). `memory` and `test` (eval_transform; None without labels or a test split)
    serve the kNN monitor; `to_input` maps device images to the network's input (CMC's Lab).
    Missing or unreadable data raise OSError, other unusable data ValueError."""
    size = args.crop_size if args.dataset == "folder" else None
    plain = eval_transform(recipe["normalize"], size)
    train = subset(build_dataset(args.dataset, args.data_dir, split), args.subset)
    memory = subset(build_dataset(args.dataset, args.data_dir, "train", plain), args.subset)
    test = build_dataset(args.dataset, args.data_dir, "test", plain)
    if test is None or num_classes(memory) == 0:
        memory = test = None
    if len(train) < args.batch_size:
        raise ValueError(f"{len(train)} training images, fewer than --batch_size {args.batch_size}")
    data = SimpleNamespace(memory=memory, test=test, views=views, augment=None,
                           to_input=to_input or (lambda x: x),
                           labels=torch.as_tensor(train.targets, dtype=torch.long).to(device))
    if args.gpu_aug:
        data.images = images_as_tensor(train)[0].to(device)
        data.augment = BatchedAugment(args.crop_size, **recipe).to(device)
        data.train = torch.utils.data.TensorDataset(torch.arange(len(train)))
    else:
        data.train = Views(train, train_transform(args.crop_size, **recipe), views)
    data.sampler = DistributedSampler(data.train, world, rank, seed=args.seed, drop_last=True)
    # workers restart each epoch, seeded from the main process's RNG: a resumed run draws the same
    data.loader = DataLoader(data.train, args.batch_size // world, sampler=data.sampler,
                             drop_last=True, num_workers=args.workers,
                             pin_memory=torch.device(device).type == "cuda")
    return data


def batch_views(batch, data, device):
    """(views, labels [b] (-1: unlabelled), data set indices [b]) of a loader batch of `run_data`'s
    `train`, on the device (channels_last on GPUs); with gpu_aug, a draw per image and view."""
    ids = batch[-1].to(device, non_blocking=True)
    if data.augment is not None:
        views = [data.augment(data.images[ids]) for _ in range(data.views)]
    else:
        views = [v.to(device, non_blocking=True) for v in batch[:-2]]
    fmt = torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format
    return [data.to_input(v).contiguous(memory_format=fmt) for v in views], data.labels[ids], ids


# ------------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------------

class RandomGaussianBlur:
    """Gaussian blur with probability p, sigma ~ U[0.1, 2], on a k x k kernel: the DCL/HCL class
    (OpenCV on the uint8 image), drawing from torch's RNG (theirs used numpy's global RNG)."""

    def __init__(self, kernel_size, p=0.5, sigma=(0.1, 2.0)):
        self.kernel_size, self.p, self.sigma = kernel_size, p, sigma

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        k = self.kernel_size
        return Image.fromarray(cv2.GaussianBlur(np.asarray(img), (k, k), sigma))


# CMC's Lab input (HobbitLong/CMC train_CMC.py): each channel's middle and half-range over sRGB
LAB_STATS = ((50.0, 6.025, -6.6895), (50.0, 92.208, 101.1675))


def rgb_to_lab(rgb):
    """CIE L*a*b* (D65 white) of sRGB values in [0, 1], channels at dim -3 (skimage's rgb2lab):
    L in [0, 100], a in [-86.2, 98.2], b in [-107.9, 94.5] over the sRGB gamut."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz_from_rgb = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                                 [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype,
                                device=rgb.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,...jhw->...ihw", xyz_from_rgb / white[:, None], linear)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_input(rgb, stats=LAB_STATS):
    """CMC's network input: the Lab image of RGB in [0, 1] ([..., 3, H, W]), normalised per
    channel with stats = (mean, std): channel 0 is CMC's L view, channels 1-2 its ab view."""
    mean, std = (torch.tensor(v, dtype=rgb.dtype, device=rgb.device)[:, None, None] for v in stats)
    return (rgb_to_lab(rgb) - mean) / std


def blur_kernel_size(crop_size):
    """10% of the crop, made odd (SimCLR's rule; 3 at 32 px as in DCL/HCL)."""
    k = max(3, int(0.1 * crop_size))
    return k if k % 2 else k + 1


def train_transform(crop_size=32, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                    grayscale_p=0.2, blur_p=0.5, normalize=NORMALIZATION["cifar10"]):
    """The SimCLR augmentation: random resized crop, horizontal flip, colour jitter (brightness,
    contrast, saturation, hue) with p = jitter_p, grayscale with p = grayscale_p, Gaussian blur
    (kernel 10% of the crop, p = blur_p; 0 turns it off), to tensor, normalise (None: [0, 1]).
    BatchedAugment(crop_size, **kwargs) takes the same arguments, defaults and meanings."""
    steps = [transforms.RandomResizedCrop(crop_size, scale=scale),
             transforms.RandomHorizontalFlip(p=0.5),
             transforms.RandomApply([transforms.ColorJitter(*jitter)], p=jitter_p),
             transforms.RandomGrayscale(p=grayscale_p)]
    if blur_p > 0:
        steps.append(RandomGaussianBlur(blur_kernel_size(crop_size), p=blur_p))
    steps.append(transforms.ToTensor())
    if normalize is not None:
        steps.append(transforms.Normalize(*normalize))
    return transforms.Compose(steps)


def eval_transform(normalize=NORMALIZATION["cifar10"], size=None):
    """To tensor and normalise; with `size` (folders of mixed sizes) first resize the shorter side
    and centre-crop. CIFAR and STL-10 are evaluated at their native size, as in DCL/HCL."""
    steps = [transforms.Resize(size), transforms.CenterCrop(size)] if size else []
    steps.append(transforms.ToTensor())
    if normalize is not None:
        steps.append(transforms.Normalize(*normalize))
    return transforms.Compose(steps)


# ------------------------------------------------------------------------------------------------
# ResNets
# ------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: ResNet v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * 4, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _shortcut(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """torchvision's ResNet (same parameter names and initialisation) without the classifier, with
    a base width and a CIFAR stem; forward returns the pooled, flattened features."""

    def __init__(self, block, layers, width=64, stem="cifar", stem_padding=1):
        super().__init__()
        if stem == "cifar":  # 3x3 stride-1 conv, no max-pool (SimCLR's CIFAR variant)
            self.conv1 = nn.Conv2d(3, width, 3, 1, stem_padding, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes, stages = width, []
        for i, blocks in enumerate(layers):
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(block(in_planes, width * 2 ** i, stride=stride))
                in_planes = width * 2 ** i * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
         "resnet50": (Bottleneck, (3, 4, 6, 3))}


def build_backbone(arch="resnet18", stem="cifar", width=64, stem_padding=1):
    """A ResNet without its classifier returning pooled features of size `.out_dim` (8 * width for
    ResNet-18/34, 32 * width for ResNet-50); width 64 is the standard ResNet. stem_padding: of the
    CIFAR stem's 3x3 conv (Nozawa & Sato used 3; 1 keeps the feature maps at the input size).
    With stem="imagenet" and width 64 its state_dict is torchvision.models' resnet18/34/50's without
    `fc.*` (same names and shapes, the same pooled features), so weights load either way."""
    if arch not in ARCHS or stem not in ("cifar", "imagenet") or width < 1:
        raise ValueError(f"no backbone {arch!r} with stem {stem!r} and width {width}; "
                         f"arch in {list(ARCHS)}, stem cifar or imagenet, width >= 1")
    return ResNet(*ARCHS[arch], width=width, stem=stem, stem_padding=stem_padding)


# ------------------------------------------------------------------------------------------------
# Batched augmentation (--gpu_aug): the SimCLR recipe on whole uint8 batches, one draw per image
# ------------------------------------------------------------------------------------------------

def images_as_tensor(dataset, size=None):
    """(uint8 [N, 3, H, W], long [N] labels) of an (image, label) data set without transform,
    decoded once. CIFAR/STL-10 (or a Subset of them) are read from `.data`; other items must be
    PIL images. With `size`, images are resized (shorter side) and centre-cropped as eval_transform
    does; images of different sizes need it."""
    base, indices = dataset, None
    while isinstance(base, Subset):  # common.subset: map the indices down to the data set
        indices = list(base.indices) if indices is None else [base.indices[i] for i in indices]
        base = base.dataset
    data = getattr(base, "data", None)
    if isinstance(data, np.ndarray) and data.ndim == 4 and data.dtype == np.uint8:
        data = data if indices is None else data[indices]
        nchw = data if data.shape[-1] != 3 else data.transpose(0, 3, 1, 2)
        images = torch.from_numpy(nchw).contiguous()
        targets = np.asarray(getattr(base, "targets", getattr(base, "labels", None)))
        labels = torch.as_tensor(targets[indices] if indices is not None else targets)
        if size is None or images.shape[-2:] == (size, size):
            return images, labels.long()
        dataset = [(Image.fromarray(a.transpose(1, 2, 0)), y)
                   for a, y in zip(images.numpy(), labels.tolist())]
    resize = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)]) if size \
        else None
    arrays, labels = [], []
    for index in range(len(dataset)):
        img, label = dataset[index]  # an ImageList raises its "cannot read image PATH" OSError
        if not isinstance(img, Image.Image):
            raise TypeError(f"images_as_tensor needs PIL images (a data set without transform), "
                            f"got {type(img)}")
        try:  # a lazily opened image of another data set decodes here
            arrays.append(np.asarray((resize(img) if resize else img).convert("RGB")))
        except Exception as err:
            raise OSError(f"cannot read image {_source(dataset, index)}: {err}") from None
        labels.append(int(label))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images of {len(shapes)} different sizes (e.g. {sorted(shapes)[:2]}): "
                         f"pass size= to resize and centre-crop them")
    images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2)).contiguous()
    return images, torch.tensor(labels)


def _source(dataset, index):
    """The file behind item `index` (ImageList's paths, ImageFolder's samples), else `item N`."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    if hasattr(dataset, "paths"):
        return dataset.paths[index]
    samples = getattr(dataset, "samples", None)
    return samples[index][0] if samples is not None else f"item {index}"


class BatchedAugment(nn.Module):
    """train_transform on a uint8 batch [B, 3, H, W] (any device) -> float32 [B, 3, crop, crop].

    train_transform's arguments (same names, defaults and meanings), steps and parameter laws,
    every parameter drawn per image (torchvision transforms on a batched tensor share one draw per
    batch). Pixels: torchvision's float-tensor formulas (no uint8 rounding between steps, unlike
    the PIL path); bilinear resampling without antialiasing (as resized_crop(antialias=False):
    differs from PIL only when a crop is shrunk); blur with torch's "reflect" border = OpenCV's
    default BORDER_REFLECT_101."""

    def __init__(self, crop_size=32, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                 grayscale_p=0.2, blur_p=0.5, normalize=NORMALIZATION["cifar10"]):
        super().__init__()
        self.crop_size, self.scale, self.jitter_p = crop_size, scale, jitter_p
        self.grayscale_p, self.blur_p = grayscale_p, blur_p
        # ColorJitter parses and checks `jitter` as the PIL path does: factor ~ U(max(0, 1 - x),
        # 1 + x), hue ~ U(-h, h) with h <= 0.5, or explicit (min, max) pairs; 0 is no jitter.
        cj = transforms.ColorJitter(*jitter)
        ranges, neutral = (cj.brightness, cj.contrast, cj.saturation, cj.hue), (1.0, 1.0, 1.0, 0.0)
        self.jitter_range = [tuple(map(float, r)) if r is not None else (n, n)
                             for r, n in zip(ranges, neutral)]
        self.kernel_size = blur_kernel_size(crop_size)
        mean, std = normalize if normalize is not None else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def sample_params(self, n, height, width, generator=None, device="cpu"):
        """All random parameters of n views of height x width images, one draw per image."""
        def rand(*shape):
            return torch.rand(shape, generator=generator, device=device)
        # RandomResizedCrop: 10 candidate boxes per image at once; the first that fits wins, else
        # the central box clamped to the ratio range (torchvision's fallback).
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * rand(n, 10))
        # log-uniform in [3/4, 4/3]
        ratio = torch.exp(float(np.log(3 / 4)) + float(np.log(16 / 9)) * rand(n, 10))
        w, h = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(1, keepdim=True)  # index of the first True (0 when none)
        r = min(max(width / height, 3 / 4), 4 / 3)
        fw, fh = min(width, round(height * r)), min(height, round(width / r))
        w = torch.where(fits.any(1), w.gather(1, first)[:, 0], fw)
        h = torch.where(fits.any(1), h.gather(1, first)[:, 0], fh)
        top = torch.where(fits.any(1), (rand(n) * (height - h + 1)).long().clamp(max=height - h),
                          (height - h) // 2)
        left = torch.where(fits.any(1), (rand(n) * (width - w + 1)).long().clamp(max=width - w),
                           (width - w) // 2)
        lo, hi = torch.tensor(self.jitter_range, device=device).T
        return {"box": torch.stack([top, left, h, w], 1), "flip": rand(n) < 0.5,
                "jitter": rand(n) < self.jitter_p, "factors": lo + (hi - lo) * rand(n, 4),
                "order": rand(n, 4).argsort(1),  # a uniform random permutation of the 4 jitter ops
                "gray": rand(n) < self.grayscale_p, "blur": rand(n) < self.blur_p,
                "sigma": 0.1 + 1.9 * rand(n)}  # RandomGaussianBlur's U[0.1, 2]

    def forward(self, images, generator=None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"BatchedAugment takes uint8 images [B, 3, H, W], "
                            f"got {images.dtype} {tuple(images.shape)}")
        p = self.sample_params(len(images), *images.shape[-2:], generator, images.device)
        return self.augment(images, p)

    def augment(self, images, p):
        """The deterministic part: images uint8 [B, 3, H, W], p from sample_params."""
        B, size = len(images), self.crop_size
        x = resized_crop(images.float() / 255, p["box"], p["flip"], size)
        for step in range(4):  # step k applies, to each jittered image, the op its order names at k
            for op, neutral in enumerate((1.0, 1.0, 1.0, 0.0)):
                chosen = p["jitter"] & (p["order"][:, step] == op)
                chosen &= p["factors"][:, op] != neutral
                if chosen.any():
                    x[chosen] = COLOR_OPS[op](x[chosen], p["factors"][chosen, op].view(-1, 1, 1, 1))
        x = torch.lerp(x, grayscale(x), p["gray"].float().view(B, 1, 1, 1))  # weight 0 or 1: exact
        if self.blur_p > 0:
            x = gaussian_blur(x, p["sigma"], self.kernel_size, p["blur"])
        return (x - self.mean) / self.std


def resized_crop(x, box, flip, size):
    """Per-image crop box (top, left, h, w) resized bilinearly to size x size, mirrored where flip:
    one grid_sample. Source coordinates are clamped to the box, as F.interpolate on the crop
    does."""
    (B, _, H, W), t = x.shape, (torch.arange(size, device=x.device) + 0.5) / size
    top, left, h, w = box.T.unsqueeze(2).float()
    xs = torch.minimum(torch.maximum(left + t * w - 0.5, left), left + w - 1)
    ys = torch.minimum(torch.maximum(top + t * h - 0.5, top), top + h - 1)
    xs = torch.where(flip.view(B, 1), xs.flip(1), xs)
    grid = torch.stack([((2 * xs + 1) / W - 1).view(B, 1, size).expand(B, size, size),
                        ((2 * ys + 1) / H - 1).view(B, size, 1).expand(B, size, size)], -1)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                     align_corners=False)


def grayscale(x):
    """ITU-R 601-2 luma, [B, 1, H, W]: PIL's "L" weights (torchvision's tensor path uses 0.2989)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_hue(x, hue):
    """torchvision's adjust_hue (RGB -> HSV, hue + factor mod 1, -> RGB) in closed form: max and
    min are kept, and channel n of (R, G, B) = min + chroma * clamp(d_n - 1, 0, 1), with d_n the
    distance from 6 hue' + (0, -2, -4)[n] + 3 to the nearest multiple of 6, taken with abs() alone
    (valid for |hue| <= 0.5; floor, remainder and argmax are several times slower on CPU)."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    chroma, (r, g, b) = maxc - minc, x.split(1, 1)
    # 6 x hue in [-1, 5]: (g - b) / chroma if R is the max, 2 + (b - r) / chroma if G, else
    # 4 + (r - g) / chroma
    h6 = torch.where(r == maxc, g - b,
                     torch.where(g == maxc, b - r + 2 * chroma, r - g + 4 * chroma))
    h6 = h6 / chroma.clamp(min=1e-12) + 6 * hue  # grey pixels: any hue, multiplied by chroma 0
    offsets = torch.tensor([0.0, -2.0, -4.0], device=x.device).view(1, 3, 1, 1)
    d = (h6 + offsets).abs_().sub_(6).abs_().sub_(3).abs_()
    return torch.addcmul(minc, chroma, d.sub_(1).clamp_(0, 1))


# torchvision's float formulas: blend with black / the mean grey level / the grey image
# (lerp(a, x, f) = f x + (1 - f) a), then clamp to [0, 1]; the mean grey level is the luma of the
# channel means.
COLOR_OPS = (lambda x, f: (f * x).clamp_(0, 1),
             lambda x, f: torch.lerp(grayscale(x.mean((2, 3), keepdim=True)), x, f).clamp_(0, 1),
             lambda x, f: torch.lerp(grayscale(x), x, f).clamp_(0, 1),
             adjust_hue)


def gaussian_blur(x, sigma, k, mask):
    """Separable per-image Gaussian blur (k taps, weights exp(-d^2 / 2 sigma^2) normalised, as
    OpenCV's for sigma > 0) where mask, the identity kernel elsewhere; torch's "reflect" padding is
    OpenCV's default border (BORDER_REFLECT_101). One multiply-add per tap over the batch: as fast
    as a batched matmul on CPU, and exact on GPUs (TF32 matmuls and convolutions would round)."""
    B, d = len(x), torch.arange(k, device=x.device) - k // 2
    weights = torch.softmax(-d.float() ** 2 / (2 * sigma.view(-1, 1) ** 2), 1)  # [B, k]
    weights = torch.where(mask.view(-1, 1), weights, (d == 0).float()).T.reshape(k, B, 1, 1, 1)
    for dim in (3, 2):
        pad = (k // 2, k // 2, 0, 0) if dim == 3 else (0, 0, k // 2, k // 2)
        padded = nn.functional.pad(x, pad, mode="reflect")
        out = weights[0] * padded.narrow(dim, 0, x.shape[dim])
        for t in range(1, k):
            out.addcmul_(weights[t], padded.narrow(dim, t, x.shape[dim]))
        x = out
    return x


if __name__ == "__main__":  # python common.py --show_aug views.png: both augmentation paths
    import argparse
    parser = argparse.ArgumentParser(description="Write a PNG grid: row 0 the original images, "
                                     "then --rows rows of BatchedAugment views, then --rows rows "
                                     "of train_transform (PIL) views.")
    parser.add_argument("--show_aug", metavar="OUT.png", required=True,
                        help="where to write the grid")
    parser.add_argument("--dataset", default="cifar10", choices=DATASETS,
                        help="data set (train split)")
    parser.add_argument("--data_dir", default="data", help="data root (nothing is downloaded)")
    parser.add_argument("--crop_size", type=int, default=32, help="random-resized-crop size")
    parser.add_argument("--image_size", type=int, default=None,
                        help="resize and centre-crop the images first (folders of mixed sizes)")
    parser.add_argument("--n", type=int, default=8, help="images (columns)")
    parser.add_argument("--rows", type=int, default=3, help="rows of views for each path")
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    args = parser.parse_args()
    if min(args.crop_size, args.n, args.rows) < 1:
        parser.error("--crop_size, --n and --rows must be >= 1")
    try:
        dataset = build_dataset(args.dataset, args.data_dir, "train", download=False)
        dataset = subset(dataset, args.n)
        images, _ = images_as_tensor(dataset, args.image_size)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    torch.manual_seed(args.seed)
    batched = BatchedAugment(args.crop_size, normalize=None)
    pil = train_transform(args.crop_size, normalize=None)
    originals = [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]
    views = [batched(images) for _ in range(args.rows)]
    views += [torch.stack([pil(img) for img in originals]) for _ in range(args.rows)]
    to_uint8 = [(255 * v + 0.5).byte().permute(0, 2, 3, 1).numpy() for v in views]
    rows = [originals] + [[Image.fromarray(a) for a in row] for row in to_uint8]
    cell = max(images.shape[-1], images.shape[-2], args.crop_size)
    zoom = max(1, 96 // cell)  # small images are drawn with nearest-neighbour zoom
    step = cell * zoom + 2  # a 2-pixel white gap between cells
    grid = Image.new("RGB", (len(originals) * step, len(rows) * step), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            zoomed = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
            grid.paste(zoomed, (c * step, r * step))
    grid.save(args.show_aug)
    print(f"{args.show_aug}: row 1 originals, rows 2-{args.rows + 1} BatchedAugment, "
          f"rows {args.rows + 2}-{2 * args.rows + 1} PIL")

"""common.py: augmentations, data sets and ResNets, shared by the training scripts. Nothing else.

Everything that decides how a method trains (its model head, loss, distributed loop, AMP,
checkpoints, kNN monitor) lives in the method's own script, so that one file reads top to bottom.
"""
import os

import cv2
import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms

# ------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "stl10", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Mean and std per channel. "cifar10" holds the constants of leftthomas/SimCLR, DCL and HCL (which
# used them on every data set); "none" leaves pixels in [0, 1] (Nozawa & Sato's code).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
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
        self.paths, self.targets, self.classes, self.transform = list(paths), list(labels), list(classes), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with Image.open(self.paths[index]) as img:
                img = img.convert("RGB")
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image {self.paths[index]}: {err}") from None
        return (self.transform(img) if self.transform else img), self.targets[index]


def _images_in(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def _folder(data_dir, split):
    """`DATA_DIR/<split>/<class>/*` (labelled), or for `train` a flat folder of images (unlabelled)."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        if split == "test":
            return None
        if not (os.path.isdir(data_dir) and _images_in(data_dir)):
            raise FileNotFoundError(f"no images in {data_dir}: expected {data_dir}/train/<class>/*.jpg "
                                    f"(or a folder of images)")
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
        raise FileNotFoundError(f"no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(paths, labels, classes)


_DOWNLOADS = {
    "cifar10": ("cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python/{train, test, meta}", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
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
            ds = torchvision.datasets.STL10(data_dir, split=split, transform=transform, download=download_now)
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
    raise FileNotFoundError(f"{name} not found in {data_dir} and {reason}; expected {data_dir}/{files}: "
                            f"download {url} and extract it into {data_dir}")


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


class TwoViews(Dataset):
    """(view_1, view_2, label, index) from an (image, label) data set: two independent draws of
    `transform`. The index lets memory-bank methods address their bank."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform
        self.targets, self.classes = dataset.targets, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        img, label = self.dataset[index]
        return self.transform(img), self.transform(img), label, index


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


def blur_kernel_size(crop_size):
    """10% of the crop, made odd (SimCLR's rule; 3 at 32 px as in DCL/HCL)."""
    k = max(3, int(0.1 * crop_size))
    return k if k % 2 else k + 1


def train_transform(crop_size=32, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                    grayscale_p=0.2, blur_p=0.5, normalize=NORMALIZATION["cifar10"]):
    """The SimCLR augmentation: random resized crop, horizontal flip, colour jitter (brightness,
    contrast, saturation, hue) with p = jitter_p, grayscale with p = grayscale_p, Gaussian blur
    (kernel 10% of the crop, p = blur_p; 0 turns it off), to tensor, normalise (None: [0, 1])."""
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
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


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
                stage.append(block(in_planes, width * 2 ** i, stride=2 if (i > 0 and j == 0) else 1))
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
    CIFAR stem's 3x3 conv (Nozawa & Sato used 3; 1 keeps the feature maps at the input size)."""
    if arch not in ARCHS or stem not in ("cifar", "imagenet") or width < 1:
        raise ValueError(f"no backbone {arch!r} with stem {stem!r} and width {width}; "
                         f"arch in {list(ARCHS)}, stem cifar or imagenet, width >= 1")
    return ResNet(*ARCHS[arch], width=width, stem=stem, stem_padding=stem_padding)

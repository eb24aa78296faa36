"""common.py: what every script of this project needs identically, and nothing else.

Data sets (CIFAR-10/100, STL-10, image folders) and the two-view wrapper; the SimCLR augmentation
and the evaluation transform; ResNet backbones; and the plumbing of a training loop: process-group
set-up from torchrun's environment, all-gather with and without gradient, seeding and RNG state,
autocast/GradScaler selection, LARC and the learning-rate schedule, the kNN monitor, atomic
checkpoints, `args.json` and `metrics.csv`. Method logic (models, losses, training loops) lives in
the method scripts, so that each one reads top to bottom.

Errors the user can fix (missing data, a bad checkpoint) raise `UserError`; the scripts turn it into
one line on stderr and exit status 2 (`exit_on_user_error`).
"""
import argparse
import contextlib
import csv
import importlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms


class UserError(Exception):
    """A problem the user can fix: bad data, a bad checkpoint, incompatible flags."""


@contextlib.contextmanager
def exit_on_user_error(prog):
    """Turn a UserError into `prog: error: message` on stderr and exit status 2 (argparse's way)."""
    try:
        yield
    except UserError as err:
        # An error raised inside a DataLoader worker comes back with the worker's traceback in its
        # message; the user needs only the original message, which is the last line.
        lines = [line for line in str(err).splitlines() if line.strip()]
        message = lines[-1].split("UserError: ", 1)[-1] if lines else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(2)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

DATASETS = ("cifar10", "cifar100", "stl10", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Mean and std per channel. "cifar10" holds the constants of leftthomas/SimCLR, DCL and HCL (which
# used them for every data set); "none" leaves pixels in [0, 1] (Nozawa & Sato's code).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}
NORMALIZATION_CHOICES = ("auto",) + tuple(NORMALIZATION)


def resolve_normalization(norm, dataset):
    """`auto` picks the data set's own statistics (ImageNet's for a folder)."""
    if norm == "auto":
        norm = dataset if dataset in NORMALIZATION else "imagenet"
    return NORMALIZATION[norm]


def default_train_split(dataset):
    """The split a method pre-trains on: STL-10 uses its 100k unlabelled images as well."""
    return "train+unlabeled" if dataset == "stl10" else "train"


def pil_loader(path):
    """Open an image as RGB; an unreadable file is a UserError that names it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


class ImageList(Dataset):
    """Images with integer labels (-1 for none), read from a list of paths."""

    def __init__(self, paths, labels, classes=(), transform=None):
        self.paths, self.targets, self.classes, self.transform = list(paths), list(labels), list(classes), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = pil_loader(self.paths[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def _list_images(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def _folder_split(data_dir, split):
    """`DATA_DIR/<split>/<class>/*` (labelled), else a flat folder of images (unlabelled, train only)."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        if split == "train" and os.path.isdir(data_dir) and _list_images(data_dir):
            root = data_dir  # a flat folder of images given directly
        elif split == "train":
            raise UserError(f"no images in {data_dir}: expected {data_dir}/train/<class>/*.jpg "
                            f"(or a folder of images)")
        else:
            return None
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if classes:
        paths, labels = [], []
        for label, name in enumerate(classes):
            images = _list_images(os.path.join(root, name))
            paths += images
            labels += [label] * len(images)
    else:
        paths = _list_images(root)
        labels = [-1] * len(paths)
    if not paths:
        raise UserError(f"no images found under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(paths, labels, classes)


_TORCHVISION_FILES = {
    "cifar10": ("cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python/{train, test, meta}",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "stl10": ("stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin}",
              "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"),
}


def build_dataset(name, data_dir, split="train", transform=None, download=True):
    """A data set of (image, label) pairs; label -1 where there is none.

    name: cifar10 | cifar100 | stl10 | folder. split: train | test, and for STL-10 also
    unlabeled | train+unlabeled. Returns None for a folder without a `test/` split. A torchvision
    data set missing from `data_dir` is downloaded when the network allows; otherwise a UserError
    says which files are expected where. Every data set has `.targets` (list of int) and `.classes`.
    """
    if name == "folder":
        if split not in ("train", "test"):
            raise UserError(f"split {split!r} does not exist for --dataset folder (train or test)")
        dataset = _folder_split(data_dir, split)
        if dataset is not None:
            dataset.transform = transform
        return dataset
    if name not in _TORCHVISION_FILES:
        raise UserError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    stl_splits = ("train", "test", "unlabeled", "train+unlabeled")
    if split not in (stl_splits if name == "stl10" else ("train", "test")):
        raise UserError(f"split {split!r} does not exist for {name}")

    def make(download_now):
        if name == "stl10":
            ds = torchvision.datasets.STL10(data_dir, split=split, transform=transform, download=download_now)
            ds.targets = [int(y) for y in ds.labels]
            return ds
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(data_dir, train=(split == "train"), transform=transform, download=download_now)

    try:
        return make(False)
    except RuntimeError:
        pass  # not there yet
    files, url = _TORCHVISION_FILES[name]
    if download:
        try:
            os.makedirs(data_dir, exist_ok=True)
            return make(True)
        except Exception as err:  # no network, disk full, a broken archive: all end the same way
            reason = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    else:
        reason = "downloading is off"
    raise UserError(f"{name} not found in {data_dir} and {reason}; expected {data_dir}/{files}: "
                    f"download {url} and extract it into {data_dir}")


def num_classes(dataset):
    """Number of classes of a labelled data set (0 if unlabelled)."""
    labels = [t for t in dataset.targets if t >= 0]
    return max(len(dataset.classes), max(labels) + 1 if labels else 0)


def evenly_spaced(total, n):
    """n indices evenly spaced through range(total): every class of a class-sorted folder keeps its
    share. n = 0 or n >= total keeps everything."""
    if not n or n >= total:
        return list(range(total))
    return [i * total // n for i in range(n)]


def subset(dataset, n):
    """A deterministic subset of n items, evenly spaced through the data set (`evenly_spaced`),
    keeping `.targets`, `.classes` and `.collate_fn`. n = 0 or n >= len keeps the data set itself."""
    if not n or n >= len(dataset):
        return dataset
    indices = evenly_spaced(len(dataset), n)
    part = Subset(dataset, indices)
    for name in ("classes", "collate_fn"):
        if hasattr(dataset, name):
            setattr(part, name, getattr(dataset, name))
    if hasattr(dataset, "targets"):
        part.targets = [dataset.targets[i] for i in indices]
    return part


class TwoViews(Dataset):
    """Wraps an (image, label) data set; returns (view_1, view_2, label, index).

    The index lets memory-bank methods address their bank. The two views are independent draws of
    `transform` (or of `transform` and `second_transform` for asymmetric recipes).
    """

    def __init__(self, dataset, transform, second_transform=None):
        self.dataset, self.transform = dataset, transform
        self.second_transform = second_transform or transform
        self.targets, self.classes = dataset.targets, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        img, label = self.dataset[index]
        return self.transform(img), self.second_transform(img), label, index


# ------------------------------------------------------------------------------------------------
# Augmentations
# ------------------------------------------------------------------------------------------------

class RandomGaussianBlur:
    """Gaussian blur with probability p, sigma ~ U[sigma_min, sigma_max], on a k x k kernel.

    The DCL/HCL class (OpenCV on the uint8 image, default border), but drawing from torch's RNG:
    the original used numpy's global RNG, which DataLoader workers once shared.
    """

    def __init__(self, kernel_size, p=0.5, sigma=(0.1, 2.0)):
        if kernel_size % 2 == 0:
            raise ValueError(f"the blur kernel must be odd, got {kernel_size}")
        self.kernel_size, self.p, self.sigma = kernel_size, p, sigma

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        k = self.kernel_size
        return Image.fromarray(cv2.GaussianBlur(np.asarray(img), (k, k), sigma))

    def __repr__(self):
        return f"RandomGaussianBlur(kernel_size={self.kernel_size}, p={self.p}, sigma={self.sigma})"


def blur_kernel_size(crop_size):
    """10% of the crop, made odd (SimCLR's rule; 3 at 32 px as in DCL/HCL)."""
    k = max(3, int(0.1 * crop_size))
    return k if k % 2 else k + 1


def train_transform(crop_size=32, scale=(0.08, 1.0), jitter=0.5, jitter_p=0.8, grayscale_p=0.2,
                    blur_p=0.5, normalize=NORMALIZATION["cifar10"],
                    interpolation=transforms.InterpolationMode.BILINEAR):
    """The SimCLR augmentation: random resized crop, flip, colour jitter (p = jitter_p),
    grayscale (p = grayscale_p), Gaussian blur (kernel 10% of the crop, sigma in [0.1, 2],
    p = blur_p; 0 turns it off), to tensor, normalise (None: keep [0, 1]).

    jitter: SimCLR's strength s, giving ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) (s = 0.5 is the
    (0.4, 0.4, 0.4, 0.1) of DCL/HCL/MoCo v2), or an explicit (brightness, contrast, saturation, hue).
    """
    if isinstance(jitter, (int, float)):
        jitter = (0.8 * jitter, 0.8 * jitter, 0.8 * jitter, 0.2 * jitter)
    steps = [transforms.RandomResizedCrop(crop_size, scale=scale, interpolation=interpolation),
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
    """To tensor and normalise. With `size` (image folders of mixed sizes), first resize the shorter
    side to `size` and centre-crop. CIFAR and STL-10 are evaluated at their native size (STL-10 at
    96 px after 32 px pre-training, as DCL/HCL did)."""
    steps = [transforms.Resize(size), transforms.CenterCrop(size)] if size else []
    steps.append(transforms.ToTensor())
    if normalize is not None:
        steps.append(transforms.Normalize(*normalize))
    return transforms.Compose(steps)


# ------------------------------------------------------------------------------------------------
# Backbones
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
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

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
    """torchvision's ResNet (same parameter names, same initialisation) without the classifier,
    with a base width and a CIFAR stem. forward returns the pooled, flattened features."""

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
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(block(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
         "resnet50": (Bottleneck, (3, 4, 6, 3))}


def build_backbone(arch="resnet18", stem="cifar", width=64, stem_padding=1):
    """A ResNet without its classifier that returns pooled features; `.out_dim` is their size
    (8 * width for ResNet-18/34, 32 * width for ResNet-50). width = 64 is the standard ResNet.
    stem_padding: padding of the CIFAR stem's 3x3 convolution (Nozawa & Sato used 3, the
    NNCLR/solo-learn code 2; 1 keeps the feature maps at the input size)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown stem {stem!r}; choose cifar or imagenet")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, width=width, stem=stem, stem_padding=stem_padding)


def backbone_from_args(args):
    """The backbone a training script built, from its arguments (`ckpt["args"]`, a dict)."""
    return build_backbone(args.get("arch", "resnet18"), args.get("stem", "cifar"), args.get("width", 64),
                          args.get("stem_padding", 1))


# ------------------------------------------------------------------------------------------------
# Processes, devices, precision
# ------------------------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed():
    """One code path for 1 and N processes: under torchrun (RANK and WORLD_SIZE set) join the
    process group (NCCL on GPUs, gloo on CPU); otherwise a single process on cuda:0 or the CPU."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        return Distributed(rank, local_rank, world, device)
    return Distributed(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_info():
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of all ranks and returns this rank's slice
    (a reduce-scatter). Without it, other ranks' anchors never push on this rank's embeddings."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        grad = torch.stack(grads)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def all_gather_with_grad(x):
    """Concatenate x from all ranks along dim 0, keeping the gradient path to every rank's rows.
    Identity in a single process."""
    if world_info()[1] == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x):
    """Concatenate x from all ranks along dim 0, without gradient (queues, banks, labels)."""
    if world_info()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision, device):
    """`auto`: bf16 on GPUs that support it, fp16 (with a GradScaler) on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device, precision):
    """The autocast context for the backbone (a no-op for fp32). Losses run outside it."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, precision):
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ------------------------------------------------------------------------------------------------
# Seeds and RNG state
# ------------------------------------------------------------------------------------------------

def seed_everything(seed):
    """Seed Python, numpy and torch (all devices). Callers offset the seed by the rank."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_rng_state():
    """This process's RNG states as tensors and plain lists (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states():
    """The RNG states of every rank, in rank order (each rank resumes its own stream)."""
    state = get_rng_state()
    if world_info()[1] == 1:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def main_process_first(dist_info):
    """Rank 0 runs the block first (a download, a cache), then the other ranks. The barrier sits in
    a `finally`, so an error on rank 0 does not leave the others waiting: they run the block
    themselves and meet the same error."""
    if dist_info.world_size > 1 and not dist_info.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if dist_info.world_size > 1 and dist_info.is_main:
            dist.barrier()


def train_loader(dataset, batch_size, dist_info, workers, seed, collate_fn=None):
    """Shuffled, drop_last loader of `batch_size` per process. A DistributedSampler is used in a
    single process too, so that the order depends only on (seed, epoch): call
    `loader.sampler.set_epoch(epoch)` every epoch. `collate_fn` defaults to the data set's own
    `collate_fn` attribute if it has one (text: padding), else PyTorch's default."""
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=dist_info.device.type == "cuda", drop_last=True,
                      collate_fn=collate_fn or getattr(dataset, "collate_fn", None))


def eval_loader(dataset, batch_size, workers, device, dist_info=None, collate_fn=None):
    """In-order loader. With `dist_info`, each rank gets every world_size-th item (no padding, no
    duplicates); `gather_in_order` puts the pieces back together. `collate_fn` defaults to the
    data set's own `collate_fn` attribute if it has one (text: padding), else PyTorch's default."""
    collate_fn = collate_fn or getattr(dataset, "collate_fn", None)
    if dist_info is not None and dist_info.world_size > 1:
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_fn)


@torch.no_grad()
def gather_in_order(x, total):
    """Inverse of `eval_loader`'s strided split: rows of all ranks, back in data-set order."""
    rank, world = world_info()
    if world == 1:
        return x
    rows = -(-total // world)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = all_gather_no_grad(padded.unsqueeze(0)).view((world, rows) + tuple(x.shape[1:]))
    return gathered.transpose(0, 1).reshape((world * rows,) + tuple(x.shape[1:]))[:total]


# ------------------------------------------------------------------------------------------------
# Optimisation helpers
# ------------------------------------------------------------------------------------------------

def learning_rate(base_lr, epoch_float, epochs, warmup_epochs=0.0, schedule="cosine"):
    """The learning rate at a fractional epoch: linear warm-up from 0 over `warmup_epochs`, then
    `constant` or `cosine` decay to 0 over the remaining epochs (per step when called per step)."""
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return base_lr * epoch_float / warmup_epochs
    if schedule == "constant":
        return base_lr
    progress = (epoch_float - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@torch.no_grad()
def larc_(optimizer, trust_coefficient=1e-3, eps=1e-8):
    """LARC without clipping (NVIDIA Apex), applied to the gradients before `optimizer.step()`.

    Per parameter tensor p with gradient g and the group's weight decay wd:
    g <- (g + wd * p) * trust * ||p|| / (||g|| + wd * ||p|| + eps); tensors with ||p|| = 0 or
    ||g|| = 0 are left alone. Weight decay is folded in here, so the inner optimizer must run with
    weight_decay = 0: keep the decay in `group["larc_weight_decay"]`.
    """
    for group in optimizer.param_groups:
        wd = group.get("larc_weight_decay", 0.0)
        for p in group["params"]:
            if p.grad is None:
                continue
            p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
            if p_norm == 0 or g_norm == 0:
                continue
            adaptive = trust_coefficient * p_norm / (g_norm + wd * p_norm + eps)
            p.grad.add_(p, alpha=wd).mul_(adaptive)


# ------------------------------------------------------------------------------------------------
# kNN monitor
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(encoder, loader, device, precision="fp32", progress=None, normalize=True):
    """L2-normalised float32 features and labels of every item of `loader`. Inputs may be
    (image, label) or (image, ..., label, index) as long as image comes first and label second.
    normalize=False returns the raw features (a linear probe trains on those)."""
    features, labels = [], []
    for batch in loader:
        images, targets = batch[0], batch[1]
        with autocast(device, precision):
            out = encoder(images.to(device, non_blocking=True))
        features.append(F.normalize(out.float(), dim=1) if normalize else out.float())
        labels.append(torch.as_tensor(targets).to(device))
        if progress is not None:
            progress.update(1)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(features, bank, bank_labels, num_classes, k=200, temperature=0.1, chunk=1024):
    """Weighted kNN (Wu et al. 2018, as in leftthomas/SimCLR and the MoCo demo): cosine
    similarity to the bank (rows assumed L2-normalised), the k most similar, weights
    exp(sim / temperature) summed per class. Returns class scores [N, num_classes]."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, features.shape[0], chunk):
        sim, idx = (features[start:start + chunk] @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        one_hot = F.one_hot(bank_labels[idx], num_classes).to(weights.dtype)
        scores.append((one_hot * weights.unsqueeze(-1)).sum(dim=1))
    return torch.cat(scores)


def class_means(features, labels, num_classes):
    """[C, D] means of the L2-normalised features of each class, NOT re-normalised: Nozawa &
    Sato's mean classifier scores a point by normalize(z) . mu_c, so a class whose features spread
    out gets a shorter mean. A class without examples gets a zero mean."""
    z = F.normalize(features, dim=1)
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels, z)
    counts = torch.bincount(labels, minlength=num_classes).to(z.dtype).clamp(min=1)
    return sums / counts[:, None]


def topk_correct(scores, labels, ks=(1, 5)):
    """Number of rows whose label is among the top-k scores, for each k (k capped at the number of
    classes)."""
    ranked = scores.argsort(dim=1, descending=True)
    return [int((ranked[:, :min(k, scores.shape[1])] == labels[:, None]).any(dim=1).sum()) for k in ks]


@torch.no_grad()
def knn_monitor(encoder, memory_set, test_set, dist_info, k=200, temperature=0.1, batch_size=256,
                workers=0, precision="fp32", show_progress=False):
    """kNN top-1 and top-5 (percent) of `encoder` on `test_set` with `memory_set` as the bank.

    Both sets are split over the ranks (every world_size-th item); the bank is gathered, each rank
    scores its own test items, and the counts are summed, so every rank returns the same numbers
    and the work is shared. The caller puts the model in eval mode.
    """
    device = dist_info.device
    n_classes = num_classes(memory_set)
    memory = eval_loader(memory_set, batch_size, workers, device, dist_info)
    test = eval_loader(test_set, batch_size, workers, device, dist_info)
    bar = progress_bar(len(memory) + len(test), "kNN", show_progress)
    bank, bank_labels = extract_features(encoder, memory, device, precision, bar)
    bank, bank_labels = gather_in_order(bank, len(memory_set)), gather_in_order(bank_labels, len(memory_set))
    features, labels = extract_features(encoder, test, device, precision, bar)
    if bar is not None:
        bar.close()
    scores = knn_predict(features, bank, bank_labels, n_classes, k, temperature)
    counts = torch.tensor(topk_correct(scores, labels) + [labels.shape[0]], device=device, dtype=torch.float64)
    if dist_info.world_size > 1:
        dist.all_reduce(counts)
    top1, top5, total = counts.tolist()
    return 100.0 * top1 / total, 100.0 * top5 / total


def progress_bar(total, desc, enabled):
    """A tqdm bar on the main process, None elsewhere."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# Run directory: args, checkpoints, metrics
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` (same extension); when the block succeeds it replaces
    `path` with os.replace, otherwise it is removed. A crash never leaves a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(directory, f".{root}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state, path):
    """torch.save, atomically (see atomic_path), flushed to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text):
    """Write a text file (JSON, CSV, Markdown) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(text)


def load_checkpoint(path, script=None, keys=("args", "epoch", "backbone")):
    """torch.load(weights_only=True) with one-line errors: a missing or unreadable file, a file that
    is not one of this project's checkpoints, or (with `script`) one written by another script."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path} (truncated or not a PyTorch checkpoint: {first})") from None
    missing = [k for k in ("script",) + tuple(keys) if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project (no {', '.join(missing)})")
    if script is not None and ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}, not {script}")
    return ckpt


def training_module(ckpt):
    """The training script that wrote `ckpt`, imported by the name stored in it (None if it cannot
    be imported here)."""
    try:
        return importlib.import_module(os.path.splitext(os.path.basename(ckpt["script"]))[0])
    except ImportError:
        return None


def model_from_checkpoint(ckpt):
    """Rebuild the model a training script saved, with its weights, in eval mode, on the CPU.

    Every training script exposes `build_model(args)`, whose model has `.backbone` (the features)
    and `.projector` (the embedding the loss saw), so this works for every script of the project."""
    module = training_module(ckpt)
    if module is None:
        raise UserError(f"the checkpoint was written by {ckpt['script']}, which cannot be imported here")
    if not hasattr(module, "build_model"):
        raise UserError(f"{ckpt['script']} has no build_model(args); cannot rebuild its checkpoints")
    model = module.build_model(ckpt["args"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"the checkpoint's weights do not fit {ckpt['script']}'s model: {str(err).splitlines()[0]}") from None
    return model.eval()


def run_datasets(ckpt, train_augment=False, data_dir=None):
    """The labelled (train, test) sets of the run that wrote `ckpt`, for evaluation: the training
    script's own `eval_datasets(args, train_augment, data_dir, checkpoint)` when it has one (text,
    whose vocabulary lives in the checkpoint), else `eval_datasets` below (images)."""
    own = getattr(training_module(ckpt), "eval_datasets", None)
    if own is None:
        return eval_datasets(ckpt["args"], train_augment, data_dir)
    return own(ckpt["args"], train_augment=train_augment, data_dir=data_dir, checkpoint=ckpt)


def eval_datasets(args, train_augment=False, data_dir=None):
    """The labelled (train, test) image sets of a run, from its arguments (`ckpt["args"]`):
    test images plain; train images plain or, with `train_augment`, under the run's own SimCLR
    augmentation (one view). `test` is None for a folder without `test/`. Items: (image, label)."""
    dataset, root = args["dataset"], data_dir or args["data_dir"]
    normalize = resolve_normalization(args.get("norm", "cifar10"), dataset)
    crop = args.get("crop_size", 32)
    plain = eval_transform(normalize, size=crop if dataset == "folder" else None)
    augment = train_transform(crop, blur_p=args.get("blur_p", 0.5), normalize=normalize)
    train = build_dataset(dataset, root, "train", augment if train_augment else plain)
    if num_classes(train) == 0:
        raise UserError(f"the training images of {root} have no labels (expected {root}/train/<class>/*)")
    return train, build_dataset(dataset, root, "test", plain)


def sync_batchnorm(model, dist_info, enabled=True):
    """SyncBatchNorm for multi-process runs (batch statistics over the global batch). PyTorch's
    SyncBatchNorm needs GPUs, so CPU processes keep their own statistics."""
    if dist_info.world_size == 1 or not enabled:
        return model
    if dist_info.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist_info.is_main:
        print("note: SyncBatchNorm needs GPUs; on CPU each process keeps its own BN statistics")
    return model


def data_parallel(model, dist_info):
    """DistributedDataParallel over the processes; the model itself in a single process."""
    if dist_info.world_size == 1:
        return model
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def restore_training(ckpt, model, optimizer, scaler, dist_info):
    """Load a checkpoint's model, optimizer, GradScaler and this rank's RNG state; returns the
    number of completed epochs. RNG streams continue only with the same number of processes."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt.get("rng", [])) == dist_info.world_size:
        set_rng_state(ckpt["rng"][dist_info.rank])
    elif dist_info.is_main:
        print("note: the checkpoint was written by a different number of processes; "
              "random streams start afresh from --seed")
    return ckpt["epoch"]


def save_training_checkpoint(path, script, args, epoch, model, optimizer, scaler, dist_info, **extra):
    """A training script's last.pt: args, completed epochs, the backbone alone (for evaluation), the
    model, optimizer, GradScaler, every rank's RNG state, and `extra` entries (queues, vocabulary).
    Every rank must call it, since the RNG states are gathered; rank 0 writes."""
    rng = gather_rng_states()
    if dist_info.is_main:
        save_checkpoint({"script": script, "args": vars(args), "epoch": epoch,
                         "backbone": model.backbone.state_dict(), "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                         "world_size": dist_info.world_size, **extra}, path)


def explicit_flags(parser, argv):
    """The destinations of the flags given on the command line (not left at their defaults)."""
    probe = type(parser)(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:  # store_true/false, BooleanOptionalAction
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def load_run(args, explicit, script, may_change, keys=("args", "epoch", "backbone", "model", "optimizer")):
    """With --resume: (the resumed run's arguments, the checkpoint); without: (args, None). The
    arguments are the checkpoint's except the flags in `may_change` given on the command line (see
    resume_args); the run directory defaults to the checkpoint's folder."""
    if not args.resume:
        return args, None
    ckpt = load_checkpoint(args.resume, script, keys)
    resumed = resume_args(args, ckpt["args"], explicit, may_change)
    resumed.resume = args.resume
    if "out_dir" not in explicit:
        resumed.out_dir = os.path.dirname(os.path.abspath(args.resume))
    return resumed, ckpt


def per_process_batch(batch_size, dist_info):
    """The share of one process of the global batch (a UserError if it does not divide evenly)."""
    if batch_size % dist_info.world_size:
        raise UserError(f"--batch_size {batch_size} (global) is not divisible by the {dist_info.world_size} processes")
    return batch_size // dist_info.world_size


def resume_args(args, ckpt_args, explicit, may_change):
    """The arguments of a resumed run: the checkpoint's, except the flags in `may_change` that were
    given on the command line. Any other flag given with a different value is an error, since the
    run would silently not be the one the user asked for."""
    merged = dict(ckpt_args)
    for name in explicit:
        new, old = getattr(args, name), ckpt_args.get(name)
        if name in may_change:
            merged[name] = new
        elif _plain(new) != _plain(old):
            raise UserError(f"--{name} {new} differs from the checkpoint's {old}; a resumed run keeps "
                            f"its settings (only {', '.join('--' + m for m in sorted(may_change))} may change)")
    for name, value in vars(args).items():
        merged.setdefault(name, value)  # flags added after the checkpoint was written
    return type(args)(**merged)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def write_args(args, out_dir):
    write_text(os.path.join(out_dir, "args.json"), json.dumps(vars(args), indent=2, sort_keys=True) + "\n")


class MetricsCSV:
    """metrics.csv, one row per epoch, fixed columns (blank where a value was not measured).
    When resuming, rows after the checkpoint's epoch (written by a run that died before saving)
    are dropped, so the file always matches the checkpoint."""

    def __init__(self, path, columns, resume_epoch=None):
        self.path, self.columns = path, list(columns)
        rows = []
        if resume_epoch is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

"""common.py: ResNets (torchvision's names and features), data sets, corrupt images and
eval_transform. The augmentation recipe is in test_recipes.py, the batched path in
test_batched_augment.py."""
import io
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import common


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_backbone_is_torchvision_resnet(arch):
    """Issue 18 item 6: our weights load into torchvision's model (only its classifier fc.* is
    missing, nothing unexpected), torchvision's load into ours (strict), and both give the same
    pooled features in eval mode."""
    ours = common.build_backbone(arch, "imagenet", 64)
    with torch.device("meta"):  # no time spent initialising weights that are replaced anyway
        theirs = getattr(torchvision.models, arch)()
    result = theirs.load_state_dict(ours.state_dict(), strict=False, assign=True)  # checks shapes
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    theirs.fc = torch.nn.Identity()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes both ways
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-6)
    assert expected.shape == (2, 2048 if arch == "resnet50" else 512)
    assert ours.out_dim == expected.shape[1]


def test_cifar_stem_and_width():
    net = common.build_backbone("resnet18", "cifar", width=8)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 64) and net.out_dim == 64
    assert common.build_backbone("resnet18", "cifar", 8, stem_padding=3).conv1.padding == (3, 3)
    # the ResNet-50 of DCL/HCL/leftthomas: 23.52M parameters with a 10-class linear layer
    r50 = common.build_backbone("resnet50", "cifar", 64)
    n_params = sum(p.numel() for p in r50.parameters()) + 2048 * 10 + 10
    assert n_params == pytest.approx(23.52e6, rel=1e-3)
    for bad in (dict(arch="vgg"), dict(stem="tiny"), dict(width=0)):
        with pytest.raises(ValueError, match="no backbone"):
            common.build_backbone(**{"arch": "resnet18", "stem": "cifar", "width": 8, **bad})


def test_folder_dataset(image_folder):
    train = common.build_dataset("folder", image_folder, "train")
    test = common.build_dataset("folder", image_folder, "test")
    assert len(train) == 64 and len(test) == 32
    assert train.classes == ["class0", "class1", "class2", "class3"]
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
    with pytest.raises(FileNotFoundError,
                       match="downloading is off; expected .*cifar-10-batches-py.*download https"):
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


def test_eval_transform_resizes_and_centre_crops():
    img = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3) % 251)
    out = common.eval_transform(None, size=24)(img)
    ref = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(24),
                              transforms.ToTensor()])(img)
    assert out.shape == (3, 24, 24) and torch.equal(out, ref)
    assert torch.equal(common.eval_transform(None)(img), transforms.ToTensor()(img))


# ------------------------------------------------------------------------------------------------
# Corrupt and truncated images: one OSError naming the file, from ImageList and images_as_tensor
# ------------------------------------------------------------------------------------------------

def encoded(fmt, size=24):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


CORRUPT = {  # file name -> bytes
    "truncated.png": encoded("PNG")[:-400],  # header and part of the pixel data
    "truncated.jpg": encoded("JPEG")[:-150],  # PIL opens it; decoding runs out of data
    "text.jpg": b"name,label\nnot an image,3\n",  # a text file renamed .jpg
    "empty.png": b"",
}


def corrupt_folder(root, bad):
    """DATA/train/a/: two good PNGs and one corrupt file `bad`, sorted in the middle."""
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    for name in ("0.png", "2.png"):
        (folder / name).write_bytes(encoded("PNG", 16))
    (folder / ("1_" + bad)).write_bytes(CORRUPT[bad])
    return str(folder / ("1_" + bad))


@pytest.mark.parametrize("bad", sorted(CORRUPT))
def test_corrupt_image_raises_oserror_naming_it(tmp_path, bad):
    path = corrupt_folder(tmp_path, bad)
    ds = common.build_dataset("folder", str(tmp_path), "train", transform=transforms.ToTensor())
    assert ds.paths[1] == path and ds[0][0].shape == (3, 16, 16)
    message = f"^cannot read image {re.escape(path)}: "
    with pytest.raises(OSError, match=message) as info:
        ds[1]
    assert type(info.value) is OSError and info.value.__cause__ is None
    # --gpu_aug decodes everything up front: the same error, also through a subset
    ds.transform = None
    for data in (ds, common.subset(ds, 2)):
        with pytest.raises(OSError, match=message) as info:
            common.images_as_tensor(data, size=8)
        assert type(info.value) is OSError


def test_lazily_decoded_image_fails_in_images_as_tensor_with_its_path(tmp_path):
    """A data set handing out PIL images opened but not decoded (as Image.open does): the decode
    error surfaces in images_as_tensor as the same OSError, naming the file."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    good.write_bytes(encoded("PNG", 16))
    bad.write_bytes(CORRUPT["truncated.jpg"])

    class Lazy(torch.utils.data.Dataset):
        samples = [(str(good), 0), (str(bad), 1)]  # torchvision ImageFolder's attribute

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Image.open(self.samples[i][0]), self.samples[i][1]

    with pytest.raises(OSError, match=f"^cannot read image {re.escape(str(bad))}: ") as info:
        common.images_as_tensor(Lazy())
    assert type(info.value) is OSError

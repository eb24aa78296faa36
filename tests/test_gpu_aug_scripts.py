"""--gpu_aug in every training script: the loader yields indices, the views come from
common.BatchedAugment on the device, and the run trains, saves and resumes as the PIL path does."""
import csv
import importlib

import pytest
import torch

import common

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "16",
        "--workers", "0", "--eval_every", "0", "--gpu_aug"]
RUNS = {
    "simclr": ("simclr_debiased", ["--tau_plus", "0.1", "--beta", "1"], 2),
    "moco": ("moco_mochi", ["--queue_size", "64", "--n_hard", "16", "--s1_hard", "8", "--s2_hard", "8",
                            "--start1_hard", "0", "--start2_hard", "0"], 2),
    "nnclr": ("nnclr_kmclr", ["--method", "nnclr", "--queue_size", "48", "--warmup_epochs", "0"], 2),
    "kmclr": ("nnclr_kmclr", ["--method", "kmclr", "--num_prototypes", "8", "--warmup_epochs", "0"], 2),
    "ring_ir": ("ring_nce", ["--method", "ir", "--ring_lower", "0.1", "--ring_upper", "0.5", "--num_negatives", "32"], 1),
    "ring_cmc": ("ring_nce", ["--method", "cmc", "--num_negatives", "32"], 1),
}


@pytest.mark.parametrize("name", RUNS)
def test_gpu_aug_trains_with_batched_views(name, image_folder, tmp_path, monkeypatch):
    script, flags, views_per_image = RUNS[name]
    module = importlib.import_module(script)
    calls = []
    real = common.BatchedAugment.forward
    monkeypatch.setattr(common.BatchedAugment, "forward",
                        lambda self, images, generator=None: calls.append((tuple(images.shape), int(images.sum())))
                        or real(self, images, generator))
    module.main([*TINY, *flags, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(tmp_path)])
    # 64 images, batch 16: 4 steps, each augmenting the batch's uint8 images once per view
    assert [shape for shape, _ in calls] == [(16, 3, 16, 16)] * (4 * views_per_image)
    first_epoch = [total for _, total in calls]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["epoch"] == "1" and float(rows[-1]["loss"]) > 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["args"]["gpu_aug"] is True and ckpt["epoch"] == 1
    calls.clear()
    module.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2"])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    # the sampler is re-seeded every epoch (set_epoch): epoch 2 sees the images in another order
    assert len(calls) == len(first_epoch) and [t for _, t in calls] != first_epoch

"""What every training script's main does alike, for each method variant: --gpu_aug's views come
from common.BatchedAugment per step and per view, and the run saves and resumes; --epochs 0 writes
the untrained network's kNN row; an unlabelled flat folder trains with the negatives monitor's
columns empty. (Exact resume, bad input and corrupt images: the scripts' own test files and, for
the harness they share, test_simclr_script.py.)"""
import importlib

import pytest
import torch

import common
from conftest import flat_folder, read_csv

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "16",
        "--workers", "0", "--eval_every", "0"]
RUNS = {  # script, flags, views per image, the method's own monitor columns
    "simclr": ("simclr_debiased", ["--tau_plus", "0.1", "--beta", "1"], 2, ["fn_weight"]),
    "moco": ("moco_mochi", ["--queue_size", "64", "--n_hard", "16", "--s1_hard", "8", "--s2_hard", "8",
                            "--start1_hard", "0", "--start2_hard", "0"], 2, ["fn_rate_synth"]),
    "nnclr": ("nnclr_kmclr", ["--method", "nnclr", "--queue_size", "48", "--warmup_epochs", "0"], 2, ["nn_acc"]),
    "kmclr": ("nnclr_kmclr", ["--method", "kmclr", "--num_prototypes", "8", "--warmup_epochs", "0"], 2,
              ["nn_acc"]),
    "ring_ir": ("ring_nce", ["--method", "ir", "--ring_lower", "0.1", "--ring_upper", "0.5", "--num_negatives",
                             "32"], 1, ["fn_rate_above"]),
    "ring_moco": ("ring_nce", ["--method", "moco", "--ring_lower", "0.1", "--ring_upper", "0.5", "--queue_size",
                               "64"], 2, ["fn_rate_above"]),
    "ring_cmc": ("ring_nce", ["--method", "cmc", "--num_negatives", "32"], 1, ["fn_rate_above"]),
}


@pytest.mark.parametrize("name", RUNS)
def test_gpu_aug_trains_with_batched_views(name, image_folder, tmp_path, monkeypatch):
    script, flags, views_per_image, _ = RUNS[name]
    module = importlib.import_module(script)
    calls = []
    real = common.BatchedAugment.forward
    monkeypatch.setattr(common.BatchedAugment, "forward",
                        lambda self, images, generator=None: calls.append((tuple(images.shape), int(images.sum())))
                        or real(self, images, generator))
    module.main([*TINY, "--gpu_aug", *flags, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(tmp_path)])
    # 64 images, batch 16: 4 steps, each augmenting the batch's uint8 images once per view
    assert [shape for shape, _ in calls] == [(16, 3, 16, 16)] * (4 * views_per_image)
    first_epoch = [total for _, total in calls]
    rows = read_csv(tmp_path / "metrics.csv")
    assert rows[-1]["epoch"] == "1" and float(rows[-1]["loss"]) > 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["args"]["gpu_aug"] is True and ckpt["epoch"] == 1
    calls.clear()
    module.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2"])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    # the sampler is re-seeded every epoch (set_epoch): epoch 2 sees the images in another order
    assert len(calls) == len(first_epoch) and [t for _, t in calls] != first_epoch


@pytest.mark.parametrize("name", ["simclr", "moco", "kmclr", "ring_cmc"])
def test_untrained_baseline(name, image_folder, tmp_path):
    script, flags, _, _ = RUNS[name]
    importlib.import_module(script).main([*TINY, *flags, "--data_dir", image_folder, "--epochs", "0",
                                          "--eval_every", "1", "--out_dir", str(tmp_path)])
    rows = read_csv(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["epoch", "knn_top1", "knn_top5"] and rows[0]["epoch"] == "0"
    assert 0 < float(rows[0]["knn_top1"]) <= float(rows[0]["knn_top5"]) <= 100
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("name", RUNS)
def test_an_unlabelled_folder_leaves_the_monitor_empty(name, image_folder, tmp_path):
    script, flags, _, columns = RUNS[name]
    flat = flat_folder(image_folder, tmp_path / "flat", per_class=16)
    importlib.import_module(script).main([*TINY, *flags, "--data_dir", flat, "--epochs", "1", "--eval_every", "1",
                                          "--out_dir", str(tmp_path / "run")])
    row = read_csv(tmp_path / "run" / "metrics.csv")[0]
    assert all(row[c] == "" for c in ["fn_rate", "fn_rate_hard", *columns]) and "knn_top1" not in row
    assert float(row["loss"]) > 0


def sentinel_data(views, steps=3):
    """A loader of `steps` batches whose view v of batch i is the constant 10 i + v, images ids 4 i
    ... 4 i + 3, with classes id % 7: what reaches train_step can be read off its inputs."""
    loader = [[torch.full((4, 3, 2, 2), 10.0 * i + v) for v in range(1, views + 1)]
              + [torch.zeros(4), torch.arange(4) + 4 * i] for i in range(steps)]
    return common.SimpleNamespace(loader=loader, augment=None, to_input=lambda x: x,
                                  labels=torch.arange(100) % 7, views=views)


def test_ring_nces_loop_feeds_each_view_its_ids_and_the_epochs_lr(monkeypatch):
    """ring_nce.train_one_epoch: MoCo's query view 1 and key view 2 of each batch, the batch's image
    ids (bank rows) and every image's class reach train_step; the lr drops x0.1 at each --lr_steps
    epoch (the Ring code's MoCoLRScheduler: 0.03, then 0.003 from epoch 136 on)."""
    import ring_nce
    args = ring_nce.get_parser().parse_args(["--method", "moco"])
    model, seen = torch.nn.Linear(2, 2), []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    monkeypatch.setattr(ring_nce, "batches", lambda data, epoch: iter(data.loader))
    monkeypatch.setattr(ring_nce, "train_step", lambda net, m, opt, scaler, views, ids, classes, *a: seen.append(
        ([v[0, 0, 0, 0].item() for v in views], ids.tolist(), classes, opt.param_groups[0]["lr"]))
        or {"loss": torch.tensor(1.0)})
    data = sentinel_data(2)
    for epoch in (135, 136):
        ring_nce.train_one_epoch(model, model, data, optimizer, None, args, epoch, torch.device("cpu"), None)
    assert [s[0] for s in seen] == [[1, 2], [11, 12], [21, 22]] * 2
    assert [s[1] for s in seen[:3]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert all(s[2] is data.labels for s in seen)
    assert [s[3] for s in seen] == pytest.approx([0.03] * 3 + [0.003] * 3)


def test_nnclr_kmclrs_loop_feeds_each_view_and_its_classes(monkeypatch):
    """nnclr_kmclr.train_one_epoch: view 1 and view 2 of each batch reach train_step as x1 and x2,
    with the classes of the batch's images."""
    import nnclr_kmclr
    args = nnclr_kmclr.get_parser().parse_args(["--epochs", "4", "--warmup_epochs", "0"])
    model, seen = torch.nn.Linear(2, 2), []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    monkeypatch.setattr(nnclr_kmclr, "batches", lambda data, epoch: iter(data.loader))
    monkeypatch.setattr(nnclr_kmclr, "train_step", lambda net, m, opt, scaler, x1, x2, labels, *a: seen.append(
        (x1[0, 0, 0, 0].item(), x2[0, 0, 0, 0].item(), labels.tolist())) or {"loss": torch.tensor(1.0)})
    nnclr_kmclr.train_one_epoch(model, model, sentinel_data(2), optimizer, None, args, 0, torch.device("cpu"),
                                None)
    assert [s[:2] for s in seen] == [(1, 2), (11, 12), (21, 22)]
    assert [s[2] for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 0], [1, 2, 3, 4]]

"""nnclr_kmclr.py end to end on a generated image folder with a tiny backbone: the defaults against
the original's published values, the recipe, the run directory, exact resume (queue, ring and
k-means state included), the lr schedule, the untrained baseline and every kind of bad input."""
import math
import os
from collections import OrderedDict

import pytest
import torch

import common
import nnclr_kmclr as m
from conftest import assert_resume_is_exact, main_error, read_csv

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "2", "--crop_size", "16",
        "--batch_size", "8", "--subset", "32", "--workers", "0", "--hidden_dim", "16",
        "--feature_dim", "8", "--pred_dim", "16", "--queue_size", "24", "--num_prototypes", "6",
        "--reset_every", "1", "--warmup_epochs", "1", "--knn_k", "10"]


# ---- the original's published values, as literals ----

def test_defaults_are_the_originals():
    a = m.get_parser().parse_args([])
    # mwritescode/nnclr-cifar100 (2ec8e6a) src/config/config.py lines 15-33: BATCH_SIZE 64,
    # NUM_EPOCHS 500 + WARMUP 10 (src/trainer.py line 114 trains both: 510 in all), LR 0.2,
    # WEIGHT_DECAY 1e-6, MOMENTUM 0.9, RESET_CENTROIDS_INTERVAL 3, EMBED_SIZE 256,
    # PROJ_HIDDEN_SIZE 2048, PRED_HIDDEN_SIZE 4096, NUM_CENTROIDS 400; nnclr.yaml line 56
    # QUEUE_SIZE 98304; src/utils/training/loss.py line 6: temperature 0.1; CIFAR-100
    assert (a.batch_size, a.epochs, a.warmup_epochs, a.lr, a.weight_decay, a.momentum) == (
        64, 510, 10, 0.2, 1e-6, 0.9)
    assert (a.reset_every, a.feature_dim, a.hidden_dim, a.pred_dim, a.num_prototypes) == (
        3, 256, 2048, 4096, 400)
    assert (a.queue_size, a.temperature, a.dataset, a.method) == (98304, 0.1, "cifar100", "nnclr")
    # src/models/nnclr.py lines 14-18: torchvision resnet18, conv1 3x3 stride 1 (padding 2 there,
    # 1 here: a deviation), no max-pool; lines 22-38: the heads below
    assert (a.arch, a.stem, a.width) == ("resnet18", "cifar", 64)
    model = m.NNCLR(a, 1)
    assert m.head_layout(model.projector) == [
        ["0", "linear", 512, 2048, True], ["1", "bn", 2048, True], ["2", "relu"],
        ["3", "linear", 2048, 2048, True], ["4", "bn", 2048, True], ["5", "relu"],
        ["6", "linear", 2048, 256, True], ["7", "bn", 256, True]]
    assert m.head_layout(model.predictor) == [
        ["0", "linear", 256, 4096, True], ["1", "bn", 4096, True], ["2", "relu"],
        ["3", "linear", 4096, 256, True]]


def test_recipe_is_the_originals_and_flags_land_in_it(monkeypatch, tmp_path):
    """One recipe serves the PIL and the batched path (common.run_data). mwritescode
    src/config/config.py lines 55-77 and src/utils/augmenters.py lines 30-51, both views:
    RandomResizedCrop(32, scale (0.08, 1.0)), flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
    grayscale 0.2; src/data/cifar_100.py lines 11-12: the CIFAR-100 mean and std. Their blur (PIL
    radius U[0.1, 0.2], a no-op at 32 px) and view 2's solarisation are left out (blur_p 0)."""
    seen = []
    monkeypatch.setattr(common, "run_data", lambda *a: seen.append(a) or 1 / 0)
    for flags in ([], ["--blur_p", "0.3", "--norm", "none", "--crop_size", "24", "--gpu_aug"],
                  ["--dataset", "folder", "--data_dir", str(tmp_path)]):
        with pytest.raises(ZeroDivisionError):
            m.main([*flags, "--out_dir", str(tmp_path / "run")])
    cifar100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    jitter = {"scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2}
    (args, recipe, _, views, split, *_), (args2, recipe2, _, views2, *_) = seen[:2]  # run_data's
    assert (args.dataset, split, args.crop_size, views, args.gpu_aug) == ("cifar100", "train", 32, 2, False)
    assert recipe == {**jitter, "blur_p": 0.0, "normalize": cifar100}
    assert (args2.crop_size, recipe2, views2, args2.gpu_aug) == (
        24, {**jitter, "blur_p": 0.3, "normalize": None}, 2, True)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # a folder: ImageNet's statistics
    assert seen[2][1]["normalize"] == imagenet


def test_lr_schedule_is_theirs_and_the_warmup_fits_short_runs(monkeypatch, tmp_path, image_folder):
    """src/utils/training/optim.py LinearWarmupWithCosineAnnealing, lines 53-59, stepped per batch
    (src/trainer.py line 163): step / warm-up steps, then 0.5 (1 + cos(pi progress)). The cosine
    ends at the last step of --epochs (theirs 10 epochs early: NUM_EPOCHS excludes the warm-up),
    and the default 10-epoch warm-up is cut to half of a shorter run: --epochs 3 trains."""
    lrs = []

    def record(net, model, optimizer, *rest):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        return {"loss": torch.tensor(1.0)}

    monkeypatch.setattr(m, "train_step", record)
    m.main([*TINY, "--warmup_epochs", "10", "--data_dir", image_folder, "--epochs", "3",
            "--eval_every", "0", "--out_dir", str(tmp_path)])
    steps, warm = 4 * 3, 4 * 1.5  # 32 images / batch 8; warm-up min(10, 3 / 2) epochs
    want = [0.2 * (s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
            for s in range(steps)]
    assert [g[0] for g in lrs] == pytest.approx(want) and all(len(set(g)) == 1 for g in lrs)
    assert [float(r["lr"]) for r in read_csv(tmp_path / "metrics.csv")] == pytest.approx(want[3::4], rel=1e-5)


# ---- runs ----

@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("nnclr") / "run"
    m.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(out)])
    return out


def test_run_directory(first_epoch):
    rows = read_csv(first_epoch / "metrics.csv")
    assert list(rows[0]) == ["epoch", "loss", "fn_rate", "fn_rate_hard", "nn_acc", "lr",
                             "epoch_seconds", "images_per_sec", "knn_top1", "knn_top5"]
    for name in ("fn_rate", "fn_rate_hard", "nn_acc"):
        assert 0 <= float(rows[0][name]) <= 1, name
    # 4 balanced classes, batches of 8: about 1 of an anchor's 7 negatives shares its class
    assert 0.05 < float(rows[0]["fn_rate"]) < 0.35
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    assert ckpt["script"] == "nnclr_kmclr.py" and ckpt["epoch"] == 1 and len(ckpt["rng"]) == 1
    assert ckpt["model"]["rows"].shape == (24, 8) and int(ckpt["model"]["ptr"]) == 32 % 24
    torch.testing.assert_close(ckpt["model"]["rows"].norm(dim=1), torch.ones(24))
    assert (ckpt["model"]["labels"] >= 0).sum() == 24  # the whole queue holds real projections
    # what linear_eval.py does: the backbone from common.py, the head from its layout
    a = ckpt["args"]
    backbone = common.build_backbone(a["arch"], a["stem"], a["width"], a["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    make = {"linear": lambda i, o, b: torch.nn.Linear(i, o, bias=b), "relu": torch.nn.ReLU,
            "bn": lambda n, affine: torch.nn.BatchNorm1d(n, affine=affine)}
    head = torch.nn.Sequential(OrderedDict((n, make[k](*r)) for n, k, *r in ckpt["head"]["layout"]))
    head.load_state_dict(ckpt["head"]["state"])
    model = m.NNCLR(m.argparse.Namespace(**a), 4)
    model.load_state_dict(ckpt["model"])
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(head.eval()(backbone.eval()(x)), model.eval().projector(model.backbone(x)))


@pytest.mark.parametrize("method,extra", [("nnclr", []), ("kmclr", ["--gpu_aug"])])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(method, extra, tmp_path, image_folder,
                                                                  monkeypatch):
    """KMCLR restarts its centroids at the last step of each epoch (--reset_every 1, 4 steps an
    epoch): the resumed run must carry the ring, its pointer, the counts, the counter and the step."""
    flags = [*TINY, "--data_dir", image_folder, "--epochs", "2", "--method", method, "--eval_every",
             "2", *extra]
    _, a, _ = assert_resume_is_exact(m, flags, tmp_path, monkeypatch)
    if method == "kmclr":
        assert int(a["model"]["step"]) == 9 and int(a["model"]["seen"]) == 6 and a["model"]["counts"].min() >= 1


# ---- bad input: one line, exit status 2 ----

@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "0"], "--temperature must be > 0"), (["--temperature", "nan"], "must be finite"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"), (["--lr", "0"], "--lr must be > 0"),
    (["--queue_size", "0"], "--queue_size must be > 0"), (["--num_prototypes", "0"], "--num_prototypes"),
    (["--feature_dim", "0"], "--feature_dim"), (["--hidden_dim", "0"], "--hidden_dim"),
    (["--pred_dim", "0"], "--pred_dim"), (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0"),
    (["--reset_every", "-1"], "--reset_every must be >= 0"), (["--method", "swav"], "invalid choice"),
    (["--batch_size", "1"], "--batch_size"), (["--blur_p", "2"], "--blur_p must be in [0, 1]"),
    (["--kmeans_metric", "cosine"], "unrecognized arguments"), (["--subset", "4"], "fewer than --batch_size"),
    (["--data_dir", "/nonexistent"], "no images in /nonexistent")])
def test_bad_flags_are_one_line(flags, fragment, image_folder, capsys, tmp_path):
    main_error(m, [*TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", tmp_path, *flags], capsys,
               fragment)


def test_bad_checkpoints_are_one_line(first_epoch, tmp_path, capsys, monkeypatch):
    (tmp_path / "random.pt").write_bytes(os.urandom(5000))
    (tmp_path / "text.pt").write_text("epoch,loss\n1,2.0\n")
    for name in ("random.pt", "text.pt"):
        main_error(m, ["--resume", tmp_path / name], capsys, "is not a checkpoint (not written by torch.save")
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    for key, value, fragment in [("script", "moco_mochi.py", "not a checkpoint of nnclr_kmclr.py"),
                                 ("optimizer", None, "lacks optimizer")]:
        torch.save({k: v for k, v in {**ckpt, key: value}.items() if v is not None}, tmp_path / "bad.pt")
        main_error(m, ["--resume", tmp_path / "bad.pt"], capsys, fragment)
    for key, value in [("rows", torch.zeros(24, 5)), ("projector.6.weight", torch.zeros(3, 3))]:
        torch.save({**ckpt, "model": {**ckpt["model"], key: value}}, tmp_path / "shape.pt")
        main_error(m, ["--resume", tmp_path / "shape.pt", "--epochs", "2"], capsys, "does not fit", key)
    main_error(m, ["--resume", first_epoch / "last.pt", "--epochs", "1"], capsys, "has trained 1 epochs")
    main_error(m, ["--resume", first_epoch / "last.pt", "--epochs", "2", "--method", "kmclr"], capsys,
               "--method: a resumed run keeps")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before any process group
    main_error(m, ["--resume", first_epoch / "last.pt", "--epochs", "2"], capsys, "resume it on as many")


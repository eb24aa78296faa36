"""moco_mochi.py end to end on the generated image folder with a tiny backbone: the run directory
and checkpoint, exact resume after an interruption, the defaults against the original code's
numbers, the augmentation flags, the negatives monitor's columns, every kind of bad input."""
import os
from collections import OrderedDict

import pytest
import torch

import common
import moco_mochi as mm
from conftest import assert_resume_is_exact, main_error, read_csv

TINY = ["--dataset", "folder", "--width", "4", "--crop_size", "16", "--batch_size", "16", "--queue_size", "32",
        "--workers", "0", "--knn_k", "10"]
MOCHI = ["--n_hard", "8", "--s1_hard", "6", "--s2_hard", "3", "--start1_hard", "0", "--start2_hard", "1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, image_folder):
    """MoCHi, 2 epochs: type 1 from epoch 0, type 2 from epoch 1."""
    out = tmp_path_factory.mktemp("moco") / "straight"
    mm.main([*TINY, *MOCHI, "--data_dir", image_folder, "--epochs", "2", "--out_dir", str(out)])
    return out


def test_run_directory_and_checkpoint(straight):
    rows = read_csv(straight / "metrics.csv")
    assert list(rows[1]) == ["epoch", "loss", "fn_rate", "fn_rate_hard", "fn_rate_synth", "lr", "epoch_seconds",
                             "images_per_sec", "knn_top1", "knn_top5"]
    for row in rows:  # 4 balanced classes: a quarter of the known keys, about, is the query's class
        assert 0.1 < float(row["fn_rate"]) < 0.4 and 0 <= float(row["fn_rate_hard"]) <= 1
        assert 0 <= float(row["fn_rate_synth"]) <= 1 and 0 <= float(row["knn_top1"]) <= 100
    assert [float(r["lr"]) for r in rows] == [0.06, pytest.approx(0.03)]  # cosine per epoch
    ckpt = torch.load(straight / "last.pt", weights_only=True)
    assert ckpt["script"] == "moco_mochi.py" and ckpt["epoch"] == 2 and len(ckpt["rng"]) == 1
    assert ckpt["bn_mode"] == "shuffle BN, 1 process(es), split BN in 8 groups each"
    state = ckpt["model"]
    assert state["queue"].shape == (32, 128) and state["queue_ptr"] == 8 * 16 % 32
    torch.testing.assert_close(state["queue"].norm(dim=1), torch.ones(32))
    assert sorted(state["queue_ids"].tolist()) == sorted(set(state["queue_ids"].tolist()))  # 2 batches
    assert 0 <= state["queue_ids"].min() and state["queue_ids"].max() < 64
    assert not torch.equal(state["encoder_q.backbone.conv1.weight"], state["encoder_k.backbone.conv1.weight"])
    # what linear_eval.py does: the backbone from common.py, the head from its layout
    a = ckpt["args"]
    backbone = common.build_backbone(a["arch"], a["stem"], a["width"], a["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    make = {"linear": lambda i, o, b: torch.nn.Linear(i, o, bias=b), "relu": torch.nn.ReLU}
    head = torch.nn.Sequential(OrderedDict((n, make[k](*r)) for n, k, *r in ckpt["head"]["layout"]))
    head.load_state_dict(ckpt["head"]["state"])
    model = mm.MoCo(mm.argparse.Namespace(**a), 8)
    model.load_state_dict(state)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(head(backbone.eval()(x)), model.eval().encoder_q(x))


@pytest.mark.parametrize("gpu_aug", [False, True])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(gpu_aug, straight, tmp_path, image_folder,
                                                                  monkeypatch):
    flags = [*TINY, *MOCHI, "--data_dir", image_folder, "--epochs", "2", "--symmetric"] + ["--gpu_aug"] * gpu_aug
    flags += ["--queue_size", "64"]
    first, _, _ = assert_resume_is_exact(mm, flags, tmp_path, monkeypatch)
    assert first["model"]["queue_ptr"] == 4 * 32 % 64 and (first["model"]["queue_ids"] >= 0).all()


def test_defaults_are_the_originals(monkeypatch, tmp_path):
    a = mm.get_parser().parse_args([])
    # facebookresearch/moco colab-notebook colab/moco_cifar10_demo.ipynb, cell 4: arch resnet18,
    # lr 0.06 (batch 512), epochs 200, cos, batch-size 512, wd 5e-4, moco-dim 128, moco-k 4096,
    # moco-m 0.99, moco-t 0.1, bn-splits 8, knn-k 200, knn-t 0.1; cell 8: conv1 3x3 stride 1
    # padding 1, no max-pool, fc -> 128 (no MLP); cell 15: SGD momentum 0.9
    assert (a.arch, a.stem, a.stem_padding, a.lr, a.epochs, a.batch_size, a.weight_decay) == (
        "resnet18", "cifar", 1, 0.06, 200, 512, 5e-4)
    assert (a.feature_dim, a.queue_size, a.ema, a.temperature, a.knn_k, a.knn_t) == (128, 4096, 0.99, 0.1, 200, 0.1)
    assert (a.mlp, a.symmetric, a.mask_own, a.dataset) == (False, False, False, "cifar10")
    optimizer = mm.make_optimizer(mm.MoCo(mm.get_parser().parse_args(["--width", "2"])), a, torch.device("cpu"))
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4
    model = mm.MoCo(mm.get_parser().parse_args(["--width", "2"]), 8)
    assert [type(m).__name__ for m in model.encoder_q.head] == ["Linear"]
    # main_moco.py argparse (v2: --mlp): MLP fc(2048, 2048), ReLU, fc
    v2 = mm.MoCo(mm.get_parser().parse_args(["--width", "2", "--mlp"]))
    assert [type(m).__name__ for m in v2.encoder_q.head] == ["Linear", "ReLU", "Linear"]
    assert v2.encoder_q.head[0].in_features == v2.encoder_q.head[0].out_features == 16
    # cell 6, train_transform: RandomResizedCrop(32) (scale (0.08, 1)), flip 0.5,
    # RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(p=0.2), no blur,
    # Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    assert (a.crop_size, a.crop_min, a.blur_p, a.norm) == (32, 0.08, 0.0, "auto")
    recipe = recipe_of([], monkeypatch, tmp_path)
    crop, flip, jitter, gray, _, norm = common.train_transform(32, **recipe).transforms
    assert tuple(crop.scale) == (0.08, 1.0) and flip.p == 0.5 and jitter.p == 0.8 and gray.p == 0.2
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert norm.mean == (0.4914, 0.4822, 0.4465) and norm.std == (0.2023, 0.1994, 0.2010)
    # MoCHi (moco_mochi.md 9): off unless --n_hard; (N, 1024, 256) with a 10-epoch warm-up
    assert (a.n_hard, a.s1_hard, a.s2_hard, a.start1_hard, a.start2_hard) == (0, 1024, 256, 10, 10)
    aliases = mm.get_parser().parse_args(["--k_moco", "64", "--m_moco", "0.5", "--t_moco", "0.3", "--dim_moco", "9"])
    assert (aliases.queue_size, aliases.ema, aliases.temperature, aliases.feature_dim) == (64, 0.5, 0.3, 9)


def recipe_of(flags, monkeypatch, out_dir):
    """The recipe main hands to common.run_data (the PIL path and --gpu_aug alike)."""
    seen = []
    monkeypatch.setattr(common, "run_data", lambda *a: seen.append(a) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        mm.main([*flags, "--out_dir", str(out_dir)])
    monkeypatch.undo()
    return seen[0][1]  # common.run_data(args, recipe, ...)


def test_augmentation_flags_reach_both_paths(monkeypatch, tmp_path):
    """One recipe serves the PIL and the batched path (common.run_data): each flag lands in it."""
    flags = ["--crop_min", "0.2", "--blur_p", "0.5", "--norm", "imagenet", "--gpu_aug"]
    assert recipe_of(flags, monkeypatch, tmp_path) == {
        "scale": (0.2, 1.0), "blur_p": 0.5, "normalize": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    assert recipe_of(["--norm", "none"], monkeypatch, tmp_path)["normalize"] is None


@pytest.mark.parametrize("flags,fragment", [
    (["--crop_min", "0"], "0 < --crop_min <= 1"), (["--ema", "1.5"], "0 <= --ema <= 1"),
    (["--m_moco", "-0.1"], "0 <= --ema <= 1"), (["--k_moco", "40"], "multiple of the 16 keys/step"),
    (["--symmetric", "--queue_size", "48"], "multiple of the 32 keys/step"), (["--n_hard", "33"], "--n_hard must be at most"),
    (["--bn_splits", "3"], "--bn_splits 3 must divide the 16 images"), (["--s1_hard", "-1"], "--s1_hard must be >= 0"),
    (["--t_moco", "nan"], "--temperature must be finite"), (["--temperature", "0"], "--temperature must be > 0"),
    (["--queue_size", "0"], "--queue_size must be > 0"), (["--width", "0"], "--width must be > 0"),
    (["--blur_p", "2"], "--blur_p must be in [0, 1]"), (["--data_dir", "/nonexistent"], "no images in /nonexistent"),
    (["--subset", "8"], "fewer than --batch_size"), (["--out_dir", "/proc/nope"], "cannot write to --out_dir")])
def test_bad_input_is_one_line(flags, fragment, image_folder, capsys, tmp_path):
    main_error(mm, [*TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(tmp_path), *flags], capsys,
               fragment)


def test_bad_checkpoints(straight, tmp_path, capsys, monkeypatch):
    data = (straight / "last.pt").read_bytes()
    (tmp_path / "random.pt").write_bytes(os.urandom(5000))
    (tmp_path / "text.pt").write_text("epoch,loss\n1,2.0\n")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    for name in ("random.pt", "text.pt", "cut.pt"):
        main_error(mm, ["--resume", str(tmp_path / name)], capsys, "is not a checkpoint (not written by torch.save")
    ckpt = torch.load(straight / "last.pt", weights_only=True)
    for key, value, fragment in [("script", "ring_nce.py", "not a checkpoint of moco_mochi.py"),
                                 ("optimizer", None, "lacks optimizer")]:
        torch.save({k: v for k, v in {**ckpt, key: value}.items() if v is not None}, tmp_path / "bad.pt")
        main_error(mm, ["--resume", str(tmp_path / "bad.pt"), "--epochs", "3"], capsys, fragment)
    wrong = {**ckpt, "model": {**ckpt["model"], "queue": torch.zeros(48, 128)}}
    torch.save(wrong, tmp_path / "shape.pt")
    main_error(mm, ["--resume", str(tmp_path / "shape.pt"), "--epochs", "3"], capsys, "does not fit the model", "queue")
    main_error(mm, ["--resume", str(straight / "last.pt"), "--epochs", "2"], capsys, "has trained 2 epochs")
    main_error(mm, ["--resume", str(straight / "last.pt"), "--epochs", "3", "--n_hard", "4"], capsys,
               "--n_hard: a resumed run keeps the checkpoint's values")
    monkeypatch.setenv("WORLD_SIZE", "2")
    main_error(mm, ["--resume", str(straight / "last.pt"), "--epochs", "3"], capsys, "ran on 1 process(es): resume it on as many")


def test_help_names_the_aliases(capsys):
    with pytest.raises(SystemExit) as stop:
        mm.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--k_moco QUEUE_SIZE   = --queue_size" in out and "GLOBAL batch" in out

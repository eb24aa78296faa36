"""ring_nce.py end to end on the generated image folder: the original defaults and augmentation
recipes (as literals, with their sources), exact resume after an interruption (IR, MoCo, CMC, and
--gpu_aug), what an evaluation reads from last.pt, the monitor's columns, and bad input."""

import pytest
import torch

import common
import ring_nce
from conftest import assert_resume_is_exact, main_error

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "16",
        "--workers", "0", "--subset", "32", "--queue_size", "32", "--num_negatives", "24", "--hidden_dim", "16",
        "--feature_dim", "8", "--knn_k", "5"]
RING = ["--ring_lower", "0.1", "--ring_upper", "0.6"]  # ranks [3, 19) of the 32 queue keys or bank rows
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# -------------------------------------------------------------------------------------------------
# Defaults and recipes
# -------------------------------------------------------------------------------------------------

def test_defaults_are_the_originals():
    a = ring_nce.get_parser().parse_args([])
    # mhw32/contrastive-ring-public config/pretrain/{nce,mocov2}/*.json: t 0.07, MoCo's k 4096 (queue), m 0.999
    # (key encoder), optim_params lr 0.03, momentum 0.9, weight_decay 1e-4, batch_size 256, num_epochs 200
    assert (a.temperature, a.queue_size, a.ema) == (0.07, 4096, 0.999)
    assert (a.lr, a.momentum, a.weight_decay, a.batch_size, a.epochs) == (0.03, 0.9, 1e-4, 256, 200)
    assert a.lr_steps == [136, 166]  # scripts/run.py lines 34-42: MoCoLRScheduler at int(0.68 E), int(0.83 E), E 200
    # src/models/resnet2.py CustomResNet lines 24-25: resnet18, l1 Linear(512, 512), ReLU, l2 Linear(512, out_dim 128)
    assert (a.arch, a.hidden_dim, a.feature_dim) == ("resnet18", 512, 128)
    assert a.num_negatives == 4096  # NCE / NCERing k = 4096 (theirs: 4095 draws + the positive; README deviation)
    assert (a.method, a.ring_lower, a.ring_upper) == ("moco", 0.0, 1.0)  # no ring: the base method
    for method, m in (("ir", 0.0), ("moco", 0.0), ("cmc", 0.5)):  # nce*.json "m": 0; train_CMC.py --nce_m 0.5
        args = ring_nce.get_parser().parse_args(["--method", method])
        ring_nce.rules(args)
        assert args.bank_momentum == m
    args = ring_nce.get_parser().parse_args(["--method", "cmc", "--bank_momentum", "0"])
    ring_nce.rules(args)
    assert args.bank_momentum == 0.0


class Loaded(Exception):
    pass


def load_call(monkeypatch, tmp_path, *flags):
    """What main passes to load_data: the recipe (both --gpu_aug and the PIL path get it), views, to_input."""
    seen = {}

    def fake(args, parser, device, recipe, views=2, split="train", to_input=None):
        seen.update(args=args, recipe=recipe, views=views, split=split, to_input=to_input)
        raise Loaded

    monkeypatch.setattr(ring_nce, "load_data", fake)
    with pytest.raises(Loaded):
        ring_nce.main([*flags, "--out_dir", str(tmp_path)])
    return seen


@pytest.mark.parametrize("method", ["ir", "moco"])
def test_recipe_of_ir_and_moco(method, monkeypatch, tmp_path):
    # src/datasets/datasets.py load_default_transforms (lines 150-166): RandomResizedCrop(224, scale=(0.2, 1.)),
    # RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip, ImageNet's mean and std
    seen = load_call(monkeypatch, tmp_path, "--method", method)
    assert seen["recipe"] == {"scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4), "jitter_p": 1.0,
                              "grayscale_p": 0.2, "blur_p": 0.0, "normalize": IMAGENET}
    assert seen["views"] == (2 if method == "moco" else 1) and seen["to_input"] is None
    assert seen["split"] == "train" and seen["args"].crop_size == 32  # 32 px (theirs: CIFAR upsampled to 224)


def test_recipe_of_cmc(monkeypatch, tmp_path):
    # HobbitLong/CMC train_CMC.py get_train_loader (lines 143-149): RandomResizedCrop(scale=(crop_low 0.2, 1.)), flip,
    # Lab normalised with CMC's constants (to_input: on the device for both data paths)
    seen = load_call(monkeypatch, tmp_path, "--method", "cmc")
    assert seen["recipe"] == {"scale": (0.2, 1.0), "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0,
                              "normalize": None}
    assert seen["views"] == 1 and seen["to_input"] is common.lab_input


@pytest.mark.parametrize("flags,key,value", [
    (["--blur_p", "0.3"], "blur_p", 0.3),
    (["--norm", "cifar10"], "normalize", ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))),
    (["--norm", "none"], "normalize", None),
    (["--norm", "auto", "--dataset", "cifar100"], "normalize", ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))])
def test_augmentation_flags_land_in_the_recipe(flags, key, value, monkeypatch, tmp_path):
    seen = load_call(monkeypatch, tmp_path, "--method", "ir", *flags)
    assert seen["recipe"][key] == value
    assert load_call(monkeypatch, tmp_path, "--crop_size", "24", "--gpu_aug")["args"].crop_size == 24


# -------------------------------------------------------------------------------------------------
# Training, exact resume, last.pt
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,extra", [("ir", []), ("moco", []), ("cmc", []), ("cmc", ["--gpu_aug"]),
                                          ("moco", ["--gpu_aug"])])
def test_resume_after_an_interruption_is_exact(method, extra, image_folder, tmp_path, monkeypatch):
    flags = [*TINY, *RING, "--data_dir", image_folder, "--method", method, "--epochs", "2", "--lr_steps", "1", *extra]
    first, straight, rows = assert_resume_is_exact(ring_nce, flags, tmp_path, monkeypatch)
    for pool in ("queue", "queue_ids", "bank"):  # the memories moved in epoch 2: they were saved and restored
        if pool in straight["model"]:
            assert not torch.equal(first["model"][pool], straight["model"][pool])
    assert [float(r["lr"]) for r in rows] == [0.03, 0.003]  # x0.1 from the --lr_steps epoch on (0-based)
    for r in rows:  # the monitor: fractions, the band above the ring included (lower > 0)
        assert all(0 <= float(r[c]) <= 1 for c in ("fn_rate", "fn_rate_hard", "fn_rate_above"))
        assert 0 <= float(r["knn_top1"]) <= 100
    evaluation_reads(straight, method)


def evaluation_reads(ckpt, method):
    """What linear_eval.py does with last.pt: common.build_backbone from ckpt["args"], the head from
    its layout, CMC's Lab input from the args."""
    args = ckpt["args"]
    assert ckpt["script"] == "ring_nce.py" and args["method"] == method
    backbone = common.build_backbone(args["arch"], args["stem"], args["width"], args["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    layout = ckpt["head"]["layout"]
    assert [layer[1] for layer in layout] == ["linear", "relu", "linear"]
    assert layout[0][2] == backbone.out_dim == 32 and layout[-1][3] == (16 if method == "cmc" else 8)
    if method == "cmc":
        assert (args["input_space"], args["lab_mean"], args["lab_std"]) == ("lab", [50.0, 6.025, -6.6895],
                                                                            [50.0, 92.208, 101.1675])
    else:
        assert "input_space" not in args
        assert torch.equal(ckpt["backbone"]["conv1.weight"], ckpt["model"]["encoder_q.backbone.conv1.weight"])


# -------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and one line
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,fragment", [
    (["--ring_lower", "0.5", "--ring_upper", "0.5"], "need 0 <= --ring_lower < --ring_upper <= 1"),
    (["--ring_lower", "-0.1"], "need 0 <= --ring_lower"),
    (["--ring_upper", "1.5"], "need 0 <= --ring_lower"),
    (["--ring_upper", "nan"], "--ring_upper must be finite"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--method", "ir", "--ring_lower", "0.01", "--ring_upper", "0.015"], "no ring [0.01, 0.015) of 32 candidates"),
    (["--method", "moco", "--ring_lower", "0.5", "--ring_upper", "0.51"], "no ring [0.5, 0.51) of 32 candidates"),
    (["--method", "moco", "--queue_size", "40"], "--queue_size must be a multiple of --batch_size"),
    (["--method", "cmc", "--width", "5"], "--method cmc halves --width"),
    (["--method", "cmc", "--norm", "cifar10"], "--method cmc crops and flips only"),
    (["--method", "cmc", "--blur_p", "0.5"], "--method cmc crops and flips only"),
    (["--num_negatives", "0"], "--num_negatives must be > 0"),
    (["--bank_momentum", "1"], "--bank_momentum must be in [0, 1)"),
    (["--ema", "1.5"], "--ema in [0, 1]"),
    (["--subset", "8"], "8 training images, fewer than --batch_size 16")])
def test_bad_flags(flags, fragment, image_folder, tmp_path, capsys):
    main_error(ring_nce, [*TINY, "--data_dir", image_folder, "--epochs", "1", *flags, "--out_dir", str(tmp_path / "x")],
               capsys, fragment)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_bad_checkpoints_and_resumes(image_folder, tmp_path, capsys, monkeypatch):
    ring_nce.main([*TINY, "--data_dir", image_folder, "--method", "moco", "--epochs", "1", "--eval_every", "0",
                   "--out_dir", str(tmp_path / "run")])
    last = str(tmp_path / "run" / "last.pt")
    ckpt = torch.load(last, weights_only=True)
    (tmp_path / "random.pt").write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "text.pt").write_text("epoch 1\n")
    torch.save({**ckpt, "script": "moco_mochi.py"}, tmp_path / "other.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, tmp_path / "lacks.pt")
    torch.save({**ckpt, "model": {**ckpt["model"], "queue": torch.zeros(8, 8)}}, tmp_path / "shape.pt")
    for name, fragment in [("random.pt", "is not a checkpoint"), ("text.pt", "is not a checkpoint"),
                           ("other.pt", "is not a checkpoint of ring_nce.py"), ("lacks.pt", "lacks optimizer"),
                           ("shape.pt", "does not fit the model"), ("missing.pt", "no checkpoint at")]:
        main_error(ring_nce, ["--resume", str(tmp_path / name), "--epochs", "2"], capsys, fragment)
    main_error(ring_nce, ["--resume", last, "--epochs", "1"], capsys, "has trained 1 epochs")
    main_error(ring_nce, ["--resume", last, "--epochs", "2", "--ring_upper", "0.5"], capsys,
               "--ring_upper: a resumed run keeps the checkpoint's values")
    monkeypatch.setenv("WORLD_SIZE", "2")
    main_error(ring_nce, ["--resume", last, "--epochs", "2"], capsys, "ran on 1 process(es): resume it on as many")


def test_help(capsys):
    with pytest.raises(SystemExit) as stop:
        ring_nce.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "GLOBAL batch" in text and "thres_outer" in text and "--ema" in text

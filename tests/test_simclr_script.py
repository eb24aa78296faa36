"""simclr_debiased.py end to end on a generated image folder with a tiny backbone: the run
directory, exact resume, torchrun, Nozawa & Sato's flags, the defaults, every kind of bad input."""
import contextlib
import io
import json
import math
import os
import shutil
from collections import OrderedDict

import pytest
import torch

import common
import simclr_debiased as sd
from conftest import (ROOT, assert_one_line_error, assert_resume_is_exact, main_error,
                      read_csv, run_script)

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size",
        "16", "--workers", "0", "--tau_plus", "0.1", "--beta", "1.0", "--knn_k", "10"]


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("simclr") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        sd.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(out)])
    (out / "stdout.txt").write_text(stdout.getvalue())
    return out


def test_run_directory(first_epoch):
    rows = read_csv(first_epoch / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    assert list(rows[0]) == ["epoch", "loss", "clamped", "fn_rate", "fn_rate_hard", "fn_weight", "lr",
                             "epoch_seconds", "images_per_sec", "knn_top1", "knn_top5"]
    # 4 balanced classes, 16 images a batch: the other 30 views hold 6 of the anchor's class on
    # average when the batch holds 4 per class, so fn_rate is near 0.2 (it varies with the draw)
    assert 0.1 < float(rows[0]["fn_rate"]) < 0.35 and 0 <= float(rows[0]["fn_rate_hard"]) <= 1
    assert 0 <= float(rows[0]["fn_weight"]) <= 1 and float(rows[0]["lr"]) == 1e-3
    # DCL/HCL: the measured rate beside the prior tau_plus that stands for it
    rate = float(rows[0]["fn_rate"])
    assert f"--tau_plus 0.1: the measured fn_rate is {rate:.4f}\n" in (first_epoch / "stdout.txt").read_text()
    assert json.loads((first_epoch / "args.json").read_text())["beta"] == 1.0
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    assert ckpt["script"] == "simclr_debiased.py" and ckpt["epoch"] == 1 and len(ckpt["rng"]) == 1
    # what linear_eval.py does: the backbone from common.py, the head from its layout
    a = ckpt["args"]
    backbone = common.build_backbone(a["arch"], a["stem"], a["width"], a["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    make = {"linear": lambda i, o, b: torch.nn.Linear(i, o, bias=b), "relu": torch.nn.ReLU,
            "bn": lambda n, affine: torch.nn.BatchNorm1d(n, affine=affine)}
    head = torch.nn.Sequential(OrderedDict((n, make[k](*r)) for n, k, *r in ckpt["head"]["layout"]))
    head.load_state_dict(ckpt["head"]["state"])
    model = sd.SimCLR(sd.argparse.Namespace(**a))
    model.load_state_dict(ckpt["model"])
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(head.eval()(backbone.eval()(x)), model.eval().projector(model.backbone(x)))


@pytest.mark.parametrize("extra", [[], ["--workers", "1"], ["--gpu_aug"]])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(extra, tmp_path, image_folder,
                                                                  monkeypatch):
    flags = [*TINY, "--data_dir", image_folder, "--epochs", "2", *extra]
    assert_resume_is_exact(sd, flags, tmp_path, monkeypatch)


def test_a_larger_epochs_goes_on_and_the_run_folder_follows_the_checkpoint(first_epoch, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(first_epoch, moved)
    (moved / "metrics.csv").write_text("garbage\x00\n")  # damaged: rewritten from the checkpoint
    sd.main(["--resume", str(moved / "last.pt"), "--epochs", "2"])
    rows = read_csv(moved / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == read_csv(first_epoch / "metrics.csv")[0]


def test_untrained_baseline_and_precisions(tmp_path, image_folder, capsys):
    out = tmp_path / "untrained"
    sd.main([*TINY, "--data_dir", image_folder, "--epochs", "0", "--out_dir", str(out)])
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["epoch", "knn_top1", "knn_top5"] and rows[0]["epoch"] == "0"
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    out = tmp_path / "bf16"
    sd.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--eval_every", "0", "--precision", "bf16",
             "--out_dir", str(out), "--temperature", "0.1", "--beta", "6"])
    assert "knn_top1" not in read_csv(out / "metrics.csv")[0]
    capsys.readouterr()
    # a bf16 run resumed where fp16 is chosen: fp16 on a CPU warns in one line; the scaler starts
    # afresh (a bf16 run saves a disabled scaler's empty state)
    sd.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--precision", "fp16"])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == ["simclr_debiased.py: warning: fp16 autocast on a CPU is very slow"]
    assert torch.load(out / "last.pt", weights_only=True)["scaler"]["scale"] > 0


def test_torchrun_two_processes(tmp_path, image_folder):
    out = tmp_path / "ddp"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "simclr_debiased.py", *TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir",
                        str(out), "--num_chunks", "2", "--precision", "fp16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("warning") == 1  # rank 0 alone speaks
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])  # seed + rank
    assert len(read_csv(out / "metrics.csv")) == 1
    assert_one_line_error(run_script("simclr_debiased.py", "--resume", str(out / "last.pt"), "--epochs", "2"),
                   "ran on 2 process(es): resume it on as many")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(first_epoch, tmp_path, monkeypatch, capsys):
    run = tmp_path / "nan"
    shutil.copytree(first_epoch, run)
    real, calls = sd.contrastive_loss_terms, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, *rest = real(*args, **kwargs)
        return (loss * math.nan if len(calls) == 3 else loss), *rest

    monkeypatch.setattr(sd, "contrastive_loss_terms", poisoned)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        sd.main(["--resume", str(run / "last.pt"), "--epochs", "3"])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err == f"non-finite loss in epoch 2; {run}/last.pt keeps epoch 1"
    before, after = (torch.load(d / "last.pt", weights_only=True) for d in (first_epoch, run))
    assert after["epoch"] == 1 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_chunks_are_independent_losses(monkeypatch, tmp_path, image_folder):
    """--num_chunks 4: each loss sees 4 images and no gathered negatives, never the whole batch."""
    seen, real = [], sd.contrastive_loss_terms
    monkeypatch.setattr(sd, "contrastive_loss_terms",
                        lambda z1, *a, **k: seen.append((len(z1), k["gather_negatives"])) or real(z1, *a, **k))
    sd.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--eval_every", "0", "--num_chunks", "4",
             "--out_dir", str(tmp_path)])
    assert seen == [(4, False)] * 16


def test_larc_on_the_device_against_formula():
    torch.manual_seed(0)
    p1, p2, p3, p4 = (torch.nn.Parameter(t) for t in (torch.randn(5, 3), torch.randn(4), torch.zeros(2),
                                                      torch.randn(3)))
    for p in (p1, p2, p3):
        p.grad = torch.randn_like(p)
    p4.grad = torch.zeros_like(p4)
    expected = []
    for p, wd in ((p1, 0.1), (p2, 0.0)):  # Apex LARC, clip off: trust 1e-3, eps 1e-8
        w, g = p.detach().double(), p.grad.double()
        expected.append(((g + wd * w) * 1e-3 * w.norm() / (g.norm() + wd * w.norm() + 1e-8)).float())
    untouched = p3.grad.clone(), p4.grad.clone()
    sd.larc_(torch.optim.SGD([{"params": [p1, p3, p4], "larc_weight_decay": 0.1},
                              {"params": [p2], "larc_weight_decay": 0.0}], lr=0.1))
    torch.testing.assert_close(p1.grad, expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(p2.grad, expected[1], rtol=1e-5, atol=0)
    assert torch.equal(p3.grad, untouched[0]) and torch.equal(p4.grad, untouched[1])  # zero norms


def test_defaults_are_the_originals():
    a = sd.get_parser().parse_args([])
    # joshr17/HCL image/main.py argparse: feature_dim 128, temperature 0.5, tau_plus 0.1, k 200,
    # batch_size 256, epochs 400, dataset stl10; optim.Adam(lr=1e-3, weight_decay=1e-6); its kNN
    # weights with the training temperature (0.5); beta 0 here makes the default DCL (DCL main.py)
    assert (a.feature_dim, a.temperature, a.tau_plus, a.beta, a.knn_k, a.knn_t) == (128, 0.5, 0.1, 0.0, 200, 0.5)
    assert (a.batch_size, a.epochs, a.dataset, a.lr, a.weight_decay) == (256, 400, "stl10", 1e-3, 1e-6)
    # DCL/HCL model.py: torchvision resnet50, conv1 3x3 stride 1, no max-pool; head 2048 -> 512
    # (no bias) -> BN -> ReLU -> 128; utils.py: 32-px crops, blur p 0.5, CIFAR-10 normalisation
    assert (a.arch, a.stem, a.hidden_dim, a.crop_size, a.blur_p, a.norm) == (
        "resnet50", "cifar", 512, 32, 0.5, "cifar10")
    assert sd.get_parser().parse_args(["--k", "7"]).knn_k == 7  # DCL's name for the kNN's k
    assert sd.head_layout(sd.SimCLR(a).projector) == [
        ["linear1", "linear", 2048, 512, False], ["bn1", "bn", 512, True], ["relu1", "relu"],
        ["linear2", "linear", 512, 128, True]]
    # Nozawa & Sato (shared/specs/bound_and_nlp.md): 512 -> 512 -> BN -> ReLU -> 128 (no bias)
    a = sd.get_parser().parse_args(["--head", "nozawa", "--arch", "resnet18"])
    assert sd.head_layout(sd.SimCLR(a).projector) == [
        ["linear1", "linear", 512, 512, True], ["bn1", "bn", 512, True], ["relu1", "relu"],
        ["linear2", "linear", 512, 128, False]]


def test_augmentation_flags_reach_both_paths(monkeypatch, tmp_path):
    """One recipe serves the PIL and the batched path (common.run_data): each flag lands in it."""
    seen = []
    monkeypatch.setattr(common, "run_data", lambda *a: seen.append(a) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sd.main(["--blur_p", "0.3", "--norm", "none", "--crop_size", "24", "--dataset", "stl10", "--out_dir",
                 str(tmp_path), "--gpu_aug"])
    args, recipe, _, views, split, *_ = seen[0]  # common.run_data(args, recipe, device, views, split)
    assert (split, args.crop_size, recipe, views, args.gpu_aug) == (
        "train+unlabeled", 24, {"blur_p": 0.3, "normalize": None}, 2, True)


@pytest.mark.parametrize("flags,fragment", [
    (["--tau_plus", "1"], "--tau_plus < 1"), (["--beta", "-1"], "--beta >= 0"),
    (["--batch_size", "1"], "--batch_size"), (["--width", "0"], "--width must be > 0"),
    (["--crop_size", "0"], "--crop_size must be > 0"), (["--lr", "nan"], "--lr must be finite"),
    (["--temperature", "inf"], "--temperature must be finite"), (["--temperature", "0"], "--temperature must be > 0"),
    (["--stem_padding", "-1"], "--stem_padding must be >= 0"), (["--hidden_dim", "0"], "--hidden_dim must be > 0"),
    (["--feature_dim", "0"], "--feature_dim must be > 0"), (["--blur_p", "1.5"], "--blur_p must be in [0, 1]"),
    (["--warmup_epochs", "nan"], "--warmup_epochs must be finite"), (["--warmup_epochs", "1"], "--warmup_epochs"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"), (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--estimator", "easy"], "unrecognized arguments"), (["--data_dir", "/nonexistent"], "no images in /nonexistent"),
    (["--subset", "8"], "fewer than --batch_size"), (["--num_chunks", "3"], "--num_chunks"),
    (["--num_chunks", "16"], "--num_chunks"), (["--out_dir", "/proc/nope"], "cannot write to --out_dir")])
def test_bad_input_is_one_line(flags, fragment, image_folder, capsys, tmp_path):
    main_error(sd, [*TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(tmp_path), *flags], capsys,
               fragment)


def test_bad_checkpoints(first_epoch, tmp_path, capsys):
    data = (first_epoch / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    (tmp_path / "random.pt").write_bytes(os.urandom(5000))
    (tmp_path / "text.pt").write_text("epoch,loss\n1,2.0\n")
    for name in ("cut.pt", "random.pt", "text.pt"):
        main_error(sd, ["--resume", str(tmp_path / name)], capsys, "is not a checkpoint (not written by torch.save")
    main_error(sd, ["--resume", str(tmp_path / "missing.pt")], capsys, "no checkpoint at")
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    for key, value, fragment in [("script", "moco_mochi.py", "not a checkpoint of simclr_debiased.py"),
                                 ("args", None, "lacks args")]:
        torch.save({k: v for k, v in {**ckpt, key: value}.items() if v is not None}, tmp_path / "bad.pt")
        main_error(sd, ["--resume", str(tmp_path / "bad.pt")], capsys, fragment)
    wrong = {**ckpt, "model": {**ckpt["model"], "projector.linear2.weight": torch.zeros(3, 3)}}
    torch.save(wrong, tmp_path / "shape.pt")
    main_error(sd, ["--resume", str(tmp_path / "shape.pt"), "--epochs", "2"], capsys,
               "does not fit the model", "projector.linear2.weight")
    main_error(sd, ["--resume", str(first_epoch / "last.pt"), "--arch", "resnet50", "--epochs", "2"], capsys,
               "--arch: a resumed run keeps the checkpoint's values")
    main_error(sd, ["--resume", str(first_epoch / "last.pt"), "--epochs", "1"], capsys,
               "has trained 1 epochs: ask for more with --epochs")
    assert_one_line_error(run_script("simclr_debiased.py", "--resume", str(tmp_path / "random.pt")), "not a checkpoint")


@pytest.mark.parametrize("extra", [["--workers", "0"], ["--workers", "1"], ["--gpu_aug"]])
def test_a_corrupt_image_is_one_line_naming_it(extra, tmp_path, image_folder):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "train" / "class2" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", str(data), "--epochs", "1", "--out_dir",
                        str(tmp_path / "run"), *extra)
    assert_one_line_error(result, f"cannot read image {bad}")


def test_copied_with_common_alone_into_an_empty_folder(tmp_path, image_folder):
    for name in ("simclr_debiased.py", "common.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    result = run_script(str(tmp_path / "simclr_debiased.py"), *TINY, "--data_dir", image_folder, "--epochs", "1",
                        "--out_dir", str(tmp_path / "run"), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


def test_import_has_no_side_effects_and_help(capsys):
    code = ("import sys, simclr_debiased; import torch.distributed as d; assert not d.is_initialized(); "
            "print(sorted(m for m in ('simclr_debiased', 'common') if m in sys.modules))")
    result = run_script("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "['common', 'simclr_debiased']", result.stderr
    with pytest.raises(SystemExit) as stop:
        sd.main(["--help"])
    assert stop.value.code == 0 and "GLOBAL batch" in capsys.readouterr().out

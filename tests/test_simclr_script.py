"""simclr_debiased.py end to end on ../shared/data/cifar10 with a tiny backbone, and its errors."""
import csv
import json
import math
import os
import shutil
import sys

import pytest
import torch

import common
from conftest import ROOT, assert_one_line_error, run_script

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "8", "--batch_size", "32", "--subset", "128",
        "--workers", "0", "--tau_plus", "0.1", "--beta", "1.0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, cifar_dir):
    out = tmp_path_factory.mktemp("simclr") / "run"
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", cifar_dir, "--epochs", "1", "--out_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_first_epoch_writes_run_directory(first_epoch):
    rows = read_csv(first_epoch / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    row = rows[0]
    for column in ("loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "clamped_fraction"):
        assert row[column] != "", column
    assert 0 < float(row["loss"]) < 10 and 0 <= float(row["knn_top1"]) <= float(row["knn_top5"]) <= 100
    args = json.loads((first_epoch / "args.json").read_text())
    assert args["tau_plus"] == 0.1 and args["beta"] == 1.0 and args["width"] == 8
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    assert ckpt["script"] == "simclr_debiased.py" and ckpt["epoch"] == 1 and ckpt["args"]["arch"] == "resnet18"
    for key in ("model", "optimizer", "scaler", "rng"):
        assert key in ckpt
    backbone = common.build_backbone(ckpt["args"]["arch"], ckpt["args"]["stem"], ckpt["args"]["width"])
    backbone.load_state_dict(ckpt["backbone"])
    model = common.model_from_checkpoint(ckpt)  # what the evaluation scripts do
    assert torch.equal(model.backbone.conv1.weight, ckpt["backbone"]["conv1.weight"]) and not model.training
    train, test = common.eval_datasets(ckpt["args"], train_augment=True)
    assert len(train) == 10000 and len(test) == 2000 and model.projector(model.backbone(train[0][0][None])).shape == (1, 128)


def test_resume_continues_exactly(first_epoch, tmp_path, cifar_dir):
    resumed = tmp_path / "resumed"
    shutil.copytree(first_epoch, resumed)
    result = run_script("simclr_debiased.py", "--resume", str(resumed / "last.pt"), "--epochs", "2",
                        "--data_dir", cifar_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(resumed / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == read_csv(first_epoch / "metrics.csv")[0]  # the first epoch's row is kept as it was
    straight = tmp_path / "straight"
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", cifar_dir, "--epochs", "2", "--out_dir", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(resumed / "last.pt", weights_only=True)
    b = torch.load(straight / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert read_csv(straight / "metrics.csv")[1]["loss"] == rows[1]["loss"]


def test_untrained_baseline_and_bf16(tmp_path, cifar_dir):
    out = tmp_path / "untrained"
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", cifar_dir, "--epochs", "0", "--out_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out / "metrics.csv")
    assert rows[0]["epoch"] == "0" and rows[0]["loss"] == "" and float(rows[0]["knn_top1"]) > 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    out = tmp_path / "bf16"
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", cifar_dir, "--epochs", "1", "--eval_every", "0",
                        "--precision", "bf16", "--out_dir", str(out), "--temperature", "0.1", "--beta", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_csv(out / "metrics.csv")[0]
    assert 0 <= float(row["loss"]) < 10 and row["knn_top1"] == ""


def test_torchrun_two_processes(tmp_path, cifar_dir):
    out = tmp_path / "ddp"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "simclr_debiased.py",
                        *TINY, "--data_dir", cifar_dir, "--epochs", "1", "--out_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seed offset by rank
    assert len(read_csv(out / "metrics.csv")) == 1


def run_main(argv, capsys):
    """simclr_debiased.main in this process: (exit status, stderr)."""
    import simclr_debiased
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        simclr_debiased.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_exit_2(argv, fragment, capsys):
    code, err = run_main(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("simclr_debiased.py: error: ") and fragment in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err


@pytest.mark.parametrize("flags,fragment", [
    (["--tau_plus", "1"], "--tau_plus must be in [0, 1)"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--batch_size", "1"], "--batch_size must be >= 2"),
    (["--estimator", "medium"], "invalid choice"),
    (["--data_dir", "/nonexistent/data"], "no images in /nonexistent/data"),
    (["--subset", "16"], "fewer than one batch"),
])
def test_bad_input_exits_with_one_line(flags, fragment, cifar_dir, capsys, tmp_path):
    assert_exit_2([*TINY, "--data_dir", cifar_dir, "--epochs", "1", *flags, "--out_dir", str(tmp_path)], fragment, capsys)


def test_bad_input_as_a_process(tmp_path):
    # The same contract seen from the shell: exit status 2, one line on stderr, no traceback.
    data = tmp_path / "cut.pt"
    data.write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(run_script("simclr_debiased.py", "--resume", str(data)), "cannot read checkpoint")


def test_bad_checkpoints(first_epoch, tmp_path, cifar_dir, capsys):
    data = (first_epoch / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    assert_exit_2(["--resume", str(tmp_path / "cut.pt"), "--data_dir", cifar_dir], "cannot read checkpoint", capsys)
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    ckpt["script"] = "moco_mochi.py"
    torch.save(ckpt, tmp_path / "other.pt")
    assert_exit_2(["--resume", str(tmp_path / "other.pt"), "--data_dir", cifar_dir],
                  "written by moco_mochi.py, not simclr_debiased.py", capsys)
    assert_exit_2(["--resume", str(first_epoch / "last.pt"), "--arch", "resnet50", "--out_dir", str(tmp_path / "x")],
                  "--arch resnet50 differs from the checkpoint's resnet18", capsys)
    assert_exit_2(["--resume", str(tmp_path / "missing.pt")], "does not exist", capsys)


def test_import_has_no_side_effects():
    code = ("import sys, simclr_debiased, common; import torch.distributed as d; "
            "assert not d.is_initialized(); print(sorted(m for m in ('simclr_debiased', 'common') if m in sys.modules))")
    result = run_script("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "['common', 'simclr_debiased']", result.stderr


def test_help(capsys):
    import simclr_debiased
    with pytest.raises(SystemExit) as exit_info:
        simclr_debiased.main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "GLOBAL batch" in help_text and "--k" in help_text and "--tau_plus" in help_text


def test_debiased_is_a_real_boolean(capsys):
    import simclr_debiased
    parser = simclr_debiased.build_parser()
    assert parser.parse_args([]).debiased is True
    assert parser.parse_args(["--no-debiased"]).debiased is False
    # DCL's type=bool read "--debiased False" as True; here it is an error
    assert_exit_2(["--debiased", "False"], "unrecognized arguments: False", capsys)


def test_less_common_flags_end_to_end(tmp_path, cifar_dir, capsys):
    import simclr_debiased
    out = tmp_path / "flags"
    flags = ["--dataset", "folder", "--data_dir", cifar_dir, "--arch", "resnet18", "--width", "4", "--batch_size", "32",
             "--subset", "64", "--workers", "0", "--eval_every", "0", "--epochs", "3", "--stem", "imagenet",
             "--crop_size", "24", "--beta", "1.0", "--anneal", "down", "--optimizer", "larc", "--momentum", "0.8",
             "--schedule", "cosine", "--warmup_epochs", "1", "--seed", "3", "--out_dir", str(out)]
    args = simclr_debiased.build_parser().parse_args(flags)
    x1, x2, _, _ = simclr_debiased.build_data(args, common.setup_distributed())[0][0]
    assert x1.shape == x2.shape == (3, 24, 24)  # --crop_size
    simclr_debiased.main(flags)
    rows = read_csv(out / "metrics.csv")
    assert [float(r["beta"]) for r in rows] == [1.0, 1.0, 0.875]  # --anneal down: linspace(1, 0, 9), one step per epoch
    # the lr of each epoch's last step (2 steps per epoch): warm-up to 1e-3 over epoch 1, then cosine
    cosine = [0.5e-3 * (1 + math.cos(math.pi * (e - 1) / 2)) for e in (1.5, 2.5)]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.5e-3] + cosine, rel=1e-5)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["backbone"]["conv1.weight"].shape == (4, 3, 7, 7)  # --stem imagenet
    assert all(g["momentum"] == 0.8 for g in ckpt["optimizer"]["param_groups"])  # --momentum (SGD under LARC)
    assert ckpt["args"]["seed"] == 3
    # --train_split exists only for STL-10
    assert_exit_2(["--dataset", "folder", "--train_split", "unlabeled"], "exists only for --dataset stl10", capsys)

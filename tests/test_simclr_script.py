"""simclr_debiased.py end to end on a generated image folder with a tiny backbone: the run
directory, exact resume, torchrun, the flags of Nozawa & Sato's runs, and every kind of bad input."""
import csv
import json
import math
import os
import shutil
from collections import OrderedDict

import pytest
import torch

import common
import simclr_debiased
from conftest import ROOT, assert_one_line_error, run_script

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "16",
        "--workers", "0", "--tau_plus", "0.1", "--beta", "1.0", "--knn_k", "10"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("simclr") / "run"
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def rebuild(ckpt):
    """What linear_eval.py does: the backbone from common.py and the head from its layout."""
    a = ckpt["args"]
    backbone = common.build_backbone(a["arch"], a["stem"], a["width"], a["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    make = {"linear": lambda i, o, b: torch.nn.Linear(i, o, bias=b), "bn": lambda n, affine: torch.nn.BatchNorm1d(n, affine=affine),
            "relu": torch.nn.ReLU}
    head = torch.nn.Sequential(OrderedDict((n, make[k](*rest)) for n, k, *rest in ckpt["head"]["layout"]))
    head.load_state_dict(ckpt["head"]["state"])
    return backbone.eval(), head.eval()


def test_first_epoch_writes_run_directory(first_epoch, image_folder):
    rows = read_csv(first_epoch / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    for column in ("loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "beta", "clamped_fraction"):
        assert rows[0][column] != "", column
    assert 0 < float(rows[0]["loss"]) < 10 and 0 <= float(rows[0]["knn_top1"]) <= float(rows[0]["knn_top5"]) <= 100
    args = json.loads((first_epoch / "args.json").read_text())
    assert args["tau_plus"] == 0.1 and args["beta"] == 1.0 and args["width"] == 4
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    assert ckpt["script"] == "simclr_debiased.py" and ckpt["epoch"] == 1 and ckpt["world_size"] == 1
    model = simclr_debiased.SimCLR(argparse_namespace(ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    backbone, head = rebuild(ckpt)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(head(backbone(x)), model.projector(model.backbone(x)))


def argparse_namespace(d):
    import argparse
    return argparse.Namespace(**d)


def test_resume_continues_exactly(first_epoch, tmp_path, image_folder):
    resumed = tmp_path / "resumed"
    shutil.copytree(first_epoch, resumed)
    with open(resumed / "metrics.csv", "a") as f:
        f.write("2,9.9,,,,,,,\n")  # a row of a run that died before saving epoch 2: dropped on resume
    result = run_script("simclr_debiased.py", "--resume", str(resumed / "last.pt"), "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(resumed / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == read_csv(first_epoch / "metrics.csv")[0]
    straight = tmp_path / "straight"
    result = run_script("simclr_debiased.py", *TINY, "--data_dir", image_folder, "--epochs", "2", "--out_dir", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (resumed, straight))
    assert a["epoch"] == b["epoch"] == 2
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert read_csv(straight / "metrics.csv")[1]["loss"] == rows[1]["loss"]


def test_untrained_baseline_and_bf16(tmp_path, image_folder):
    out = tmp_path / "untrained"
    simclr_debiased.main([*TINY, "--data_dir", image_folder, "--epochs", "0", "--out_dir", str(out)])
    rows = read_csv(out / "metrics.csv")
    assert rows[0]["epoch"] == "0" and rows[0]["loss"] == "" and float(rows[0]["knn_top1"]) > 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    out = tmp_path / "bf16"
    simclr_debiased.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--eval_every", "0", "--precision", "bf16",
                          "--out_dir", str(out), "--temperature", "0.1", "--beta", "6"])
    row = read_csv(out / "metrics.csv")[0]
    assert 0 <= float(row["loss"]) < 10 and row["knn_top1"] == ""
    # a bf16 run resumed where fp16 is chosen (a V100): the disabled scaler's empty state is not loaded
    simclr_debiased.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--precision", "fp16"])
    assert torch.load(out / "last.pt", weights_only=True)["scaler"]["scale"] > 0


def test_torchrun_two_processes(tmp_path, image_folder):
    out = tmp_path / "ddp"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "simclr_debiased.py",
                        *TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(out), "--negatives", "local")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])  # seed offset by rank
    assert len(read_csv(out / "metrics.csv")) == 1
    # one process would change the number of negatives of --negatives local: an error
    assert_one_line_error(run_script("simclr_debiased.py", "--resume", str(out / "last.pt"), "--epochs", "2"),
                          "ran on 2 process(es)")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, image_folder, monkeypatch, capsys):
    out = tmp_path / "nan"
    simclr_debiased.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--eval_every", "0", "--out_dir", str(out)])
    before = torch.load(out / "last.pt", weights_only=True)
    real = simclr_debiased.contrastive_loss_terms
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        terms, clamped = real(*args, **kwargs)
        return (terms * float("nan") if len(calls) == 3 else terms), clamped

    monkeypatch.setattr(simclr_debiased, "contrastive_loss_terms", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        simclr_debiased.main(["--resume", str(out / "last.pt"), "--epochs", "3"])
    assert "non-finite loss at epoch 2, step 3" in str(exit_info.value.code)
    after = torch.load(out / "last.pt", weights_only=True)
    assert after["epoch"] == 1 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_nozawa_flags_end_to_end(tmp_path, image_folder):
    out = tmp_path / "nozawa"
    simclr_debiased.main(["--dataset", "folder", "--data_dir", image_folder, "--arch", "resnet18", "--width", "4",
                          "--batch_size", "32", "--workers", "0", "--eval_every", "0", "--epochs", "3", "--crop_size", "12",
                          "--tau_plus", "0", "--beta", "0", "--head", "nozawa", "--stem_padding", "3", "--norm", "none",
                          "--blur_p", "0", "--optimizer", "larc", "--momentum", "0.8", "--weight_decay", "1e-4",
                          "--schedule", "cosine", "--warmup_epochs", "1", "--negatives", "local", "--num_chunks", "4",
                          "--anneal", "down", "--hidden_dim", "16", "--feature_dim", "8", "--out_dir", str(out)])
    rows = read_csv(out / "metrics.csv")
    # the lr of each epoch's last step (2 steps per epoch): warm-up to 1e-3 over epoch 1, then cosine
    cosine = [0.5e-3 * (1 + math.cos(math.pi * (e - 1) / 2)) for e in (1.5, 2.5)]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.5e-3] + cosine, rel=1e-5)
    assert [float(r["beta"]) for r in rows] == [0, 0, 0]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert [row[:2] for row in ckpt["head"]["layout"]] == [["linear1", "linear"], ["bn1", "bn"], ["relu1", "relu"],
                                                          ["linear2", "linear"]]
    assert ckpt["head"]["layout"][0][4] is True and ckpt["head"]["layout"][3][4] is False  # biases as theirs
    assert ckpt["backbone"]["conv1.weight"].shape == (4, 3, 3, 3) and all(
        g["momentum"] == 0.8 for g in ckpt["optimizer"]["param_groups"])
    decay, no_decay = ckpt["optimizer"]["param_groups"]
    # their filter: no decay for names with "bias" or "bn" (it misses the downsample BN weights, reproduced)
    names = [n for n, _ in simclr_debiased.SimCLR(argparse_namespace(ckpt["args"])).named_parameters()]
    skipped = [n for n in names if "bias" in n or "bn" in n]
    assert len(no_decay["params"]) == len(skipped) == 40 and len(decay["params"]) == len(names) - 40
    assert "projector.bn1.weight" in skipped and "backbone.layer2.0.downsample.1.weight" not in skipped
    assert decay["larc_weight_decay"] == 1e-4 and no_decay["larc_weight_decay"] == 0.0


def test_chunks_are_independent_losses(monkeypatch, tmp_path, image_folder):
    """--num_chunks 4: the loss sees 4 chunks of 4 images each, never the whole batch."""
    seen = []
    real = simclr_debiased.contrastive_loss_terms
    monkeypatch.setattr(simclr_debiased, "contrastive_loss_terms",
                        lambda z1, *a, **k: seen.append((z1.shape[0], a[-1])) or real(z1, *a, **k))
    simclr_debiased.main([*TINY, "--data_dir", image_folder, "--epochs", "1", "--eval_every", "0", "--negatives", "local",
                          "--num_chunks", "4", "--out_dir", str(tmp_path)])
    assert set(seen) == {(4, False)} and len(seen) == 4 * 4


def test_anneal_and_imagenet_stem(tmp_path, image_folder):
    simclr_debiased.main([*TINY, "--data_dir", image_folder, "--epochs", "3", "--eval_every", "0", "--batch_size", "32",
                          "--anneal", "down", "--stem", "imagenet", "--out_dir", str(tmp_path)])
    assert [float(r["beta"]) for r in read_csv(tmp_path / "metrics.csv")] == [1.0, 1.0, 0.875]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["backbone"]["conv1.weight"].shape == (4, 3, 7, 7)


def test_larc_on_the_device_against_formula():
    torch.manual_seed(0)
    p1, p2, p3, p4 = (torch.nn.Parameter(t) for t in (torch.randn(5, 3), torch.randn(4), torch.zeros(2), torch.randn(3)))
    for p in (p1, p2, p3):
        p.grad = torch.randn_like(p)
    p4.grad = torch.zeros_like(p4)
    expected = []
    for p, wd in ((p1, 0.1), (p2, 0.0)):
        w, g = p.detach().double(), p.grad.double()
        expected.append(((g + wd * w) * 1e-3 * w.norm() / (g.norm() + wd * w.norm() + 1e-8)).float())
    untouched = p3.grad.clone(), p4.grad.clone()
    opt = torch.optim.SGD([{"params": [p1, p3, p4], "larc_weight_decay": 0.1}, {"params": [p2], "larc_weight_decay": 0.0}],
                          lr=0.1)
    simclr_debiased.larc_(opt)
    torch.testing.assert_close(p1.grad, expected[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(p2.grad, expected[1], rtol=1e-5, atol=0)
    assert torch.equal(p3.grad, untouched[0]) and torch.equal(p4.grad, untouched[1])  # zero norms: left alone


def run_main(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        simclr_debiased.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_exit_2(argv, fragment, capsys):
    code, err = run_main(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("simclr_debiased.py: error: ") and fragment in lines[-1], err


@pytest.mark.parametrize("flags,fragment", [
    (["--tau_plus", "1"], "--tau_plus must be in [0, 1)"), (["--beta", "-1"], "--beta must be >= 0"),
    (["--batch_size", "1"], "--batch_size >= 2"), (["--width", "0"], "--width"), (["--crop_size", "0"], "--crop_size"),
    (["--lr", "nan"], "must be finite"), (["--temperature", "inf"], "must be finite"), (["--temperature", "0"], "--temperature > 0"),
    (["--estimator", "easy"], "unrecognized arguments"), (["--data_dir", "/nonexistent/data"], "no images in /nonexistent/data"),
    (["--subset", "8"], "fewer than one batch"), (["--num_chunks", "2"], "needs --negatives local"),
    (["--negatives", "local", "--num_chunks", "16"], "chunks of at least 2"),
    (["--train_split", "unlabeled"], "only for stl10"), (["--out_dir", "/proc/nope"], "cannot write to --out_dir"),
])
def test_bad_input_exits_with_one_line(flags, fragment, image_folder, capsys, tmp_path):
    assert_exit_2([*TINY, "--data_dir", image_folder, "--epochs", "1", "--out_dir", str(tmp_path), *flags], fragment, capsys)


def test_bad_checkpoints(first_epoch, tmp_path, capsys):
    data = (first_epoch / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    assert_exit_2(["--resume", str(tmp_path / "cut.pt")], "cannot read checkpoint", capsys)
    ckpt = torch.load(first_epoch / "last.pt", weights_only=True)
    ckpt["script"] = "moco_mochi.py"
    torch.save(ckpt, tmp_path / "other.pt")
    assert_exit_2(["--resume", str(tmp_path / "other.pt")], "not a checkpoint of simclr_debiased.py", capsys)
    assert_exit_2(["--resume", str(first_epoch / "last.pt"), "--arch", "resnet50", "--out_dir", str(tmp_path / "x")],
                  "--arch resnet50 differs from the checkpoint's resnet18", capsys)
    assert_exit_2(["--resume", str(tmp_path / "missing.pt")], "cannot read checkpoint", capsys)
    # and from the shell: exit status 2, one line, no traceback
    assert_one_line_error(run_script("simclr_debiased.py", "--resume", str(tmp_path / "cut.pt")), "cannot read checkpoint")


def test_copied_with_common_alone_into_an_empty_folder(tmp_path, image_folder):
    for name in ("simclr_debiased.py", "common.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    result = run_script(str(tmp_path / "simclr_debiased.py"), *TINY, "--data_dir", image_folder, "--epochs", "1",
                        "--out_dir", str(tmp_path / "run"), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


def test_import_has_no_side_effects_and_help(capsys):
    code = ("import sys, simclr_debiased; import torch.distributed as d; "
            "assert not d.is_initialized(); print(sorted(m for m in ('simclr_debiased', 'common') if m in sys.modules))")
    result = run_script("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "['common', 'simclr_debiased']", result.stderr
    with pytest.raises(SystemExit) as exit_info:
        simclr_debiased.main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "GLOBAL batch" in help_text and "--k " in help_text

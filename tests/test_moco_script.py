"""moco_mochi.py end to end on the generated image folder with a tiny backbone: MoCo, MoCHi, exact
resume (queue, ids and pointer included), the checkpoint contract, bad input, and the benchmark."""
import csv
import json
import shutil

import pytest
import torch

import common
from conftest import assert_one_line_error, run_script

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "16",
        "--queue_size", "48", "--workers", "0", "--bn_splits", "2", "--knn_k", "10"]
MOCHI = ["--n_hard", "8", "--s1_hard", "6", "--s2_hard", "3", "--start1_hard", "0", "--start2_hard", "1"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train(image_folder, out, *flags):
    result = run_script("moco_mochi.py", *TINY, "--data_dir", image_folder, "--out_dir", str(out), *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder):
    """MoCHi: 2 epochs straight, and 1 epoch then --resume to 2."""
    root = tmp_path_factory.mktemp("moco")
    train(image_folder, root / "straight", *MOCHI, "--epochs", "2")
    train(image_folder, root / "first", *MOCHI, "--epochs", "1")
    shutil.copytree(root / "first", root / "resumed")
    result = run_script("moco_mochi.py", "--resume", str(root / "resumed" / "last.pt"), "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_mochi_run_writes_contract(runs):
    rows = read_csv(runs / "straight" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [r["synthetic"] for r in rows] == ["6", "9"]  # type 2 from epoch index 1 on
    for column in ("loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "instance_top1",
                   "hardest_cos", "synthetic_cos", "synthetic_harder"):
        assert rows[1][column] != "", column
    assert 0 <= float(rows[1]["knn_top1"]) <= float(rows[1]["knn_top5"]) <= 100
    ckpt = torch.load(runs / "straight" / "last.pt", weights_only=True)
    assert ckpt["script"] == "moco_mochi.py" and ckpt["epoch"] == 2 and ckpt["world_size"] == 1
    assert "split BN in 2 groups" in ckpt["bn_mode"]
    args = ckpt["args"]
    for key in ("dataset", "data_dir", "norm", "crop_size", "blur_p", "arch", "stem", "width", "stem_padding"):
        assert key in args, key
    assert json.loads((runs / "straight" / "args.json").read_text())["n_hard"] == 8
    # What linear_eval.py does: the query encoder's backbone and head rebuilt from the checkpoint alone.
    backbone = common.build_backbone(args["arch"], args["stem"], args["width"], args["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    for name, value in ckpt["backbone"].items():
        assert torch.equal(value, ckpt["model"]["backbone." + name]), name
    assert not torch.equal(ckpt["backbone"]["conv1.weight"], ckpt["model"]["key_backbone.conv1.weight"])
    assert [layer[:2] for layer in ckpt["head"]["layout"]] == [["0", "linear"], ["1", "relu"], ["2", "linear"]]
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 128))
    head.load_state_dict(ckpt["head"]["state"])
    assert ckpt["model"]["queue"].shape == (48, 128) and ckpt["model"]["queue_ptr"].item() == 128 % 48
    assert (ckpt["model"]["queue_ids"] >= 0).all()  # 8 steps x 16 keys: the initial keys are gone


def test_resume_is_bit_exact(runs):
    first = torch.load(runs / "first" / "last.pt", weights_only=True)
    resumed = torch.load(runs / "resumed" / "last.pt", weights_only=True)
    straight = torch.load(runs / "straight" / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and resumed["epoch"] == straight["epoch"] == 2
    assert first["model"]["queue_ptr"].item() == 64 % 48  # a pointer mid-queue must survive the resume
    assert set(resumed["model"]) == set(straight["model"])
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    a, b = read_csv(runs / "resumed" / "metrics.csv"), read_csv(runs / "straight" / "metrics.csv")
    assert [r["epoch"] for r in a] == ["1", "2"]
    for column in ("loss", "instance_top1", "hardest_cos", "synthetic_cos", "knn_top1"):
        assert a[1][column] == b[1][column], column


def test_plain_moco_and_untrained_baseline(tmp_path, image_folder):
    train(image_folder, tmp_path / "moco", "--epochs", "1", "--symmetric", "--no-mask_own", "--no-mlp",
          "--queue_size", "96")
    row = read_csv(tmp_path / "moco" / "metrics.csv")[0]
    assert row["synthetic"] == "0" and row["synthetic_cos"] == "" and 0 < float(row["loss"]) < 2 * 7
    ckpt = torch.load(tmp_path / "moco" / "last.pt", weights_only=True)
    assert ckpt["model"]["queue_ptr"].item() == 128 % 96  # 4 steps x 2 views x 16 keys
    assert [layer[1] for layer in ckpt["head"]["layout"]] == ["linear"]
    train(image_folder, tmp_path / "zero", "--epochs", "0")
    row = read_csv(tmp_path / "zero" / "metrics.csv")[0]
    assert row["epoch"] == "0" and row["loss"] == "" and float(row["knn_top1"]) > 0
    assert torch.load(tmp_path / "zero" / "last.pt", weights_only=True)["epoch"] == 0


def assert_exit_2(argv, fragment, capsys):
    """moco_mochi.main in this process: exit status 2 and one line `moco_mochi.py: error: ...`."""
    import moco_mochi
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        moco_mochi.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in "".join(err), err
    assert err[-1].startswith("moco_mochi.py: error: ") and fragment in err[-1], err
    assert all(line.startswith(("usage:", " ")) for line in err[:-1]), err


@pytest.mark.parametrize("flags,fragment", [
    (["--n_hard", "49"], "larger than the queue"),
    (["--n_hard", "8", "--s1_hard", "-1"], "--s1_hard and --s2_hard must be >= 0"),
    (["--n_hard", "8", "--s2_hard", "-3"], "--s1_hard and --s2_hard must be >= 0"),
    (["--k_moco", "40"], "not a multiple of the 16 keys"),
    (["--symmetric"], "not a multiple of the 32 keys"),
    (["--m_moco", "1.0"], "--ema (--m_moco) must be in [0, 1)"),
    (["--t_moco", "nan"], "must be finite"),
    (["--width", "0"], "--width"),
    (["--bn_splits", "3"], "BN group"),
])
def test_bad_input_is_a_one_line_error(flags, fragment, image_folder, tmp_path, capsys):
    assert_exit_2([*TINY, "--data_dir", image_folder, "--out_dir", str(tmp_path / "x"), *flags], fragment, capsys)
    assert not (tmp_path / "x").exists()


def test_bad_files_are_one_line_errors(tmp_path, image_folder, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_exit_2(["--resume", str(junk)], "cannot read checkpoint", capsys)
    torch.save({"script": "simclr_debiased.py"}, tmp_path / "foreign.pt")
    assert_exit_2(["--resume", str(tmp_path / "foreign.pt")], "is not a checkpoint of moco_mochi.py", capsys)
    assert_exit_2([*TINY, "--data_dir", str(tmp_path / "none"), "--epochs", "1"], "no images", capsys)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_exit_2([*TINY, "--data_dir", image_folder, "--out_dir", str(blocker / "out")], "cannot write", capsys)
    # one line also from a subprocess, as a user sees it
    assert_one_line_error(run_script("moco_mochi.py", "--n_hard", "-1"), "--n_hard")


def test_benchmark_quick(tmp_path):
    result = run_script("benchmarks/mochi_cost.py", "--quick", "--csv", str(tmp_path / "bench.csv"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "bench.csv")
    assert {r["variant"] for r in rows} >= {"moco", "mochi"} and all(float(r["value"]) > 0 for r in rows)

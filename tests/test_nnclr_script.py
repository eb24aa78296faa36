"""nnclr_kmclr.py end to end on the generated image folder: both methods, the run directory, an
exact resume (support set and k-means state included), the untrained baseline and bad input."""
import csv
import os
import shutil
import types

import pytest
import torch

import common
import nnclr_kmclr
from conftest import assert_one_line_error, run_script

# 64 images, batch 8: 8 steps per epoch. NNCLR's queue of 48 wraps (pointer 16 after epoch 1); KMCLR re-seeds at step 10 and
# resets at step 16, so a resume after epoch 1 must carry the ring, the counter and the generator.
TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "8",
        "--workers", "0", "--proj_hidden_dim", "32", "--proj_dim", "16", "--pred_dim", "32", "--warmup_epochs", "1",
        "--queue_size", "48", "--num_prototypes", "8", "--reset_every", "2", "--reseed_ratio", "0.5", "--knn_k", "20"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_main(*argv, capsys=None):
    """main() in this process (no interpreter start-up): exit code and stderr like a subprocess."""
    try:
        nnclr_kmclr.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    return types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err if capsys else "")


@pytest.fixture(scope="module", params=["nnclr", "kmclr"])
def runs(request, image_folder, tmp_path_factory):
    """A straight 2-epoch run that also keeps its epoch-1 checkpoint, and that checkpoint resumed
    to epoch 2 (an interrupted run: the schedule over --epochs is the same)."""
    root = tmp_path_factory.mktemp(request.param)
    args = [*TINY, "--method", request.param, "--data_dir", image_folder]

    def keep(state, path, real=nnclr_kmclr.save_checkpoint):
        real(state, path)
        shutil.copy(path, os.path.join(os.path.dirname(path), f"epoch{state['epoch']}.pt"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nnclr_kmclr, "save_checkpoint", keep)
        assert run_main(*args, "--epochs", 2, "--out_dir", root / "straight").returncode == 0
    shutil.copytree(root / "straight", root / "resumed")
    shutil.copy(root / "straight" / "epoch1.pt", root / "resumed" / "last.pt")
    assert run_main("--resume", root / "resumed" / "last.pt", "--data_dir", image_folder).returncode == 0
    return request.param, root


def test_run_directory(runs):
    method, root = runs
    rows = read_csv(root / "straight" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    row = rows[0]
    method_columns = ["nn_acc"] if method == "nnclr" else ["distinct_pos", "reseeded", "count_min", "count_max"]
    for column in ["loss", "lr", "images_per_sec", "epoch_seconds", "knn_top1", "knn_top5", "online_top1",
                   "online_top5", "probe_loss", *method_columns]:
        assert row[column] != "", column
    assert 0 < float(row["loss"]) < 10 and 0 <= float(row["online_top1"]) <= float(row["online_top5"]) <= 100
    ckpt = torch.load(root / "straight" / "epoch1.pt", weights_only=True)
    assert ckpt["script"] == "nnclr_kmclr.py" and ckpt["epoch"] == 1 and ckpt["args"]["method"] == method
    for key in ("dataset", "data_dir", "norm", "crop_size", "blur_p", "arch", "stem", "width", "stem_padding"):
        assert key in ckpt["args"], key
    backbone = common.build_backbone(ckpt["args"]["arch"], ckpt["args"]["stem"], ckpt["args"]["width"],
                                     ckpt["args"]["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    layout = ckpt["head"]["layout"]
    assert [layer[1] for layer in layout][-1] == "bn" and layout[-2] == ["6", "linear", 32, 16, True]
    assert set(ckpt["head"]["state"]) == {k[len("projector."):] for k in ckpt["model"] if k.startswith("projector.")}
    memory = ckpt["memory"]
    if method == "nnclr":
        assert memory["queue"].shape == (48, 16) and memory["_extra_state"]["ptr"] == 16  # 64 rows into 48
        torch.testing.assert_close(memory["queue"].norm(dim=1), torch.ones(48))
        assert memory["labels"].min() >= 0  # every row holds a real projection by now
    else:
        assert memory["centroids"].shape == (8, 16) and memory["_extra_state"]["step"] == 9
        assert memory["counts"].sum() > 8


def test_resume_is_exact(runs):
    method, root = runs
    resumed, straight = (torch.load(root / d / "last.pt", weights_only=True) for d in ("resumed", "straight"))
    assert resumed["epoch"] == straight["epoch"] == 2
    for part in ("model", "memory"):
        for key, value in straight[part].items():
            if key.endswith("_extra_state"):
                assert set(value) == set(resumed[part][key])
                for name in value:
                    assert torch.equal(torch.as_tensor(value[name]), torch.as_tensor(resumed[part][key][name])), name
            else:
                assert torch.equal(resumed[part][key], value), (part, key)
    rows, straight_rows = read_csv(root / "resumed" / "metrics.csv"), read_csv(root / "straight" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == straight_rows[0]
    for column in ("loss", "knn_top1", "online_top1", "probe_loss", "nn_acc", "reseeded", "count_max"):
        assert rows[1][column] == straight_rows[1][column], column
    if method == "kmclr":
        assert float(rows[1]["reseeded"]) > 0  # the re-seed at step 10 happened after the resume
        assert straight["memory"]["_extra_state"]["step"] == 17 and straight["memory"]["counts"].min() >= 1


def test_untrained_baseline(image_folder, tmp_path):
    out = tmp_path / "untrained"
    assert run_main(*TINY, "--data_dir", image_folder, "--epochs", 0, "--out_dir", out).returncode == 0
    rows = read_csv(out / "metrics.csv")
    assert rows[0]["epoch"] == "0" and rows[0]["loss"] == "" and float(rows[0]["knn_top1"]) > 0
    assert rows[0]["online_top1"] != "" and torch.load(out / "last.pt", weights_only=True)["epoch"] == 0


def test_bad_input(image_folder, tmp_path, capsys):
    data = ["--data_dir", image_folder, "--out_dir", tmp_path / "bad"]
    cases = [
        (["--queue_size", "36"], ["--queue_size 36", "multiple"]),
        (["--method", "kmclr", "--num_prototypes", "100"], ["--num_prototypes 100", "exceeds"]),
        (["--temperature", "0"], ["--temperature"]),
        (["--lr", "nan"], ["finite"]),
        (["--width", "0"], ["--width"]),
        (["--reseed_ratio", "-1"], ["--reseed_ratio"]),
        (["--kmeans_momentum", "1"], ["--kmeans_momentum"]),
        (["--warmup_epochs", "5", "--epochs", "5"], ["--warmup_epochs"]),
        (["--data_dir", tmp_path / "missing"], ["no images"]),
        (["--out_dir", tmp_path / "file" / "sub"], ["cannot write"]),
    ]
    (tmp_path / "file").write_text("")
    for flags, fragments in cases:
        assert_one_line_error(run_main(*TINY, *data, "--epochs", 2, *flags, capsys=capsys), *fragments)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"script": "moco_mochi.py", "args": {}}, tmp_path / "foreign.pt")
    assert_one_line_error(run_main("--resume", tmp_path / "junk.pt", capsys=capsys), "cannot read checkpoint")
    assert_one_line_error(run_main("--resume", tmp_path / "foreign.pt", capsys=capsys), "not a checkpoint of nnclr_kmclr.py")


def test_benchmark_quick(tmp_path):
    """Also the one run in a fresh interpreter: the benchmark imports the script as a user would."""
    result = run_script("benchmarks/nnclr_cost.py", "--quick", "--csv", str(tmp_path / "bench.csv"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "bench.csv")
    assert [r["piece"] for r in rows] == ["backbone_fwd_bwd", "nn_lookup", "kmeans_step", "loss_fwd_bwd"]
    assert all(float(r["median_ms"]) > 0 for r in rows)

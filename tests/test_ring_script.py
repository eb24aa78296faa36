"""ring_nce.py end to end on the generated image folder (IR, MoCo, CMC, each with and without the
ring), exact resume including the bank, queue and annealed ring, the checkpoint contract, and bad input."""
import csv
import json
import shutil

import pytest
import torch

import common
import ring_nce

TINY = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--crop_size", "16", "--batch_size", "16",
        "--workers", "0", "--subset", "32", "--queue_size", "32", "--num_negatives", "24", "--hidden_dim", "16",
        "--feature_dim", "8", "--knn_k", "5"]
RING = ["--ring_lower", "0.1", "--ring_upper", "0.5", "--ring_anneal", "linear", "--anneal_epochs", "2"]
NO_RING = ["--ring_lower", "0", "--ring_upper", "1", "--lr_steps", "1"]
VARIANTS = [(m, ring) for m in ("ir", "moco", "cmc") for ring in (True, False)]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train(out, *flags):
    ring_nce.main([*TINY, *flags, "--out_dir", str(out)])
    return torch.load(out / "last.pt", weights_only=True)


@pytest.mark.parametrize("method,ring", VARIANTS)
def test_end_to_end_and_exact_resume(method, ring, image_folder, tmp_path):
    flags = ["--data_dir", image_folder, "--method", method, *(RING if ring else NO_RING)]
    straight = train(tmp_path / "straight", *flags, "--epochs", "2")
    first = train(tmp_path / "resumed", *flags, "--epochs", "1")
    ring_nce.main(["--resume", str(tmp_path / "resumed" / "last.pt"), "--epochs", "2"])
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and resumed["epoch"] == straight["epoch"] == 2
    # bit for bit: weights, BatchNorm statistics, key encoder, bank / queue / pointer, optimizer
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    momentum = [c["optimizer"]["state"][0]["momentum_buffer"] for c in (resumed, straight)]
    assert torch.equal(*momentum)
    pools = {"ir": ["bank"], "moco": ["queue"], "cmc": ["bank", "bank_ab"]}[method]
    for name in pools:  # the pools moved during the second epoch, so they were saved and restored
        assert name in first["model"] and not torch.equal(first["model"][name], straight["model"][name]), name
    rows, rows_straight = read_csv(tmp_path / "resumed" / "metrics.csv"), read_csv(tmp_path / "straight" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    columns = ["loss", "lr", "knn_top1", "knn_top5", "ring_lower", "ring_upper", "ring_size", "negatives"]
    assert [[r[c] for c in columns] for r in rows] == [[r[c] for c in columns] for r in rows_straight]
    pool = 32  # the queue, or the bank of the 32-image subset
    if ring:  # linear anneal over 2 epochs: upper 1.0 then 0.75, lower keeps a fifth of upper
        assert [(float(r["ring_lower"]), float(r["ring_upper"])) for r in rows] == [(0.2, 1.0), (0.15, 0.75)]
        assert [int(r["ring_size"]) for r in rows] == [pool - pool // 5, 3 * pool // 4 - int(0.15 * pool)]
        assert resumed["ring"] == pytest.approx([0.15, 0.75])
    else:
        assert {int(r["ring_size"]) for r in rows} == {pool} and [float(r["lr"]) for r in rows] == [0.03, 0.003]
    negatives = [int(r["negatives"]) for r in rows]
    assert negatives == ([int(r["ring_size"]) for r in rows] if method == "moco" else [24, 24])
    check_checkpoint(straight, method, image_folder)


def check_checkpoint(ckpt, method, image_folder):
    """What an evaluator does with last.pt: common.build_backbone from ckpt["args"], then the head."""
    args = ckpt["args"]
    assert ckpt["script"] == "ring_nce.py" and args["method"] == method and ckpt["world_size"] == 1
    backbone = common.build_backbone(args["arch"], args["stem"], args["width"], args["stem_padding"])
    backbone.load_state_dict(ckpt["backbone"])
    assert backbone.out_dim == 32
    if method == "cmc":  # the L and ab encoders side by side; the input is normalised Lab
        assert args["input_space"] == "lab" and args["lab_mean"] == list(ring_nce.LAB_MEAN)
        assert torch.equal(ckpt["backbone"]["conv1.weight"][:2, 1:], torch.zeros(2, 2, 3, 3))
        assert torch.equal(ckpt["backbone"]["conv1.weight"][:2, :1], ckpt["model"]["encoder.l.backbone.conv1.weight"])
    else:
        assert "input_space" not in args
        assert torch.equal(ckpt["backbone"]["conv1.weight"], ckpt["model"]["encoder.backbone.conv1.weight"])
    layout = ckpt["head"]["layout"]
    assert [layer[1] for layer in layout] == ["linear", "relu", "linear"]
    assert layout[0][2] == 32 and layout[-1][3] == (16 if method == "cmc" else 8)
    json.dumps(args)  # plain types only


def test_untrained_baseline(image_folder, tmp_path):
    ckpt = train(tmp_path / "untrained", "--data_dir", image_folder, "--method", "cmc", "--epochs", "0")
    rows = read_csv(tmp_path / "untrained" / "metrics.csv")
    assert ckpt["epoch"] == 0 and rows[0]["epoch"] == "0" and rows[0]["loss"] == "" and float(rows[0]["knn_top1"]) > 0


def assert_exit_2(argv, fragment, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ring_nce.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("ring_nce.py: error: ") and fragment in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err


@pytest.mark.parametrize("flags,fragment", [
    (["--ring_lower", "0.5", "--ring_upper", "0.5"], "--ring_lower 0.5 must be below --ring_upper 0.5"),
    (["--ring_lower", "0.6", "--ring_upper", "0.2"], "must be below"),
    (["--ring_lower", "-0.1"], "fractions in [0, 1]"),
    (["--ring_upper", "1.5"], "fractions in [0, 1]"),
    (["--ring_upper", "nan"], "must be finite"),
    (["--temperature", "inf"], "must be finite"),
    (["--method", "ir", "--ring_lower", "0.01", "--ring_upper", "0.015"], "leave no candidates in the 32-entry bank"),
    (["--method", "moco", "--ring_lower", "0.5", "--ring_upper", "0.51"], "leave no candidates in the 32-entry queue"),
    (["--method", "ir", "--ring_lower", "0.01", "--ring_upper", "0.015", "--ring_anneal", "step", "--epochs", "100"],
     "(epoch 91: ranks [0, 0))"),  # annealed: empty from the last plateau on
    (["--method", "moco", "--queue_size", "40"], "--queue_size 40 must be a multiple of --batch_size 16"),
    (["--method", "cmc", "--width", "5"], "needs an even --width"),
    (["--width", "0"], "--width"),
    (["--num_negatives", "0"], "--num_negatives"),
    (["--bank_momentum", "1"], "--bank_momentum in [0, 1)"),
    (["--subset", "8"], "8 training images are fewer than one batch of 16"),
])
def test_bad_input_exits_with_one_line(flags, fragment, image_folder, tmp_path, capsys):
    assert_exit_2([*TINY, "--data_dir", image_folder, "--epochs", "1", *flags, "--out_dir", str(tmp_path / "x")],
                  fragment, capsys)
    assert not (tmp_path / "x" / "last.pt").exists()


def test_bad_data_and_checkpoints(image_folder, tmp_path, capsys):
    assert_exit_2([*TINY, "--data_dir", str(tmp_path / "none")], "no images in", capsys)
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_exit_2(["--resume", str(tmp_path / "junk.pt")], "cannot read checkpoint", capsys)
    torch.save({"script": "moco_mochi.py", "args": {}}, tmp_path / "other.pt")
    assert_exit_2(["--resume", str(tmp_path / "other.pt")], "not a checkpoint of ring_nce.py", capsys)
    (tmp_path / "file").write_text("")
    assert_exit_2([*TINY, "--data_dir", image_folder, "--out_dir", str(tmp_path / "file" / "sub")], "cannot write", capsys)


def test_resume_keeps_settings(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(run, "--data_dir", image_folder, "--method", "ir", "--epochs", "1", "--eval_every", "0")
    assert_exit_2(["--resume", str(run / "last.pt"), "--ring_upper", "0.5"], "--ring_upper 0.5 differs", capsys)
    shutil.copy(run / "last.pt", tmp_path / "copy.pt")
    ring_nce.main(["--resume", str(tmp_path / "copy.pt"), "--epochs", "1"])  # nothing left to do: no error


@pytest.mark.parametrize("flags,momentum", [(["--method", "ir"], 0.0), (["--method", "moco"], 0.0),
                                            (["--method", "cmc"], 0.5), (["--method", "cmc", "--bank_momentum", "0"], 0.0),
                                            (["--method", "ir", "--bank_momentum", "0.3"], 0.3)])
def test_bank_momentum_default_per_method(flags, momentum):
    """IR's bank is overwritten (the Ring code's m = 0); CMC's rows move halfway (CMC's nce_m = 0.5)."""
    parser = ring_nce.get_parser()
    args = parser.parse_args(flags)
    ring_nce.check_args(parser, args)
    assert args.bank_momentum == momentum


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ring_nce.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "GLOBAL batch" in text and "--k_moco" in text and "thres_outer" in text


@pytest.mark.parametrize("method", ["ir", "moco", "cmc"])
def test_one_step_sees_the_pools_before_the_batch(method):
    """batch_loss scores the bank / queue as it was before the batch (the positive of IR is the row
    written at the image's previous visit; CMC's L anchors meet the ab bank and vice versa); the
    pools change only in update_pools, which writes this batch's normalised outputs."""
    args = ring_nce.get_parser().parse_args([*TINY, "--method", method, "--ring_lower", "0.1", "--ring_upper", "0.6",
                                             "--bank_momentum", "0"])
    torch.manual_seed(0)
    model = ring_nce.RingModel(args, 40)
    x, index = torch.randn(6, 3, 8, 8), torch.tensor([3, 17, 5, 39, 0, 22])
    batch = (x, x.flip(3), torch.zeros(6), index) if method == "moco" else (x, torch.zeros(6), index)
    before = {n: b.clone() for n, b in model.named_buffers() if n in ("queue", "queue_ptr", "bank", "bank_ab")}
    torch.manual_seed(1)
    loss, new = ring_nce.batch_loss(model.encoder, model, batch, args, 0.1, 0.6, torch.device("cpu"), None)
    for name, value in before.items():
        assert torch.equal(getattr(model, name), value), name
    torch.manual_seed(1)  # the same negative draws (the forward passes draw no random numbers)
    t, n = args.temperature, args.num_negatives
    if method == "ir":
        expected = ring_nce.sampled_ring_nce_loss(model.encoder(x), before["bank"][index], before["bank"], t, 0.1, 0.6, n)
    elif method == "cmc":
        zl, zab = model.encoder(x)
        expected = (ring_nce.sampled_ring_nce_loss(zl, before["bank_ab"][index], before["bank_ab"], t, 0.1, 0.6, n)
                    + ring_nce.sampled_ring_nce_loss(zab, before["bank"][index], before["bank"], t, 0.1, 0.6, n))
    else:
        expected = ring_nce.ring_nce_loss(model.encoder(x), new, before["queue"], t, 0.1, 0.6)
        assert torch.equal(new, model.key_encoder(x.flip(3)))  # keys: the key encoder on the second view
    torch.testing.assert_close(loss, expected)
    ring_nce.update_pools(model, new, args)
    if method == "moco":
        torch.testing.assert_close(model.queue[:6], torch.nn.functional.normalize(new, dim=1))
        assert torch.equal(model.queue[6:], before["queue"][6:]) and int(model.queue_ptr) == 6
    else:
        outputs = [new[1]] if method == "ir" else [new[1], new[2]]
        for name, z in zip(["bank", "bank_ab"], outputs):
            torch.testing.assert_close(getattr(model, name)[index], torch.nn.functional.normalize(z, dim=1))

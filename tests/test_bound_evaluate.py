"""bound.py end to end: `evaluate` on checkpoints of two short simclr_debiased.py runs with
different K+1 on ../shared/data/cifar10, `plot` on both, a stand-in text script that follows the
contract of nlp_similar_words.py (build_model + eval_datasets with a collate_fn), and bad input."""
import csv
import json
import math
import textwrap

import pytest
import torch

import bound
import common
import simclr_debiased

RUN = ["--dataset", "folder", "--arch", "resnet18", "--width", "4", "--hidden_dim", "32", "--feature_dim", "16",
       "--workers", "0", "--eval_every", "0", "--epochs", "1", "--estimator", "easy", "--norm", "none", "--blur_p", "0",
       "--head", "nozawa", "--optimizer", "larc", "--weight_decay", "1e-4", "--negatives", "local"]
SMALL = ["--passes", "1", "--num_augmentations", "1", "--train_subset", "60", "--test_subset", "48",
         "--workers", "0", "--feature_batch", "128"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_dir):
    """Two one-epoch runs (a step or two each): K+1 = 16 and K+1 = 32."""
    root = tmp_path_factory.mktemp("bound_runs")
    for k in (16, 32):
        simclr_debiased.main([*RUN, "--data_dir", cifar_dir, "--subset", "32", "--batch_size", str(k),
                              "--lr", str(k / 256), "--out_dir", str(root / f"k{k}")])
    return root


def run_main(argv, capsys):
    capsys.readouterr()
    code, result = 0, None
    try:
        result = bound.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err, result


@pytest.fixture(scope="module")
def evaluated(runs):
    bound.main(["evaluate", "--checkpoint", str(runs / "k16" / "last.pt"), *SMALL])
    bound.main(["evaluate", "--checkpoint", str(runs / "k32" / "last.pt"), *SMALL, "--save_features"])
    return runs


def test_k_plus_1_of_a_run():
    # the batch one loss saw: per process with local negatives, per chunk with --num_chunks
    assert bound.run_k_plus_1({"batch_size": 128, "negatives": "local", "num_chunks": 4}) == 32
    assert bound.run_k_plus_1({"batch_size": 128, "negatives": "local"}, world_size=4) == 32
    assert bound.run_k_plus_1({"batch_size": 128, "negatives": "global"}, world_size=4) == 128
    assert bound.run_k_plus_1({"batch_size": 256}) == 256 and bound.run_k_plus_1({}) is None


def test_evaluate_writes_every_term(evaluated):
    for name, k in (("k16", 16), ("k32", 32)):  # K+1 read from the run: its batch, per chunk
        text = (evaluated / name / "bounds.json").read_text()
        assert "NaN" not in text and "Infinity" not in text  # strict JSON
        report = json.loads(text)
        s, t, table, u = report["settings"], report["terms"], report["table"], report["upper_bounds"]
        assert s["k_plus_1"] == k and s["num_classes"] == 10 and s["temperature"] == 0.5
        assert s["samples"] == (48 // k) * k and s["test_items"] == 48 and s["train_items"] == 60
        for key in ("SimCLR_loss", "Original_SimCLR_loss", "assumption_value", "upsilon", "curl_tau", "sup_loss",
                    "partial_sup_loss", "conflict_term", "curl_sup_loss", "curl_partial_sup_loss", "bound",
                    "curl_bound", "centroid_accuracy", "sup_loss_all"):
            assert isinstance(t[key], float) and math.isfinite(t[key]), key
        assert t["SimCLR_loss"] > 0 and t["assumption_value"] <= 0 and 0 <= t["upsilon"] <= 1 and 0 <= t["curl_tau"] <= 1
        assert t["SimCLR_loss"] <= math.log(k) + 2 / 0.5 + 1e-9  # cosines in [-1, 1]: at most ln(K+1) + 2/t
        # the table is the notebook's recomposition of the terms
        assert table["bound"] == pytest.approx(table["L_sup"] + table["L_sub"] + table["curl_collision"] / 2 + table["d"])
        assert table["curl_bound"] == pytest.approx(table["curl_collision"] + table["curl_L_sup"] + table["curl_L_sub"]
                                                    + table["d"])
        for name_ in ("ours_theorem", "ours_notebook", "arora"):
            assert name_ in u and "ln_" + name_ in u
        assert 0 <= report["mean_classifier"]["accuracy_clean_top1"] <= report["mean_classifier"]["accuracy_clean_top5"]
        assert report["collision_statistic"]["head"] >= 0 and report["collision_statistic"]["without_head"] >= 0
    # 48 test items evenly spaced over a class-sorted folder: 4 or 5 per class, an unbalanced pool
    k32 = json.loads((evaluated / "k32" / "bounds.json").read_text())
    assert "unbalanced" in k32["analytic"]["model"] and k32["analytic"]["tau"] > 0.9
    saved = torch.load(evaluated / "k32" / "bounds_features.pt", weights_only=True)
    assert saved["test_fbar"].shape == (48, 16) and saved["mu"].shape == (10, 16) and saved["train_labels"].shape == (60,)
    assert float(saved["test_fbar"].norm(dim=1).max()) <= 1 + 1e-6  # a mean of unit vectors, not re-normalised


def test_plot_figure_and_table(evaluated, tmp_path, capsys):
    (evaluated / "k16" / "linear.json").write_text(json.dumps({"linear": {"best": 0.25}}))
    (evaluated / "k32" / "linear.json").write_text(json.dumps({"linear": {"best": 31.0}}))
    code, out, _, groups = run_main(["plot", str(evaluated / "k32"), str(evaluated / "k16"), "--out",
                                     str(tmp_path / "fig.png"), "--csv", str(tmp_path / "t2.csv"), "--markdown",
                                     str(tmp_path / "t2.md"), "--accuracy_file", "linear.json", "--accuracy_key",
                                     "linear.best"], capsys)
    assert code == 0 and (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(groups) == [16, 32]  # sorted by K+1
    assert groups[16]["accuracy"][0] == 25.0 and groups[32]["accuracy"][0] == 31.0  # fraction or percent
    with open(tmp_path / "t2.csv", newline="") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    k16 = json.loads((evaluated / "k16" / "bounds.json").read_text())
    assert float(rows["L_Info"]["K+1=16"]) == pytest.approx(k16["table"]["L_Info"])
    assert float(rows["tau"]["K+1=32"]) == pytest.approx(groups[32]["tau"][0])
    markdown = (tmp_path / "t2.md").read_text()
    assert markdown.splitlines()[0] == "| row | 16 | 32 |" and "ln †upper bound of L_sup" in markdown
    assert markdown.strip() in out


def test_vacuous_bound_warns_and_still_writes(runs, tmp_path, capsys):
    out = tmp_path / "vacuous.json"
    code, _, err, report = run_main(["evaluate", "--checkpoint", str(runs / "k16" / "last.pt"), "--batch", "8",
                                     "--out", str(out), *SMALL, "--test_subset", "20", "--train_subset", "20"], capsys)
    assert code == 0 and "warning" in err and "vacuous" in err and "K+1 = 8 < C = 10" in err
    data = json.loads(out.read_text())
    assert data["upper_bounds"]["ours_theorem"] is None and data["upper_bounds"]["ln_ours_notebook"] is None
    assert data["terms"]["upsilon"] == 0 and data["terms"]["sup_loss"] == 0 and data["settings"]["k_plus_1"] == 8


FAKE_TEXT_SCRIPT = '''
"""A stand-in for nlp_similar_words.py's contract: build_model(args) and eval_datasets(...) whose
data sets carry a collate_fn giving (padded LongTensor [B, L], labels); train_augment = erase."""
import torch
import torch.nn as nn


class Bag(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=0)

    def forward(self, tokens):
        return self.embedding(tokens)


class Model(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.backbone = Bag(args["vocab"], args["dim"])
        self.projector = nn.Sequential(nn.Linear(args["dim"], args["dim"]), nn.BatchNorm1d(args["dim"]), nn.ReLU(),
                                       nn.Linear(args["dim"], args["dim"], bias=False))


def build_model(args):
    return Model(args)


class Documents(torch.utils.data.Dataset):
    """No .targets, no .transform: only items and a collate_fn."""

    def __init__(self, docs, labels, erase):
        self.docs, self.labels, self.erase = docs, labels, erase
        self.collate_fn = self.collate

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i], self.labels[i]

    def collate(self, items):
        docs = []
        for tokens, _ in items:
            if self.erase > 0:
                keep = torch.rand(len(tokens)) > self.erase
                tokens = [t for t, k in zip(tokens, keep.tolist()) if k]
            docs.append(tokens)
        width = max(1, max(len(d) for d in docs))
        batch = torch.zeros(len(docs), width, dtype=torch.long)
        for i, d in enumerate(docs):
            batch[i, :len(d)] = torch.tensor(d, dtype=torch.long)
        return batch, torch.tensor([label for _, label in items])


def eval_datasets(args, train_augment=False, data_dir=None, checkpoint=None):
    g = torch.Generator().manual_seed(0)

    def split(n):
        labels = [i % 4 for i in range(n)]
        docs = [(1 + 10 * y + torch.randint(0, 10, (12,), generator=g)).tolist() for y in labels]
        return docs, labels

    train, test = split(120), split(48)
    return Documents(*train, args.get("erase", 0.2) if train_augment else 0.0), Documents(*test, 0.0)
'''


def test_text_checkpoint_through_the_contract(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_text_bound.py").write_text(textwrap.dedent(FAKE_TEXT_SCRIPT))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_text_bound
    args = {"vocab": 41, "dim": 8, "batch_size": 16, "temperature": 0.5, "data_dir": None}
    model = fake_text_bound.build_model(args)
    common.save_checkpoint({"script": "fake_text_bound.py", "args": args, "epoch": 0,
                            "backbone": model.backbone.state_dict(), "model": model.state_dict()},
                           str(tmp_path / "run" / "last.pt"))
    code, out, err, report = run_main(["evaluate", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--passes", "2",
                                       "--num_augmentations", "2", "--workers", "0", "--test_subset", "40"], capsys)
    assert code == 0, err
    assert report["settings"]["k_plus_1"] == 16 and report["settings"]["num_classes"] == 4
    assert report["settings"]["samples"] == 2 * 32 and report["settings"]["train_items"] == 120
    assert json.loads((tmp_path / "run" / "bounds.json").read_text())["terms"] == pytest.approx(report["terms"])
    assert 0 <= report["terms"]["upsilon"] <= 1 and report["collision_statistic"]["head"] > 0
    # the test split's augmented views use the run's own augmentation (the train split's collate_fn)
    train, test = fake_text_bound.eval_datasets(args, train_augment=True)
    augmented = bound.with_augmentation(test, train)
    assert augmented.collate_fn.__self__.erase == 0.2 and test.collate_fn.__self__.erase == 0.0
    assert common.subset(augmented, 10).collate_fn == augmented.collate_fn  # a text set without .targets
    assert not any("identical" in w for w in report["warnings"])
    # a run whose "augmentation" is not random: the two views coincide, and bound.py says so
    args["erase"] = 0.0
    common.save_checkpoint({"script": "fake_text_bound.py", "args": args, "epoch": 0,
                            "backbone": model.backbone.state_dict(), "model": model.state_dict()},
                           str(tmp_path / "plain" / "last.pt"))
    code, _, err, _ = run_main(["evaluate", "--checkpoint", str(tmp_path / "plain" / "last.pt"), "--passes", "1",
                                "--num_augmentations", "1", "--workers", "0"], capsys)
    assert code == 0 and "3 batches had two identical augmented views" in err


def test_evaluate_bad_input(runs, tmp_path, capsys):
    def exit_2(argv, fragment):
        code, _, err, _ = run_main(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and "Traceback" not in err, err
        assert lines[-1].startswith("bound.py") and ": error: " in lines[-1] and fragment in lines[-1], err
        assert len(lines) == 1 or lines[0].startswith("usage:"), err

    exit_2(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")], "does not exist")
    (tmp_path / "cut.pt").write_bytes((runs / "k16" / "last.pt").read_bytes()[:500])
    exit_2(["evaluate", "--checkpoint", str(tmp_path / "cut.pt")], "cannot read checkpoint")
    exit_2(["evaluate", "--checkpoint", str(runs / "k16" / "last.pt"), "--batch", "100", *SMALL],
           "the test split has 48 items, fewer than one batch of K+1 = 100")
    exit_2(["evaluate", "--checkpoint", str(runs / "k16" / "last.pt"), "--passes", "0"], "must be >= 1")
    exit_2(["evaluate", "--checkpoint", str(runs / "k16" / "last.pt"), "--temperature", "-1"], "must be > 0")
    exit_2(["evaluate", "--checkpoint", str(runs / "k16" / "last.pt"), "--data_dir", str(tmp_path / "nowhere")],
           "no images in")
    exit_2(["plot", str(tmp_path), "--out", str(tmp_path / "f.png")], "bounds.json does not exist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bounds.json").write_text("{}")
    exit_2(["plot", str(tmp_path / "bad")], "is not a bounds.json")


def test_plot_dpi_and_accuracy_label(evaluated, tmp_path, capsys):
    import struct
    widths = []
    for dpi in (40, 80):
        out = tmp_path / f"fig{dpi}.png"
        code, _, err, _ = run_main(["plot", str(evaluated / "k16"), str(evaluated / "k32"), "--out", str(out),
                                    "--dpi", str(dpi), "--accuracy_label", "probe accuracy (%)"], capsys)
        assert code == 0, err
        widths.append(struct.unpack(">I", out.read_bytes()[16:20])[0])  # the PNG header's width
    assert widths[1] == 2 * widths[0]

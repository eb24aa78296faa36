"""Shared test helpers. Tests generate their own tiny data (nothing is read from outside the
repository): a class-structured image folder, an AG-News-style CSV and a word-vector file."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The training scripts; each holds its own copy of the pieces every training loop needs.
TRAINING_SCRIPTS = ["simclr_debiased", "moco_mochi", "ring_nce", "nnclr_kmclr"]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run tiny models in this process: on a busy 2-core machine one intra-op thread is as
    fast as two, which mostly synchronise. Scripts started by `run_script` keep their defaults."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root, classes=4, train_per_class=16, test_per_class=8, size=16, seed=0):
    """DATA/train/<class>/*.png and DATA/test/<class>/*.png. Class c is a noisy image whose colour
    and stripe orientation depend on c, so a network can learn to tell classes apart."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(classes, 3))
    yy, xx = np.mgrid[:size, :size]
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            stripes = np.sin((xx if c % 2 else yy) * (1 + c // 2) * np.pi / 4)[..., None]
            for i in range(per_class):
                img = colours[c] + 40 * stripes + rng.normal(0, 20, size=(size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny labelled image folder (4 classes, 64 train and 32 test images of 16x16 pixels)."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


TOPICS = [["market", "shares", "stocks", "profit", "bank", "trade"],
          ["game", "team", "season", "coach", "win", "players"],
          ["election", "minister", "government", "vote", "party", "talks"],
          ["software", "computer", "internet", "science", "space", "phone"]]
FILLER = ["the", "a", "of", "in", "on", "said", "new", "after", "with", "for"]


def make_ag_news(root, train_per_class=40, test_per_class=10, seed=0):
    """AG-News-style train.csv and test.csv ("class","title","description", classes 1..4, no
    header); each class draws its words from its own topic list plus shared filler words."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for i in range(n):
            for c, topic in enumerate(TOPICS):
                words = [str(rng.choice(topic if rng.random() < 0.5 else FILLER)) for _ in range(12)]
                rows.append(f'"{c + 1}","{" ".join(words[:4])}","{" ".join(words[4:])}."')
        with open(os.path.join(root, f"{split}.csv"), "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
    return str(root)


def make_word_vectors(path, dim=8, seed=0, header=False):
    """A GloVe-style text file (fastText-style with `header`) with vectors for the topic and filler
    words: words of one topic lie close together."""
    rng = np.random.default_rng(seed)
    lines = []
    for topic in TOPICS:
        centre = rng.normal(size=dim)
        lines += [w + " " + " ".join(f"{v:.5f}" for v in centre + 0.1 * rng.normal(size=dim)) for w in topic]
    lines += [w + " " + " ".join(f"{v:.5f}" for v in rng.normal(size=dim)) for w in FILLER]
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write(f"{len(lines)} {dim}\n")
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def ag_news(tmp_path_factory):
    return make_ag_news(tmp_path_factory.mktemp("ag_news"))


@pytest.fixture(scope="session")
def word_vectors(tmp_path_factory):
    return make_word_vectors(tmp_path_factory.mktemp("vectors") / "vectors.txt")


def run_script(*args, timeout=600, env=None, cwd=ROOT):
    """Run a script of the repository as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(result, *fragments):
    """A script run from the shell: exit status 2, no traceback, exactly one stderr line
    `PROG: error: ...` holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    assert ": error: " in lines[0] and all(f in lines[0] for f in fragments), (fragments, lines)


def main_error(module, argv, capsys, *fragments):
    """The same in this process (faster): module.main(argv) exits 2 with exactly one stderr line
    `PROG: error: ...` holding every fragment, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    prog = module.get_parser().prog
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"{prog}: error: ") and all(f in lines[0] for f in fragments), lines


def flat_folder(image_folder, root, per_class=8):
    """An unlabelled flat folder of per_class training images of each class of image_folder."""
    os.makedirs(root)
    for c in sorted(os.listdir(os.path.join(image_folder, "train"))):
        for name in sorted(os.listdir(os.path.join(image_folder, "train", c)))[:per_class]:
            shutil.copy(os.path.join(image_folder, "train", c, name), os.path.join(root, f"{c}_{name}"))
    return str(root)


def assert_resume_is_exact(module, flags, root, monkeypatch):
    """The README's resume sentence, for module.main(flags) with --epochs 2: run straight, and run
    again killed after epoch 1's checkpoint (end_epoch raises) then resumed with --resume alone.
    The two last.pt hold the same tensors (weights, memories, optimizer state, RNG states) and
    metrics rows (time columns aside). Returns the killed run's epoch-1 checkpoint and the final
    straight one, and the rows, for further checks."""
    module.main([*flags, "--out_dir", str(root / "straight")])
    real = module.end_epoch

    def killed(*args):
        real(*args)
        raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint

    monkeypatch.setattr(module, "end_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        module.main([*flags, "--out_dir", str(root / "resumed")])
    monkeypatch.undo()
    first = torch.load(root / "resumed" / "last.pt", weights_only=True)
    module.main(["--resume", str(root / "resumed" / "last.pt")])  # to the planned --epochs
    a, b = (torch.load(root / run / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert first["epoch"] == 1 and a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # weights, BatchNorm statistics, queues, banks, centroids
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(a["rng"][0][0], b["rng"][0][0])  # the CPU generator goes on alike
    rows = [[{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_sec")}
             for r in read_csv(root / run / "metrics.csv")] for run in ("straight", "resumed")]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[0]] == ["1", "2"]
    return first, a, rows[0]

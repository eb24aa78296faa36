"""Shared test helpers. Tests generate their own tiny data (nothing is read from outside the
repository): a class-structured image folder, an AG-News-style CSV and a word-vector file."""
import os
import subprocess
import sys

import numpy as np
import pytest

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


def assert_one_line_error(result, *fragments):
    """Exit status 2 and no traceback; the message is one line `PROG: error: ...` containing every
    fragment, preceded at most by argparse's usage text."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines and ": error: " in lines[-1], result.stderr[-2000:]
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])

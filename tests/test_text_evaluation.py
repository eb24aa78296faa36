"""linear_eval.py and bound.py on a real nlp_similar_words.py checkpoint (AG News, replace
augmentation with the real GloVe vectors), after its run directory has moved: the vocabulary and
the similar-word table must come from the checkpoint."""
import json
import math
import os
import shutil

import pytest
import torch

import bound
import common
import linear_eval
import nlp_similar_words as nlp
from conftest import DATA

AG = os.path.join(DATA, "ag_news")
GLOVE = os.path.join(DATA, "word_vectors", "glove.6B.50d.10k.txt")


@pytest.fixture(scope="module")
def moved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_eval")
    nlp.main(["train", "--data_dir", AG, "--vectors", GLOVE, "--batch_size", "128", "--workers", "0",
              "--epochs", "1", "--eval_every", "0", "--out_dir", str(root / "run")])
    os.makedirs(root / "moved")
    shutil.copy(root / "run" / "last.pt", root / "moved" / "last.pt")
    shutil.rmtree(root / "run")  # vocab.txt and replace_ids.npy are gone with it
    return root / "moved" / "last.pt"


def test_run_datasets_take_vocabulary_and_table_from_the_checkpoint(moved_checkpoint):
    ckpt = common.load_checkpoint(str(moved_checkpoint))
    train, test = common.run_datasets(ckpt, train_augment=True)
    assert len(train) == 6080 and len(test) == 1520 and train.transform.kind == "replace"
    torch.testing.assert_close(train.transform.table, ckpt["replace_ids"])
    with pytest.raises(common.UserError, match="similar-word table was not found"):
        nlp.eval_datasets(ckpt["args"], train_augment=True)  # without the checkpoint it cannot know


def test_linear_eval_on_a_text_checkpoint(moved_checkpoint, tmp_path):
    for flags in (["--augment", "none", "--cache_dir", str(tmp_path / "cache")], []):
        results = linear_eval.main([str(moved_checkpoint), "--epochs", "2", "--workers", "0", "--subset", "1000",
                                    "--out", str(tmp_path / "eval.json"), *flags])
        assert results["protocol"] == "nozawa" and results["script"] == "nlp_similar_words.py"
        assert results["data"]["num_classes"] == 4 and results["data"]["num_test"] == 1520
        assert results["mean_classifier"]["train_view"] == "augmented"
        for block in (results["linear"], results["knn"], results["mean_classifier"]):
            assert 25.0 < block["top1"] <= 100.0  # one epoch of training is already well above chance
    assert json.loads((tmp_path / "eval.json").read_text())["linear"]["top1"] == results["linear"]["top1"]


def test_bound_on_a_text_checkpoint(moved_checkpoint, tmp_path):
    out = tmp_path / "bounds.json"
    bound.main(["evaluate", "--checkpoint", str(moved_checkpoint), "--out", str(out), "--passes", "1",
                "--num_augmentations", "1", "--train_subset", "800", "--test_subset", "512", "--workers", "0",
                "--feature_batch", "256"])
    report = json.loads(out.read_text())
    assert report["settings"]["k_plus_1"] == 128 and report["settings"]["num_classes"] == 4
    terms, upper = report["terms"], report["upper_bounds"]
    assert math.isfinite(terms["SimCLR_loss"]) and terms["assumption_value"] <= 0 and terms["upsilon"] == 1.0
    # K+1 = 128 documents of 4 classes: every batch covers every class, so the theorem's bound is
    # finite and small, while Arora et al.'s divides by 1 - tau ~ 0
    assert upper["ln_ours_theorem"] < 5 < upper["ln_arora"]

"""bound.py evaluate and plot end to end: a "perfect" text encoder (hand-made checkpoint) against
the closed form of every term, what f-bar and mu are (not re-normalised, from the training split),
what the collision statistic compares, k-means sub-classes, the figure's bars read back, the
README's Figure 1 recipe with a real simclr_debiased.py run, and bad input."""
import json
import math

import pytest
import torch

import bound
import linear_eval
import simclr_debiased
from conftest import TOPICS
from test_linear_eval import VOCAB, class_embedding, shifted, text_checkpoint  # noqa: F401 (fixture)

QUICK = ["--workers", "0", "--passes", "2", "--num_augmentations", "1"]


def same_class_table():
    """Replace each topic word by words of its own class: the augmentation changes the tokens, not
    the class direction of the document."""
    table = torch.arange(len(VOCAB))[:, None].repeat(1, 5)
    for topic in TOPICS:
        for w in topic:
            table[VOCAB.index(w)] = torch.tensor([VOCAB.index(x) for x in topic if x != w][:5])
    return table


def evaluate(ckpt, out, *flags):
    return bound.main(["evaluate", "--checkpoint", ckpt, "--out", str(out), *QUICK, *flags])


@pytest.fixture(scope="module")
def perfect(tmp_path_factory, ag_news):
    """Every document embeds exactly as e_c (topic words e_c, filler 0), also augmented."""
    return text_checkpoint(tmp_path_factory.mktemp("perfect") / "last.pt", ag_news, class_embedding(), torch.eye(4),
                           same_class_table(), "replace", 0.5)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, ag_news):
    """Random word vectors and erase at 0.5: views of a document differ."""
    emb = torch.randn(len(VOCAB) + 1, 6, generator=torch.Generator().manual_seed(0))
    return text_checkpoint(tmp_path_factory.mktemp("noisy") / "last.pt", ag_news, emb, torch.eye(6),
                           None, "erase", 0.5)


def test_perfect_encoder_closed_forms_end_to_end(perfect, tmp_path):
    # The 40 test documents (10 per class) are ONE batch of K+1 = 40: every batch has n_c = 10,
    # covers all C = 4 classes, and z.mu_j = 1 for j = c, 0 otherwise (t = 0.5, e = exp(-1/t)).
    r = evaluate(perfect, tmp_path / "b.json", "--batch", "40")
    t, table, u, e = r["terms"], r["table"], r["upper_bounds"], math.exp(-2)
    L_info, L_sup = math.log(10 + 30 * e), math.log(1 + 3 * e)
    assert r["settings"]["k_plus_1"] == 40 and r["settings"]["num_classes"] == 4 and r["settings"]["samples"] == 80
    assert t["SimCLR_loss"] == pytest.approx(L_info, rel=1e-6)
    assert t["assumption_value"] == pytest.approx(0, abs=1e-6) and t["upsilon"] == 1.0 and t["curl_tau"] == 1.0
    assert t["conflict_term"] == pytest.approx(math.log(10)) and t["sup_loss"] == pytest.approx(L_sup, rel=1e-6)
    assert t["sup_loss_all"] == pytest.approx(L_sup, rel=1e-6) and t["partial_sup_loss"] == 0
    assert t["curl_sup_loss"] == 0 and t["curl_partial_sup_loss"] == 0
    assert table["bound"] == pytest.approx(0.5 * (L_sup + math.log(10)), rel=1e-6)
    assert table["L_sup"] == pytest.approx(L_sup / 2, rel=1e-6) and table["curl_bound"] == pytest.approx(math.log(10))
    assert u["ln_ours_theorem"] == pytest.approx(math.log(2 * L_info - math.log(10)), rel=1e-6)
    assert u["tau_source"].startswith("exact")  # every anchor collided
    assert table["mu_acc"] == 100.0 and r["mean_classifier"]["mu_acc_clean_test"] == 100.0
    assert table["collision_bound"] == pytest.approx(0, abs=1e-6)  # same-class features identical
    # two sub-classes per class: the 8 centroids, the accuracy mapped back to the 4 classes
    r = evaluate(perfect, tmp_path / "b2.json", "--batch", "40", "--sub_classes", "2")
    assert r["settings"]["num_classes"] == 8 and r["settings"]["labelled_classes"] == 4
    assert r["table"]["mu_acc"] == 100.0


def test_fbar_and_class_means_are_not_renormalised_and_come_from_training(noisy, tmp_path):
    evaluate(noisy, tmp_path / "b.json", "--batch", "16", "--save_features", "--num_augmentations", "3")
    f = torch.load(tmp_path / "b_features.pt", weights_only=True)
    train_fbar, y = f["train_fbar"], f["train_labels"]
    assert train_fbar.shape == (160, 6) and f["test_fbar"].shape == (40, 6)
    norms = train_fbar.norm(dim=1)
    assert bool((norms <= 1 + 1e-6).all()) and float((norms < 0.99).float().mean()) > 0.5  # means of 6 unit vectors
    means = torch.stack([train_fbar[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(f["mu"], means)  # plain means of the TRAINING f-bar, not re-normalised
    assert bool((f["mu"].norm(dim=1) < 0.99).all())
    test_means = torch.stack([f["test_fbar"][f["test_labels"] == c].mean(0) for c in range(4)])
    assert (f["mu"] - test_means).abs().max() > 1e-3


def test_collision_statistic_compares_two_augmentation_passes_of_the_training_split(noisy, tmp_path, monkeypatch):
    calls, real = [], bound.collision_statistic

    def recording(v0, v1, labels, *a):
        calls.append((v0, v1, labels))
        return real(v0, v1, labels, *a)

    monkeypatch.setattr(bound, "collision_statistic", recording)
    r = evaluate(noisy, tmp_path / "b.json", "--batch", "16")
    assert len(calls) == 2  # head and backbone outputs
    for v0, v1, labels in calls:
        assert v0.shape[0] == 160 and not torch.equal(v0, v1)
        assert labels.max() == 3  # the labelled classes
    assert r["table"]["collision_bound"] == pytest.approx(real(calls[1][0], calls[1][1], calls[1][2]))
    assert r["collision_statistic"]["without_head"] == pytest.approx(real(*calls[0]))


def test_kmeans_and_sub_class_means():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0], [0, 4.0], [-4.0, 0], [0, -4.0]])  # class 0: blobs 0, 1; class 1: 2, 3
    blob = torch.arange(200) % 4
    x = centres[blob] + 0.3 * torch.randn(200, 2, generator=g)
    c, assign = bound.kmeans(x[blob < 2], 2, generator=g)
    truth = blob[blob < 2]
    assert bool((assign == truth).all() or (assign == 1 - truth).all())
    mu, train_sub, test_sub = bound.sub_class_means(x[:120], blob[:120] // 2, x[120:], blob[120:] // 2, 2, seed=0)
    assert mu.shape == (4, 2) and bool((train_sub // 2 == blob[:120] // 2).all())
    for sub, b, points in ((train_sub, blob[:120], x[:120]), (test_sub, blob[120:], x[120:])):
        for j in range(4):  # each sub-class is one blob, its centroid the blob's mean
            assert len(set(b[sub == j].tolist())) == 1
    torch.testing.assert_close(mu[train_sub], torch.stack([x[:120][train_sub == j].mean(0) for j in range(4)])[train_sub])


def test_figure_bars_and_accuracy_read_back():
    groups = {16: {"ln_curl_upper_bound": (2.0, 0.1, 2), "ln_upper_bound": (3.0, 0.0, 2),
                   "ln_upper_bound_theorem": (4.0, 0.0, 2), "accuracy": (50.0, 1.0, 2)},
              32: {"ln_curl_upper_bound": (5.0, 0.0, 2), "ln_upper_bound": (6.0, 0.0, 2),
                   "ln_upper_bound_theorem": (7.0, 0.0, 2), "accuracy": (60.0, 1.0, 2)}}
    fig = bound.figure(groups, "linear probe top-1 (%)")
    ax, acc = fig.axes
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers if hasattr(c, "patches")}
    assert bars == {"Arora et al.": [2.0, 5.0], "Ours (notebook)": [3.0, 6.0], "Ours (theorem)": [4.0, 7.0]}
    assert list(acc.lines[0].get_ydata()) == [50.0, 60.0] and acc.get_ylabel() == "linear probe top-1 (%)"


def test_figure1_recipe_as_in_the_readme(image_folder, tmp_path):
    # train (Nozawa & Sato's settings), linear_eval.py --protocol nozawa, bound.py evaluate, bound.py plot
    # (in this process: the training script's main, as `python simclr_debiased.py ...` runs it)
    run = tmp_path / "k8"
    simclr_debiased.main(["--dataset", "folder", "--data_dir", image_folder, "--arch", "resnet18", "--width", "4",
                          "--crop_size", "16", "--batch_size", "16", "--subset", "32", "--epochs", "1", "--workers", "0",
                          "--head", "nozawa", "--norm", "none", "--blur_p", "0", "--tau_plus", "0", "--beta", "0",
                          "--optimizer", "larc", "--lr", "0.0625", "--schedule", "cosine", "--negatives", "local",
                          "--num_chunks", "2", "--eval_every", "0", "--out_dir", str(run)])
    ckpt = str(run / "last.pt")
    linear_eval.main([ckpt, "--protocol", "nozawa", "--epochs", "1", "--batch_size", "16", "--workers", "0"])
    bound.main(["evaluate", "--checkpoint", ckpt, *QUICK])
    bound.main(["plot", str(run), "--out", str(tmp_path / "fig.png"), "--markdown", str(tmp_path / "t.md")])
    report = json.loads((run / "bounds.json").read_text())
    assert report["settings"]["k_plus_1"] == 8  # 16 per step in 2 chunks of their own negatives
    linear = json.loads((run / "eval.json").read_text())["linear"]["top1"]
    table = (tmp_path / "t.md").read_text()
    assert f"| linear acc | {linear:.2f} |" in table and f"| μ acc (mean classifier, clean test) | " in table
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_bad_input(noisy, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    (tmp_path / "run").mkdir()
    cases = [(["evaluate", "--checkpoint", str(junk)], "cannot read checkpoint"),
             (["evaluate", "--checkpoint", noisy, "--data_dir", str(tmp_path)], "train.csv"),
             (["evaluate", "--checkpoint", noisy, "--batch", "41"], "fewer than one batch"),
             (["evaluate", "--checkpoint", noisy, "--out", str(tmp_path / "x" / "b.json")], "cannot write"),
             (["evaluate", "--checkpoint", noisy, "--temperature", "0"], "--temperature"),
             (["evaluate", "--checkpoint", noisy, "--sub_classes", "0"], "must be >= 1"),
             (["plot", str(tmp_path / "run")], "not a bounds.json")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as info:
            bound.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and fragment in err.splitlines()[-1], err
    # a run without eval.json: the figure needs linear_eval.py first (or --accuracy_file '')
    bound.main(["evaluate", "--checkpoint", noisy, "--batch", "16", "--out", str(tmp_path / "run" / "bounds.json"),
                *QUICK])
    with pytest.raises(SystemExit) as info:
        bound.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "f.png")])
    assert info.value.code == 2 and "linear_eval.py" in capsys.readouterr().err.splitlines()[-1]
    assert bound.main(["plot", str(tmp_path / "run"), "--accuracy_file", "", "--out", str(tmp_path / "f.png")])


def test_mu_acc_classifies_clean_test_inputs(shifted, tmp_path):
    # augmented documents look like the next class, clean ones like their own: mu (from augmented
    # training views) sits one class ahead, so clean test inputs are all wrong, augmented ones all right
    r = evaluate(shifted, tmp_path / "b.json", "--batch", "16")
    assert r["table"]["mu_acc"] == 0.0

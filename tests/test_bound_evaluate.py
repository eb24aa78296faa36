"""bound.py evaluate and plot end to end: a "perfect" text encoder (hand-made checkpoint) against
the closed form of every term, what f-bar and mu are (not re-normalised, from the training split),
what the collision statistic compares, k-means sub-classes from the training features and the
paper's decision rule, the table's and the figure's values under their names, the README's
Figure 1 recipe with a real simclr_debiased.py run (bad input: test_eval_errors.py)."""
import json
import math
import pathlib

import pytest
import torch

import bound
import linear_eval
from conftest import TOPICS
from test_bound_loop import published_sums
from test_linear_eval import (VOCAB, class_embedding, image_checkpoint, shifted,  # noqa: F401
                              text_checkpoint)

QUICK = ["--workers", "0", "--passes", "2", "--num_augmentations", "1"]


def same_class_table():
    """Replace each topic word by words of its own class: the augmentation changes the tokens,
    not the class direction of the document."""
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
    return text_checkpoint(tmp_path_factory.mktemp("perfect") / "last.pt", ag_news,
                           class_embedding(), torch.eye(4), same_class_table(), "replace", 0.5)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, ag_news):
    """Random word vectors and erase at 0.5: views of a document differ."""
    emb = torch.randn(len(VOCAB) + 1, 6, generator=torch.Generator().manual_seed(0))
    return text_checkpoint(tmp_path_factory.mktemp("noisy") / "last.pt", ag_news, emb,
                           torch.eye(6), None, "erase", 0.5)


def test_perfect_encoder_closed_forms_end_to_end(perfect, tmp_path):
    # The 40 test documents (10 per class) are ONE batch of K+1 = 40: every batch has n_c = 10,
    # covers all C = 4 classes, and z.mu_j = 1 for j = c, 0 otherwise (t = 0.5, e = exp(-1/t)).
    r = evaluate(perfect, tmp_path / "b.json", "--batch", "40")
    t, table, u, e = r["terms"], r["table"], r["upper_bounds"], math.exp(-2)
    L_info, L_sup = math.log(10 + 30 * e), math.log(1 + 3 * e)
    assert r["settings"]["num_classes"] == 4 and r["settings"]["samples"] == 80  # 2 passes
    assert t["SimCLR_loss"] == pytest.approx(L_info, rel=1e-6)
    assert t["assumption_value"] == pytest.approx(0, abs=1e-6)
    assert t["upsilon"] == 1.0 and t["curl_tau"] == 1.0
    assert t["conflict_term"] == pytest.approx(math.log(10))
    assert t["sup_loss"] == pytest.approx(L_sup, rel=1e-6)
    assert t["sup_loss_all"] == pytest.approx(L_sup, rel=1e-6) and t["partial_sup_loss"] == 0
    assert t["curl_sup_loss"] == 0 and t["curl_partial_sup_loss"] == 0
    assert table["bound"] == pytest.approx(0.5 * (L_sup + math.log(10)), rel=1e-6)
    assert table["L_sup"] == pytest.approx(L_sup / 2, rel=1e-6)
    assert table["curl_bound"] == pytest.approx(math.log(10))
    assert u["ln_ours_theorem"] == pytest.approx(math.log(2 * L_info - math.log(10)), rel=1e-6)
    assert u["tau_source"].startswith("exact")  # every anchor collided
    assert table["mu_acc"] == 100.0
    assert table["collision_bound"] == pytest.approx(0, abs=1e-6)  # same-class features equal
    # two sub-classes per class: 8 centroids, the accuracy mapped back to the 4 classes; the
    # default output is then bounds_sub2.json (bounds.json keeps the one-class result)
    r = bound.main(["evaluate", "--checkpoint", perfect, *QUICK, "--batch", "40",
                    "--sub_classes", "2"])
    assert r["settings"]["num_classes"] == 8 and r["settings"]["labelled_classes"] == 4
    assert r["table"]["mu_acc"] == 100.0
    written = pathlib.Path(perfect).parent / "bounds_sub2.json"
    assert json.loads(written.read_text())["settings"]["num_classes"] == 8


def test_fbar_and_class_means_are_not_renormalised_and_come_from_training(noisy, tmp_path):
    evaluate(noisy, tmp_path / "b.json", "--batch", "16", "--save_features",
             "--num_augmentations", "3")
    f = torch.load(tmp_path / "b_features.pt", weights_only=True)
    train_fbar, y = f["train_fbar"], f["train_labels"]
    norms = train_fbar.norm(dim=1)
    # means of 6 unit vectors: inside the unit ball, mostly well inside
    assert bool((norms <= 1 + 1e-6).all()) and float((norms < 0.99).float().mean()) > 0.5
    means = torch.stack([train_fbar[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(f["mu"], means)  # plain means of the TRAINING f-bar
    assert bool((f["mu"].norm(dim=1) < 0.99).all())
    test_means = torch.stack([f["test_fbar"][f["test_labels"] == c].mean(0) for c in range(4)])
    assert (f["mu"] - test_means).abs().max() > 1e-3


def test_collision_statistic_compares_two_augmentation_passes_of_the_training_split(
        noisy, tmp_path, monkeypatch):
    calls, real = [], bound.collision_statistic

    def recording(v0, v1, labels, *a):
        calls.append((v0, v1, labels))
        return real(v0, v1, labels, *a)

    monkeypatch.setattr(bound, "collision_statistic", recording)
    r = evaluate(noisy, tmp_path / "b.json", "--batch", "16")
    assert len(calls) == 2  # head and backbone outputs
    for v0, v1, labels in calls:
        assert v0.shape[0] == 160 and not torch.equal(v0, v1)  # the 160 TRAINING documents
        assert labels.max() == 3  # the labelled classes
    assert r["table"]["collision_bound"] == pytest.approx(real(*calls[1]))
    assert r["collision_statistic"]["without_head"] == pytest.approx(real(*calls[0]))


def test_sub_class_centroids_come_from_the_training_features():
    # Class 0 lies in two training blobs around (4, 0) and (0, 4), class 1 around (-4, 0) and
    # (0, -4); the test features sit elsewhere (shifted by (1, 1)). The centroids must be the
    # training blobs' means; test items go to the nearer centroid of their own class.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0], [0, 4.0], [-4.0, 0], [0, -4.0]], dtype=torch.float64)
    blob = torch.arange(120) % 4
    train = centres[blob] + 0.3 * torch.randn(120, 2, generator=g, dtype=torch.float64)
    test_blob = torch.arange(40) % 4
    test = centres[test_blob] + 1.0 + 0.3 * torch.randn(40, 2, generator=g, dtype=torch.float64)
    mu, train_sub, test_sub = bound.sub_class_means(train, blob // 2, test, test_blob // 2, 2,
                                                    seed=0)
    blob_means = torch.stack([train[blob == b].mean(0) for b in range(4)])
    for c in range(2):  # the two centroids of class c are its two blobs' means, in some order
        got = mu[2 * c:2 * c + 2]
        want = blob_means[2 * c:2 * c + 2]
        assert torch.allclose(got, want, atol=1e-12) or torch.allclose(got, want.flip(0),
                                                                       atol=1e-12), (got, want)
    for sub, labels, b in ((train_sub, blob // 2, blob), (test_sub, test_blob // 2, test_blob)):
        assert bool((sub // 2 == labels).all())  # sub-class c k + j stays in class c
        for j in range(4):  # each sub-class is one blob
            assert len(set(b[sub == j].tolist())) == 1


def test_mean_classifier_decision_rule_over_sub_classes():
    # nlp_bound.py: argmax over the C k sub-class means, then the class = sub-class // k. Class 0's
    # sub-classes point at (1, 0) and (-1, 0) (their class mean is 0), class 1's both at
    # (0.6, 0.8). The first two points are nearest (1, 0) and (-1, 0): class 0 by this rule; the
    # plain class means (0 and (0.6, 0.8)) would say class 1 for all four.
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    z = torch.tensor([[3.0, 0.15], [-1.0, 1.5], [0.5, 0.9], [0.1, 2.0]])
    assert bound.mean_classifier_predictions(z, mu, 2).tolist() == [0, 0, 1, 1]
    means = torch.stack([mu[:2].mean(0), mu[2:].mean(0)])
    assert bound.mean_classifier_predictions(z, means, 1).tolist() == [1, 1, 1, 1]


def paper_rows(L, d, L_sup, L_sub, col, upsilon, tau, curl_sup, curl_sub):
    """Table 2's rows by bound_and_nlp.md 2.3-2.6 (L_sup, L_sub halved as printed)."""
    return {"τ": tau, "υ": upsilon, "L_Info": L, "d(f)": d, "L_sup": L_sup, "L_sub": L_sub,
            "†Collision": col, "†L_sup": curl_sup, "†L_sub": curl_sub,
            "†bound": col + curl_sup + curl_sub + d, "bound": L_sup + L_sub + col / 2 + d,
            "ln upper bound of L_sup (theorem)": math.log((2 * (L - d) - 2 * L_sub - col)
                                                          / upsilon),
            "ln upper bound of L_sup (notebook)": math.log((2 * L - L_sub - col - 2 * d)
                                                           / upsilon),
            "ln †upper bound of L_sup": math.log((L - curl_sub - col - d) / (1 - tau))}


def test_table_and_figure_show_each_quantity_under_its_own_name(tmp_path, monkeypatch):
    runs = {8: dict(L=3.13, d=-0.41, L_sup=0.71, L_sub=0.33, col=1.17, upsilon=0.52, tau=0.21,
                    curl_sup=0.06, curl_sub=0.27),
            16: dict(L=4.02, d=-0.83, L_sup=0.97, L_sub=0.45, col=1.71, upsilon=0.88, tau=0.93,
                     curl_sup=0.49, curl_sub=0.04)}
    extra = {8: {"μ acc (mean classifier, clean test)": 47.3, "linear acc": 63.6,
                 "Collision bound": 0.137},
             16: {"μ acc (mean classifier, clean test)": 58.9, "linear acc": 71.4,
                  "Collision bound": 0.291}}
    expected = {k: {**paper_rows(**v), **extra[k]} for k, v in runs.items()}
    for k, rows in expected.items():  # distinct values, or a swap of two rows could pass
        values = sorted(rows.values())
        assert min(b - a for a, b in zip(values, values[1:])) > 0.02, k
    for k, v in runs.items():
        sums = published_sums(v["L"], v["d"], v["L_sup"], v["L_sub"], v["col"], v["upsilon"],
                              v["tau"], v["curl_sup"], v["curl_sub"])
        report = bound.bound_report(sums, 4, k, bound.analytic_terms(k, [100] * 4),
                                    {"head": extra[k]["Collision bound"]},
                                    extra[k]["μ acc (mean classifier, clean test)"])
        report["settings"] = {"k_plus_1": k}
        (tmp_path / f"k{k}").mkdir()
        (tmp_path / f"k{k}" / "bounds.json").write_text(json.dumps(bound._plain(report)))
        (tmp_path / f"k{k}" / "eval_nozawa.json").write_text(
            json.dumps({"linear": {"top1": extra[k]["linear acc"]}}))
    figures, real = [], bound.figure
    monkeypatch.setattr(bound, "figure", lambda *a: figures.append(real(*a)) or figures[-1])
    bound.main(["plot", str(tmp_path / "k16"), str(tmp_path / "k8"), "--out",
                str(tmp_path / "f.png"), "--markdown", str(tmp_path / "t.md")])
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| row | 8 | 16 |"
    table = {cells[0]: [float(x) for x in cells[1:]]
             for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    for name in expected[8]:
        assert table[name] == pytest.approx([expected[8][name], expected[16][name]], abs=0.006), \
            name
    ax, acc = figures[0].axes
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers
            if hasattr(c, "patches")}
    for label, row in (("Arora et al.", "ln †upper bound of L_sup"),
                       ("Ours (notebook)", "ln upper bound of L_sup (notebook)"),
                       ("Ours (theorem)", "ln upper bound of L_sup (theorem)")):
        assert bars[label] == pytest.approx([expected[8][row], expected[16][row]], rel=1e-12)
    assert list(acc.lines[0].get_ydata()) == pytest.approx([63.6, 71.4])


def test_figure1_pipeline_as_in_the_readme(image_folder, tmp_path):
    # linear_eval.py --protocol nozawa, bound.py evaluate, bound.py plot on a checkpoint of a run
    # with 16 images per step in 2 chunks of their own negatives (--num_chunks 2): K+1 = 8
    run = tmp_path / "runs" / "k8"
    run.mkdir(parents=True)
    ckpt = image_checkpoint(run / "last.pt", image_folder)
    saved = torch.load(ckpt, weights_only=True)
    saved["args"].update(batch_size=16, num_chunks=2)
    torch.save(saved, ckpt)
    linear_eval.main([ckpt, "--protocol", "nozawa", "--epochs", "1", "--batch_size", "16",
                      "--workers", "0"])
    bound.main(["evaluate", "--checkpoint", ckpt, *QUICK])
    bound.main(["plot", str(run), "--markdown", str(tmp_path / "t.md")])
    report = json.loads((run / "bounds.json").read_text())
    assert report["settings"]["k_plus_1"] == 8 and report["settings"]["samples"] == 64
    linear = json.loads((run / "eval_nozawa.json").read_text())["linear"]["top1"]
    table = (tmp_path / "t.md").read_text()
    assert f"| linear acc | {linear:.2f} |" in table
    assert f"| μ acc (mean classifier, clean test) | {report['table']['mu_acc']:.2f} |" in table
    assert (run / "figure1.png").stat().st_size > 1000  # one run: the figure in its directory


def test_mu_acc_classifies_clean_test_inputs(shifted, tmp_path):
    # augmented documents look like the next class, clean ones like their own: mu (from augmented
    # training views) sits one class ahead, so clean test inputs are all wrong
    r = evaluate(shifted, tmp_path / "b.json", "--batch", "16")
    assert r["table"]["mu_acc"] == 0.0

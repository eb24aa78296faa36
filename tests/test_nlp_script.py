"""nlp_similar_words.py end to end on the generated `ag_news` / `word_vectors` fixtures: the run
directory and checkpoint contract, learning, the loop's glue, exact resume after an interruption,
and every kind of bad input (exit status 2 and exactly one line on stderr)."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import nlp_similar_words as nlp
from conftest import assert_one_line_error, run_script
from test_nlp_similar_words import is_subsequence, reference_table

FAST = ["--batch_size", "32", "--workers", "0"]
TIME = ("epoch_seconds", "images_per_sec")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run3(tmp_path_factory, ag_news, word_vectors):
    """3 epochs of replace with the fixture's word vectors (the table computed at start-up)."""
    out = tmp_path_factory.mktemp("nlp") / "run3"
    nlp.main(["--data_dir", ag_news, "--vectors", word_vectors, *FAST, "--epochs", "3",
              "--out_dir", str(out)])
    return out


def test_run_directory_checkpoint_contract_and_learning(run3, ag_news, word_vectors, tmp_path):
    rows = read_csv(run3 / "metrics.csv")
    assert list(rows[0]) == ["epoch", "loss", "fn_rate", "fn_rate_hard", "lr", "epoch_seconds",
                             "images_per_sec", "mean_top1"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("fn_rate", "fn_rate_hard"))
    # 160 documents / 32: 5 steps an epoch; warm-up W = 10 steps, T = 15; each row: its last step
    root = math.sqrt(32)  # lr 1.0 * sqrt(B)
    expected = [0.4 * root, 0.9 * root, root * (1 + math.cos(math.pi * 3 / 5)) / 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    ckpt = torch.load(run3 / "last.pt", weights_only=True)
    args, vocab = ckpt["args"], ckpt["vocab"]
    assert ckpt["script"] == "nlp_similar_words.py" and ckpt["epoch"] == 3 and len(ckpt["rng"]) == 1
    assert json.loads((run3 / "args.json").read_text()) == args
    texts = nlp.read_ag_news(os.path.join(ag_news, "train.csv"))[0]
    assert vocab == nlp.build_vocab(texts, 5) and vocab[-1] == "<unk>"
    assert ckpt["classes"] == ["0", "1", "2", "3"]
    assert [{k: v for k, v in r.items() if k not in TIME} for r in rows] == \
        [{k: f"{v:.6g}" if type(v) is float else str(v) for k, v in r.items() if k not in TIME}
         for r in ckpt["history"]]
    words, vectors = nlp.read_vectors(word_vectors)
    table = reference_table(vocab, words, vectors, 5)
    np.testing.assert_array_equal(ckpt["replace_ids"].numpy(), table)
    np.testing.assert_array_equal(np.load(run3 / "replace_ids.npy"), table)
    # What linear_eval.py and bound.py do, without this script: rebuild backbone and head
    backbone = nn.Module()
    backbone.embedding = nn.EmbeddingBag(len(vocab) + 1, args["embedding_dim"], mode="mean",
                                         padding_idx=len(vocab))
    backbone.load_state_dict(ckpt["backbone"])
    layers = {"linear": lambda i, o, b: nn.Linear(i, o, bias=b),
              "bn": lambda n, a: nn.BatchNorm1d(n, affine=a), "relu": nn.ReLU}
    head = nn.Sequential(*[layers[kind](*sizes) for _, kind, *sizes in ckpt["head"]["layout"]])
    head.load_state_dict(ckpt["head"]["state"])
    model = nlp.ContrastiveFastText(len(vocab), args["embedding_dim"])
    model.load_state_dict(ckpt["model"])
    x = torch.tensor([[0, 3, len(vocab)], [5, len(vocab), len(vocab)]])
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(backbone.embedding(x)),
                                   model.eval().projector(model.backbone(x)))
    # it learns: the mean classifier beats the untrained network (measured: 70 untrained, then
    # 75 / 92.5 / 97.5)
    nlp.main(["--data_dir", ag_news, "--vectors", word_vectors, *FAST, "--epochs", "0",
              "--out_dir", str(tmp_path)])
    untrained = read_csv(tmp_path / "metrics.csv")
    assert list(untrained[0]) == ["epoch", "mean_top1"] and untrained[0]["epoch"] == "0"
    assert float(rows[-1]["mean_top1"]) >= 90 > float(untrained[0]["mean_top1"])
    assert float(rows[0]["loss"]) > float(rows[-1]["loss"])


def test_each_step_gets_two_views_of_its_documents_and_their_classes(ag_news, tmp_path,
                                                                     monkeypatch):
    fed = []
    monkeypatch.setattr(nlp, "train_step", lambda net, opt, scaler, x1, x2, labels, *rest:
                        fed.append((x1, x2, labels)) or {"loss": torch.tensor(1.0)})
    nlp.main(["--data_dir", ag_news, "--augmentation", "erase", "--mask_ratio", "0", *FAST,
              "--epochs", "2", "--eval_every", "0", "--out_dir", str(tmp_path)])
    vocab = nlp.build_vocab(nlp.read_ag_news(os.path.join(ag_news, "train.csv"))[0])
    texts, labels = nlp.read_ag_news(os.path.join(ag_news, "train.csv"))
    label_of = {tuple(nlp.encode([t], vocab)[0].tolist()): y for t, y in zip(texts, labels)}
    assert len(fed) == 10 and all(x1.shape[0] == 32 for x1, _, _ in fed)
    for epoch in (fed[:5], fed[5:]):
        seen = []
        for x1, x2, y in epoch:
            assert torch.equal(x1, x2)  # mask_ratio 0: both views are the document
            docs = [tuple(row[row != len(vocab)].tolist()) for row in x1]
            assert [label_of[d] for d in docs] == y.tolist()
            seen += docs
        assert len(set(seen)) == 160  # each document once an epoch
    assert [d for d in fed[0][0].tolist()] != [d for d in fed[5][0].tolist()]  # reshuffled


def test_the_script_feeds_the_mean_classifier_augmented_train_and_clean_test(ag_news, tmp_path,
                                                                             monkeypatch):
    fed, real = [], nlp.mean_classifier

    def recording(embed, *args, **kwargs):
        return real(lambda x: fed.append(x.clone()) or embed(x), *args, **kwargs)

    monkeypatch.setattr(nlp, "mean_classifier", recording)
    nlp.main(["--data_dir", ag_news, "--augmentation", "erase", *FAST, "--epochs", "0",
              "--out_dir", str(tmp_path)])
    vocab = torch.load(tmp_path / "last.pt", weights_only=True)["vocab"]
    clean = [[nlp.encode([t], vocab)[0] for t in nlp.read_ag_news(os.path.join(ag_news, f))[0]]
             for f in ("train.csv", "test.csv")]
    seen = [row[row != len(vocab)] for batch in fed for row in batch]  # padding id = len(vocab)
    assert len(seen) == len(clean[0]) + len(clean[1])
    train_seen, test_seen = seen[:len(clean[0])], seen[len(clean[0]):]
    assert all(is_subsequence(s.tolist(), d.tolist()) for s, d in zip(train_seen, clean[0]))
    assert sum(len(s) < len(d) for s, d in zip(train_seen, clean[0])) > 0.8 * len(clean[0])
    assert all(torch.equal(s, d) for s, d in zip(test_seen, clean[1]))


@pytest.mark.parametrize("flags", [["--augmentation", "erase", "--workers", "0"],
                                   ["--workers", "1", "--clean_text", "--subset", "128"]])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(flags, ag_news, word_vectors,
                                                                   tmp_path, monkeypatch):
    argv = ["--data_dir", ag_news, "--batch_size", "32", *flags, "--epochs", "2"]
    if "erase" not in flags:
        argv += ["--vectors", word_vectors]
    nlp.main([*argv, "--out_dir", str(tmp_path / "whole")])
    real, calls = nlp.end_epoch, []

    def interrupted(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(real(*args))

    monkeypatch.setattr(nlp, "end_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        nlp.main([*argv, "--out_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(nlp, "end_epoch", real)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    nlp.main(["--resume", str(tmp_path / "cut" / "last.pt"), "--epochs", "2"])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("cut", "whole"))
    assert a["epoch"] == b["epoch"] == 2 and a["args"]["out_dir"] == str(tmp_path / "cut")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    for key, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][key]["momentum_buffer"],
                           state["momentum_buffer"])
    assert torch.equal(a["rng"][0][0], b["rng"][0][0])
    assert (a["replace_ids"] is None) == ("erase" in flags)
    if "erase" not in flags:
        assert torch.equal(a["replace_ids"], b["replace_ids"])
    strip = [{k: v for k, v in r.items() if k not in TIME}
             for r in read_csv(tmp_path / "whole" / "metrics.csv")]
    assert [{k: v for k, v in r.items() if k not in TIME}
            for r in read_csv(tmp_path / "cut" / "metrics.csv")] == strip
    assert len(strip) == 2 and strip[1]["mean_top1"] != ""


def test_a_non_finite_loss_stops_and_keeps_the_last_good_epoch(ag_news, tmp_path, monkeypatch,
                                                               capsys):
    calls, real = [], nlp.nt_xent

    def nan_on_step_7(*args):
        calls.append(1)
        loss, logits, negative = real(*args)
        return (loss * math.nan if len(calls) == 7 else loss), logits, negative

    monkeypatch.setattr(nlp, "nt_xent", nan_on_step_7)
    argv = ["--data_dir", ag_news, "--augmentation", "erase", "--subset", "96",
            "--embedding_dim", "8", *FAST, "--epochs", "4", "--eval_every", "0",
            "--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        nlp.main(argv)  # 96 documents, 3 steps an epoch: the 7th step is in epoch 3
    assert exit_info.value.code == 1
    assert "non-finite loss in epoch 3" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["backbone"]["embedding.weight"].shape[1] == 8
    assert [r["epoch"] for r in read_csv(tmp_path / "metrics.csv")] == ["1", "2"]


# -------------------------------------------------------------------------------------------------
# Bad input: exit status 2 and exactly one line on stderr
# -------------------------------------------------------------------------------------------------

def assert_exit_2(argv, fragment, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        nlp.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("nlp_similar_words.py: error: "), err
    assert fragment in lines[0], (fragment, err)


@pytest.mark.parametrize("flags,fragment", [
    (["--mask_ratio", "1"], "--mask_ratio must be in [0, 1)"),
    (["--mask_ratio", "-0.1"], "--mask_ratio must be in [0, 1)"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--batch_size", "1"], "--batch_size must hold 2 or more"),
    (["--embedding_dim", "0"], "--embedding_dim must be > 0"),
    (["--momentum", "-1"], "--momentum must be in [0, 1)"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--epochs", "x"], "invalid int value"),
    (["--unknown"], "unrecognized arguments"),
    (["--augmentation", "swap"], "invalid choice"),
    (["--augmentation", "replace"], "needs --vectors FILE or --replace_ids FILE"),
    (["--vectors", "v.txt", "--replace_ids", "t.npy"], "not both"),
    (["--vectors", "v.txt"], "are for --augmentation replace"),
    (["--batch_size", "512"], "160 documents < --batch_size"),
    (["--min_freq", "1000"], "no word occurs 1000 times"),
    (["--augmentation", "replace", "--vectors", "/nowhere/v.txt"], "/nowhere/v.txt does not exist"),
])
def test_bad_flags(flags, fragment, ag_news, tmp_path, capsys):
    argv = ["--data_dir", ag_news, *FAST, "--out_dir", str(tmp_path), "--augmentation", "erase"]
    assert_exit_2([*argv, *flags], fragment, capsys)


def test_bad_data_files_and_tables(ag_news, tmp_path, capsys):
    erase = ["--augmentation", "erase", *FAST, "--out_dir", str(tmp_path / "out")]
    (tmp_path / "half").mkdir()
    write(tmp_path / "half" / "train.csv", open(os.path.join(ag_news, "train.csv")).read())
    assert_exit_2(["--data_dir", str(tmp_path / "half"), *erase], "half/test.csv does not exist",
                  capsys)
    assert_exit_2(["--data_dir", str(tmp_path), *erase], "train.csv does not exist", capsys)
    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "train.csv").write_bytes(b'"1","\xff\xfe","x"\n')
    assert_exit_2(["--data_dir", str(tmp_path / "bytes"), *erase], "not a UTF-8 CSV", capsys)
    write(tmp_path / "half" / "test.csv", '"1","a","b"\n"2","c"\n')
    assert_exit_2(["--data_dir", str(tmp_path / "half"), *erase], "line 2: 2 column(s)", capsys)
    replace = ["--data_dir", ag_news, *FAST, "--out_dir", str(tmp_path / "out")]
    for name, table in [("short", np.zeros((3, 5), dtype=np.int64)),
                        ("floats", np.zeros((36, 5))), ("beyond", np.full((36, 5), 36))]:
        np.save(tmp_path / f"{name}.npy", table)
        assert_exit_2([*replace, "--replace_ids", str(tmp_path / f"{name}.npy")],
                      "expected an int64 table [36, 5] of ids of this vocabulary", capsys)
    write(tmp_path / "junk.npy", "not numpy")
    assert_exit_2([*replace, "--replace_ids", str(tmp_path / "junk.npy")], "cannot use", capsys)
    assert_exit_2([*replace, "--replace_ids", str(tmp_path / "none.npy")], "cannot use", capsys)
    assert_exit_2([*replace, "--vectors", write(tmp_path / "v.txt", "the 0.1 0.2\nof 0.3\n")],
                  "line 2: 'of' has 1 values", capsys)
    assert_exit_2([*erase[:-1], str(tmp_path / "junk.npy" / "sub"), "--data_dir", ag_news],
                  "cannot write to --out_dir", capsys)


def test_bad_checkpoints(run3, ag_news, tmp_path, capsys):
    ckpt = torch.load(run3 / "last.pt", weights_only=True)
    out = ["--out_dir", str(tmp_path / "out")]

    def resume(name, state=None, *flags, fragment):
        if state is not None:
            torch.save(state, tmp_path / name)
        assert_exit_2(["--resume", str(tmp_path / name), *out, *flags], fragment, capsys)

    resume("missing.pt", fragment="no checkpoint at")
    (tmp_path / "bytes.pt").write_bytes(bytes(range(256)) * 4)
    resume("bytes.pt", fragment="is not a checkpoint (not written by torch.save, or damaged)")
    write(tmp_path / "text.pt", "epoch 3\n")
    resume("text.pt", fragment="is not a checkpoint (not written by torch.save, or damaged)")
    (tmp_path / "cut.pt").write_bytes((run3 / "last.pt").read_bytes()[:5000])
    resume("cut.pt", fragment="is not a checkpoint (not written by torch.save, or damaged)")
    resume("other.pt", dict(ckpt, script="simclr_debiased.py"),
           fragment="is not a checkpoint of nlp_similar_words.py")
    resume("list.pt", [1, 2], fragment="is not a checkpoint of nlp_similar_words.py")
    resume("partial.pt", {k: v for k, v in ckpt.items() if k not in ("history", "scaler")},
           fragment="lacks scaler, history")
    resume("novocab.pt", {k: v for k, v in ckpt.items() if k != "vocab"}, "--epochs", "4",
           fragment="not the vocabulary of the checkpoint")
    resume("notable.pt", dict(ckpt, replace_ids=None), "--epochs", "4",
           fragment="the checkpoint: expected an int64 table")
    model = dict(ckpt["model"], **{"projector.3.weight": torch.zeros(3, 3)})
    resume("shape.pt", dict(ckpt, model=model), "--epochs", "4",
           fragment="the checkpoint does not fit the model its arguments build")
    resume("two.pt", dict(ckpt, rng=ckpt["rng"] * 2), "--epochs", "4",
           fragment="ran on 2 process(es): resume it on as many")
    for epochs in ("3", "2"):
        resume("last.pt", ckpt, "--epochs", epochs, fragment="has trained 3 epochs")
    resume("last.pt", ckpt, "--epochs", "4", "--mask_ratio", "0.5",
           fragment="--mask_ratio: a resumed run keeps the checkpoint's values")
    other = tmp_path / "other_data"
    other.mkdir()
    for split in ("train.csv", "test.csv"):
        write(other / split, '"1","market shares","of the"\n' * 40)
    resume("last.pt", ckpt, "--epochs", "4", "--data_dir", str(other),
           fragment="not the vocabulary of the checkpoint")


def test_from_the_shell_import_has_no_side_effects(tmp_path):
    # One fresh interpreter: importing parses nothing, loads nothing and starts no process group;
    # then a bad vector file seen from the shell: exit 2, one line, no traceback.
    write(tmp_path / "train.csv", '"1","the of the of the of the","of of"\n' * 3)
    write(tmp_path / "test.csv", '"2","the","of"\n')
    code = ("import sys, nlp_similar_words as m; import torch.distributed as d; "
            "assert not d.is_initialized(); print(sorted(k for k in ('common', 'simclr_debiased') "
            "if k in sys.modules), flush=True); sys.argv[0] = 'nlp_similar_words.py'; m.main()")
    result = run_script("-c", code, "--data_dir", str(tmp_path), "--min_freq", "1",
                        "--batch_size", "2", "--out_dir", str(tmp_path),
                        "--vectors", write(tmp_path / "bad.vec", "the 0.1 0.2\nof 0.3\n"))
    assert result.stdout.strip() == "[]", result.stderr
    assert_one_line_error(result, "bad.vec line 2: 'of' has 1 values")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        nlp.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "GLOBAL batch" in out and "--mask_ratio" in out

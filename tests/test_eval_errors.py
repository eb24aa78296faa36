"""Every bad input to linear_eval.py and bound.py ends cleanly: exit status 2 and exactly one line
on stderr, `PROG: error: MESSAGE`, saying what is wrong in plain words (no traceback, no usage
dump, never torch's advice to load with weights_only=False); fp16 on a CPU is one warning line
and the run goes on; `bound.py coverage` takes no longer for 10^12 draws; outputs go where they
are pointed.

Each case runs the script as a user would, as `__main__` in its own process with its own stdout,
stderr and exit status. Starting Python and importing torch costs 4-8 s on the test machine, so
one driver process (started with conftest's run_script) imports torch once and forks a fresh
child per case, which runs the script file with runpy as `python SCRIPT ARGS` would (an uncaught
exception prints its traceback and exits 1, SystemExit gives the status)."""
import json
import math
import os
import shutil
from collections import namedtuple

import pytest
import torch

from conftest import ROOT, run_script
from test_linear_eval import class_embedding, image_checkpoint, text_checkpoint

DRIVER = r"""
import json, os, runpy, sys, time, traceback
import torch, torchvision  # noqa: F401  (the scripts' imports, once for every case)
import matplotlib.pyplot  # noqa: F401
import bound, linear_eval  # noqa: F401


def child(case):
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.update(case["env"])
    sys.argv, code = list(case["argv"]), 0
    try:
        runpy.run_path(case["argv"][0], run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        if not isinstance(exit.code, (int, type(None))):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


cases, results, running = json.load(open(sys.argv[1])), {}, {}
while cases or running:
    while cases and len(running) < int(sys.argv[3]):  # a few children at a time
        case = cases.pop(0)
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = (case, time.time())
    for pid, (case, start) in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done and time.time() - start > case["timeout"]:
            os.kill(pid, 9)
            done, status = os.waitpid(pid, 0)
            status = None
        if done:
            code = "timeout" if status is None else os.waitstatus_to_exitcode(status)
            results[case["id"]] = {"returncode": code, "seconds": time.time() - start}
            del running[pid]
    time.sleep(0.01)
json.dump(results, open(sys.argv[2], "w"))
"""

Outcome = namedtuple("Outcome", "returncode stdout stderr seconds")
QUICK = ["--workers", "0", "--batch_size", "16", "--feature_batch_size", "16", "--epochs", "1"]
BOUND = ["--passes", "1", "--num_augmentations", "1", "--feature_batch", "16"]

# id: (argv, fragments of the one stderr line). {name} is a path made by the `outcomes` fixture.
ERRORS = {
    # checkpoints: missing, not torch.save's, damaged, foreign objects, incomplete, wrong shapes
    "le_missing": (["linear_eval.py", "{d}/missing.pt"], ["{d}/missing.pt does not exist"]),
    "le_random": (["linear_eval.py", "{random}"],
                  ["{random} is not a checkpoint (not written by torch.save, or damaged)"]),
    "le_text": (["linear_eval.py", "{text}"], ["{text} is not a checkpoint"]),
    "le_truncated": (["linear_eval.py", "{truncated}"], ["{truncated} is not a checkpoint"]),
    "le_objects": (["linear_eval.py", "{objects}"],
                   ["{objects} holds Python objects other than tensors", "argparse.Namespace"]),
    "le_no_backbone": (["linear_eval.py", "{no_backbone}"], ["{no_backbone} lacks 'backbone'"]),
    "le_no_arch": (["linear_eval.py", "{no_arch}"], ["{no_arch} lacks args['arch']"]),
    "le_shape": (["linear_eval.py", "{shape}"],
                 ["{shape} does not fit the backbone its arguments describe: size mismatch for "
                  "conv1.weight"]),
    "le_head_shape": (["linear_eval.py", "{head_shape}"],
                      ["{head_shape} does not fit the projection head its layout describes: "
                       "size mismatch for linear2.weight"]),
    # corrupt images, in this process and in DataLoader workers
    "le_image_workers0": (["linear_eval.py", "{ckpt}", "--data_dir", "{truncated_images}",
                           *QUICK], ["cannot read image {truncated_image}"]),
    "le_image_workers2": (["linear_eval.py", "{ckpt}", "--data_dir", "{garbage_images}",
                           *QUICK, "--workers", "2"], ["cannot read image {garbage_image}"]),
    # schedules and other flag values
    "le_milestones_negative": (["linear_eval.py", "{ckpt}", "--protocol", "moco", "--milestones",
                                "-5"], ["--milestones must be epochs >= 1"]),
    "le_milestones_order": (["linear_eval.py", "{ckpt}", "--protocol", "moco", "--milestones",
                             "80", "60"], ["--milestones must increase"]),
    "le_milestones_beyond": (["linear_eval.py", "{ckpt}", "--protocol", "moco", "--milestones",
                              "100"], ["--milestones 100 is never reached in 100 epochs"]),
    "le_milestones_no_step": (["linear_eval.py", "{ckpt}", "--protocol", "dcl", "--milestones",
                               "5"], ["--milestones needs --schedule step"]),
    "le_lr_decay": (["linear_eval.py", "{ckpt}", "--lr_decay", "0"], ["--lr_decay must be in"]),
    "le_momentum": (["linear_eval.py", "{ckpt}", "--momentum", "1"], ["--momentum must be in"]),
    "le_lr": (["linear_eval.py", "{ckpt}", "--lr", "-1"], ["--lr must be finite and > 0"]),
    "le_lr_nan": (["linear_eval.py", "{ckpt}", "--lr", "nan"], ["--lr must be finite"]),
    "le_epochs": (["linear_eval.py", "{ckpt}", "--epochs", "0"], ["--epochs"]),
    "le_unknown": (["linear_eval.py", "{ckpt}", "--bogus"], ["unrecognized arguments: --bogus"]),
    "le_choice": (["linear_eval.py", "{ckpt}", "--protocol", "simclr"], ["invalid choice"]),
    "le_nesterov": (["linear_eval.py", "{ckpt}", "--optimizer", "adam", "--nesterov"],
                    ["--nesterov needs --optimizer sgd"]),
    "le_no_data": (["linear_eval.py", "{ckpt}", "--data_dir", "{d}/nowhere"], ["no images in"]),
    "le_no_csv": (["linear_eval.py", "{text_ckpt}", "--data_dir", "{d}"], ["train.csv"]),
    "le_out": (["linear_eval.py", "{ckpt}", "--out", "{d}/no/dir/e.json"], ["cannot write --out"]),
    "le_batch": (["linear_eval.py", "{ckpt}", "--batch_size", "128"],
                 ["make no full batch of 128"]),
    "le_crop_flip_text": (["linear_eval.py", "{text_ckpt}", "--augment", "crop_flip"],
                          ["--augment crop_flip needs an image checkpoint"]),
    # bound.py evaluate: the same checkpoints and images
    "bd_missing": (["bound.py", "evaluate", "--checkpoint", "{d}/missing.pt"],
                   ["{d}/missing.pt does not exist"]),
    "bd_random": (["bound.py", "evaluate", "--checkpoint", "{random}"],
                  ["{random} is not a checkpoint (not written by torch.save, or damaged)"]),
    "bd_text": (["bound.py", "evaluate", "--checkpoint", "{text}"], ["{text} is not a checkpoint"]),
    "bd_objects": (["bound.py", "evaluate", "--checkpoint", "{objects}"],
                   ["{objects} holds Python objects other than tensors"]),
    "bd_no_backbone": (["bound.py", "evaluate", "--checkpoint", "{no_backbone}"],
                       ["{no_backbone} lacks 'backbone'"]),
    "bd_shape": (["bound.py", "evaluate", "--checkpoint", "{shape}"],
                 ["{shape} does not fit the backbone its arguments describe: size mismatch"]),
    "bd_head_shape": (["bound.py", "evaluate", "--checkpoint", "{head_shape}"],
                      ["{head_shape} does not fit the projection head its layout describes"]),
    "bd_image_workers0": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--data_dir",
                           "{truncated_images}", "--workers", "0", *BOUND],
                          ["cannot read image {truncated_image}"]),
    "bd_image_workers2": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--data_dir",
                           "{garbage_images}", "--workers", "2", *BOUND],
                          ["cannot read image {garbage_image}"]),
    "bd_batch": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--batch", "33"],
                 ["fewer than one batch of K+1 = 33"]),
    "bd_out": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--out", "{d}/no/b.json"],
               ["cannot write --out"]),
    "bd_temperature": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--temperature", "0"],
                       ["--temperature must be finite and > 0"]),
    "bd_sub_classes": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--sub_classes", "0"],
                       ["argument --sub_classes: must be >= 1"]),
    "bd_too_many_sub_classes": (["bound.py", "evaluate", "--checkpoint", "{ckpt}", "--workers",
                                 "0", "--sub_classes", "17", *BOUND],
                                ["class 0 has 16 training items, fewer than --sub_classes 17"]),
    # bound.py's other commands
    "bd_no_command": (["bound.py"], ["the following arguments are required"]),
    "bd_no_draws": (["bound.py", "coverage", "--classes", "10"], ["--draws"]),
    "bd_draws": (["bound.py", "coverage", "--classes", "10", "--draws", "-3"],
                 ["--draws must be >= 0"]),
    "bd_probs": (["bound.py", "coverage", "--probs", "0.5", "0.4", "--draws", "3"],
                 ["sum to 0.9, not 1"]),
    "bd_classes": (["bound.py", "coverage", "--classes", "-4", "--draws", "3"], ["must be >= 1"]),
    "bd_pool": (["bound.py", "coverage", "--classes", "10", "--per_class", "2", "--draws", "30"],
                ["pool of 10 x 2"]),
    "bd_neither": (["bound.py", "coverage", "--draws", "3"], ["exactly one of"]),
    "bd_counts": (["bound.py", "table3", "--imagenet_counts", "{d}/counts.json"],
                  ["does not exist"]),
    "bd_plot_junk": (["bound.py", "plot", "{d}"], ["is not a bounds.json"]),
    "bd_plot_no_eval": (["bound.py", "plot", "{no_eval_run}", "--out", "{d}/f.png"],
                        ["linear_eval.py"]),
    "bd_plot_out": (["bound.py", "plot", "{plots}/k8", "--out", "{d}/no/f.png"],
                    ["cannot write --out"]),
    "bd_plot_markdown": (["bound.py", "plot", "{plots}/k8", "--markdown", "{d}/no/t.md"],
                         ["cannot write --markdown"]),
}
OTHERS = {  # id: argv, env
    "le_rank1": (["linear_eval.py", "{ckpt}", "--milestones", "-5"], {"RANK": "1"}),
    "bd_rank1": (["bound.py", "coverage", "--classes", "10"], {"RANK": "1"}),
    "le_help": (["linear_eval.py", "--help"], {}),
    "bd_help": (["bound.py", "evaluate", "--help"], {}),
    "le_fp16": (["linear_eval.py", "{ckpt}", *QUICK, "--precision", "fp16", "--out",
                 "{d}/fp16.json"], {}),
    "bd_huge": (["bound.py", "coverage", "--classes", "10", "--draws", "1000000000000"], {}),
    "bd_plot_default": (["bound.py", "plot", "{plots}/k8", "{plots}/k16"], {}),
}


def make_inputs(d, image_folder, ag_news):
    """The files the cases read: checkpoints good and bad, image folders with a broken image."""
    paths = {"d": str(d), "ckpt": image_checkpoint(d / "last.pt", image_folder)}
    good = torch.load(paths["ckpt"], weights_only=True)
    paths["text_ckpt"] = text_checkpoint(d / "text.pt", ag_news, class_embedding(), torch.eye(4))
    (d / "random.pt").write_bytes(os.urandom(3000))
    (d / "text.txt").write_text("epoch,loss\n1,0.5\n")
    (d / "truncated.pt").write_bytes(open(paths["ckpt"], "rb").read()[:5000])
    paths.update(random=str(d / "random.pt"), text=str(d / "text.txt"),
                 truncated=str(d / "truncated.pt"))

    def variant(name, change):
        ckpt = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        change(ckpt)
        torch.save(ckpt, d / f"{name}.pt")
        paths[name] = str(d / f"{name}.pt")

    import argparse
    variant("objects", lambda c: c.update(args=argparse.Namespace(**c["args"])))  # main_moco's way
    variant("no_backbone", lambda c: c.pop("backbone"))
    variant("no_arch", lambda c: c["args"].pop("arch"))
    variant("shape", lambda c: c["backbone"].update({"conv1.weight": torch.zeros(8, 3, 3, 3)}))
    variant("head_shape", lambda c: c["head"].update(state=dict(
        c["head"]["state"], **{"linear2.weight": torch.zeros(8, 15)})))
    for kind, split, name in (("truncated", "train", "class1/3.png"),
                              ("garbage", "train", "class0/0.png")):
        folder = d / f"{kind}_images"
        shutil.copytree(image_folder, folder)
        image = folder / split / name
        data = image.read_bytes()
        image.write_bytes(data[:len(data) // 2] if kind == "truncated" else os.urandom(len(data)))
        paths[f"{kind}_images"], paths[f"{kind}_image"] = str(folder), str(image)
    # plot inputs: two runs with bounds.json and eval_nozawa.json, one without its eval file
    table = {"tau": 0.9, "upsilon": 0.5, "ln_curl_upper_bound": 3.0, "ln_upper_bound": 2.0,
             "ln_upper_bound_theorem": 1.5}
    for name, k in (("plots/k8", 8), ("plots/k16", 16), ("lonely/k8", 8)):
        (d / name).mkdir(parents=True)
        (d / name / "bounds.json").write_text(json.dumps({"table": table,
                                                          "settings": {"k_plus_1": k}}))
        if not name.startswith("lonely"):
            (d / name / "eval_nozawa.json").write_text(json.dumps({"linear": {"top1": 50.0}}))
    paths.update(plots=str(d / "plots"), no_eval_run=str(d / "lonely" / "k8"))
    return paths


def fill(value, paths):
    return value.format(**paths) if isinstance(value, str) else value


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, image_folder, ag_news):
    d = tmp_path_factory.mktemp("bad")
    paths = make_inputs(d, image_folder, ag_news)
    cases, expected = [], {}
    for case_id, (argv, env) in {**{k: (v[0], {}) for k, v in ERRORS.items()}, **OTHERS}.items():
        cases.append({"id": case_id, "argv": [fill(a, paths) for a in argv], "env": env,
                      "stdout": str(d / f"{case_id}.out"), "stderr": str(d / f"{case_id}.err"),
                      "timeout": 60})
    for case_id, (_, fragments) in ERRORS.items():
        expected[case_id] = [fill(f, paths) for f in fragments]
    (d / "cases.json").write_text(json.dumps(cases))
    before = set(os.listdir(ROOT))
    result = run_script("-c", DRIVER, str(d / "cases.json"), str(d / "results.json"),
                        str(os.cpu_count() or 1), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((d / "results.json").read_text())
    out = {c["id"]: Outcome(results[c["id"]]["returncode"], open(c["stdout"]).read(),
                            open(c["stderr"]).read(), results[c["id"]]["seconds"])
           for c in cases}
    new_in_root = {f for f in set(os.listdir(ROOT)) - before
                   if f.endswith((".png", ".md", ".json"))}
    return out, expected, paths, new_in_root


def stderr_lines(outcome):
    return [line for line in outcome.stderr.splitlines() if line.strip()]


def assert_one_line_error(outcome, prog, fragments, sub=None):
    """Exit status 2, no traceback, exactly ONE non-empty stderr line `PROG: error: ...` holding
    every fragment, and never torch's advice to load with weights_only=False."""
    lines = stderr_lines(outcome)
    assert outcome.returncode == 2, outcome
    assert "Traceback" not in outcome.stderr and len(lines) == 1, outcome.stderr[-3000:]
    assert lines[0].startswith(prog) and ": error: " in lines[0], lines
    assert lines[0].split(": error: ")[0] in (prog, f"{prog} {sub}"), lines
    assert "weights_only" not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case_id", list(ERRORS))
def test_bad_input_is_one_line_and_exit_status_2(outcomes, case_id):
    out, expected, _, _ = outcomes
    prog = "linear_eval.py" if case_id.startswith("le_") else "bound.py"
    argv = ERRORS[case_id][0]
    sub = argv[1] if prog == "bound.py" and len(argv) > 1 else None  # bound.py coverage: error
    assert_one_line_error(out[case_id], prog, expected[case_id], sub)


def test_under_torchrun_only_rank_0_prints(outcomes):
    out = outcomes[0]
    for case_id in ("le_rank1", "bd_rank1"):
        assert out[case_id].returncode == 2 and out[case_id].stderr == "", out[case_id]


def test_help_still_prints_the_usage(outcomes):
    out = outcomes[0]
    for case_id, prog in (("le_help", "linear_eval.py"), ("bd_help", "bound.py evaluate")):
        assert out[case_id].returncode == 0 and out[case_id].stderr == "", out[case_id]
        assert out[case_id].stdout.startswith(f"usage: {prog} ")
        assert "--checkpoint" in out[case_id].stdout or "checkpoint" in out[case_id].stdout


def test_fp16_on_a_cpu_warns_in_one_line_and_runs(outcomes):
    out, _, paths, _ = outcomes
    lines = stderr_lines(out["le_fp16"])
    assert out["le_fp16"].returncode == 0, out["le_fp16"]
    assert len(lines) == 1 and lines[0].startswith("linear_eval.py: warning: --precision fp16 "
                                                   "on a CPU"), lines
    assert json.loads(open(os.path.join(paths["d"], "fp16.json")).read())["linear"]["epoch"] == 1


def test_coverage_of_10_to_the_12_draws_is_immediate(outcomes):
    # An exact sum over 10^12 draws would never end (the case is killed after 60 s). Expected:
    # upsilon = 1 - 10 (9/10)^(10^12 - 1) rounds to 1 and so does tau = 1 - (9/10)^K; Col ~
    # Binomial(K, 1/10) with K = 10^12 - 1 has mean mu = K / 10, and by the delta method
    # E ln(1 + Col) = ln(1 + mu) - K (1/10)(9/10) / (2 (1 + mu)^2) + ..., the correction ~5e-12.
    out = outcomes[0]["bd_huge"]
    assert out.returncode == 0 and out.seconds < 30, out
    row = out.stdout.splitlines()[-1].split()
    mu = (10 ** 12 - 1) / 10
    assert row == ["1000000000000", "1", "0", "0", "1", f"{math.log1p(mu):.8g}"], row


def test_plot_writes_next_to_the_runs_not_into_the_repository(outcomes):
    out, _, paths, new_in_root = outcomes
    assert out["bd_plot_default"].returncode == 0, out["bd_plot_default"]
    figure = os.path.join(paths["plots"], "figure1.png")
    assert os.path.getsize(figure) > 1000 and f"wrote {figure}" in out["bd_plot_default"].stdout
    assert not new_in_root, new_in_root  # nothing written into the repository's root

"""The benchmarks keep running against the training scripts: benchmarks/gpu_report.py --quick (which
drives overhead.py, augment.py and losses.py) and the other benchmarks at tiny sizes, in this
process. Every part must write its CSV with finite positive numbers. Speed is never checked."""
import csv
import importlib
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
gpu_report = importlib.import_module("gpu_report")
overhead = importlib.import_module("overhead")

METHODS = ["SimCLR", "DCL", "HCL", "MoCo", "MoCHi", "IR", "Ring-IR", "MoCo (ring_nce)", "Ring-MoCo",
           "CMC", "Ring-CMC", "NNCLR", "KMCLR"]
LOSSES = ["NT-Xent", "DCL", "HCL", "MoCo", "MoCHi", "MoCo (ring_nce)", "Ring-MoCo", "IR", "Ring-IR",
          "NNCLR", "KMCLR"]
# part -> the columns that must hold a finite positive number in every row
POSITIVE = {
    "methods": ["images_per_sec", "pil_images_per_sec", "step_ms", "baseline_ms", "overhead",
                "monitor_call_pct"],
    "augment": ["median_views_per_s"],
    "losses": ["ms", "vs_ntxent"],
    "amp": ["loss", "loss_fp32", "loss_rel_diff", "grad_norm", "grad_norm_fp32",
            "grad_norm_rel_diff", "grad_rel_err"],
    "learning": ["epochs", "train_s", "images_per_sec", "loss", "knn_top1", "untrained_knn_top1"],
    "compile": ["images_per_sec", "first_epoch_s", "wall_s"],
}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def positive(row, columns):
    return all(row[c] and math.isfinite(float(row[c])) and float(row[c]) > 0 for c in columns)


def test_gpu_report_quick(tmp_path, capsys):
    """Every part writes its CSV (all methods and losses, fp16 and TF32 skipped with a note on a
    CPU), report.md a section per part, log.txt the progress."""
    out = tmp_path / "report"
    outcome = gpu_report.main(["--quick", "--out", str(out), "--budget_s", "1000"])
    assert {part: state for part, (state, _) in outcome.items()} == {p: "done" for p in POSITIVE}
    tables = {part: read_csv(out / f"{part}.csv") for part in POSITIVE}
    assert [r["method"] for r in tables["methods"]] == METHODS
    assert all(r["peak_mem_mb"] == "" and math.isfinite(float(r["monitor_pct"]))
               for r in tables["methods"])  # the stub's difference: noise may make it negative
    assert [r["loss"] for r in tables["losses"]] == LOSSES
    assert [r["precision"] for r in tables["amp"]] == ["tf32", "bf16", "fp16"] * 2
    skipped = [r for r in tables["amp"] if r["note"].startswith("skipped")]
    assert [r["precision"] for r in skipped] == ["tf32", "fp16"] * 2
    tables["amp"] = [r for r in tables["amp"] if r not in skipped]
    assert [r["method"] for r in tables["learning"]] == ["DCL", "MoCo"]
    assert [(r["method"], r["compile"]) for r in tables["compile"]] == [
        ("SimCLR", "off"), ("SimCLR", "on"), ("MoCo", "off"), ("MoCo", "on")]
    for part, rows in tables.items():
        assert rows and all(positive(r, POSITIVE[part]) for r in rows), (part, rows)
    report = (out / "report.md").read_text()
    assert all(f"## {part}\n\ndone in " in report for part in POSITIVE)
    assert "torch " + torch.__version__ in report and "--quick" in report
    log = (out / "log.txt").read_text()
    printed = capsys.readouterr().out
    assert "methods: done" in log and "compile: done" in log
    assert all(line in printed for line in log.splitlines())


def test_gpu_report_goes_on_after_a_failure(tmp_path, monkeypatch):
    """A part that raises is logged and reported; the parts after it run; a part whose time is
    spent before it starts writes no CSV."""
    def broken(*args):
        raise RuntimeError("no GPU today")

    monkeypatch.setitem(gpu_report.PARTS, "amp", broken)
    out = tmp_path / "report"
    outcome = gpu_report.main(["--quick", "--out", str(out), "--budget_s", "0",
                               "--parts", "amp", "methods", "losses"])
    assert outcome["amp"][0] == "FAILED: RuntimeError: no GPU today"
    assert outcome["methods"][0] == "no rows; skipped: " + ", ".join(METHODS)
    assert not (out / "methods.csv").exists()
    assert outcome["losses"][0] == "done" and read_csv(out / "losses.csv")
    assert "FAILED: RuntimeError: no GPU today" in (out / "report.md").read_text()
    assert "Traceback" in (out / "log.txt").read_text()
    with pytest.raises(SystemExit):  # the GPU run needs the data
        gpu_report.main(["--out", str(out)])


def test_overhead_main(tmp_path, capsys):
    path = tmp_path / "overhead.csv"
    overhead.main(["--quick", "--device", "cpu", "--methods", "Ring-CMC", "--csv", str(path)])
    rows = read_csv(path)
    assert [r["method"] for r in rows] == ["Ring-CMC"] and rows[0]["pil_images_per_sec"] == ""
    assert positive(rows[0], POSITIVE["methods"][:1] + POSITIVE["methods"][2:]), rows
    assert "| Ring-CMC |" in capsys.readouterr().out
    assert overhead.method_flags("MoCHi", overhead.SIZES["quick"]) == [
        "--start1_hard", "0", "--start2_hard", "0", "--queue_size", "256", "--n_hard", "64"]


def test_ring_cost(tmp_path):
    ring_cost = importlib.import_module("ring_cost")
    rows = ring_cost.main(["--quick", "--csv", str(tmp_path / "ring.csv")])
    assert [(r["pool"], r["variant"]) for r in read_csv(tmp_path / "ring.csv")] == [
        (pool, v) for pool, first in (("queue", "infonce"), ("bank", "ir_uniform"))
        for v in (first, "ring_topk", "ring_sort")]
    assert all(r["median_ms"] > 0 for r in rows) and torch.get_num_threads() == 1


def test_augment_quick(tmp_path, capsys):
    """benchmarks/augment.py --quick, in this process (its DataLoader workers are forked from
    it)."""
    augment = importlib.import_module("augment")
    path = tmp_path / "augment.csv"
    rows = augment.main(["--quick", "--csv", str(path)])
    lines = path.read_text().splitlines()
    assert lines[0].startswith("path,") and len(lines) == len(rows) + 1 >= 4
    out = capsys.readouterr().out
    assert "PIL per image" in out and "batched" in out
    assert torch.get_num_threads() == 1  # restored

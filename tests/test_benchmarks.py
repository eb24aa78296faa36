"""benchmarks/overhead.py and benchmarks/losses.py --quick, in this process: they must keep running
against the training scripts (one row per method, positive finite numbers). No timing is checked."""
import csv
import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def positive_finite(row, columns):
    return all(math.isfinite(float(row[c])) and float(row[c]) > 0 for c in columns)


def test_overhead_quick(tmp_path, capsys):
    bench = load("overhead")
    out = tmp_path / "overhead.csv"
    bench.main(["--quick", "--device", "cpu", "--csv", str(out)])
    rows = read_csv(out)
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for r in rows:
        assert positive_finite(r, ["images_per_sec", "step_ms", "baseline_ms", "overhead", "aug_ms"]), r
        assert r["device"] == "cpu" and r["dtype"] == "fp32"
        moco_type = r["method"] in ("MoCo", "MoCHi", "MoCo (ring_nce)", "Ring-MoCo")
        assert (r["key_fwd_ms"] != "") == moco_type and (not moco_type or positive_finite(r, ["key_fwd_ms"])), r
    table = capsys.readouterr().out
    assert "overhead" in table and all(name in table for name in bench.METHODS)


def test_losses_quick(tmp_path, capsys):
    bench = load("losses")
    out = tmp_path / "losses.csv"
    bench.main(["--quick", "--device", "cpu", "--csv", str(out)])
    rows = read_csv(out)
    assert [r["loss"] for r in rows] == ["NT-Xent", "SimCLR", "DCL", "HCL", "MoCo", "MoCHi", "MoCo (ring_nce)",
                                         "Ring-MoCo", "IR", "Ring-IR", "NNCLR", "NNCLR (step)", "KMCLR"]
    assert all(positive_finite(r, ["ms", "vs_ntxent"]) for r in rows), rows
    assert float(rows[0]["vs_ntxent"]) == pytest.approx(1.0)
    assert "x NT-Xent" in capsys.readouterr().out

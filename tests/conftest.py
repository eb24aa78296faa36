"""Shared test fixtures: the repository root on sys.path and the offline data of ../shared/data."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
CIFAR = os.path.join(DATA, "cifar10")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run tiny models in this process: one intra-op thread is as fast as two there, and
    on a busy 2-core machine two threads spend most of their time synchronising (an evaluation
    took 15.7 s with 2 threads, 1.0 s with 1). Scripts run by `run_script` keep their defaults."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar_dir():
    if not os.path.isdir(os.path.join(CIFAR, "train")):
        pytest.fail(f"the offline CIFAR-10 subset is missing: expected {CIFAR}/train/<class>/*.jpg")
    return CIFAR


def run_script(*args, timeout=600, env=None):
    """Run a script of the repository as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def assert_one_line_error(result, *fragments):
    """Exit status 2 and no traceback; the message is one line `PROG: error: ...` containing every
    fragment, preceded at most by argparse's usage text."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines and ": error: " in lines[-1], result.stderr[-2000:]
    assert len(lines) == 1 or lines[0].startswith("usage:"), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])

"""Two gloo processes on the CPU give the same loss, gradients and kNN numbers as one process on
the whole batch (the copies of the gathers and the kNN monitor are the same in every script)."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simclr_debiased import concat_all_gather, contrastive_loss, gather_with_grad, knn_monitor
from test_copies import Identity, Vectors

WORLD = 2
SETTINGS = [(0.1, 1.0, 0.5), (0.0, 0.0, 0.5), (0.1, 0.0, 0.2), (0.3, 6.0, 0.1)]


def batch(seed=0, b=8, d=16):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)


def knn_data(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 37 if seed == 0 else 23)
    return Vectors(rng.normal(size=(len(y), 5)) + y[:, None], y)  # 37 and 23 rows: uneven over 2 ranks


def far_data():
    """3 bank points of class 1 and one test point of class 1 facing away from all of them: its
    nearest neighbour has similarity -1, so a padding row (zeros, similarity 0) must never vote.
    With 2 processes the bank is padded by one row and one process has no test point at all."""
    bank = np.eye(5)[[0, 1, 2]] + 0.1
    return Vectors(bank, [1, 1, 1]), Vectors(-bank[:1] - 0.5, [1])


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {"losses": [], "grads": [], "local": []}
    z1, z2 = batch()
    rows = slice(rank * 4, rank * 4 + 4)
    for tau_plus, beta, t in SETTINGS:
        a, b = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
        loss = contrastive_loss(a, b, t, tau_plus, beta)
        loss.backward()
        results["losses"].append(loss.item())
        results["grads"].append((a.grad, b.grad))
        results["local"].append(contrastive_loss(z1[rows], z2[rows], t, tau_plus, beta, gather=False).item())
    results["no_grad"] = concat_all_gather(torch.full((2,), float(rank)))
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    (gather_with_grad(x) * torch.arange(4.0)[:, None]).sum().backward()  # row r of the gathered batch weighs r
    results["gather_grad"] = x.grad
    results["knn"] = knn_monitor(Identity(), knn_data(0), knn_data(1), 5, 0.1, 4, 0, torch.device("cpu"), None)
    results["knn_far"] = knn_monitor(Identity(), *far_data(), 1, 0.1, 4, 0, torch.device("cpu"), None)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_loss_and_gradients_equal_one_process(ranks, setting):
    tau_plus, beta, t = SETTINGS[setting]
    z1, z2 = batch()
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    single = contrastive_loss(z1, z2, t, tau_plus, beta)
    single.backward()
    assert sum(r["losses"][setting] for r in ranks) / WORLD == pytest.approx(single.item(), rel=1e-12)
    for rank, result in enumerate(ranks):
        g1, g2 = result["grads"][setting]
        rows = slice(rank * 4, rank * 4 + 4)
        # DDP averages gradients over processes: grad / world must equal the single-process gradient
        torch.testing.assert_close(g1 / WORLD, z1.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g2 / WORLD, z2.grad[rows], rtol=1e-10, atol=1e-14)


def test_local_negatives_use_only_own_batch(ranks):
    z1, z2 = batch()
    tau_plus, beta, t = SETTINGS[0]
    for rank, result in enumerate(ranks):
        rows = slice(rank * 4, rank * 4 + 4)
        assert result["local"][0] == pytest.approx(contrastive_loss(z1[rows], z2[rows], t, tau_plus, beta).item(), rel=1e-12)
        assert result["local"][0] != pytest.approx(result["losses"][0], rel=1e-3)


def test_gathers(ranks):
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["no_grad"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        # both ranks' losses reach this rank's rows: the summed weight of its rows, times the world
        torch.testing.assert_close(result["gather_grad"], torch.tensor([2 * rank, 2 * rank + 1.0])[:, None].expand(2, 3) * WORLD)


def test_knn_monitor_equals_one_process(ranks):
    single = knn_monitor(Identity(), knn_data(0), knn_data(1), 5, 0.1, 4, 0, torch.device("cpu"), None)
    for result in ranks:
        assert result["knn"] == pytest.approx(single, abs=1e-9)
        assert result["knn_far"] == (100.0, 100.0)
    assert 0 < single[0] <= single[1] <= 100
    assert knn_monitor(Identity(), *far_data(), 1, 0.1, 4, 0, torch.device("cpu"), None) == (100.0, 100.0)

"""Two gloo processes on the CPU give the same losses, gradients and kNN numbers as one process on
the whole batch (spec simclr_debiased.md 7.1)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from simclr_debiased import contrastive_loss

WORLD = 2
SETTINGS = [("hard", 0.1, 1.0, 0.5), ("hard", 0.0, 0.0, 0.5), ("hard", 0.1, 0.0, 0.2), ("easy", 0.0, 0.0, 0.5),
            ("hard", 0.3, 6.0, 0.1)]


def batch(seed=0, b=8, d=16):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)


class Labelled(torch.utils.data.Dataset):
    """A tiny labelled data set of feature vectors (the 'encoder' is the identity)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 4, (n,), generator=g).tolist()
        centres = torch.randn(4, 6, generator=g)
        self.x = centres[self.targets] + 0.8 * torch.randn(n, 6, generator=g)
        self.classes = list("abcd")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {"losses": [], "grads": [], "local": []}
    z1, z2 = batch()
    rows = slice(rank * 4, rank * 4 + 4)
    for estimator, tau_plus, beta, t in SETTINGS:
        a, b = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
        loss = contrastive_loss(a, b, t, tau_plus, beta, estimator)
        loss.backward()
        results["losses"].append(loss.item())
        results["grads"].append((a.grad, b.grad))
        results["local"].append(contrastive_loss(z1[rows], z2[rows], t, tau_plus, beta, estimator, gather=False).item())
    x = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)[rank::WORLD]  # a strided split of 5 rows
    results["in_order"] = common.gather_in_order(x, 5)
    results["no_grad"] = common.all_gather_no_grad(torch.full((2,), float(rank)))
    info = common.Distributed(rank, rank, WORLD, torch.device("cpu"))
    results["knn"] = common.knn_monitor(torch.nn.Identity(), Labelled(37, 0), Labelled(23, 1), info, k=5,
                                        temperature=0.1, batch_size=4)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_loss_and_gradients_equal_one_process(ranks, setting):
    estimator, tau_plus, beta, t = SETTINGS[setting]
    z1, z2 = batch()
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    single = contrastive_loss(z1, z2, t, tau_plus, beta, estimator)
    single.backward()
    mean_loss = sum(r["losses"][setting] for r in ranks) / WORLD
    assert mean_loss == pytest.approx(single.item(), rel=1e-12)
    for rank, result in enumerate(ranks):
        g1, g2 = result["grads"][setting]
        rows = slice(rank * 4, rank * 4 + 4)
        # DDP averages gradients over processes: grad / world must equal the single-process gradient
        torch.testing.assert_close(g1 / WORLD, z1.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g2 / WORLD, z2.grad[rows], rtol=1e-10, atol=1e-14)


def test_local_negatives_use_only_own_batch(ranks):
    z1, z2 = batch()
    for rank, result in enumerate(ranks):
        rows = slice(rank * 4, rank * 4 + 4)
        estimator, tau_plus, beta, t = SETTINGS[0]
        assert result["local"][0] == pytest.approx(contrastive_loss(z1[rows], z2[rows], t, tau_plus, beta, estimator).item(), rel=1e-12)
        assert result["local"][0] != pytest.approx(result["losses"][0], rel=1e-3)


def test_gathers(ranks):
    for result in ranks:
        torch.testing.assert_close(result["in_order"], torch.arange(15, dtype=torch.float32).view(5, 3))
        torch.testing.assert_close(result["no_grad"], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_knn_monitor_equals_one_process(ranks):
    single = common.knn_monitor(torch.nn.Identity(), Labelled(37, 0), Labelled(23, 1),
                                common.Distributed(0, 0, 1, torch.device("cpu")), k=5, temperature=0.1, batch_size=4)
    for result in ranks:
        assert result["knn"] == pytest.approx(single, abs=1e-9)
    assert 0 < single[0] <= single[1] <= 100

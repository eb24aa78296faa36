"""Two gloo processes on the CPU give the same losses, gradients and negatives monitor as one
process on the whole batch; the harness's gathers and epoch statistics sum over processes and its
kNN monitor runs on rank 0 alone (the harness is the same in every training script)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import simclr_debiased as sd
from test_copies import knn

WORLD = 2
SETTINGS = [(0.1, 1.0, 0.5), (0.0, 0.0, 0.5), (0.1, 0.0, 0.2), (0.3, 6.0, 0.1)]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])


def batch(seed=0, b=8, d=16):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)


def monitor(z1, z2, labels, beta=1.0):
    """What train_step records for one chunk with global negatives: negative_rates over the step's
    logits, gathered labels as the columns' classes."""
    _, _, logits, negative = sd.contrastive_loss_terms(z1, z2, 0.5, 0.1, beta)
    y, ys = labels.repeat(2), sd.gather(labels).repeat(2)
    return {"loss": torch.tensor(0.0), **sd.negative_rates(logits.detach(), negative, y, ys)}


def bn_free_step(flags, rows, wrap=lambda m: m):
    """simclr_debiased.train_step on images[rows] with the script's optimizer, on a model whose
    backbone and head have no BatchNorm (per-process batch statistics would differ from one
    process's on the whole batch): (epoch statistics, parameters after the step)."""
    args = sd.get_parser().parse_args(["--feature_dim", "6", *flags])
    torch.manual_seed(0)
    model = sd.SimCLR(args)
    model.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    model.projector = torch.nn.Linear(10, 6)
    model.double()
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64)
    x2 = x1 + 0.2 * torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64)
    optimizer = sd.make_optimizer(model, args, torch.device("cpu"))
    stats = sd.train_step(wrap(model), optimizer, torch.amp.GradScaler("cpu", enabled=False), x1[rows],
                          x2[rows], LABELS[rows], args, None)
    return sd.epoch_stats([stats]), model.state_dict()


STEP_FLAGS = [["--tau_plus", "0.1", "--beta", "1"], ["--optimizer", "larc", "--num_chunks", "2",
                                                     "--tau_plus", "0", "--beta", "0"]]


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {"losses": [], "grads": [], "local": []}
    results["steps"] = [bn_free_step(f, slice(rank * 4, rank * 4 + 4), torch.nn.parallel.DistributedDataParallel)
                        for f in STEP_FLAGS]
    z1, z2 = batch()
    rows = slice(rank * 4, rank * 4 + 4)
    for tau_plus, beta, t in SETTINGS:
        a, b = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
        loss = sd.contrastive_loss(a, b, t, tau_plus, beta)
        loss.backward()
        results["losses"].append(loss.item())
        results["grads"].append((a.grad, b.grad))
        results["local"].append(sd.contrastive_loss(z1[rows], z2[rows], t, tau_plus, beta,
                                                    gather_negatives=False).item())
    results["ids"] = sd.gather(torch.full((2,), rank))
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    (sd.gather(x) * torch.arange(4.0)[:, None]).sum().backward()  # row r of the gathered batch weighs r
    results["gather_grad"] = x.grad
    # two steps of the negatives monitor: the second one's labels make rank 1's anchors unknown
    steps = [monitor(z1[rows], z2[rows], LABELS[rows]),
             monitor(z2[rows], z1[rows], torch.where(torch.arange(8) < 4, LABELS, -1)[rows])]
    results["epoch"] = sd.epoch_stats(steps)
    results["knn"] = knn([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]], [0, 1], [[1.0, 0.1, 0, 0, 0]], [0], 1, 0.1)
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
    single = sd.contrastive_loss(z1, z2, t, tau_plus, beta)
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
        own = sd.contrastive_loss(z1[rows], z2[rows], t, tau_plus, beta).item()
        assert result["local"][0] == pytest.approx(own, rel=1e-12)
        assert result["local"][0] != pytest.approx(result["losses"][0], rel=1e-3)


def test_gathers(ranks):
    for rank, result in enumerate(ranks):
        assert result["ids"].tolist() == [0, 0, 1, 1]
        # both ranks' losses reach this rank's rows: the summed weight of its rows, times the world
        expected = torch.tensor([2 * rank, 2 * rank + 1.0])[:, None].expand(2, 3) * WORLD
        torch.testing.assert_close(result["gather_grad"], expected)


def test_negatives_monitor_is_global(ranks):
    """Counts add up over processes: the epoch's rates equal one process's on the whole batch,
    also when the processes have different numbers of labelled anchors."""
    z1, z2 = batch()
    single = sd.epoch_stats([monitor(z1, z2, LABELS),
                             monitor(z2, z1, torch.where(torch.arange(8) < 4, LABELS, -1))])
    for result in ranks:
        assert result["epoch"] == pytest.approx(single, rel=1e-12)


def test_knn_monitor_runs_on_rank_zero_alone(ranks):
    assert ranks[0]["knn"] == {"knn_top1": 100.0, "knn_top5": 100.0} and ranks[1]["knn"] == {}


@pytest.mark.parametrize("setting", range(len(STEP_FLAGS)))
def test_one_step_of_the_loop_equals_one_process(ranks, setting):
    """train_step under DDP with gathered negatives (and with --num_chunks 2 = one chunk per
    process, Nozawa & Sato's local negatives): the same loss, monitor and parameters after the
    step as one process on the whole batch."""
    stats, params = bn_free_step(STEP_FLAGS[setting], slice(0, 8))
    for result in ranks:
        theirs, their_params = result["steps"][setting]
        assert theirs == pytest.approx(stats, rel=1e-10)
        for name in params:
            torch.testing.assert_close(their_params[name], params[name], rtol=1e-9, atol=1e-12)

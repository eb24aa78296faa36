"""nlp_similar_words.py in two gloo processes on the CPU: NT-Xent over the gathered global batch
gives the one-process loss and gradients, and the script's torchrun code path runs end to end."""
import csv
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nlp_similar_words as nlp

WORLD, B = 2, 6


def views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randn(B, 5, generator=g, dtype=torch.float64)


def worker(rank, out_dir, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    z1, z2 = views()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    a, b = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
    loss = nlp.nt_xent(a, b, 0.5)
    loss.backward()
    local = nlp.nt_xent(z1[rows], z2[rows], 0.5, gather=False)
    torch.save({"loss": loss.item(), "local": local.item(), "grads": (a.grad, b.grad)}, f"{out_dir}/rank{rank}.pt")
    nlp.main(argv)  # joins the existing process group, trains, destroys it


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, ag_news):
    out = tmp_path_factory.mktemp("nlp_ddp")
    argv = ["--data_dir", ag_news, "--augmentation", "erase", "--batch_size", "32", "--workers", "0", "--epochs", "1",
            "--out_dir", str(out / "run")]
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once, before the fork
    mp.start_processes(worker, args=(str(out), argv), nprocs=WORLD, start_method="fork")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gathered_loss_and_gradients_equal_one_process(ranks):
    z1, z2 = (z.requires_grad_(True) for z in views())
    single = nlp.nt_xent(z1, z2, 0.5)
    single.backward()
    results = ranks[1]
    assert sum(r["loss"] for r in results) / WORLD == pytest.approx(single.item(), rel=1e-12)
    for rank, r in enumerate(results):
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        # DDP averages gradients over processes: grad / world must equal the one-process gradient
        torch.testing.assert_close(r["grads"][0] / WORLD, z1.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r["grads"][1] / WORLD, z2.grad[rows], rtol=1e-10, atol=1e-14)
        assert r["local"] != pytest.approx(r["loss"], rel=1e-3)  # the gather did add negatives


def test_two_process_run(ranks):
    out = ranks[0] / "run"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["epoch"] == 1
    assert not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])  # seed offset by rank
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0 < float(rows[0]["loss"]) < 10 and 25 < float(rows[0]["mean_top1"]) <= 100

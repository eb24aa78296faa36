"""nlp_similar_words.py in two gloo processes on the CPU: NT-Xent over the gathered global batch
gives the one-process loss and gradients; one train_step under DDP gives the one-process step and
epoch statistics (loss, fn_rate, fn_rate_hard: global); the script's torchrun path runs end to
end."""
import csv

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nlp_similar_words as nlp

WORLD, B, WORDS = 2, 8, 30


def views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 5, generator=g, dtype=torch.float64),
            torch.randn(B, 5, generator=g, dtype=torch.float64))


def documents():
    """Two views [B, 6] of B documents (padded with WORDS) and their classes."""
    g = torch.Generator().manual_seed(1)
    x1 = torch.randint(WORDS, (B, 6), generator=g)
    x2 = torch.where(torch.rand(B, 6, generator=g) < 0.2, WORDS, x1)
    return x1, x2, torch.tensor([0, 1, 2, 3, 0, 0, 1, -1])


def one_step(rows=slice(None)):
    """The model of seed 0 in eval mode (BatchNorm's running statistics: the same function of a
    document in any process), one train_step on `rows` of the documents, the epoch statistics."""
    args = nlp.get_parser().parse_args(["--augmentation", "erase", "--embedding_dim", "6",
                                        "--batch_size", str(B)])
    torch.manual_seed(0)
    model = nlp.ContrastiveFastText(WORDS, 6).eval()
    optimizer = nlp.make_optimizer(model, args, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 2.0
    net = nlp.distribute(model, model, args, torch.device("cpu"))
    x1, x2, labels = documents()
    step = nlp.train_step(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), x1[rows],
                          x2[rows], labels[rows], args, None)
    return nlp.epoch_stats([step]), model.state_dict()


def worker(rank, out_dir, argv):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD)
    z1, z2 = views()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    a, b = z1[rows].clone().requires_grad_(True), z2[rows].clone().requires_grad_(True)
    loss = nlp.nt_xent(a, b, 0.5)[0]
    loss.backward()
    local = nlp.nt_xent(z1[rows], z2[rows], 0.5, gather_negatives=False)[0]
    stats, state = one_step(rows)
    torch.save({"loss": loss.item(), "local": local.item(), "grads": (a.grad, b.grad),
                "stats": stats, "state": state}, f"{out_dir}/rank{rank}.pt")
    nlp.main(argv)  # joins the existing process group, trains, destroys it


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, ag_news):
    out = tmp_path_factory.mktemp("nlp_ddp")
    argv = ["--data_dir", ag_news, "--augmentation", "erase", "--batch_size", "32", "--workers",
            "0", "--epochs", "1", "--out_dir", str(out / "run")]
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo before the fork
    mp.start_processes(worker, args=(str(out), argv), nprocs=WORLD, start_method="fork")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_gathered_loss_and_gradients_equal_one_process(ranks):
    z1, z2 = (z.requires_grad_(True) for z in views())
    single = nlp.nt_xent(z1, z2, 0.5)[0]
    single.backward()
    results = ranks[1]
    assert sum(r["loss"] for r in results) / WORLD == pytest.approx(single.item(), rel=1e-12)
    for rank, r in enumerate(results):
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        # DDP averages gradients over processes: grad / world must equal the one-process gradient
        torch.testing.assert_close(r["grads"][0] / WORLD, z1.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r["grads"][1] / WORLD, z2.grad[rows], rtol=1e-10, atol=1e-14)
        assert r["local"] != pytest.approx(r["loss"], rel=1e-3)  # the gather did add negatives


def test_a_step_and_its_statistics_equal_one_process(ranks):
    stats, state = one_step()
    for r in ranks[1]:
        assert r["stats"].keys() == stats.keys() == {"loss", "fn_rate", "fn_rate_hard"}
        for name, value in stats.items():  # global negatives: the rates over the whole batch
            assert r["stats"][name] == pytest.approx(value, rel=1e-6), name
        for name, tensor in state.items():
            torch.testing.assert_close(r["state"][name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert 0 < stats["fn_rate"] < 1


def test_two_process_run(ranks):
    out = ranks[0] / "run"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["epoch"] == 1
    assert not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])  # seed offset by rank
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 25 < float(rows[0]["mean_top1"]) <= 100
    assert all(0 <= float(rows[0][k]) <= 1 for k in ("fn_rate", "fn_rate_hard"))

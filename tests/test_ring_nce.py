"""ring_nce.py's pieces: the ring loss against a float64 loop reference (spec ring_nce.md 8), the
memory-bank and queue updates (also under two gloo processes), the Lab conversion, the CMC export
and the benchmark's --quick mode."""
import copy
import math
import os
import runpy
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import ring_nce
from ring_nce import enqueue, ring_bounds, ring_nce_loss, rgb_to_lab, sampled_ring_nce_loss, update_bank

T = 0.07


def spec_inputs():
    """The inputs of spec 8.1."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    return q, k, torch.randn(64, 8, generator=g, dtype=torch.float64)


def reference(q, k, pool, t, lo, hi, draws=None):
    """One anchor at a time, python floats: sort the pool by similarity (most similar first), keep
    ranks [lo, hi) (or the ring positions `draws[i]`), -s+ + log(exp(s+) + sum exp(ring))."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]
    total = 0.0
    for i, (qi, ki) in enumerate(zip(q.tolist(), k.tolist())):
        qi, ki = unit(qi), unit(ki)
        pos = sum(a * b for a, b in zip(qi, ki)) / t
        sims = sorted((sum(a * b for a, b in zip(qi, unit(c))) / t for c in pool.tolist()), reverse=True)
        ring = sims[lo:hi] if draws is None else [sims[lo:hi][j] for j in draws[i]]
        m = max([pos] + ring)
        total += -pos + m + math.log(math.exp(pos - m) + sum(math.exp(s - m) for s in ring))
    return total / len(q)


def test_spec_inputs_and_vectors():
    q, k, pool = spec_inputs()
    assert q[0, 0].item() == pytest.approx(-2.3104118) and q.sum().item() == pytest.approx(-8.5751984)
    assert k.sum().item() == pytest.approx(-8.8330369) and pool.sum().item() == pytest.approx(-14.196389)
    for (lower, upper), value in [((0.1, 0.5), 0.14428889), ((0.0, 1.0), 1.5838166), ((0.1, 1.0), 0.14473339),
                                  ((0.0, 0.5), 1.5838041), ((0.5, 0.9), 0.00076444923), ((0.0, 0.1), 1.5786577)]:
        assert ring_nce_loss(q, k, pool, T, lower, upper).item() == pytest.approx(value, rel=1e-7), (lower, upper)


@pytest.mark.parametrize("lower,upper,lo,hi", [
    (0.1, 0.5, 6, 32), (0.0, 1.0, 0, 64), (0.25, 0.75, 16, 48), (0.0, 0.02, 0, 1), (0.98, 1.0, 62, 64),
    (6 / 64, 32 / 64, 6, 32),                      # exactly on a rank: that rank is the first kept / first dropped
    (6 / 64 - 1e-9, 32 / 64 - 1e-9, 5, 31),        # just below: one rank earlier on both sides
    (6 / 64 + 1e-9, 32 / 64 + 1e-9, 6, 32)])
def test_loss_against_float64_reference(lower, upper, lo, hi):
    q, k, pool = spec_inputs()
    assert ring_bounds(64, lower, upper) == (lo, hi)
    ours = ring_nce_loss(q, k, pool, T, lower, upper).item()
    assert ours == pytest.approx(reference(q, k, pool, T, lo, hi), rel=1e-12, abs=1e-15)
    # float32 inputs give the same value to float32 precision (the loss computes in float32)
    single = ring_nce_loss(q.float(), k.float(), pool.float(), T, lower, upper).item()
    assert single == pytest.approx(ours, rel=1e-4, abs=1e-6)


def test_no_ring_is_infonce_and_inputs_are_normalised():
    q, k, pool = spec_inputs()
    qn, kn, pn = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ pn.T], 1) / T
    infonce = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert ring_nce_loss(q, k, pool, T, 0.0, 1.0).item() == pytest.approx(infonce.item(), rel=1e-13)
    assert ring_nce_loss(3 * q, 0.5 * k, 2 * pool).item() == pytest.approx(infonce.item(), rel=1e-13)  # t = 0.07
    # the positive is in the normaliser, the hardest negatives dominate (spec 8.2)
    assert ring_nce_loss(q, k, pool, T, 6 / 64, 1.0).item() < 0.1 * infonce.item()


def test_gradients():
    q, k, pool = spec_inputs()
    q.requires_grad_(True)
    ring_nce_loss(q, k, pool, T, 0.1, 0.5).backward()
    assert q.grad[0, :3].tolist() == pytest.approx([0.0023648268, -0.00062992914, -0.0015942172], rel=1e-6)
    q.grad = None
    ring_nce_loss(q, k, pool, T, 0.0, 1.0).backward()
    assert q.grad[0, :3].tolist() == pytest.approx([0.00032642866, 0.0031398473, 0.0010059950], rel=1e-6)
    qs, ks = q.detach()[:2].clone().requires_grad_(True), k[:2].clone().requires_grad_(True)
    small = pool[:16].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: ring_nce_loss(a, b, c, 0.5, 0.25, 0.75), (qs, ks, small))
    draw = lambda a, b, c: sampled_ring_nce_loss(a, b, c, 0.5, 0.25, 0.75, 5, torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(draw, (qs, ks, small))


@pytest.mark.parametrize("lower,upper", [(0.1, 0.5), (0.0, 1.0), (0.9, 1.0)])
def test_sampled_loss_draws_from_the_ring(lower, upper):
    q, k, pool = spec_inputs()
    lo, hi = ring_bounds(64, lower, upper)
    ours = sampled_ring_nce_loss(q, k, pool, T, lower, upper, 50, torch.Generator().manual_seed(3)).item()
    draws = torch.randint(0, hi - lo, (4, 50), generator=torch.Generator().manual_seed(3)).tolist()
    if (lower, upper) == (0.0, 1.0):  # no ring: uniform draws from the pool in its own order (IR)
        qn, pn = F.normalize(q, dim=1), F.normalize(pool, dim=1)
        neg = (qn @ pn.T / T).gather(1, torch.tensor(draws))
        pos = (qn * F.normalize(k, dim=1)).sum(1) / T
        expected = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean().item()
    else:
        expected = reference(q, k, pool, T, lo, hi, draws)
    assert ours == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("lower,upper,fragment", [
    (0.01, 0.015, "is empty"), (0.5, 0.5, "lower < upper"), (0.6, 0.5, "lower < upper"),
    (-0.1, 0.5, "0 <= lower"), (0.1, 1.5, "upper <= 1"), (float("nan"), 0.5, "lower < upper")])
def test_bad_rings_raise(lower, upper, fragment):
    q, k, pool = spec_inputs()
    with pytest.raises(ValueError, match="empty" if fragment == "is empty" else "need 0 <= lower < upper <= 1"):
        ring_nce_loss(q, k, pool, T, lower, upper)
    with pytest.raises(ValueError):
        sampled_ring_nce_loss(q, k, pool, T, lower, upper, 4)


def test_bad_shapes_and_temperature_raise():
    q, k, pool = spec_inputs()
    for args in [(q, k[:3], pool), (q, k, pool[:, :5]), (q[0], k[0], pool)]:
        with pytest.raises(ValueError, match="need q, k"):
            ring_nce_loss(*args)
    with pytest.raises(ValueError, match="temperature"):
        ring_nce_loss(q, k, pool, 0.0)


def test_bank_update():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(10, 4, generator=g), dim=1)
    old = bank.clone()
    index, z = torch.tensor([7, 2, 5]), torch.randn(3, 4, generator=g)
    update_bank(bank, index, z, 0.0)  # the Ring code's m = 0: overwrite with the normalised output
    torch.testing.assert_close(bank[index], F.normalize(z, dim=1))
    keep = torch.tensor([i not in (7, 2, 5) for i in range(10)])
    assert torch.equal(bank[keep], old[keep])
    bank = old.clone()
    update_bank(bank, index, z, 0.5)  # IR's m = 0.5 (spec 8.3: matches the official update exactly)
    torch.testing.assert_close(bank[index], F.normalize(0.5 * old[index] + 0.5 * F.normalize(z, dim=1), dim=1))


def test_enqueue_is_fifo_and_wraps():
    queue, ptr = torch.zeros(6, 2), torch.zeros((), dtype=torch.long)
    keys = [torch.tensor([[3.0, 4.0], [0.0, 2.0]]) * (i + 1) for i in range(4)]
    for i in range(3):
        enqueue(queue, ptr, keys[i])
    assert int(ptr) == 0
    torch.testing.assert_close(queue, torch.tensor([[0.6, 0.8], [0.0, 1.0]]).repeat(3, 1))
    queue[:] = 0
    enqueue(queue, ptr, keys[3])
    assert int(ptr) == 2 and queue[2:].abs().sum() == 0


def test_moco_keys_come_from_the_updated_key_encoder():
    """batch_loss moves the key encoder (EMA of the query encoder) first, then computes the keys,
    as MoCo does; the returned keys are the normalised targets the loss used."""
    torch.manual_seed(0)
    args = ring_nce.get_parser().parse_args(["--method", "moco", "--width", "4", "--hidden_dim", "6",
                                             "--feature_dim", "5", "--queue_size", "8", "--moco_momentum", "0.5"])
    model = ring_nce.RingModel(args, 10)
    with torch.no_grad():  # the query encoder has moved away from its copy, as after a few steps
        for p in model.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    expected = copy.deepcopy(model.key_encoder)
    ring_nce.momentum_update(model.encoder, expected, 0.5)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    loss, k = ring_nce.batch_loss(model.encoder, model, (x1, x2, None, None), args, 0.0, 1.0, torch.device("cpu"), None)
    for p, p_expected in zip(model.key_encoder.parameters(), expected.parameters()):
        torch.testing.assert_close(p, p_expected)
    torch.testing.assert_close(k, expected(x2))
    q = model.encoder(x1)
    torch.testing.assert_close(loss, ring_nce_loss(q, expected(x2), model.queue, args.temperature))


def test_lab_conversion_known_colours():
    colours = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                            [0.5, 0.5, 0.5]], dtype=torch.float64)
    lab = rgb_to_lab(colours[:, :, None, None])[:, :, 0, 0]  # [9, 3, 1, 1] images
    expected = torch.tensor([[100, 0, 0], [0, 0, 0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602], [97.1393, -21.5537, 94.4780],
                             [60.3199, 98.2542, -60.8429], [91.1132, -48.0875, -14.1312], [53.3890, 0, 0]],
                            dtype=torch.float64)
    torch.testing.assert_close(lab, expected, atol=0.03, rtol=0)  # published tables round the sRGB matrix differently
    # CMC's constants (computed there with skimage): the middle and half-range of each channel over the sRGB cube
    lo, hi = lab[:8].min(0).values, lab[:8].max(0).values
    torch.testing.assert_close(((lo + hi) / 2).float(), torch.tensor(ring_nce.LAB_MEAN), atol=2e-3, rtol=0)
    torch.testing.assert_close(((hi - lo) / 2).float(), torch.tensor(ring_nce.LAB_STD), atol=2e-3, rtol=0)
    image = torch.rand(3, 5, 4, dtype=torch.float64)  # per pixel, unbatched
    torch.testing.assert_close(rgb_to_lab(image)[:, 2, 1], rgb_to_lab(image[:, 2:3, 1:2])[:, 0, 0])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cmc_export_is_both_encoders_side_by_side(arch):
    torch.manual_seed(0)
    args = ring_nce.get_parser().parse_args(["--method", "cmc", "--arch", arch, "--width", "4", "--hidden_dim", "6",
                                             "--feature_dim", "5"])
    model = ring_nce.RingModel(args, 10)
    x = torch.randn(6, 3, 8, 8)
    model.encoder(x)  # one training-mode pass gives the BatchNorm layers running statistics
    model.eval()
    backbone_state, head = ring_nce.export(model, args)
    backbone = common.build_backbone(arch, "cifar", 4)  # what an evaluator builds from ckpt["args"]
    backbone.load_state_dict(backbone_state)
    backbone.eval()
    enc = model.encoder
    features = torch.cat([enc.l.backbone(x[:, :1]), enc.ab.backbone(x[:, 1:])], 1)
    torch.testing.assert_close(backbone(x), features)
    assert backbone.out_dim == features.shape[1]
    rebuilt = ring_nce.make_head(*[layer[2] for layer in head["layout"] if layer[1] == "linear"], 10)
    assert [layer[1] for layer in head["layout"]] == ["linear", "relu", "linear"]
    rebuilt.load_state_dict(head["state"])
    torch.testing.assert_close(rebuilt(features), torch.cat([enc.l.projector(features[:, :features.shape[1] // 2]),
                                                             enc.ab.projector(features[:, features.shape[1] // 2:])], 1))
    # the training forward feeds channel 0 to the L encoder and channels 1-2 to the ab encoder
    torch.testing.assert_close(rebuilt(backbone(x)), torch.cat(enc(x), 1))


# ------------------------------------------------------------------------------------------------
# Two gloo processes: identical banks and queues everywhere, equal to one process on the whole batch
# ------------------------------------------------------------------------------------------------

WORLD = 2


def pool_data():
    g = torch.Generator().manual_seed(1)
    return (F.normalize(torch.randn(20, 4, generator=g), dim=1), torch.randperm(20, generator=g)[:8],
            torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g))


def worker(rank, store, out_dir, data, ports):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    bank, index, z, keys = pool_data()
    rows = slice(4 * rank, 4 * rank + 4)
    result = {"out_dir": out_dir}
    for m in (0.0, 0.5):
        b = bank.clone()
        update_bank(b, index[rows], z[rows], m)
        result[f"bank{m}"] = b
    queue, ptr = torch.zeros(16, 4), torch.tensor(8)
    enqueue(queue, ptr, keys[rows])
    result["queue"], result["ptr"] = queue, ptr
    q = z[rows].clone().requires_grad_(True)
    loss = ring_nce_loss(q, keys[rows], bank, 0.5, 0.1, 0.6)
    loss.backward()
    result["loss"], result["grad"] = loss.detach(), q.grad
    encoder = torch.nn.Linear(4, 3)  # per row: ShuffleBN's unshuffle must give back this rank's own keys
    torch.manual_seed(0)
    encoder.reset_parameters()
    torch.manual_seed(10 + rank)
    result["keys"] = ring_nce.shuffled_keys(encoder, keys[rows])
    result["keys_local"] = encoder(keys[rows]).detach()
    dist.destroy_process_group()
    # the script itself under two processes (what torchrun does): record every rank's pools
    update_pools = ring_nce.update_pools

    def recording(model, new, args):
        update_pools(model, new, args)
        pools = ("queue", "queue_ptr", "bank", "bank_ab")
        result[args.method] = {n: b.clone() for n, b in model.named_buffers() if n in pools}
        if args.method == "moco":  # the key encoder too: it is not what DDP synchronises
            result["key_encoder"] = torch.cat([p.flatten() for p in model.key_encoder.parameters()])

    ring_nce.update_pools = recording
    for method, port in zip(("moco", "cmc"), ports):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        ring_nce.main(["--dataset", "folder", "--data_dir", data, "--arch", "resnet18", "--width", "4", "--crop_size",
                       "16", "--batch_size", "16", "--subset", "32", "--workers", "0", "--queue_size", "32",
                       "--num_negatives", "8", "--method", method, "--ring_lower", "0.1", "--ring_upper", "0.5",
                       "--epochs", "1", "--knn_k", "5", "--out_dir", os.path.join(out_dir, method)])
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("ring_dist")
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    mp.start_processes(worker, args=(str(out / "store"), str(out), image_folder, ports), nprocs=WORLD,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_processes_keep_identical_pools(ranks):
    bank, index, z, keys = pool_data()
    for m in (0.0, 0.5):
        single = bank.clone()
        update_bank(single, index, z, m)
        for result in ranks:
            assert torch.equal(result[f"bank{m}"], single), m
    queue, ptr = torch.zeros(16, 4), torch.tensor(8)
    enqueue(queue, ptr, keys)
    for result in ranks:
        assert torch.equal(result["queue"], queue) and int(result["ptr"]) == int(ptr) == 0 and queue[:8].abs().sum() == 0


def test_two_processes_loss_gradients_and_shuffled_keys(ranks):
    bank, index, z, keys = pool_data()
    q = z.clone().requires_grad_(True)
    single = ring_nce_loss(q, keys, bank, 0.5, 0.1, 0.6)
    single.backward()
    assert sum(r["loss"].item() for r in ranks) / WORLD == pytest.approx(single.item(), rel=1e-6)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["grad"] / WORLD, q.grad[4 * rank:4 * rank + 4])
        torch.testing.assert_close(result["keys"], result["keys_local"])


def test_script_under_two_processes(ranks, tmp_path_factory):
    """ring_nce.main under 2 gloo processes: DDP, ShuffleBN and the gathered updates keep every
    process's queue (MoCo) and both banks (CMC) identical through the epoch."""
    for method, names in (("moco", {"queue", "queue_ptr"}), ("cmc", {"bank", "bank_ab"})):
        assert set(ranks[0][method]) == names
        for name in names:
            assert torch.equal(ranks[0][method][name], ranks[1][method][name]), (method, name)
    assert torch.equal(ranks[0]["key_encoder"], ranks[1]["key_encoder"])


def test_two_process_checkpoints(ranks):
    for method in ("moco", "cmc"):
        ckpt = torch.load(os.path.join(ranks[0]["out_dir"], method, "last.pt"), weights_only=True)
        assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["epoch"] == 1
        assert not torch.equal(ckpt["rng"][0][0], ckpt["rng"][1][0])  # seeds offset by rank
        for name in ("queue", "bank", "bank_ab"):
            if name in ckpt["model"]:
                assert torch.equal(ckpt["model"][name], ranks[1][method][name])


def test_benchmark_quick(tmp_path, monkeypatch, capsys):
    from conftest import ROOT
    monkeypatch.setattr(sys, "argv", ["ring_nce.py", "--quick", "--csv", str(tmp_path / "bench.csv")])
    runpy.run_path(os.path.join(ROOT, "benchmarks", "ring_cost.py"), run_name="__main__")
    assert "ring_topk" in capsys.readouterr().out
    lines = (tmp_path / "bench.csv").read_text().splitlines()
    assert lines[0].startswith("pool,") and len(lines) == 7

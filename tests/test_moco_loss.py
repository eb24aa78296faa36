"""moco_mochi.py's pieces: the loss against a float64 loop and the spec's test vectors, MoCHi's
points against davidsvy's draws and their laws, the queue, split BN, shuffle BN, the negatives
monitor on constructed cases, and two gloo processes against one (spec moco_mochi.md 2, 7, 8)."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import moco_mochi as mm
from moco_mochi import MoCo, SplitBatchNorm, mochi_negatives, moco_loss, shuffled_keys


def spec_inputs():
    """moco_mochi.md 8.2: q, k, queue (B=4, K=32, d=8) from one generator, float64."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    return q, k, F.normalize(torch.randn(32, 8, generator=g, dtype=torch.float64), dim=1)


def reference_loss(q, k, queue, t, synthetic=None, exclude=None):
    """Per query: -log softmax of [q.k, q.n_1..q.n_K, q.h_1..q.h_S] / t at the positive, in Python floats."""
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    total = 0.0
    for b in range(q.shape[0]):
        qb = unit(q[b].tolist())
        logits = [dot(qb, unit(k[b].tolist())) / t]
        logits += [dot(qb, unit(n.tolist())) / t for j, n in enumerate(queue) if exclude is None or not exclude[b, j]]
        if synthetic is not None:
            logits += [dot(qb, unit(h.tolist())) / t for h in synthetic[b]]
        top = max(logits)
        total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[0]
    return total / q.shape[0]


def random_inputs(b=5, k=12, d=6, s=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return r(b, d) * 3, r(b, d), r(k, d) * 0.5, r(b, s, d)  # not normalised: the functions normalise


@pytest.mark.parametrize("t", [0.2, 0.07])
@pytest.mark.parametrize("with_synthetic", [False, True])
def test_moco_loss_equals_loop_reference(t, with_synthetic):
    q, k, queue, syn = random_inputs()
    syn = syn if with_synthetic else None
    assert moco_loss(q, k, queue, t, syn).item() == pytest.approx(reference_loss(q, k, queue, t, syn), rel=1e-12)
    exclude = torch.zeros(q.shape[0], queue.shape[0], dtype=torch.bool)
    exclude[0, 3] = exclude[2, :5] = exclude[4, 11] = True
    assert moco_loss(q, k, queue, t, syn, exclude).item() == pytest.approx(
        reference_loss(q, k, queue, t, syn, exclude), rel=1e-12)
    assert moco_loss(q.float(), k.float(), queue.float(), t, syn).dtype == torch.float32


def test_moco_loss_spec_vectors():
    """moco_mochi.md 8.4: MoCo 2.3503367 (T=0.2), 3.5301461 (T=0.07); MoCHi with 8.3's fixed draws 3.0610235."""
    q, k, queue = spec_inputs()
    assert moco_loss(q, k, queue, 0.2).item() == pytest.approx(2.3503367, abs=1e-7)
    assert moco_loss(q, k, queue, 0.07).item() == pytest.approx(3.5301461, abs=1e-7)
    top = (q @ queue.T).topk(8, dim=1).indices
    assert top[0].tolist() == [16, 28, 10, 4, 18, 13, 9, 11]  # 8.2: row 0's hardest first
    pos_i = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6], [1, 3, 5, 7]])
    pos_j = torch.tensor([[1, 2, 3, 0], [7, 6, 5, 4], [7, 5, 3, 1], [1, 0, 2, 2]])
    alpha = torch.tensor([[0.1, 0.25, 0.5, 0.9], [0.3, 0.7, 0.45, 0.05], [0.6, 0.2, 0.8, 0.35],
                          [0.5, 0.15, 0.75, 0.95]], dtype=torch.float64)[..., None]
    pos_m = torch.tensor([[0, 3], [1, 6], [2, 7], [5, 0]])
    beta = torch.tensor([[0.1, 0.45], [0.25, 0.05], [0.3, 0.2], [0.4, 0.15]], dtype=torch.float64)[..., None]
    h1 = alpha * queue[top.gather(1, pos_i)] + (1 - alpha) * queue[top.gather(1, pos_j)]
    h2 = beta * q[:, None] + (1 - beta) * queue[top.gather(1, pos_m)]
    assert moco_loss(q, k, queue, 0.2, torch.cat([h1, h2], 1)).item() == pytest.approx(3.0610235, abs=1e-7)
    assert moco_loss(q, k, queue, 0.2, h1).item() == pytest.approx(2.7857869, abs=1e-7)
    assert moco_loss(q, k, queue, 0.2, h2).item() == pytest.approx(2.7533764, abs=1e-7)


def test_moco_loss_gradcheck_and_errors():
    q, k, queue, syn = random_inputs(b=3, k=5, d=4, s=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    syn.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: moco_loss(a, b, queue, 0.3, c), (q, k, syn))
    with pytest.raises(ValueError, match="temperature"):
        moco_loss(q, k, queue, 0.0)
    with pytest.raises(ValueError, match="queue"):
        moco_loss(q, k, queue[:, :3], 0.2)


# ---- MoCHi -------------------------------------------------------------------------------------

def test_mochi_negatives_are_davidsvys_draws():
    """davidsvy src/moco.py hard_negatives1/2 with the same torch stream: positions
    randint(0, N, (2, B, s1)) (first B x s1 for n_i, the next for n_j), a = rand(B, s1, 1), then
    randint(0, N, (B, s2)) and b = 0.5 rand(B, s2, 1); points built one at a time here. The hard set
    is sorted (hardest first; davidsvy's unsorted order is implementation-defined)."""
    q, _, queue, _ = random_inputs(b=3, k=20, d=6, seed=7)
    torch.manual_seed(11)
    out, sources = mochi_negatives(q, queue, 5, 4, 3, return_sources=True)
    torch.manual_seed(11)
    pos, a = torch.randint(0, 5, (2, 3, 4)), torch.rand(3, 4, 1, dtype=torch.float64)
    pos_m, b = torch.randint(0, 5, (3, 3)), 0.5 * torch.rand(3, 3, 1, dtype=torch.float64)
    qn, unit = F.normalize(q, dim=1), F.normalize(queue, dim=1)
    for r in range(3):
        order = sorted(range(20), key=lambda j: -float(qn[r] @ unit[j]))[:5]  # the 5 hardest rows
        for s in range(4):
            i, j = order[pos[0, r, s]], order[pos[1, r, s]]
            h = a[r, s] * unit[i] + (1 - a[r, s]) * unit[j]
            torch.testing.assert_close(out[r, s], h / h.norm(), rtol=0, atol=1e-14)
            assert sources[r, s].tolist() == [i, j]
        for s in range(3):
            m = order[pos_m[r, s]]
            h = b[r, s] * qn[r] + (1 - b[r, s]) * unit[m]
            torch.testing.assert_close(out[r, 4 + s], h / h.norm(), rtol=0, atol=1e-14)
            assert sources[r, 4 + s].tolist() == [m, m]
    torch.manual_seed(11)
    assert torch.equal(mochi_negatives(q, queue, 5, 4, 3), out)  # the same points without the sources


def test_mochi_negatives_laws_and_no_gradient():
    """Positions uniform over the hard set, pairs with replacement (i = j with probability 1/N, as
    davidsvy), a ~ U(0, 1), b ~ U(0, 0.5): Kolmogorov-Smirnov and chi-square at the 0.1 % level."""
    q, _, queue, _ = random_inputs(b=8, k=30, d=8, seed=3)
    q.requires_grad_(True)
    n, s1, s2 = 6, 400, 400
    out, src = mochi_negatives(q, queue, n, s1, s2, torch.Generator().manual_seed(1), return_sources=True)
    assert out.shape == (8, s1 + s2, 8) and not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out.norm(dim=2), torch.ones(8, s1 + s2, dtype=torch.float64))
    hard = (F.normalize(q, dim=1) @ F.normalize(queue, dim=1).T).topk(n, dim=1).indices
    rank = (src[..., None] == hard[:, None, None]).float().argmax(-1)                # [B, S, 2] positions
    assert ((src[..., None] == hard[:, None, None]).any(-1)).all()                    # all in the hard set
    counts = torch.stack([(rank[:, :s1] == p).sum() for p in range(n)]).double()
    expected = counts.sum() / n
    assert ((counts - expected) ** 2 / expected).sum() < 20.5  # chi-square, 5 d.o.f.
    same = (src[:, :s1, 0] == src[:, :s1, 1]).double().mean()
    assert abs(same - 1 / n) < 3.3 * math.sqrt(1 / n * (1 - 1 / n) / (8 * s1))
    unit, qn = F.normalize(queue.detach(), dim=1), F.normalize(q.detach(), dim=1)
    first = torch.cat([unit[src[:, :s1, 0]], qn[:, None].expand(-1, s2, -1)], 1)      # n_i or q
    second = unit[src[..., 1]]                                                          # n_j or n_m
    distinct = torch.cat([src[:, :s1, 0] != src[:, :s1, 1], torch.ones(8, s2, dtype=torch.bool)], 1)
    # weight w of the first source: out = (w f + (1 - w) s) / norm, by least squares on (f, s)
    basis = torch.stack([first, second], -1)[distinct]
    c = torch.linalg.lstsq(basis, out[distinct][..., None]).solution[..., 0]
    assert (c > 0).all()
    w = c[:, 0] / c.sum(1)
    type1 = (torch.arange(s1 + s2) < s1).expand(8, -1)[distinct]
    w1, w2 = w[type1], w[~type1]

    def ks(x):  # Kolmogorov-Smirnov distance to U(0, 1)
        x, m = x.sort().values, len(x)
        i = torch.arange(1, m + 1, dtype=x.dtype)
        return max((i / m - x).max().item(), (x - (i - 1) / m).max().item())

    assert ks(w1) < 1.95 / math.sqrt(len(w1)) and ks(2 * w2) < 1.95 / math.sqrt(len(w2)) and w2.max() < 0.5
    k = torch.randn(8, 8, dtype=torch.float64)
    grad, = torch.autograd.grad(moco_loss(q, k, queue, 0.2, out), q)
    grad_const, = torch.autograd.grad(moco_loss(q, k, queue, 0.2, out.detach().clone()), q)
    assert torch.equal(grad, grad_const)  # the gradient reaches q only through q.h


def test_excluded_keys_never_enter_the_hard_set_and_bad_sizes():
    q, _, queue, _ = random_inputs(b=4, k=20, d=6, seed=5)
    hard = (F.normalize(q, dim=1) @ F.normalize(queue, dim=1).T).topk(6, dim=1).indices
    exclude = torch.zeros(4, 20, dtype=torch.bool)
    exclude[torch.arange(4)[:, None], hard[:, :3]] = True  # each query's three hardest keys
    _, src = mochi_negatives(q, queue, 3, 50, 50, exclude=exclude, return_sources=True)
    assert (src[..., None] == hard[:, None, None, 3:]).any(-1).all()  # the next three, only
    for n, s1, s2 in [(0, 1, 1), (21, 1, 1), (6, -1, 1), (6, 1, -1)]:
        with pytest.raises(ValueError):
            mochi_negatives(q, queue, n, s1, s2)


# ---- the negatives monitor ---------------------------------------------------------------------

def test_monitor_on_constructed_similarities():
    """Query 0 (class 1): 300 queue keys, 50 of the random initial queue (id -1, unknown class),
    10 masked (own image), 240 negatives of known class, 60 of them of class 1: fn_rate 60/240;
    the 1% most similar = the top 2 of those 240 (the unknown and the masked keys are more similar
    but are no known negatives): one of class 1, fn_rate_hard 1/2. Query 1 has no label: NaN."""
    K = 300
    ids = torch.cat([torch.full((50,), -1), torch.arange(250)])
    classes = torch.tensor([1 if i < 60 else 2 + i % 3 for i in range(250)])     # class of each image id
    key_labels = torch.where(ids >= 0, classes[ids], -1)
    sim = torch.linspace(0, 0.5, K).repeat(2, 1)
    own = torch.zeros(2, K, dtype=torch.bool)
    own[0, 290:] = True                                                       # ids 240..249: class 2..4
    sim[0, 0], sim[0, 295] = 0.99, 0.98                                       # unknown, masked: hardest
    sim[0, 50 + 7], sim[0, 50 + 100] = 0.9, 0.8                               # class 1 and class 2
    logits = torch.cat([torch.ones(2, 1), sim], 1) / 0.1
    # type 1 (class 1, class 2): same; (2, 3): not; (unknown, class 1): left out; type 2 (1, 1): same
    sources = torch.tensor([[50, 150], [151, 152], [0, 51], [53, 53]]).repeat(2, 1, 1)
    stats = mm.monitor(logits, own, torch.tensor([1, -1]), key_labels, sources)
    assert stats["fn_rate"][0].item() == pytest.approx(60 / 240)
    assert stats["fn_rate_hard"][0].item() == pytest.approx(1 / 2)
    assert stats["fn_rate_synth"][0].item() == pytest.approx(2 / 3)
    assert all(math.isnan(stats[name][1].item()) for name in ("fn_rate", "fn_rate_hard", "fn_rate_synth"))
    without_mask = mm.monitor(logits, own & False, torch.tensor([1, -1]), key_labels, None)
    assert without_mask["fn_rate"][0].item() == pytest.approx(60 / 250)  # the own-image keys count
    assert without_mask["fn_rate_hard"][0].item() == pytest.approx(1 / 2) and "fn_rate_synth" not in without_mask


# ---- queue, split BN, shuffle BN -----------------------------------------------------------------

def tiny_args(*flags):
    return mm.get_parser().parse_args(["--width", "2", "--queue_size", "8", "--feature_dim", "3", *flags])


def test_queue_is_a_fifo_of_buffers():
    model = MoCo(tiny_args())
    initial = model.queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(8))
    assert (model.queue_ids == -1).all() and model.queue_ptr.item() == 0
    keys = torch.arange(36, dtype=torch.float32).view(12, 3)
    for step in range(3):  # 3 x 4 keys through a queue of 8: the oldest go first
        model.enqueue(keys[4 * step:4 * step + 4], torch.arange(4 * step, 4 * step + 4))
    assert torch.equal(model.queue, keys[[8, 9, 10, 11, 4, 5, 6, 7]]) and model.queue_ptr.item() == 4
    assert model.queue_ids.tolist() == [8, 9, 10, 11, 4, 5, 6, 7]
    assert {"queue", "queue_ids", "queue_ptr"} <= set(model.state_dict())


def test_split_bn_is_batchnorm_per_interleaved_group():
    """The demo's SplitBatchNorm: group g = images g, g + G, ... (input.view(-1, C * G, H, W))."""
    torch.manual_seed(0)
    split = SplitBatchNorm(3)
    split.splits = 4
    split.weight.data.uniform_(0.5, 2)
    split.bias.data.normal_()
    copies = [nn.BatchNorm2d(3) for _ in range(4)]
    for c in copies:
        c.load_state_dict(split.state_dict())
    x = torch.randn(12, 3, 5, 5) * 2 + 1
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = split(x1)
    ref = torch.stack([c(x2[g::4]) for g, c in enumerate(copies)], 1).flatten(0, 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.weight.grad, sum(c.weight.grad for c in copies), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.running_mean, sum(c.running_mean for c in copies) / 4)
    torch.testing.assert_close(split.running_var, sum(c.running_var for c in copies) / 4)
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                      split.bias, False, 0.0, split.eps))
    model = MoCo(tiny_args(), bn_splits=4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(type(m) is SplitBatchNorm and m.splits == 4 for m in bns)
    assert set(model.state_dict()) == set(MoCo(tiny_args(), bn_splits=1).state_dict())


def minus_group_mean(x):
    """A batch-dependent 'encoder' (like BatchNorm): each row minus the mean of its batch."""
    return x - x.mean(0)


def test_shuffled_keys_one_process():
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(shuffled_keys(lambda v: 2 * v, x), 2 * x)  # the order comes back
    torch.testing.assert_close(shuffled_keys(minus_group_mean, x), minus_group_mean(x))
    model = MoCo(tiny_args(), bn_splits=2)
    imgs = torch.randn(8, 3, 8, 8)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    torch.manual_seed(3)
    keys = shuffled_keys(model.encoder_k, imgs)
    expected = model.encoder_k(imgs[perm])[perm.argsort()]  # split-BN groups of the shuffled batch
    torch.testing.assert_close(keys, expected)
    assert not torch.allclose(keys, model.encoder_k(imgs), atol=1e-4)


# ---- two gloo processes against one -------------------------------------------------------------

WORLD = 2
STEP_FLAGS = ("--symmetric", "--mask_own", "--lr", "0.5", "--ema", "0.9", "--bn_splits", "1")


def step_inputs():
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64)
    ids = torch.tensor([3, 9, 1, 14, 6, 0, 11, 5])
    return [x1, (x1 + 0.2 * torch.rand(8, 3, 8, 8, generator=g, dtype=torch.float64))], ids, ids % 3


def one_step(rank, world):
    """train_step (BatchNorm in eval mode: per-image, so one process and two compute the same) from
    a queue whose ids hold some of the batch's images; then the epoch statistics."""
    args = tiny_args(*STEP_FLAGS, "--queue_size", "32")
    torch.manual_seed(0)
    model = MoCo(args).double()
    model.queue_ids.copy_(torch.arange(32) % 17 - 1)
    net = mm.distribute(model, model, args, torch.device("cpu"))
    optimizer = mm.make_optimizer(model, args, torch.device("cpu"))
    views, ids, labels = step_inputs()
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    model.eval()
    stats = mm.train_step(net, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                          [v[part] for v in views], labels[part], ids[part], torch.arange(20) % 3, args, None)
    return {"model": model.state_dict(), "epoch": mm.epoch_stats([stats])}


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(100 + rank)  # only rank 0's permutation may count
    result = {"shuffled": shuffled_keys(minus_group_mean, x[rank * 4:rank * 4 + 4]),
              "order": shuffled_keys(lambda v: 2 * v, x[rank * 4:rank * 4 + 4]), "step": one_step(rank, WORLD)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("moco_dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_shuffle_bn_across_processes(ranks):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(100)
    perm = torch.randperm(8)  # rank 0's permutation, broadcast
    per_rank = [minus_group_mean(x[perm[r * 4:r * 4 + 4]]) for r in range(WORLD)]
    expected = torch.cat(per_rank)[perm.argsort()]  # each image normalised with the group it was sent to
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["order"], 2 * x[rank * 4:rank * 4 + 4])
        torch.testing.assert_close(r["shuffled"], expected[rank * 4:rank * 4 + 4])


def test_two_processes_take_the_step_of_one(ranks):
    """Loss, weights (DDP's averaged gradient), the queue with its ids and pointer (keys gathered
    in rank order, view 1's first) and the negatives monitor equal one process's on the whole batch."""
    one = one_step(0, 1)
    for r in ranks:
        for name, value in one["model"].items():
            torch.testing.assert_close(r["step"]["model"][name], value, rtol=1e-9, atol=1e-12, msg=name)
        assert r["step"]["epoch"].keys() == one["epoch"].keys()
        for name, value in one["epoch"].items():
            assert r["step"]["epoch"][name] == pytest.approx(value, rel=1e-9), name
    assert 0 < one["epoch"]["fn_rate"] < 1 and one["model"]["queue_ptr"] == 16

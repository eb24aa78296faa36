"""moco_mochi.py's pieces: the loss against a float64 loop, MoCHi's synthetic negatives (structure
and the laws of their coefficients), the queue, split BN, shuffle BN, the momentum update, and two
gloo processes against one (spec moco_mochi.md 2, 7, 8)."""
import argparse
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import moco_mochi
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
    """moco_mochi.md 8.4: MoCo 2.3503367 (T=0.2), 3.5301461 (T=0.07); MoCHi with its fixed draws 3.0610235."""
    q, k, queue = spec_inputs()
    assert moco_loss(q, k, queue, 0.2).item() == pytest.approx(2.3503367, abs=1e-7)
    assert moco_loss(q, k, queue, 0.07).item() == pytest.approx(3.5301461, abs=1e-7)
    top = (q @ queue.T).topk(8, dim=1).indices
    pos_i = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6], [1, 3, 5, 7]])
    pos_j = torch.tensor([[1, 2, 3, 0], [7, 6, 5, 4], [7, 5, 3, 1], [1, 0, 2, 2]])
    alpha = torch.tensor([[0.1, 0.25, 0.5, 0.9], [0.3, 0.7, 0.45, 0.05], [0.6, 0.2, 0.8, 0.35],
                          [0.5, 0.15, 0.75, 0.95]], dtype=torch.float64)[..., None]
    pos_m = torch.tensor([[0, 3], [1, 6], [2, 7], [5, 0]])
    beta = torch.tensor([[0.1, 0.45], [0.25, 0.05], [0.3, 0.2], [0.4, 0.15]], dtype=torch.float64)[..., None]
    h1 = alpha * queue[top.gather(1, pos_i)] + (1 - alpha) * queue[top.gather(1, pos_j)]
    h2 = beta * q[:, None] + (1 - beta) * queue[top.gather(1, pos_m)]
    assert moco_loss(q, k, queue, 0.2, torch.cat([h1, h2], 1)).item() == pytest.approx(3.0610235, abs=1e-7)


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

def hard_sets(q, queue, n):
    return (F.normalize(q, dim=1) @ F.normalize(queue, dim=1).T).topk(n, dim=1).indices


def decompose(h, a, b):
    """Coefficients (c_a, c_b) with h = c_a a + c_b b and the residual (least squares, batched)."""
    m = torch.stack([a, b], dim=-1)                                   # [..., D, 2]
    c = torch.linalg.lstsq(m, h[..., None]).solution[..., 0]         # [..., 2]
    return c, (m @ c[..., None])[..., 0].sub(h).norm(dim=-1)


def ks_uniform(x):
    """Kolmogorov-Smirnov distance of the sample x to U(0, 1)."""
    x, n = x.sort().values, x.numel()
    i = torch.arange(1, n + 1, dtype=x.dtype)
    return max((i / n - x).max().item(), (x - (i - 1) / n).max().item())


def test_mochi_negatives_shapes_norm_and_no_gradient():
    q, _, queue, _ = random_inputs(b=4, k=20, d=6)
    q.requires_grad_(True)
    out = mochi_negatives(q, queue, 6, 5, 3, torch.Generator().manual_seed(0))
    assert out.shape == (4, 8, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out.norm(dim=2), torch.ones(4, 8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not out.requires_grad and out.grad_fn is None
    # the loss's gradient reaches q only through q.h, exactly as with constant points
    k = torch.randn(4, 6, dtype=torch.float64)
    grad, = torch.autograd.grad(moco_loss(q, k, queue, 0.2, out), q)
    grad_const, = torch.autograd.grad(moco_loss(q, k, queue, 0.2, out.detach().clone()), q)
    torch.testing.assert_close(grad, grad_const, rtol=0, atol=0)
    same = mochi_negatives(q, queue, 6, 5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert mochi_negatives(q.float(), queue.float(), 6, 0, 0).shape == (4, 0, 6)


@pytest.mark.parametrize("n,s1,s2", [(0, 1, 1), (21, 1, 1), (6, -1, 1), (6, 1, -1), (1, 1, 0)])
def test_mochi_negatives_rejects_bad_sizes(n, s1, s2):
    q, _, queue, _ = random_inputs(b=4, k=20, d=6)
    with pytest.raises(ValueError):
        mochi_negatives(q, queue, n, s1, s2)


def test_type1_points_mix_two_hard_keys_with_uniform_weights():
    """Every type-1 point is a positive combination of two distinct members of its own query's
    hard set (and of no other pair); a = c_i / (c_i + c_j) follows U(0, 1); all positions are drawn."""
    b, n, s1 = 8, 6, 200
    q, _, queue, _ = random_inputs(b=b, k=30, d=8, seed=3)
    out = mochi_negatives(q, queue, n, s1, 0, torch.Generator().manual_seed(1))
    hard = hard_sets(q, queue, n)
    unit = F.normalize(queue, dim=1)
    pairs = list(itertools.combinations(range(n), 2))
    fits, alphas, used = torch.zeros(b, s1, dtype=torch.long), [], torch.zeros(b, n)
    for i, j in pairs:
        c, res = decompose(out, unit[hard[:, i]][:, None].expand(-1, s1, -1), unit[hard[:, j]][:, None].expand(-1, s1, -1))
        ok = (res < 1e-9) & (c > 0).all(-1)
        fits += ok
        alphas.append((c[..., 0] / c.sum(-1))[ok])
        used[:, i] += ok.sum(1)
        used[:, j] += ok.sum(1)
    assert (fits == 1).all(), fits  # exactly one pair of the hard set explains each point
    alphas = torch.cat(alphas)
    assert alphas.numel() == b * s1 and ks_uniform(alphas) < 1.63 / math.sqrt(alphas.numel())  # 1 % level
    # Every hard-set position is used, about equally (chi-square, 5 d.o.f., far beyond the 0.1 % level 20.5).
    expected = 2 * s1 / n
    assert (((used - expected) ** 2 / expected).sum(1) < 20.5).all(), used


def test_type2_points_mix_query_and_one_hard_key_with_weight_below_half():
    b, n, s2 = 8, 5, 200
    q, _, queue, _ = random_inputs(b=b, k=30, d=8, seed=4)
    out = mochi_negatives(q, queue, n, 0, s2, torch.Generator().manual_seed(2))
    hard = hard_sets(q, queue, n)
    qn, unit = F.normalize(q, dim=1), F.normalize(queue, dim=1)
    fits, betas = torch.zeros(b, s2, dtype=torch.long), []
    for m in range(n):
        c, res = decompose(out, qn[:, None].expand(-1, s2, -1), unit[hard[:, m]][:, None].expand(-1, s2, -1))
        ok = (res < 1e-9) & (c > 0).all(-1)
        fits += ok
        betas.append((c[..., 0] / c.sum(-1))[ok])
    assert (fits == 1).all(), fits
    betas = torch.cat(betas)
    assert betas.numel() == b * s2 and betas.max() < 0.5
    assert ks_uniform(2 * betas) < 1.63 / math.sqrt(betas.numel())  # b ~ U(0, 0.5)


def test_excluded_keys_never_enter_the_hard_set():
    q, _, queue, _ = random_inputs(b=4, k=20, d=6, seed=5)
    hard = hard_sets(q, queue, 3)
    exclude = torch.zeros(4, 20, dtype=torch.bool)
    exclude[torch.arange(4)[:, None], hard] = True  # mask each query's three hardest keys
    out = mochi_negatives(q, queue, 3, 0, 50, torch.Generator().manual_seed(0), exclude=exclude)
    allowed = hard_sets(q, queue, 6)[:, 3:]
    unit, qn = F.normalize(queue, dim=1), F.normalize(q, dim=1)
    fits = sum((decompose(out, qn[:, None].expand(-1, 50, -1), unit[allowed[:, m]][:, None].expand(-1, 50, -1))[1]
                < 1e-9).long() for m in range(3))
    assert (fits == 1).all()


# ---- queue, momentum update, split BN, shuffle BN -------------------------------------------

def tiny_args(**kw):
    argv = ["--width", "2", "--queue_size", "8", "--feature_dim", "3", "--no-mlp"]
    for key, value in kw.items():
        argv += [f"--{key}", str(value)]
    return moco_mochi.get_parser().parse_args(argv)


def test_queue_is_fifo_and_wraps_around():
    model = MoCo(tiny_args())
    initial = model.queue.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(8))
    assert (model.queue_ids == -1).all() and model.queue_ptr.item() == 0
    keys = torch.arange(30, dtype=torch.float32).view(10, 3)
    model.enqueue(keys[:3], torch.arange(3))
    assert torch.equal(model.queue[:3], keys[:3]) and torch.equal(model.queue[3:], initial[3:])
    model.enqueue(keys[3:6], torch.arange(3, 6))
    model.enqueue(keys[6:9], torch.arange(6, 9))  # rows 6, 7, then 0: the oldest goes first
    assert model.queue_ptr.item() == 1
    assert torch.equal(model.queue, keys[[8, 1, 2, 3, 4, 5, 6, 7]])
    assert model.queue_ids.tolist() == [8, 1, 2, 3, 4, 5, 6, 7]
    model.enqueue(keys[:8], torch.arange(8))  # a full queue's worth from row 1
    assert model.queue_ptr.item() == 1 and model.queue_ids.tolist() == [7, 0, 1, 2, 3, 4, 5, 6]
    names = dict(model.named_buffers())
    assert {"queue", "queue_ids", "queue_ptr"} <= set(model.state_dict()) and names["queue_ptr"].dtype == torch.long


def test_momentum_update_moves_parameters_only():
    model = MoCo(tiny_args())
    for p in model.query_parameters():
        p.data.add_(1.0)
    before_k = [p.clone() for p in model.key_parameters()]
    bn_stats = model.key_backbone.bn1.running_mean.clone()
    model.momentum_update(0.75)
    for pk, k0, pq in zip(model.key_parameters(), before_k, model.query_parameters()):
        torch.testing.assert_close(pk, 0.75 * k0 + 0.25 * pq, rtol=0, atol=1e-6)
        assert not pk.requires_grad
    assert torch.equal(model.key_backbone.bn1.running_mean, bn_stats)


def test_split_bn_equals_batchnorm_per_group():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    split = SplitBatchNorm(bn, 4)
    x = torch.randn(12, 3, 5, 5, dtype=torch.float32) * 2 + 1
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    copies = [nn.BatchNorm2d(3) for _ in range(4)]
    for c in copies:
        c.load_state_dict(bn.state_dict())
    y = split(x1)
    ref = torch.cat([c(chunk) for c, chunk in zip(copies, x2.chunk(4))])
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
    assert set(split.state_dict()) == set(bn.state_dict())


def minus_group_mean(x):
    """A batch-dependent 'encoder' (like BatchNorm): each row minus the mean of its batch."""
    return x - x.mean(0)


def test_shuffled_keys_one_process():
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.manual_seed(7)
    out = shuffled_keys(minus_group_mean, x)
    torch.testing.assert_close(shuffled_keys(lambda v: 2 * v, x), 2 * x)  # the order comes back
    torch.testing.assert_close(out, minus_group_mean(x))  # one group: the permutation changes nothing
    model = MoCo(tiny_args(bn_splits=2), bn_splits=2)
    imgs = torch.randn(8, 3, 8, 8)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    torch.manual_seed(3)
    keys = shuffled_keys(model.keys, imgs)
    expected = model.keys(imgs[perm])[perm.argsort()]  # split BN groups = halves of the shuffled batch
    torch.testing.assert_close(keys, expected)
    assert not torch.allclose(keys, model.keys(imgs), atol=1e-4)


def test_momentum_update_precedes_the_keys_in_training():
    """One training step: key params = m k0 + (1 - m) q0 (query before its SGD step), and the
    enqueued keys come from that updated key encoder."""
    args = tiny_args(ema=0.5, bn_splits=1, batch_size=4, lr=10.0)
    torch.manual_seed(0)
    model = MoCo(args)
    for p in model.key_parameters():
        p.data.mul_(-1.0)  # make key and query encoders differ
    k0, q0 = [p.clone() for p in model.key_parameters()], [p.clone() for p in model.query_parameters()]
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    optimizer = torch.optim.SGD(model.query_parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    moco_mochi.train_one_epoch(model, model, [(x1, x2, None, torch.arange(4))], optimizer, scaler, args, 0,
                               torch.device("cpu"), None)
    assert any(not torch.equal(a, b) for a, b in zip(q0, model.query_parameters()))  # SGD moved the query
    for pk, a, b in zip(model.key_parameters(), k0, q0):
        torch.testing.assert_close(pk, 0.5 * a + 0.5 * b, rtol=0, atol=1e-6)
    model.train()
    torch.testing.assert_close(model.queue[:4], model.keys(x2), rtol=1e-4, atol=1e-5)
    assert model.queue_ptr.item() == 4 and model.queue_ids[:4].tolist() == [0, 1, 2, 3]


# ---- two gloo processes against one ---------------------------------------------------------

WORLD = 2


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    model = MoCo(tiny_args())
    g = torch.Generator().manual_seed(0)  # same global batches on both ranks
    for _ in range(5):  # 5 x 4 keys through a queue of 8: wraps twice
        keys, ids = torch.randn(4, 3, generator=g), torch.randint(0, 100, (4,), generator=g)
        model.enqueue(keys[rank * 2:rank * 2 + 2], ids[rank * 2:rank * 2 + 2])
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    local = x[rank * 4:rank * 4 + 4]
    torch.manual_seed(100 + rank)  # only rank 0's permutation may count
    result = {"queue": model.queue, "ids": model.queue_ids, "ptr": model.queue_ptr,
              "shuffled": shuffled_keys(minus_group_mean, local), "order": shuffled_keys(lambda v: 2 * v, local)}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("moco_dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_processes_hold_the_queue_of_one(ranks):
    model = MoCo(tiny_args())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        keys, ids = torch.randn(4, 3, generator=g), torch.randint(0, 100, (4,), generator=g)
        model.enqueue(keys, ids)
    for r in ranks:
        assert torch.equal(r["queue"], model.queue) and torch.equal(r["ids"], model.queue_ids)
        assert r["ptr"].item() == model.queue_ptr.item() == 4


def test_shuffle_bn_across_processes(ranks):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        torch.randn(4, 3, generator=g), torch.randint(0, 100, (4,), generator=g)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(100)
    perm = torch.randperm(8)  # rank 0's permutation, broadcast
    per_rank = [minus_group_mean(x[perm[r * 4:r * 4 + 4]]) for r in range(WORLD)]
    expected = torch.cat(per_rank)[perm.argsort()]  # each image normalised with the group it was sent to
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["order"], 2 * x[rank * 4:rank * 4 + 4])
        torch.testing.assert_close(r["shuffled"], expected[rank * 4:rank * 4 + 4])
    assert not torch.allclose(torch.cat([r["shuffled"] for r in ranks]),
                              torch.cat([minus_group_mean(x[:4]), minus_group_mean(x[4:])]))


def test_mask_own_removes_the_query_images_keys_in_training():
    """Keys of the batch's own images in the queue are the hardest negatives (cosine 1 here: query
    and key encoders start equal); --mask_own takes them out of the loss."""
    import copy
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    hardest = {}
    for mask in (True, False):
        args = tiny_args(bn_splits=1, batch_size=4, lr=1e-9)
        args.mask_own = mask
        torch.manual_seed(0)
        model = MoCo(args)
        with torch.no_grad():
            model.queue[:4] = model.keys(x)
        model.queue_ids[:4] = torch.arange(4)
        optimizer = torch.optim.SGD(model.query_parameters(), lr=1e-9)
        _, _, stats, _ = moco_mochi.train_one_epoch(model, model, [(x, x, None, torch.arange(4))], optimizer,
                                                    torch.amp.GradScaler("cpu", enabled=False), args, 0,
                                                    torch.device("cpu"), None)
        hardest[mask] = stats["hardest_cos"]
    assert hardest[False] == pytest.approx(1.0, abs=1e-5) and hardest[True] < 0.999

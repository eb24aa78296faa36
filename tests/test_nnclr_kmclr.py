"""nnclr_kmclr.py's functions and memories: the spec's test vectors (nnclr_kmclr.md section 9),
float64 loop references, gradcheck, the order of look-up and update, and two gloo processes."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import nnclr_kmclr as m

f64 = torch.float64


def vectors():
    """The inputs of spec section 9.1."""
    torch.manual_seed(0)
    z1, z2, p1, p2 = (torch.randn(4, 8, dtype=f64) for _ in range(4))
    return z1, z2, p1, p2, torch.randn(16, 8, dtype=f64), torch.randn(5, 8, dtype=f64)


def close(actual, expected, rel=1e-7):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=f64), torch.tensor(expected, dtype=f64), rtol=rel, atol=1e-8)


# ---- float64 loop references, written independently of the script ----

def ref_nn(z, support):
    rows = []
    for zi in z.tolist():
        best, best_j = -math.inf, 0
        for j, s in enumerate(support.tolist()):
            cos = sum(a * b for a, b in zip(zi, s)) / math.sqrt(sum(a * a for a in zi) * sum(b * b for b in s))
            if cos > best:
                best, best_j = cos, j
        rows.append(best_j)
    return rows


def ref_direction(anchors, p, t):
    """mean_i [log sum_j exp(a^_i.p^_j / t) - a^_i.p^_i / t] with loops."""
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]
    a, p = [unit(v) for v in anchors.tolist()], [unit(v) for v in p.tolist()]
    total = 0.0
    for i in range(len(a)):
        logits = [sum(x * y for x, y in zip(a[i], p[j])) / t for j in range(len(p))]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[i]
    return total / len(a)


def ref_nnclr(z1, z2, p1, p2, support, t):
    return 0.5 * ref_direction(support[ref_nn(z1, support)], p2, t) + 0.5 * ref_direction(support[ref_nn(z2, support)], p1, t)


def ref_assign(x, c):
    return [min(range(len(c)), key=lambda j: (sum((a - b) ** 2 for a, b in zip(xi, c[j])), j)) for xi in x.tolist()]


def ref_update(c, n, x, a):
    c, n = c.clone(), n.clone()
    for j in range(c.shape[0]):
        rows = [i for i in range(len(a)) if a[i] == j]
        if rows:
            total = sum(x[i] for i in rows)
            c[j] = (n[j] * c[j] + total) / (n[j] + len(rows))
            n[j] += len(rows)
    return c, n


# ---- section 9 vectors ----

def test_inputs_match_the_spec_checksums():
    for t, (s, first, last) in zip(vectors(), [(-8.5751984, -2.3104118, -0.89100304), (-0.51567719, -0.091741741, -0.0078556174),
                                               (7.2255754, -1.1287986, 0.88871446), (3.5291359, -0.59188236, -0.60368394),
                                               (-20.098518, 0.053419194, -0.76341347), (6.0131317, 2.096924, -0.14732233)]):
        close([t.sum(), t.flatten()[0], t.flatten()[-1]], [s, first, last])


def test_nnclr_vectors():
    z1, z2, p1, p2, queue, _ = vectors()
    assert m._nn_index(z1, queue).tolist() == [8, 7, 13, 13] and m._nn_index(z2, queue).tolist() == [9, 8, 6, 14]
    torch.testing.assert_close(m.nearest_neighbour(z1, queue), F.normalize(queue[[8, 7, 13, 13]], dim=1))
    nn1, nn2 = m.nearest_neighbour(z1, queue), m.nearest_neighbour(z2, queue)
    close(m.pair_loss(nn1, nn1, p2, p2), 4.6953710)          # both directions l(NN(z1), p2)
    close(m.pair_loss(nn2, nn2, p1, p1), 6.5486075)
    for t, value in [(0.1, 5.6219892), (0.2, 3.1725672), (0.5, 1.9462116)]:
        close(m.nnclr_loss(z1, z2, p1, p2, queue, t), value)
    z1.requires_grad_(True)
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    queue.requires_grad_(True)
    m.nnclr_loss(z1, z2, p1, p2, queue).backward()
    close(p1.grad[0], [0.17771762, -0.20579195, 0.18042482, 0.22666646, -0.036724658, 0.32969796, -0.01648024, -0.31259807])
    close([p1.grad.norm(), p2.grad.norm()], [1.2522665, 1.2558976])
    assert z1.grad is None and queue.grad is None          # only p gets a gradient
    anchors = queue[:4].detach().clone().requires_grad_(True)  # positives that could take a gradient: none
    m.pair_loss(anchors, anchors, p1, p2).backward()
    assert anchors.grad is None


def test_kmclr_loss_vectors():
    z1, z2, p1, p2, _, c = vectors()
    a1, a2 = m.kmeans_assign(z1, c), m.kmeans_assign(z2, c)
    assert a1.tolist() == [1, 1, 1, 1] and a2.tolist() == [1, 1, 4, 4]
    close(m.pair_loss(c[a1], c[a2], p1, p2), 5.0473393)
    close(m.nnclr_loss(c[a1], c[a2], p1, p2, c), 5.0473393)
    # cosine assignment (option O1) is the NN rule on the centroids
    assert m._nn_index(z1, c).tolist() == [1, 2, 3, 3] and m._nn_index(z2, c).tolist() == [0, 1, 4, 4]
    close(m.nnclr_loss(z1, z2, p1, p2, c), 6.7664556)


def test_kmeans_steps_a_a2_and_ema():
    z1, z2, _, _, _, c = vectors()
    n = torch.tensor([10.0, 3, 7, 1, 5], dtype=f64)
    c_in, n_in = c.clone(), n.clone()
    new, counts = m.kmeans_update(c, n, z1, m.kmeans_assign(z1, c))
    assert counts.tolist() == [10, 7, 7, 1, 5] and torch.equal(c, c_in) and torch.equal(n, n_in)  # pure
    close(new[1], [-0.41052533, 0.037022164, -0.4096397, 0.02446216, -0.10192041, -0.28824559, -0.4492532, -0.0017756126])
    close(new.sum(), 5.2878996)
    assert torch.equal(new[[0, 2, 3, 4]], c[[0, 2, 3, 4]])
    new, counts = m.kmeans_update(c, n, z2, m.kmeans_assign(z2, c))
    assert counts.tolist() == [10, 5, 7, 1, 7]
    close(new[1], [0.025967273, 0.13785332, -0.25038827, 0.026244176, -0.36671441, -0.418604, -0.50079702, 0.68162791])
    close(new[4], [-0.51490126, -1.1205093, 1.015287, 0.465152, -0.014765024, 0.8394363, 0.80970981, 0.02905275])
    new, _ = m.kmeans_update(c, n, z1, m.kmeans_assign(z1, c), momentum=0.9)
    close(new[1], [-0.19073719, 0.0022791821, -0.098193052, -0.13978274, -0.088838801, -0.38420086, -0.71708951, 0.61500397])
    assert torch.equal(new[[0, 2, 3, 4]], c[[0, 2, 3, 4]])


def test_reseed_step_b():
    z1, _, _, _, _, c = vectors()
    c[1] = 100.0
    n = torch.tensor([10.0, 0, 7, 1, 5], dtype=f64)
    a = m.kmeans_assign(z1, c)
    assert a.tolist() == [4, 2, 3, 3]
    c, n = m.kmeans_update(c, n, z1, a)
    assert n.tolist() == [10, 0, 8, 3, 6]
    c_in, n_in = c.clone(), n.clone()
    new, counts = m.reseed_dead(c, n, z1, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(c, c_in) and torch.equal(n, n_in)
    assert counts.tolist() == [10, 3, 8, 3, 6]
    assert torch.equal(new[1], z1[torch.randperm(4, generator=torch.Generator().manual_seed(0))[0]])
    assert torch.equal(new[1], z1[0])                      # spec: randperm(4) from seed 0 starts with 0
    close(new[2], [0.70890318, -0.28919297, -0.8661473, 0.7109985, 1.5284296, -1.3186574, 0.12559452, -0.27990687])
    close(new[3], [0.71140096, -0.71829711, -0.88844078, -1.2875699, 0.22888006, 0.3589253, 0.069693892, -0.43266101])
    close(new[4], [-0.23141461, -1.0080556, 0.71706883, 0.88439094, -0.020853776, 0.14696889, 0.44250085, -0.26717554])
    assert torch.equal(new[0], c[0])


# ---- loop references on random inputs ----

@pytest.mark.parametrize("b,d,k,t", [(3, 5, 7, 0.1), (6, 4, 2, 0.5), (5, 9, 40, 0.07)])
def test_functions_equal_loop_references(b, d, k, t):
    g = torch.Generator().manual_seed(b * d + k)
    z1, z2, p1, p2 = (torch.randn(b, d, generator=g, dtype=f64) for _ in range(4))
    support = torch.randn(k, d, generator=g, dtype=f64) * 3
    assert m._nn_index(z1, support).tolist() == ref_nn(z1, support)
    assert m.nnclr_loss(z1, z2, p1, p2, support, t).item() == pytest.approx(ref_nnclr(z1, z2, p1, p2, support, t), rel=1e-12)
    a = m.kmeans_assign(z1, support)
    assert a.tolist() == ref_assign(z1, support)
    counts = torch.randint(0, 5, (k,), generator=g).to(f64)
    for got, want in zip(m.kmeans_update(support, counts, z1, a), ref_update(support, counts, z1, a.tolist())):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    f32 = m.nnclr_loss(z1.float(), z2.float(), p1.float(), p2.float(), support.float(), t)
    assert f32.dtype == torch.float32 and f32.item() == pytest.approx(ref_nnclr(z1, z2, p1, p2, support, t), rel=1e-4)


def test_gradcheck_and_storage_invariance():
    g = torch.Generator().manual_seed(1)
    z1, z2, p1, p2 = (torch.randn(3, 4, generator=g, dtype=f64) for _ in range(4))
    support = torch.randn(6, 4, generator=g, dtype=f64)
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: m.nnclr_loss(z1, z2, a, b, support, 0.2), (p1, p2))
    # raw or normalised support rows, scaled z: the same neighbours and loss
    assert m.nnclr_loss(z1, z2, p1, p2, support).item() == pytest.approx(
        m.nnclr_loss(5 * z1, z2, p1, p2, F.normalize(support, dim=1)).item(), rel=1e-13)


def test_ties_go_to_the_first():
    support = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    assert m._nn_index(torch.tensor([[3.0, 0.0]]), support).tolist() == [1]
    assert m.kmeans_assign(torch.tensor([[1.5, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])).tolist() == [0]


def test_reseed_cap_counts_and_limits():
    x = torch.arange(12.0).view(6, 2)                      # N = 6: at most 3 re-seeds
    c = torch.zeros(7, 2)
    n = torch.tensor([100.0, 0.5, 0.25, 0.5, 0.25, 0.75, 50.0])
    new, counts = m.reseed_dead(c, n, x, 0.01, torch.Generator().manual_seed(3))
    flagged = [2, 4, 1]                                    # the 3 lowest, ties to the lower index (stable)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))[:3]
    assert torch.equal(new[sorted(flagged)], x[perm])      # ascending centroid order takes perm in order
    assert counts.tolist() == [100, 0.5, 0.5, 0.5, 0.5, 0.75, 50]  # min over the others, dropped ones included
    for ratio in (0.0, 0.001):
        same = m.reseed_dead(c, n, x, ratio)
        assert torch.equal(same[0], c) and torch.equal(same[1], n)
    zeros = m.reseed_dead(c, torch.zeros(7), x, 0.5)      # all counts 0: nothing flagged
    assert torch.equal(zeros[0], c)
    with pytest.raises(ValueError, match="every centroid"):
        m.reseed_dead(torch.zeros(2, 2), torch.tensor([1.0, 2.0]), x, 1.5)


def test_bad_arguments_raise_value_errors():
    x, c = torch.randn(4, 3), torch.randn(5, 3)
    for call in [lambda: m.nearest_neighbour(x, torch.zeros(0, 3)), lambda: m.nearest_neighbour(x[0], c),
                 lambda: m.nnclr_loss(x, x, x, x, torch.randn(5, 2)), lambda: m.nnclr_loss(x, x, x, x, c, 0.0),
                 lambda: m.nnclr_loss(x, x, x, x, c, -1.0), lambda: m.kmeans_assign(x, torch.randn(5, 4)),
                 lambda: m.kmeans_update(c, torch.ones(5), x, torch.tensor([0, 1, 5, 2])),
                 lambda: m.kmeans_update(c, torch.ones(5), x, torch.tensor([0, 1])),
                 lambda: m.kmeans_update(c, torch.ones(4), x, torch.tensor([0, 1, 2, 3])),
                 lambda: m.reseed_dead(c, torch.ones(5), x, -0.1)]:
        with pytest.raises(ValueError):
            call()


# ---- memories and the order of a step ----

def test_lookup_before_enqueue_and_wrap():
    z1, z2, p1, p2, _, _ = vectors()
    mem = m.SupportSet(6, 8, seed=0).double()
    before = mem.queue.clone()
    mem.ptr = 4                                            # 4 rows from pointer 4 wrap into rows 4, 5, 0, 1
    loss, nn_acc, _ = m.memory_step(mem, z1, z2, p1, p2, torch.tensor([0, 1, 2, 3]), 0.1)
    assert loss.item() == pytest.approx(m.nnclr_loss(z1, z2, p1, p2, before).item(), rel=1e-12)
    torch.testing.assert_close(mem.queue[[4, 5, 0, 1]], F.normalize(z1, dim=1))
    assert torch.equal(mem.queue[2:4], before[2:4]) and mem.ptr == 2
    assert mem.labels.tolist() == [2, 3, -1, -1, 0, 1] and nn_acc.item() == 0
    _, nn_acc, _ = m.memory_step(mem, z1, z2, p1, p2, torch.tensor([0, 1, 2, 3]), 0.1)
    assert nn_acc.item() == 1                              # each z1 now finds itself


def test_prototype_positives_come_before_the_update():
    z1, z2, p1, p2, _, c = vectors()
    mem = m.Prototypes(5, 8).double()
    mem.centroids.copy_(c)
    loss, used, _ = m.memory_step(mem, z1, z2, p1, p2, None, 0.1)
    close(loss, 5.0473393)
    assert used.item() == 2 and not torch.equal(mem.centroids, c)
    cos = m.Prototypes(5, 8, metric="cosine").double()
    cos.centroids.copy_(c)
    close(m.memory_step(cos, z1, z2, p1, p2, None, 0.1)[0], 6.7664556)
    torch.testing.assert_close(cos.recent[:4], F.normalize(z1, dim=1))  # cosine mode keeps normalised rows


def ref_prototypes(xs, k, d, seed, reset_steps, ratio=0.01):
    """The original flow (spec 3.1/3.2) written out step by step, with loops for the k-means."""
    g = torch.Generator().manual_seed(seed)
    recent = torch.rand(k, d, generator=g).double()
    c, n, seen, ptr = recent.clone(), torch.ones(k, dtype=f64), 0, 0
    for step, x in enumerate(xs, start=1):
        x = x.double()
        for row in x:                                      # shift buffer of the last k rows
            recent[ptr] = row
            ptr = (ptr + 1) % k
        if reset_steps and step % reset_steps == 0:
            c, n, seen = torch.cat([recent[ptr:], recent[:ptr]]), torch.ones(k, dtype=f64), 0
        seen += min(1024, k)
        check = bool((n == 0).any()) or seen >= 10 * k
        if check:
            seen = 0
        c, n = ref_update(c, n, x, ref_assign(x, c))
        if check:
            dead = [j for j in range(k) if n[j] < ratio * n.max()]
            if dead:
                rows = torch.randperm(len(x), generator=g)[:len(dead)]
                low = min(n[j] for j in range(k) if j not in dead)
                for j, r in zip(dead, rows):
                    c[j], n[j] = x[r], low
    return c, n


def test_prototypes_follow_the_original_flow():
    k, d, b = 6, 3, 4
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(b, d, generator=g, dtype=f64) * (1 + 4 * (i % 3 == 0)) for i in range(23)]
    mem = m.Prototypes(k, d, seed=7, reset_steps=13).double()
    calls = []
    real = m.reseed_dead
    try:
        m.reseed_dead = lambda *a: calls.append(mem.step) or real(*a)
        for x in xs:
            mem.update(x, None)
    finally:
        m.reseed_dead = real
    assert calls == [10, 22]                               # every 10 calls, restarted by the reset at step 13
    c, n = ref_prototypes(xs, k, d, 7, 13)
    torch.testing.assert_close(mem.centroids, c, rtol=1e-12, atol=1e-12)
    assert mem.counts.tolist() == n.tolist() and mem.step == 24


def test_reset_step_counts_and_sample_counter():
    k, d = 10, 3
    mem = m.Prototypes(k, d, seed=0, reset_steps=3, reseed_ratio=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, d, generator=g)
        mem.update(x, None)
    # step 3 reset the centroids to the last 10 rows; its own 4 rows then counted twice
    assert sorted(mem.counts.tolist()) == [1] * 6 + [2] * 4 and mem.seen == k
    assert all(any(torch.equal(row, c) for c in mem.centroids) for row in x)
    samples = m.Prototypes(k, d, reseed_counter="samples")
    samples.update(torch.randn(4, d), None)
    assert samples.seen == 4


def test_projector_is_a_plain_head():
    import argparse
    args = argparse.Namespace(arch="resnet18", stem="cifar", width=2, stem_padding=1, proj_hidden_dim=8, proj_dim=4,
                              pred_dim=6)
    model = m.NNCLR(args, 3)
    kinds = [layer[1] for layer in m.head_layout(model.projector)]
    assert kinds == ["linear", "bn", "relu", "linear", "bn", "relu", "linear", "bn"]
    z1, z2, p1, p2, logits = model(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    assert p1.shape == z1.shape == (2, 4) and logits.shape == (4, 3)
    logits.sum().backward()                                # the probe sees detached features
    assert model.backbone.conv1.weight.grad is None


# ---- two gloo processes ----

WORLD = 2


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    z1, z2, p1, p2, queue, _ = vectors()
    rows = slice(2 * rank, 2 * rank + 2)
    a, b = p1[rows].clone().requires_grad_(True), p2[rows].clone().requires_grad_(True)
    loss = m.nnclr_loss(z1[rows], z2[rows], a, b, queue)
    loss.backward()
    result = {"loss": loss.item(), "grads": (a.grad, b.grad)}
    support, protos, big = m.SupportSet(12, 3, seed=1), m.Prototypes(6, 3, seed=2, reset_steps=5), m.Prototypes(3, 3)
    for x, y in steps():
        for mem in (support, protos, big):
            mem.update(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2])
    result["memories"] = [mem.state_dict() for mem in (support, protos, big)]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def steps():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, generator=g) * (1 + 5 * (i % 4 == 0)), torch.arange(4) + 4 * i) for i in range(12)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("nnclr_dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_processes_equal_one(ranks):
    z1, z2, p1, p2, queue, _ = vectors()
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    single = m.nnclr_loss(z1, z2, p1, p2, queue)
    single.backward()
    close([r["loss"] for r in ranks], [4.9478439, 6.2961346])
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(single.item(), rel=1e-12)
    for rank, r in enumerate(ranks):
        rows = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(r["grads"][0] / WORLD, p1.grad[rows], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r["grads"][1] / WORLD, p2.grad[rows], rtol=1e-10, atol=1e-14)


def test_two_processes_hold_the_same_memories(ranks):
    support, protos, big = m.SupportSet(12, 3, seed=1), m.Prototypes(6, 3, seed=2, reset_steps=5), m.Prototypes(3, 3)
    for x, y in steps():
        for mem in (support, protos, big):
            mem.update(x, y)                               # one process, the whole batch
    for r in ranks:
        for mem, state in zip((support, protos, big), r["memories"]):
            for key, value in mem.state_dict().items():
                if key.endswith("_extra_state"):
                    got = {k: v for k, v in state[key].items() if k != "generator"}
                    assert got == {k: v for k, v in value.items() if k != "generator"}, key
                else:
                    assert torch.equal(state[key], value), key
    assert ranks[0]["memories"][0]["labels"].tolist() == list(range(36, 48))

"""nnclr_kmclr.py's functions and step: the spec's test vectors (shared/specs/nnclr_kmclr.md, section
9), float64 loop references, a reference training step per method written from the original code
(mwritescode/nnclr-cifar100 at 2ec8e6a), the negatives monitor on constructed values, and two gloo
processes against one."""
import argparse
import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import nnclr_kmclr as m

f64 = torch.float64


def vectors():
    """The inputs of spec section 9.1."""
    torch.manual_seed(0)
    z1, z2, p1, p2 = (torch.randn(4, 8, dtype=f64) for _ in range(4))
    return z1, z2, p1, p2, torch.randn(16, 8, dtype=f64), torch.randn(5, 8, dtype=f64)


def close(actual, expected, rel=1e-7):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=f64), torch.tensor(expected, dtype=f64),
                               rtol=rel, atol=1e-8)


# ---- float64 loop references, written from the definitions (no code of the script) ----

def ref_nn(z, support):
    """Index of the cosine-nearest support row of each z row, the first on ties."""
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
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    a, p = [unit(v) for v in anchors.tolist()], [unit(v) for v in p.tolist()]
    total = 0.0
    for i in range(len(a)):
        logits = [sum(x * y for x, y in zip(a[i], p[j])) / t for j in range(len(p))]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[i]
    return total / len(a)


def ref_nnclr(z1, z2, p1, p2, support, t):
    return 0.5 * ref_direction(support[ref_nn(z1, support)], p2, t) + \
        0.5 * ref_direction(support[ref_nn(z2, support)], p1, t)


def ref_assign(x, c):
    """scikit-learn's predict: the nearest centroid by squared Euclidean distance, first on ties."""
    return [min(range(len(c)), key=lambda j: (sum((a - b) ** 2 for a, b in zip(xi, c[j])), j))
            for xi in x.tolist()]


def ref_update(c, n, x, a):
    """scikit-learn's _mini_batch_step update (sample weights 1), one centroid at a time."""
    c, n = c.clone(), n.clone()
    for j in range(c.shape[0]):
        rows = [i for i in range(len(a)) if a[i] == j]
        if rows:
            total = sum(x[i] for i in rows)
            c[j] = (n[j] * c[j] + total) / (n[j] + len(rows))
            n[j] += len(rows)
    return c, n


def ref_reseed(c, n, x, generator, ratio=0.01):
    """scikit-learn's _mini_batch_step re-seeding (spec section 3.1): flagged = counts < ratio max;
    above N / 2 flagged keep the N // 2 lowest (stable); ascending centroid order takes rows
    randperm(N)[:r] (theirs: numpy's choice, the same law); counts become the least unflagged."""
    c, n = c.clone(), n.clone()
    flagged = [j for j in range(len(n)) if n[j] < ratio * max(n)]
    if len(flagged) > 0.5 * len(x):
        flagged = sorted(sorted(flagged, key=lambda j: n[j].item())[:len(x) // 2])
    if flagged:
        rows = torch.randperm(len(x), generator=generator)[:len(flagged)]
        low = min(n[j] for j in range(len(n)) if j not in flagged)
        for j, r in zip(flagged, rows.tolist()):
            c[j], n[j] = x[r], low
    return c, n


# ---- section 9 vectors ----

def test_inputs_match_the_spec_checksums():
    sums = [(-8.5751984, -2.3104118, -0.89100304), (-0.51567719, -0.091741741, -0.0078556174),
            (7.2255754, -1.1287986, 0.88871446), (3.5291359, -0.59188236, -0.60368394),
            (-20.098518, 0.053419194, -0.76341347), (6.0131317, 2.096924, -0.14732233)]
    for t, (s, first, last) in zip(vectors(), sums):
        close([t.sum(), t.flatten()[0], t.flatten()[-1]], [s, first, last])


def test_nnclr_vectors():
    z1, z2, p1, p2, queue, _ = vectors()
    assert m._nn_index(z1, queue).tolist() == [8, 7, 13, 13]
    assert m._nn_index(z2, queue).tolist() == [9, 8, 6, 14]
    torch.testing.assert_close(m.nearest_neighbour(z1, queue), F.normalize(queue[[8, 7, 13, 13]], dim=1))
    nn1, nn2 = m.nearest_neighbour(z1, queue), m.nearest_neighbour(z2, queue)
    close(m.contrast(nn1, nn1, p2, p2)[0], 4.6953710)          # both directions l(NN(z1), p2)
    close(m.contrast(nn2, nn2, p1, p1)[0], 6.5486075)
    for t, value in [(0.1, 5.6219892), (0.2, 3.1725672), (0.5, 1.9462116)]:
        close(m.nnclr_loss(z1, z2, p1, p2, queue, t), value)
    for t in (z1, p1, p2, queue):
        t.requires_grad_(True)
    m.nnclr_loss(z1, z2, p1, p2, queue).backward()
    close(p1.grad[0], [0.17771762, -0.20579195, 0.18042482, 0.22666646, -0.036724658, 0.32969796,
                       -0.01648024, -0.31259807])
    close([p1.grad.norm(), p2.grad.norm()], [1.2522665, 1.2558976])
    assert z1.grad is None and queue.grad is None             # only p gets a gradient


def test_kmclr_loss_vectors():
    z1, z2, p1, p2, _, c = vectors()
    a1, a2 = m.kmeans_assign(z1, c), m.kmeans_assign(z2, c)
    assert a1.tolist() == [1, 1, 1, 1] and a2.tolist() == [1, 1, 4, 4]
    close(m.contrast(c[a1], c[a2], p1, p2)[0], 5.0473393)
    close(m.nnclr_loss(c[a1], c[a2], p1, p2, c), 5.0473393)
    anchors = c[a1].clone().requires_grad_(True)              # positives never take a gradient
    m.contrast(anchors, anchors, p1.requires_grad_(True), p2)[0].backward()
    assert anchors.grad is None and p1.grad is not None


def test_kmeans_steps_a_and_a2():
    z1, z2, _, _, _, c = vectors()
    n = torch.tensor([10.0, 3, 7, 1, 5], dtype=f64)
    c_in, n_in = c.clone(), n.clone()
    new, counts = m.kmeans_update(c, n, z1, m.kmeans_assign(z1, c))
    assert counts.tolist() == [10, 7, 7, 1, 5] and torch.equal(c, c_in) and torch.equal(n, n_in)
    close(new[1], [-0.41052533, 0.037022164, -0.4096397, 0.02446216, -0.10192041, -0.28824559,
                   -0.4492532, -0.0017756126])
    close(new.sum(), 5.2878996)
    assert torch.equal(new[[0, 2, 3, 4]], c[[0, 2, 3, 4]])
    new, counts = m.kmeans_update(c, n, z2, m.kmeans_assign(z2, c))
    assert counts.tolist() == [10, 5, 7, 1, 7]
    close(new[1], [0.025967273, 0.13785332, -0.25038827, 0.026244176, -0.36671441, -0.418604,
                   -0.50079702, 0.68162791])
    close(new[4], [-0.51490126, -1.1205093, 1.015287, 0.465152, -0.014765024, 0.8394363,
                   0.80970981, 0.02905275])


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
    assert torch.equal(new[1], z1[0])                      # spec: randperm(4) from seed 0 starts with 0
    close(new[2], [0.70890318, -0.28919297, -0.8661473, 0.7109985, 1.5284296, -1.3186574,
                   0.12559452, -0.27990687])
    close(new[3], [0.71140096, -0.71829711, -0.88844078, -1.2875699, 0.22888006, 0.3589253,
                   0.069693892, -0.43266101])
    close(new[4], [-0.23141461, -1.0080556, 0.71706883, 0.88439094, -0.020853776, 0.14696889,
                   0.44250085, -0.26717554])
    assert torch.equal(new[0], c[0])


# ---- loop references on random inputs ----

@pytest.mark.parametrize("b,d,k,t", [(3, 5, 7, 0.1), (6, 4, 2, 0.5), (5, 9, 40, 0.07)])
def test_functions_equal_loop_references(b, d, k, t):
    g = torch.Generator().manual_seed(b * d + k)
    z1, z2, p1, p2 = (torch.randn(b, d, generator=g, dtype=f64) for _ in range(4))
    support = torch.randn(k, d, generator=g, dtype=f64) * 3
    assert m._nn_index(z1, support).tolist() == ref_nn(z1, support)
    assert m.nnclr_loss(z1, z2, p1, p2, support, t).item() == pytest.approx(
        ref_nnclr(z1, z2, p1, p2, support, t), rel=1e-12)
    a = m.kmeans_assign(z1, support)
    assert a.tolist() == ref_assign(z1, support)
    counts = torch.randint(0, 5, (k,), generator=g).to(f64)
    for got, want in zip(m.kmeans_update(support, counts, z1, a), ref_update(support, counts, z1, a.tolist())):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    f32 = m.nnclr_loss(z1.float(), z2.float(), p1.float(), p2.float(), support.float(), t)
    assert f32.dtype == torch.float32
    assert f32.item() == pytest.approx(ref_nnclr(z1, z2, p1, p2, support, t), rel=1e-4)


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
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))[:3]
    assert torch.equal(new[[1, 2, 4]], x[perm])            # the 3 lowest (stable), ascending order
    assert torch.equal(new[[0, 3, 5, 6]], c[[0, 3, 5, 6]])
    assert counts.tolist() == [100, 0.5, 0.5, 0.5, 0.5, 0.75, 50]  # the least of the others, 3 included
    for ratio in (0.0, 0.001):
        same = m.reseed_dead(c, n, x, ratio)
        assert torch.equal(same[0], c) and torch.equal(same[1], n)
    assert torch.equal(m.reseed_dead(c, torch.zeros(7), x, 0.5)[0], c)  # all counts 0: none flagged
    with pytest.raises(ValueError, match="every centroid"):
        m.reseed_dead(torch.zeros(2, 2), torch.tensor([1.0, 2.0]), x, 1.5)


def test_bad_arguments_raise_value_errors():
    x, c = torch.randn(4, 3), torch.randn(5, 3)
    for call in [lambda: m.nearest_neighbour(x, torch.zeros(0, 3)), lambda: m.nearest_neighbour(x[0], c),
                 lambda: m.nnclr_loss(x, x, x, x, torch.randn(5, 2)), lambda: m.nnclr_loss(x, x, x, x, c, 0.0),
                 lambda: m.nnclr_loss(x, x, x, x[:3], c), lambda: m.kmeans_assign(x, torch.randn(5, 4)),
                 lambda: m.kmeans_update(c, torch.ones(5), x, torch.tensor([0, 1, 5, 2])),
                 lambda: m.kmeans_update(c, torch.ones(5), x, torch.tensor([0, 1])),
                 lambda: m.kmeans_update(c, torch.ones(4), x, torch.tensor([0, 1, 2, 3])),
                 lambda: m.reseed_dead(c, torch.ones(5), x, -0.1),
                 lambda: m.reseed_dead(c, torch.ones(4), x)]:
        with pytest.raises(ValueError):
            call()


# ---- the training step against a reference written from the original loop ----

def tiny_args(method, **changes):
    args = argparse.Namespace(arch="resnet18", stem="cifar", width=2, stem_padding=1, hidden_dim=16,
                              feature_dim=8, pred_dim=16, seed=3, method=method, queue_size=10,
                              num_prototypes=8, reset_every=1, temperature=0.1, lr=0.1,
                              weight_decay=0.01, momentum=0.9)
    return argparse.Namespace(**{**vars(args), **changes})


class Reference:
    """One training step as mwritescode/nnclr-cifar100 (2ec8e6a) runs it, written out plainly on a
    copy of the model, with the project's deliberate deviations (README) marked DEVIATION."""

    def __init__(self, model, args, lr):
        self.net, self.args, self.lr, self.momentum = copy.deepcopy(model), args, lr, {}
        state = {k: v.clone() for k, v in model.state_dict().items()}
        # DEVIATION: the queue stores normalize(z1) (theirs raw z1, normalised at every look-up:
        # the same neighbours and loss); KMCLR's shift buffer init_values is a ring with a pointer:
        # we keep it oldest first. Labels ride along (theirs keep none: the nn_acc monitor).
        ptr = int(state["ptr"])
        self.rows, self.labels = state["rows"].roll(-ptr, 0), state["labels"].roll(-ptr, 0)
        if args.method == "kmclr":
            self.c, self.n = state["centroids"].clone(), state["counts"].clone()
            self.seen, self.calls = int(state["seen"]), int(state["step"])  # kmclr.py's self.step

    def step(self, x1, x2, labels):
        net, args = self.net, self.args
        # src/models/nnclr.py (and kmclr.py) forward, lines 52-59: each view alone
        f1, f2 = net.backbone(x1), net.backbone(x2)
        proj1, proj2 = net.projector(f1), net.projector(f2)
        pred1, pred2 = net.predictor(proj1), net.predictor(proj2)
        if args.method == "nnclr":  # src/utils/support_set.py QueueSupportSet.forward, lines 25-34
            queue_l2 = F.normalize(self.rows, p=2, dim=1)
            i1 = (F.normalize(proj1, dim=1) @ queue_l2.T).argmax(dim=1)
            i2 = (F.normalize(proj2, dim=1) @ queue_l2.T).argmax(dim=1)
            nn1, nn2 = queue_l2[i1], queue_l2[i2]
            pos_labels = torch.cat([self.labels[i1], self.labels[i2]])
        else:  # src/models/kmclr.py lines 71-80: kmeans.predict on raw float64 projections
            a1 = ref_assign(proj1.detach().double(), self.c)
            a2 = ref_assign(proj2.detach().double(), self.c)
            nn1, nn2 = self.c[a1].float(), self.c[a2].float()
            # the monitor: a centroid's class is that of the ring's row nearest to it
            pos_labels = self.labels[ref_assign(torch.cat([self.c[a1], self.c[a2]]), self.rows.double())]

        # src/utils/training/loss.py NNCLRLoss, lines 11-27: loss(pred1, nn2)/2 + loss(pred2, nn1)/2
        def loss_fn(pred, nn_):
            logits = F.normalize(nn_, p=2, dim=1) @ F.normalize(pred, p=2, dim=1).T / args.temperature
            return F.cross_entropy(logits, torch.arange(len(pred))), logits.detach()

        l1, logits_21 = loss_fn(pred1, nn2)
        l2, logits_12 = loss_fn(pred2, nn1)
        loss = l1 * 0.5 + l2 * 0.5
        for p in net.parameters():
            p.grad = None
        loss.backward()  # src/trainer.py lines 141-162: zero_grad, forward, backward, step
        self.lars_step()
        x = proj1.detach().float()
        if args.method == "nnclr":  # src/models/nnclr.py line 68: update_queue(proj1), after the loss
            self.push(F.normalize(x, dim=1), labels)  # DEVIATION: wraps, never drops rows
        else:
            self.kmeans(x, labels)
        return loss.detach(), torch.cat([logits_12, logits_21]), pos_labels

    def lars_step(self):
        """src/utils/training/optim.py LARS.step, lines 122-159 (lightning-bolts), momentum 0.9.
        DEVIATION: decay and LARS on every weight with 2+ dimensions; all 1-D parameters (biases and
        BatchNorm) without (theirs: configure_parameter_groups, lines 17-29, by 'bn' in the name)."""
        for name, p in self.net.named_parameters():
            wd = self.args.weight_decay if p.dim() > 1 else 0.0
            d_p = p.grad.clone()
            if wd != 0:
                p_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
                if p_norm != 0 and g_norm != 0:
                    lars_lr = p_norm / (g_norm + p_norm * wd + 1e-8) * 1e-3
                    d_p = (d_p + wd * p.data) * lars_lr
            if name not in self.momentum:
                self.momentum[name] = d_p.clone()
            else:
                self.momentum[name] = self.momentum[name] * self.args.momentum + d_p
            with torch.no_grad():
                p -= self.lr * self.momentum[name]

    def push(self, rows, labels):
        """FIFO, oldest first: the last K rows of everything seen (rows and labels)."""
        k = len(self.rows)
        self.rows = torch.cat([self.rows, rows.to(self.rows.dtype)])[-k:]
        self.labels = torch.cat([self.labels, labels])[-k:]

    def kmeans(self, x, labels):
        """src/models/kmclr.py lines 83-98 and scikit-learn MiniBatchKMeans.partial_fit."""
        k = len(self.c)
        self.push(x, labels)  # lines 84-91: shift buffer (DEVIATION for N >= k: the last k rows)
        if self.calls % self.reset_steps == 0:  # lines 92-95: a new MiniBatchKMeans on init_values
            self.c, self.n, self.seen = self.rows.double().clone(), torch.ones(k, dtype=f64), 0
        # scikit-learn _mini_batch_step / _random_reassign: the counter grows by _batch_size =
        # min(1024, k) and, with any count at 0, or at 10 k, triggers a re-seed check
        self.seen += min(1024, k)
        check = bool((self.n == 0).any()) or self.seen >= 10 * k
        if check:
            self.seen = 0
        xd, self.reseeded = x.double(), None
        self.c, self.n = ref_update(self.c, self.n, xd, ref_assign(xd, self.c))
        if check:  # DEVIATION: draws from a torch generator seeded by (--seed, step), not numpy's
            g = torch.Generator().manual_seed((self.args.seed << 32) + self.calls)
            before = self.c.clone()
            self.c, self.n = ref_reseed(self.c, self.n, xd, g)
            self.reseeded = int((self.c != before).any(1).sum())
        self.calls += 1


def ref_rates(logits, labels, pos_labels):
    """Per anchor row: its negatives are every column but its own image's; fn_rate = share of them
    of its class, fn_rate_hard = over its max(1, n // 100) most similar; nn_acc: positive's class."""
    out = {"fn_rate": [], "fn_rate_hard": [], "nn_acc": []}
    b = len(labels)
    for r in range(2 * b):
        i, y = r % b, labels[r % b].item()
        neg = [j for j in range(b) if j != i]
        known = [j for j in neg if labels[j] >= 0] if y >= 0 else []
        hard = sorted(known, key=lambda j: -logits[r, j].item())[:max(1, len(known) // 100)]
        out["fn_rate"].append(sum(labels[j] == y for j in known) / len(known) if known else math.nan)
        out["fn_rate_hard"].append(sum(labels[j] == y for j in hard) / len(hard) if known else math.nan)
        pos = pos_labels[r].item()
        out["nn_acc"].append(float(pos == y) if y >= 0 and pos >= 0 else math.nan)
    return {k: torch.tensor(v, dtype=f64) for k, v in out.items()}


def setup_step(method, steps=3, b=6, seed=0, **changes):
    args = tiny_args(method, **changes)
    torch.manual_seed(seed)
    model = m.NNCLR(args, steps_per_epoch=3)
    optimizer = m.make_optimizer(model, args, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(b, 3, 8, 8, generator=g), torch.randn(b, 3, 8, 8, generator=g),
                torch.tensor([0, 1, 2, 0, 1, -1] * (b // 6))) for _ in range(steps)]
    return args, model, optimizer, batches


# Biases whose shift the next BatchNorm undoes (z's BN bias: the predictor's BN follows): their
# gradient is 0 but for rounding noise.
NOISE = {"projector.0.bias", "projector.3.bias", "projector.6.bias", "projector.7.bias",
         "predictor.0.bias"}


def assert_same_state(model, optimizer, ref):
    assert not any(t.requires_grad for t in model.buffers())  # the memory holds no graph
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref.net.named_parameters())[name], rtol=1e-4, atol=1e-5)
    for name, t in model.state_dict().items():
        if name.startswith(("backbone", "projector", "predictor")):
            torch.testing.assert_close(t, ref.net.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    ptr = int(model.ptr)
    torch.testing.assert_close(model.rows.roll(-ptr, 0), ref.rows, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.labels.roll(-ptr, 0), ref.labels)
    names = dict((p, n) for n, p in model.named_parameters())
    for p, state in optimizer.state.items():
        want = ref.momentum[names[p]]
        torch.testing.assert_close(state["momentum_buffer"], want, rtol=1e-4, atol=1e-5 if names[p]
                                   in NOISE else 1e-4 * want.abs().max().item())
    assert len(optimizer.state) == len(ref.momentum)


@pytest.mark.parametrize("method", ["nnclr", "kmclr"])
def test_train_step_equals_the_original_step(method, monkeypatch):
    """Three steps of train_step with the optimizer main builds against Reference: the loss, every
    parameter, buffer (BN statistics, queue or ring, pointer, labels, centroids, counts, counter,
    step) and momentum buffer, and the monitors. NNCLR: the queue of 10 wraps in step 2. KMCLR
    (k = 8): scikit-learn's counter set to 8 k, so that step 1 checks nothing (9 k) and step 2
    does, with counts set so that 7 are low and 3 (the cap, N // 2) re-seeded; step 3 restarts the
    centroids from the ring (every 3 steps)."""
    args, model, optimizer, batches = setup_step(method)
    if method == "kmclr":
        model.seen.fill_(8 * 8)
        model.counts.copy_(torch.tensor([4000.0, 1, 2, 1, 1, 3, 1, 2], dtype=f64))
        model.centroids.normal_(generator=torch.Generator().manual_seed(9))
    ref = Reference(model, args, args.lr)
    ref.reset_steps = model.reset_steps
    assert ref.reset_steps == 3
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step, (x1, x2, y) in enumerate(batches):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = m.train_step(model, model, optimizer, scaler, x1, x2, y, args, None)
        loss, logits, pos_labels = ref.step(x1, x2, y)
        torch.testing.assert_close(out["loss"], loss, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():  # the updates themselves, not only the weights
            want = dict(ref.net.named_parameters())[name].detach() - before[name]
            scale = 1e-4 * want.abs().max() + 4e-7 * before[name].abs().max()  # (float32 ulps of p)
            torch.testing.assert_close(p.detach() - before[name], want, rtol=1e-3,
                                       atol=1e-5 if name in NOISE else scale.item(), msg=name)
        assert_same_state(model, optimizer, ref)
        for name, value in ref_rates(logits, y, pos_labels).items():
            torch.testing.assert_close(out[name].double(), value, equal_nan=True, msg=name)
        if method == "kmclr":
            torch.testing.assert_close(model.centroids, ref.c, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model.counts, ref.n)
            assert (int(model.seen), int(model.step)) == (ref.seen, ref.calls)
            if step == 0:
                assert int(model.seen) == 9 * 8 and ref.reseeded is None
            if step == 1:  # re-seeded: three centroids (the cap, N // 2) moved onto view-1 rows
                assert ref.reseeded == 3 and int(model.seen) == 0
            if step == 2:  # restarted: the ring, oldest first; the batch's 6 rows counted twice
                assert sorted(ref.n.tolist()) == [1.0] * 2 + [2.0] * 6
    assert int(model.ptr) == (18 % 10 if method == "nnclr" else 18 % 8)


def test_the_monitor_changes_nothing(monkeypatch):
    """The negatives monitor reads detached values: with negative_rates stubbed out, one step gives
    the same parameters and memory bit for bit."""
    results = []
    for stub in (False, True):
        args, model, optimizer, batches = setup_step("kmclr", steps=1)
        if stub:
            monkeypatch.setattr(m, "negative_rates", lambda *a: {})
        m.train_step(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                     *batches[0], args, None)
        results.append(model.state_dict())
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


class Stub(nn.Module):
    """A network without BatchNorm: z = W x, p = V z. Several processes then compute what one
    process computes on their whole batch."""

    def __init__(self, z=None, p=None):
        super().__init__()
        torch.manual_seed(0)
        self.fixed = (z, p)
        if z is None:
            self.f, self.g = nn.Linear(12, 4), nn.Linear(4, 4)
        else:
            self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x1, x2):
        if self.fixed[0] is not None:  # constructed embeddings: z and p given, p scaled by 1
            z, p = self.fixed
            return z[0], z[1], self.scale * p[0], self.scale * p[1]
        z1, z2 = self.f(x1.flatten(1)), self.f(x2.flatten(1))
        return z1, z2, self.g(z1), self.g(z2)


def test_monitor_on_constructed_embeddings():
    """b = 4 images of classes [0, 0, 1, -1]; p_j = e_j, so row i's similarities are its positive
    anchor's coordinates. Each row's negatives are the 3 other images, the unknown one left out:
    image 0: {1 same, 2 other}, fn_rate 1/2; image 1 likewise; image 2: {0, 1} both other, 0;
    image 3: unknown class, NaN. The hard negative (1% of 2, at least 1) is the most similar.
    nn_acc: the NN rows' labels are set by hand."""
    e = torch.eye(4)
    z1 = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    args = tiny_args("nnclr", feature_dim=4, queue_size=4)
    model = m.NNCLR(args, 1)
    # queue row r: anchor for image r (cos 1 with z1_r); its other coordinates pick the hard negative
    queue = torch.tensor([[3.0, 0, 1, 0], [0.5, 3, 0, 0], [1, 2, 3, 0], [0, 0, 0, 1]])
    model.rows.copy_(F.normalize(queue, dim=1))
    model.labels.copy_(torch.tensor([0, 1, 1, 5]))
    net = Stub(z=(z1, z1), p=(e, e))
    optimizer = m.make_optimizer(net, args, torch.device("cpu"))
    x = torch.zeros(4, 3, 2, 2)
    out = m.train_step(net, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), x, x,
                       torch.tensor([0, 0, 1, -1]), args, None)
    nan = math.nan
    # image 0: negatives 1 (same, similarity 0), 2 (other, 1): hard = image 2 -> 0
    # image 1: negatives 0 (same, 0.5), 2 (other, 0): hard = image 0 -> 1
    # image 2: negatives 0 (other, 1), 1 (other, 2): hard = image 1 -> 0
    want = {"fn_rate": [0.5, 0.5, 0.0, nan], "fn_rate_hard": [0.0, 1.0, 0.0, nan],
            "nn_acc": [1.0, 0.0, 1.0, nan]}
    for name, value in want.items():
        torch.testing.assert_close(out[name].double(), torch.tensor(value * 2, dtype=f64),
                                   equal_nan=True, msg=name)


# ---- two gloo processes against one ----

WORLD = 2


def run_steps(method, rank, world):
    """Two steps of train_step on rows [rank b, (rank + 1) b) of 6-image batches."""
    args = tiny_args(method, feature_dim=4, queue_size=8, num_prototypes=6)
    model = m.NNCLR(args, steps_per_epoch=2)  # KMCLR: a restart at step 2
    if method == "kmclr":
        model.seen.fill_(9 * 6)  # a re-seed check at step 1
        model.counts.copy_(torch.tensor([500.0, 1, 1, 80, 90, 70], dtype=f64))
    net = Stub()
    optimizer = m.make_optimizer(net, args, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    net = m.distribute(model, net, argparse.Namespace(compile=False), torch.device("cpu"))
    g, b, steps = torch.Generator().manual_seed(4), 6 // world, []
    for _ in range(2):
        x1, x2 = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
        y = torch.tensor([0, 1, 1, 0, 2, -1])
        rows = slice(rank * b, rank * b + b)
        steps.append(m.train_step(net, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                  x1[rows], x2[rows], y[rows], args, None))
    stub = net.module if world > 1 else net
    return {"stats": m.epoch_stats(steps), "memory": model.state_dict(),
            "params": {k: v.detach() for k, v in stub.state_dict().items()}}


def worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    z1, z2, p1, p2, queue, _ = vectors()
    rows = slice(2 * rank, 2 * rank + 2)
    a, b = p1[rows].clone().requires_grad_(True), p2[rows].clone().requires_grad_(True)
    loss = m.nnclr_loss(z1[rows], z2[rows], a, b, queue)
    loss.backward()
    result = {"loss": loss.item(), "grads": (a.grad, b.grad)}
    for method in ("nnclr", "kmclr"):
        result[method] = run_steps(method, rank, WORLD)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("nnclr_dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_two_processes_nnclr_loss(ranks):
    """Spec section 9.2: local losses 4.9478439 and 6.2961346, their mean the whole batch's; each
    gradient / world size (DDP's average) the whole batch's gradient of its rows."""
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


@pytest.mark.parametrize("method", ["nnclr", "kmclr"])
def test_two_processes_equal_one(ranks, method):
    """Two steps on two processes against one process on the whole batch: the epoch statistics
    (loss, fn_rate, fn_rate_hard, nn_acc: global), the network, and the memory on both ranks."""
    one = run_steps(method, 0, 1)
    for r in ranks:
        got = r[method]
        for name, value in one["stats"].items():
            assert got["stats"][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
        for name, value in one["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6)
        for name, value in one["memory"].items():
            if not name.startswith(("backbone", "projector", "predictor")):
                torch.testing.assert_close(got["memory"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert set(one["stats"]) == {"loss", "fn_rate", "fn_rate_hard", "nn_acc"}
    for name in ("rows", "labels", "ptr", "centroids", "counts", "seen", "step"):
        if name in ranks[0][method]["memory"]:
            assert torch.equal(ranks[0][method]["memory"][name], ranks[1][method]["memory"][name])


def test_reseed_cadence_beyond_1024_prototypes(monkeypatch):
    """scikit-learn's counter grows by its _batch_size = min(1024, k) a call and checks at 10 k:
    for k > 1024 every ceil(10 k / 1024) calls (shared spec nnclr_kmclr.md, 'Re-seeding': k = 1100
    -> calls 11, 22), not every 10 as for k <= 1024."""
    k, checks = 1100, []
    model = SimpleNamespace(centroids=torch.rand(k, 2, dtype=f64), counts=torch.ones(k, dtype=f64),
                            seen=torch.tensor(0), step=torch.tensor(1), rows=torch.rand(k, 2),
                            ptr=torch.tensor(0), reset_steps=0, seed=0)
    monkeypatch.setattr(m, "reseed_dead", lambda c, n, *a: checks.append(int(model.step)) or (c, n))
    for _ in range(23):
        m.kmeans_step(model, torch.rand(8, 2))
    assert checks == [11, 22]

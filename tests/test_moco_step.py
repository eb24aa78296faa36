"""One step of moco_mochi.py's own loop (train_step, with make_optimizer's SGD) against a step
written independently from the original code, in float64 (two steps, so SGD's momentum is used):
- facebookresearch/moco (78b69ca) main_moco.py train() lines 293-315: output, target =
  model(im_q, im_k); loss = criterion(output, target) (CrossEntropyLoss); zero_grad, backward,
  step; optimizer lines 195-197: SGD(model.parameters(), lr, momentum (0.9, line 55),
  weight_decay). moco/builder.py forward() lines 115-160: q = normalize(encoder_q(im_q)); under
  no_grad the momentum update (lines 45-50: param_k * m + param_q * (1 - m)) BEFORE the keys,
  shuffle, k = normalize(encoder_k(im_k)), unshuffle; l_pos = einsum('nc,nc->n'), l_neg against
  queue.clone().detach(); logits / T with the positive at 0; _dequeue_and_enqueue (lines 53-66).
- The CIFAR demo (branch colab-notebook, colab/moco_cifar10_demo.ipynb): SplitBatchNorm (cell 8:
  input.view(-1, C * G, H, W), i.e. image n in group n mod G, running statistics the groups'
  mean), _batch_shuffle_single_gpu (randperm, argsort) and forward() (cell 10): the momentum update
  once, loss_12 + loss_21 when symmetric (keys of view 2 first), the enqueue of cat([k1, k2]).
- davidsvy/hard-negative-mixing (2955553) src/moco.py forward() lines 212-274: the own-image mask
  (file_idxs == queue_file -> -inf) before the hard set, topk of the masked logits, type 1
  (randint(0, N, (2, B, s1)), rand(B, s1, 1), alpha n_i + (1 - alpha) n_j, normalised,
  detached), type 2 (randint(0, N, (B, s2)), 0.5 rand(B, s2, 1), beta q.detach() + (1 - beta)
  n_m), logits [pos | queue | type 1 | type 2] / T, the enqueue of keys and file ids.
The reference follows the project where the README says it differs: the hard set sorted (davidsvy's
topk(sorted=False) order is implementation-defined), a and b drawn in the features' dtype
(davidsvy: float32), the queue [K, D] with image ids also for MoCo (official: [D, K], no ids), SGD as
MoCo (not davidsvy's AdamW with clipping), the own-image mask only with --mask_own. Random draws:
both steps start from the same torch seed and draw in the same order (each pair's key permutation,
then MoCHi's positions and weights), so permutations and mixing weights are the same."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import moco_mochi as mm

B, K, D, SPLITS = 8, 32, 8, 2
CLASSES = [i % 4 for i in range(12)]  # the class of each image id
CPU = torch.device("cpu")


def make(flags, seed=0):
    """The script's model (float64, split BN in 2 groups) with a queue of known keys whose ids
    include the batch's images (ids 0..7), the pointer mid-queue and a key encoder != the query's."""
    args = mm.get_parser().parse_args(["--width", "2", "--feature_dim", str(D), "--queue_size", str(K),
                                       "--ema", "0.9", "--temperature", "0.2", "--lr", "0.5", *flags])
    torch.manual_seed(seed)
    model = mm.MoCo(args, SPLITS).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.queue.copy_(F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1))
        model.queue_ids.copy_(torch.randint(-1, 12, (K,), generator=g))
        model.queue_ptr.fill_(16)
        for p in model.encoder_k.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return args, model, mm.make_optimizer(model, args, torch.device("cpu"))


def fixed_views(seed=2):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(B, 3, 8, 8, generator=g, dtype=torch.float64)
    return [x1, (x1 + 0.3 * torch.rand(B, 3, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 1)]


class LoopSplitBN(nn.BatchNorm2d):
    """The demo's SplitBatchNorm written as a loop: group g (images g, g + G, ...) normalised with
    its own statistics and its own copy of the running statistics, which are then averaged."""
    splits = SPLITS

    def forward(self, x):
        outs, means, variances = [], [], []
        for g in range(self.splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(x[g::self.splits], mean, var, self.weight, self.bias, True,
                                     self.momentum, self.eps))
            means.append(mean)
            variances.append(var)
        self.running_mean.copy_(sum(means) / self.splits)
        self.running_var.copy_(sum(variances) / self.splits)
        return torch.stack(outs, 1).flatten(0, 1)  # back to image order


def swap_bn(module):
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, LoopSplitBN(child.num_features))
        else:
            swap_bn(child)
    return module


def reference_encoders(model, args):
    """The demo's ModelBase: the CIFAR ResNet, fc -> feature_dim (v2's --mlp: Linear, ReLU before
    it), split BN; loaded with the script's initial weights (query and key encoder)."""
    encoders = []
    for state in (model.encoder_q.state_dict(), model.encoder_k.state_dict()):
        backbone = swap_bn(common.build_backbone(args.arch, args.stem, args.width, args.stem_padding))
        d = backbone.out_dim
        head = nn.Sequential(*([nn.Linear(d, d), nn.ReLU()] if args.mlp else []), nn.Linear(d, D))
        enc = nn.Sequential(OrderedDict(backbone=backbone, head=head)).double()
        enc.load_state_dict(state)
        encoders.append(enc)
    return encoders


class Reference:
    """The original loop's state: encoders, queue [K, D], ids, pointer and the SGD of main_moco.py."""

    def __init__(self, model, args):
        self.enc_q, self.enc_k = reference_encoders(model, args)
        self.queue, self.ids = model.queue.clone(), model.queue_ids.clone()
        self.ptr, self.args, self.rates = int(model.queue_ptr), args, []
        self.opt = torch.optim.SGD(self.enc_q.parameters(), lr=args.lr, momentum=0.9,
                                   weight_decay=args.weight_decay)

    def contrastive(self, im_q, im_k, ids, mix):
        """builder.py / the demo's contrastive_loss, with davidsvy's mixing when mix != (0, 0)."""
        a, T = self.args, self.args.temperature
        q = F.normalize(self.enc_q(im_q), dim=1)
        with torch.no_grad():
            idx_shuffle = torch.randperm(len(im_k))
            k = F.normalize(self.enc_k(im_k[idx_shuffle]), dim=1)[torch.argsort(idx_shuffle)]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,kc->nk", q, self.queue.clone().detach())
        if a.mask_own:
            l_neg = l_neg.masked_fill(ids[:, None] == self.ids[None], -float("inf"))
        logits, sources = [l_pos, l_neg], [[] for _ in q]
        if mix[0] or mix[1]:
            hard = torch.topk(l_neg.detach(), a.n_hard, dim=-1, sorted=True).indices
            idxs1, idxs2 = torch.randint(0, a.n_hard, size=(2, len(q), mix[0]))
            sources = [list(zip(*(hard[r][i].tolist() for i in (idxs1[r], idxs2[r])))) for r in range(len(q))]
            alpha = torch.rand(len(q), mix[0], 1, dtype=torch.float64)
            neg = alpha * self.queue[torch.gather(hard, 1, idxs1)] + \
                (1 - alpha) * self.queue[torch.gather(hard, 1, idxs2)]
            logits.append(torch.einsum("bd,bsd->bs", q, F.normalize(neg, dim=-1).detach()))
            idxs = torch.randint(0, a.n_hard, size=(len(q), mix[1]))
            sources = [src + [(m, m) for m in hard[r][idxs[r]].tolist()] for r, src in enumerate(sources)]
            beta = torch.rand(len(q), mix[1], 1, dtype=torch.float64) * 0.5
            neg = beta * q.clone().detach()[:, None] + (1 - beta) * self.queue[torch.gather(hard, 1, idxs)]
            logits.append(torch.einsum("bd,bsd->bs", q, F.normalize(neg, dim=-1).detach()))
        logits = torch.cat(logits, dim=1) / T
        self.rates.append(self.monitor(l_neg.detach(), ids % 4, sources, mix != (0, 0)))
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)), k

    def monitor(self, sim, labels, sources, mixing):
        """The negatives monitor by its definition, query by query: the share of the anchor's class
        among the queue keys the loss contrasts with a known image (and among its 1% most similar
        of them, at least one), and among MoCHi's points with sources of known class those with a
        source of the anchor's class."""
        cls = [CLASSES[i] if i >= 0 else -1 for i in self.ids.tolist()]
        rates = {"fn_rate": [], "fn_rate_hard": [], "fn_rate_synth": []}
        for r, y in enumerate(labels.tolist()):
            negatives = [j for j in range(K) if sim[r, j] > -math.inf and cls[j] >= 0]
            hardest = sorted(negatives, key=lambda j: -sim[r, j].item())[:max(1, len(negatives) // 100)]
            rates["fn_rate"].append(sum(cls[j] == y for j in negatives) / len(negatives))
            rates["fn_rate_hard"].append(sum(cls[j] == y for j in hardest) / len(hardest))
            known = [(i, j) for i, j in sources[r] if cls[i] >= 0 and cls[j] >= 0]
            rates["fn_rate_synth"].append(sum(y in (cls[i], cls[j]) for i, j in known) / len(known)
                                          if known else math.nan)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in rates.items() if mixing or k != "fn_rate_synth"}

    def step(self, x1, x2, ids, mix=(0, 0)):
        m = self.args.ema
        with torch.no_grad():  # the momentum update first (builder.py line 130, the demo's forward)
            for param_q, param_k in zip(self.enc_q.parameters(), self.enc_k.parameters()):
                param_k.data = param_k.data * m + param_q.data * (1. - m)
        if self.args.symmetric:
            loss_12, k2 = self.contrastive(x1, x2, ids, mix)
            loss_21, k1 = self.contrastive(x2, x1, ids, mix)
            loss, k = loss_12 + loss_21, torch.cat([k1, k2], dim=0)
        else:
            loss, k = self.contrastive(x1, x2, ids, mix)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # _dequeue_and_enqueue (davidsvy: also the file ids)
            self.queue[self.ptr:self.ptr + len(k)] = k
            self.ids[self.ptr:self.ptr + len(k)] = ids.repeat(len(k) // len(ids))
            self.ptr = (self.ptr + len(k)) % K
        return loss


VARIANTS = {
    "MoCo": ([], (0, 0)),
    "MoCo symmetric": (["--symmetric", "--mlp"], (0, 0)),
    "MoCHi": (["--n_hard", "6", "--s1_hard", "5", "--s2_hard", "3"], (5, 3)),
    "MoCHi mask_own": (["--n_hard", "6", "--s1_hard", "4", "--s2_hard", "2", "--mask_own", "--mlp"], (4, 2)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_step_equals_the_original_step(variant):
    flags, mix = VARIANTS[variant]
    args, model, optimizer = make(flags)
    ref = Reference(model, args)
    views, ids = fixed_views(), torch.arange(B)
    labels = ids % 4
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(123)
    stats = [mm.train_step(model, model, optimizer, scaler, views, labels, ids, torch.tensor(CLASSES),
                           args, None, mix) for _ in range(2)]
    torch.manual_seed(123)
    expected = [ref.step(*views, ids, mix) for _ in range(2)]
    for mine, theirs in zip(stats, expected):
        assert mine["loss"].item() == pytest.approx(theirs.item(), rel=1e-10)
    pairs = len(ref.rates) // 2  # the monitor's values of each query, per step
    for mine, rates in zip(stats, (ref.rates[:pairs], ref.rates[pairs:])):
        assert set(mine) == {"loss", *rates[0]}
        for name in rates[0]:
            torch.testing.assert_close(mine[name], torch.cat([r[name] for r in rates]), equal_nan=True,
                                       check_dtype=False)
    state = model.state_dict()
    for prefix, enc in (("encoder_q.", ref.enc_q), ("encoder_k.", ref.enc_k)):
        for name, value in enc.state_dict().items():  # weights and BatchNorm statistics
            torch.testing.assert_close(state[prefix + name], value, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(model.queue, ref.queue, rtol=1e-9, atol=1e-12)
    assert torch.equal(model.queue_ids, ref.ids) and int(model.queue_ptr) == ref.ptr
    for p, r in zip(model.encoder_q.parameters(), ref.enc_q.parameters()):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"],
                                   ref.opt.state[r]["momentum_buffer"], rtol=1e-9, atol=1e-12)
    assert all(p not in optimizer.state for p in model.encoder_k.parameters())


def test_the_monitor_leaves_the_step_unchanged(monkeypatch):
    """The negatives monitor reads the step's logits under no_grad: with it stubbed out, the step
    gives the same parameters and queue, bit for bit."""
    results = []
    for stub in (False, True):
        if stub:
            monkeypatch.setattr(mm, "negative_rates", lambda sim, *a: {"fn_rate": sim[:, 0] * math.nan})
        args, model, optimizer = make(VARIANTS["MoCHi mask_own"][0])
        torch.manual_seed(5)
        mm.train_step(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), fixed_views(),
                      torch.arange(B) % 4, torch.arange(B), torch.arange(12) % 4, args, None, (4, 2))
        results.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(results[0].values(), results[1].values()))


def test_the_epoch_loop_feeds_the_views_and_sets_lr_and_mixing(monkeypatch):
    """train_one_epoch: view 1 and view 2 of each batch reach train_step in that order with the
    batch's labels and ids; main_moco.py's adjust_learning_rate with --cos (lines 372-381):
    lr 0.5 (1 + cos(pi epoch / epochs)), set per epoch; MoCHi's types from their start epochs."""
    args, model, optimizer = make(["--lr", "0.4", "--epochs", "4", "--n_hard", "6", "--s1_hard", "5",
                                   "--s2_hard", "3", "--start1_hard", "1", "--start2_hard", "2"])
    batches = [[torch.full((4, 3, 2, 2), 10.0 * i + v) for v in (1, 2)] + [torch.arange(4) % 2,
                                                                         torch.arange(4) + i] for i in range(3)]
    data = common.SimpleNamespace(loader=batches, augment=None, to_input=lambda x: x,
                                  labels=torch.arange(100) % 7)
    seen = []
    monkeypatch.setattr(mm, "batches", lambda data, epoch: iter(data.loader))

    def fake_step(net, model, opt, scaler, views, labels, ids, classes, args, dtype, mix):
        seen.append((views[0][0, 0, 0, 0].item(), views[1][0, 0, 0, 0].item(), labels.tolist(),
                     ids.tolist(), classes is data.labels, opt.param_groups[0]["lr"], tuple(mix)))
        return {"loss": torch.tensor(1.0)}
    monkeypatch.setattr(mm, "train_step", fake_step)
    rows = [mm.train_one_epoch(model, model, data, optimizer, None, args, e, CPU, None) for e in range(4)]
    assert [s[:2] for s in seen[:3]] == [(1, 2), (11, 12), (21, 22)]
    assert [s[2:5] for s in seen[:3]] == [([(i + j) % 7 for j in range(4)], [i + j for j in range(4)], True)
                                          for i in range(3)]  # labels: data.labels[ids]
    lrs = [0.4 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [s[5] for s in seen] == pytest.approx([lr for lr in lrs for _ in range(3)], rel=1e-12)
    assert [r["lr"] for r in rows] == pytest.approx(lrs, rel=1e-12)
    assert [s[6] for s in seen[::3]] == [(0, 0), (5, 0), (5, 3), (5, 3)]
    args.n_hard = 0  # MoCo: no mixing at any epoch
    seen.clear()
    mm.train_one_epoch(model, model, data, optimizer, None, args, 3, CPU, None)
    assert {s[6] for s in seen} == {(0, 0)}


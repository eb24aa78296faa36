"""One step of simclr_debiased.py's own loop (train_step, with the optimizer main builds) against a
step written independently from the original code's loop, in float64:
- joshr17/HCL image/main.py: train() (each view its own forward, `feature_1, out_1 = net(pos_1)`,
  `feature_2, out_2 = net(pos_2)`, then zero_grad, backward, step) and criterion() (the 2B x 2B
  exp matrix, get_negative_mask, imp = exp(beta log neg), reweight_neg = (imp neg).sum / imp.mean,
  Ng = (-tau_plus N pos + reweight_neg) / (1 - tau_plus), clamp at N e^(-1/t), mean of
  -log(pos / (pos + Ng))); optim.Adam(lr=1e-3, weight_decay=1e-6). chingyaoc/DCL main.py is the
  same with beta = 0. model.py L2-normalises the head's output.
- leftthomas/SimCLR main.py train() for tau_plus = beta = 0 (the diagonal masked, the positive in
  the denominator).
- Nozawa & Sato (shared/specs/bound_and_nlp.md, "Optimiser"): SGD momentum 0.9 wrapped in Apex
  LARC (trust 0.001, no clip, eps 1e-8; weight decay folded into the gradient, none on names with
  "bias" or "bn"), each GPU's own NT-Xent over its local batch (here two chunks of one process).
The project's deviations are none of these: the comparison is exact to float64 rounding."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
import simclr_debiased as sd

B, D = 8, 16


def make(flags, seed=0):
    args = sd.get_parser().parse_args(["--arch", "resnet18", "--width", "4", "--hidden_dim", "16",
                                       "--feature_dim", "8", *flags])
    torch.manual_seed(seed)
    model = sd.SimCLR(args).double()
    return args, model, sd.make_optimizer(model, args, torch.device("cpu"))


def fixed_views(seed=1):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(B, 3, D, D, generator=g, dtype=torch.float64)
    return x1, (x1 + 0.3 * torch.rand(B, 3, D, D, generator=g, dtype=torch.float64)).clamp(0, 1)


def hcl_loss(out_1, out_2, t, tau_plus, beta):
    """HCL's criterion() as written there, in the probability domain."""
    b = len(out_1)
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t()) / t)
    mask = torch.ones((b, 2 * b), dtype=torch.bool)
    for i in range(b):
        mask[i, i] = False
        mask[i, i + b] = False
    neg = neg.masked_select(torch.cat((mask, mask), 0)).view(2 * b, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / t)
    pos = torch.cat([pos, pos], dim=0)
    n = 2 * b - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng = torch.clamp((-tau_plus * n * pos + reweight_neg) / (1 - tau_plus), min=n * math.e ** (-1 / t))
    return (-torch.log(pos / (pos + ng))).mean()


def simclr_loss(out_1, out_2, t):
    """leftthomas/SimCLR main.py train(): the diagonal masked, the positive stays in the sum."""
    out = torch.cat([out_1, out_2], dim=0)
    sim = torch.exp(torch.mm(out, out.t()) / t)
    sim = sim.masked_select(~torch.eye(len(out), dtype=torch.bool)).view(len(out), -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / t)
    return (-torch.log(torch.cat([pos, pos]) / sim.sum(dim=-1))).mean()


def net_of(model):
    """model.py of DCL/HCL: (normalised feature, normalised projection) of one view."""
    return lambda x: F.normalize(model.projector(model.backbone(x)), dim=-1)


def larc_sgd_step(model, lr, wd=1e-4, momentum=0.9, buffers=None):
    """Apex LARC (trust 1e-3, clip off) on SGD with momentum, from the spec's formula."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            decay = 0.0 if ("bias" in name or "bn" in name) else wd
            w, g = p.norm(), p.grad.norm()
            if w > 0 and g > 0:
                p.grad = (p.grad + decay * p) * (1e-3 * w / (g + decay * w + 1e-8))
            buf = buffers.setdefault(name, p.grad.clone()) if name not in buffers else \
                buffers[name].mul_(momentum).add_(p.grad)
            p.add_(buf, alpha=-lr)


VARIANTS = {"SimCLR": (0.0, 0.0), "DCL": (0.1, 0.0), "HCL": (0.1, 1.0), "HCL beta 6": (0.05, 6.0)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_step_equals_the_original_step(variant):
    tau_plus, beta = VARIANTS[variant]
    args, model, optimizer = make(["--tau_plus", str(tau_plus), "--beta", str(beta)])
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, weight_decay=1e-6)  # HCL main.py
    x1, x2 = fixed_views()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):  # two steps: Adam's state after the first one matters for the second
        stats = sd.train_step(model, optimizer, scaler, x1, x2, labels, args, None)
        net = net_of(ref)
        out_1, out_2 = net(x1), net(x2)  # train(): one forward per view
        loss = simclr_loss(out_1, out_2, 0.5) if variant == "SimCLR" else \
            hcl_loss(out_1, out_2, 0.5, tau_plus, beta)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)  # weights and BN buffers
    for p, q in zip(model.parameters(), ref.parameters()):
        mine, theirs = optimizer.state[p], ref_opt.state[q]
        assert int(mine["step"]) == int(theirs["step"]) == 2
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"], rtol=1e-9, atol=1e-20)


def test_nozawa_step_equals_their_step():
    flags = ["--tau_plus", "0", "--beta", "0", "--head", "nozawa", "--optimizer", "larc",
             "--weight_decay", "1e-4", "--lr", "0.25", "--num_chunks", "2"]
    args, model, optimizer = make(flags)
    ref = copy.deepcopy(model)
    for group in optimizer.param_groups:
        group["lr"] = 0.25
    x1, x2 = fixed_views(2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    buffers = {}
    for _ in range(2):
        stats = sd.train_step(model, optimizer, scaler, x1, x2, torch.full((B,), -1), args, None)
        net = net_of(ref)
        out_1, out_2 = net(x1), net(x2)
        # two "GPUs" of 4 images, each its own NT-Xent; the loss DDP sees is their mean
        loss = (simclr_loss(out_1[:4], out_2[:4], 0.5) + simclr_loss(out_1[4:], out_2[4:], 0.5)) / 2
        ref.zero_grad()
        loss.backward()
        larc_sgd_step(ref, 0.25, buffers=buffers)
        assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    names = dict(model.named_parameters())
    for name, p in names.items():
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], buffers[name], rtol=1e-9,
                                   atol=1e-10, msg=name)  # the bias before BN: a zero grad's noise
    # their filter misses the downsample BatchNorm ("downsample.1.weight" has no "bn"): reproduced
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(names["backbone.layer2.0.downsample.1.weight"]) in decayed
    assert id(names["projector.bn1.weight"]) not in decayed and id(names["backbone.bn1.bias"]) not in decayed


def test_the_monitor_leaves_the_step_unchanged(monkeypatch):
    """The negatives monitor reads the step's similarities under no_grad: with it stubbed out the
    step gives the same parameters, bit for bit."""
    results = []
    for stub in (False, True):
        if stub:
            monkeypatch.setattr(sd, "negative_rates", lambda sim, *a: {"fn_rate": sim[:, 0] * math.nan})
        args, model, optimizer = make(["--tau_plus", "0.1", "--beta", "1"])
        x1, x2 = fixed_views()
        sd.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), x1, x2,
                      torch.tensor([0, 1] * 4), args, None)
        results.append(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(results[0].values(), results[1].values()))


def test_the_epoch_loop_feeds_each_view_and_sets_each_steps_lr(monkeypatch):
    """train_one_epoch: view 1 and view 2 of the batch reach train_step as x1 and x2, with the
    batch's labels; Nozawa & Sato's lr: linear warm-up over --warmup_epochs, then a cosine to 0
    at the end of --epochs, set before every step (spec: per-step cosine)."""
    args, model, optimizer = make(["--optimizer", "larc", "--lr", "0.5", "--warmup_epochs", "1",
                                   "--epochs", "3", "--batch_size", "4"])
    batches = [[torch.full((4, 3, 2, 2), 10.0 * i + v) for v in (1, 2)] + [torch.arange(4) + i,
                                                                         torch.arange(4)] for i in range(4)]
    data = common.SimpleNamespace(loader=batches, sampler=None, augment=None, to_input=lambda x: x,
                                  labels=torch.arange(100))
    seen = []
    monkeypatch.setattr(sd, "batches", lambda data, epoch: iter(data.loader))
    monkeypatch.setattr(sd, "train_step", lambda net, opt, scaler, x1, x2, labels, args, dtype: seen.append(
        (x1[0, 0, 0, 0].item(), x2[0, 0, 0, 0].item(), labels.tolist(), opt.param_groups[0]["lr"]))
        or {"loss": torch.tensor(1.0)})
    sd.train_one_epoch(model, data, optimizer, None, args, 1, torch.device("cpu"), None)
    assert [s[:2] for s in seen] == [(1, 2), (11, 12), (21, 22), (31, 32)]
    assert [s[2] for s in seen] == [[0, 1, 2, 3]] * 4  # labels of the batch's indices
    # epoch 1 of 3 (0-based), 4 steps: t = 1, 1.25, 1.5, 1.75; cosine over the 2 epochs after warm-up
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * (t - 1) / 2)) for t in (1, 1.25, 1.5, 1.75)]
    assert [s[3] for s in seen] == pytest.approx(expected, rel=1e-12)
    seen.clear()
    sd.train_one_epoch(model, data, optimizer, None, args, 0, torch.device("cpu"), None)
    assert [s[3] for s in seen] == pytest.approx([0, 0.125, 0.25, 0.375], abs=1e-15)  # warm-up
    args.optimizer = "adam"  # DCL/HCL: a constant lr (after an optional warm-up)
    seen.clear()
    sd.train_one_epoch(model, data, optimizer, None, args, 2, torch.device("cpu"), None)
    assert [s[3] for s in seen] == [0.5] * 4


def test_hcl_weight_share_on_designed_logits(monkeypatch):
    """fn_weight = the share of HCL's reweighted negative mass on the anchor's class: negative j of
    anchor i weighs exp((1 + beta) s_ij) (HCL's imp * neg), summed by hand over the negatives."""
    args, model, optimizer = make(["--tau_plus", "0.1", "--beta", "1"])
    logits = torch.rand(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    labels = torch.tensor([0, 1, 0])
    real = sd.contrastive_loss_terms
    monkeypatch.setattr(sd, "contrastive_loss_terms", lambda *a, **k: (*real(*a, **k)[:2], logits,
                                                                       real(*a, **k)[3]))
    x = torch.rand(3, 3, D, D, dtype=torch.float64)
    stats = sd.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), x, x, labels,
                          args, None)
    y = labels.repeat(2).tolist()
    for i in range(6):
        negatives = [j for j in range(6) if j not in (i, (i + 3) % 6)]  # not itself, not its positive
        w = {j: math.exp(2 * logits[i, j].item()) for j in negatives}
        same = [j for j in negatives if y[j] == y[i]]
        assert stats["fn_weight"][i].item() == pytest.approx(sum(w[j] for j in same) / sum(w.values()))
        assert stats["fn_rate"][i].item() == pytest.approx(len(same) / 4)

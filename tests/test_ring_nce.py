"""ring_nce.py's pieces and its training step.

* The ring loss against the official code's values on the spec's inputs (spec ring_nce.md 8.3,
  from mhw32/contrastive-ring-public run unmodified) and against a float64 loop reference.
* A reference step per variant (IR, Ring-IR, MoCo, Ring-MoCo, CMC, Ring-CMC): the script's own
  train_step against a step written here from the original training loops, two steps each in
  float64, comparing the loss, the monitor, every parameter and buffer (queue, ids, pointer, key
  encoder, banks) and the SGD state. The random draws are made deterministic by one seed: torch's
  global RNG is seeded before the script's step and again before the reference's first draw, and
  both draw the same calls from it first (train_step's forward passes draw nothing): IR's and CMC's
  torch.randint of the negatives, MoCo's torch.randperm of the keys. CMC's alias-method draw
  (NCE/alias_multinomial.py, also uniform with replacement) is replaced by that randint: injected.
* The negatives monitor on constructed embeddings, its independence from the loss, and two gloo
  processes against one.
"""
import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import ring_nce
from common import rgb_to_lab
from ring_nce import ring_bounds, ring_nce_loss, ring_nce_terms

T = 0.07


def spec_inputs():
    """The inputs of spec 8.1."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    return q, k, torch.randn(64, 8, generator=g, dtype=torch.float64)


def loop_reference(q, k, pool, t, lo, hi, draws=None):
    """One anchor at a time, python floats: sort the pool by similarity (most similar first), keep
    ranks [lo, hi) (or the ring positions draws[i]), -s+ + log(exp(s+) + sum exp(ring))."""
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


def test_official_values_on_the_spec_inputs():
    """spec 8.2/8.3: MoCoRing / MoCo of src/objectives/moco.py on the spec inputs (official = these)."""
    q, k, pool = spec_inputs()
    assert q[0, 0].item() == pytest.approx(-2.3104118) and q.sum().item() == pytest.approx(-8.5751984)
    assert k.sum().item() == pytest.approx(-8.8330369) and pool.sum().item() == pytest.approx(-14.196389)
    for (lower, upper), value in [((0.1, 0.5), 0.14428889), ((0.0, 1.0), 1.5838166), ((0.1, 1.0), 0.14473339),
                                  ((0.0, 0.5), 1.5838041), ((0.5, 0.9), 0.00076444923), ((0.0, 0.1), 1.5786577)]:
        assert ring_nce_loss(q, k, pool, T, lower, upper).item() == pytest.approx(value, rel=1e-7), (lower, upper)


@pytest.mark.parametrize("lower,upper,lo,hi", [
    (0.1, 0.5, 6, 32), (0.0, 1.0, 0, 64), (0.25, 0.75, 16, 48), (0.0, 0.02, 0, 1), (0.98, 1.0, 62, 64),
    (6 / 64, 32 / 64, 6, 32),                      # exactly on a rank: that rank is the first kept / first dropped
    (6 / 64 - 1e-9, 32 / 64 - 1e-9, 5, 31),        # just below: int() truncates, one rank earlier on both sides
    (0.01, 0.1, 0, 6)])                            # the released 0.1/0.1 at K = 64: the inner cut vanishes (spec 2.4)
def test_loss_against_float64_loop(lower, upper, lo, hi):
    q, k, pool = spec_inputs()
    assert ring_bounds(64, lower, upper) == (lo, hi)
    ours = ring_nce_loss(q, k, pool, T, lower, upper).item()
    assert ours == pytest.approx(loop_reference(q, k, pool, T, lo, hi), rel=1e-12, abs=1e-15)
    single = ring_nce_loss(q.float(), k.float(), pool.float(), T, lower, upper).item()  # float32 inputs
    assert single == pytest.approx(ours, rel=1e-4, abs=1e-6)


def test_no_ring_is_infonce_and_inputs_are_normalised():
    q, k, pool = spec_inputs()
    qn, kn, pn = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(pool, dim=1)
    infonce = F.cross_entropy(torch.cat([(qn * kn).sum(1, keepdim=True), qn @ pn.T], 1) / T, torch.zeros(4).long())
    assert ring_nce_loss(q, k, pool, T, 0.0, 1.0).item() == pytest.approx(infonce.item(), rel=1e-13)
    assert ring_nce_loss(3 * q, 0.5 * k, 2 * pool).item() == pytest.approx(infonce.item(), rel=1e-13)  # t = 0.07


def test_gradients_against_the_spec():
    q, k, pool = spec_inputs()
    q.requires_grad_(True)
    ring_nce_loss(q, k, pool, T, 0.1, 0.5).backward()
    assert q.grad[0, :3].tolist() == pytest.approx([0.0023648268, -0.00062992914, -0.0015942172], rel=1e-6)
    q.grad = None
    ring_nce_loss(q, k, pool, T, 0.0, 1.0).backward()
    assert q.grad[0, :3].tolist() == pytest.approx([0.00032642866, 0.0031398473, 0.0010059950], rel=1e-6)
    qs, ks, small = (x.detach()[:n].clone().requires_grad_(True) for x, n in ((q, 2), (k, 2), (pool, 16)))
    draws = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda a, b, c: ring_nce_loss(a, b, c, 0.5, 0.25, 0.75, draws), (qs, ks, small))


@pytest.mark.parametrize("lower,upper", [(0.1, 0.5), (0.9, 1.0)])
def test_draws_pick_ring_positions(lower, upper):
    q, k, pool = spec_inputs()
    lo, hi = ring_bounds(64, lower, upper)
    draws = torch.randint(0, hi - lo, (4, 50), generator=torch.Generator().manual_seed(3))
    ours = ring_nce_loss(q, k, pool, T, lower, upper, draws).item()
    assert ours == pytest.approx(loop_reference(q, k, pool, T, lo, hi, draws.tolist()), rel=1e-12)


def test_draws_without_a_ring_are_pool_rows():
    """Lower 0, upper 1 with draws is the Ring code's NCE (instdisc.py lines 31-39): the draws are
    bank rows, in the bank's own order, not ranks."""
    q, k, pool = spec_inputs()
    rows = torch.randint(0, 64, (4, 50), generator=torch.Generator().manual_seed(3))
    qn, pn = F.normalize(q, dim=1), F.normalize(pool, dim=1)
    pos = (qn * F.normalize(k, dim=1)).sum(1) / T
    expected = -(pos - torch.logsumexp(torch.cat([pos[:, None], (qn @ pn.T / T).gather(1, rows)], 1), 1)).mean()
    assert ring_nce_loss(q, k, pool, T, 0.0, 1.0, rows).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("lower,upper", [(0.01, 0.015), (0.5, 0.5), (0.6, 0.5), (-0.1, 0.5), (0.1, 1.5)])
def test_bad_rings_raise(lower, upper):
    q, k, pool = spec_inputs()
    with pytest.raises(ValueError, match="no ring"):
        ring_nce_loss(q, k, pool, T, lower, upper)


def test_bad_shapes_and_temperature_raise():
    q, k, pool = spec_inputs()
    for args in [(q, k[:3], pool, T), (q, k, pool[:, :5], T), (q[0], k[0], pool, T), (q, k, pool, 0.0)]:
        with pytest.raises(ValueError, match="need q, k"):
            ring_nce_loss(*args)


def test_lab_conversion_known_colours():
    colours = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
                            [0.5, 0.5, 0.5]], dtype=torch.float64)
    lab = rgb_to_lab(colours[:, :, None, None])[:, :, 0, 0]
    expected = torch.tensor([[100, 0, 0], [0, 0, 0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602], [97.1393, -21.5537, 94.4780],
                             [60.3199, 98.2542, -60.8429], [91.1132, -48.0875, -14.1312], [53.3890, 0, 0]],
                            dtype=torch.float64)  # published sRGB -> Lab (D65) tables
    torch.testing.assert_close(lab, expected, atol=0.03, rtol=0)
    # CMC's normalisation (train_CMC.py get_train_loader lines 132-133), as literals
    mean = [(0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2]
    std = [(100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2]
    assert list(common.LAB_STATS[0]) == pytest.approx(mean) and list(common.LAB_STATS[1]) == pytest.approx(std)
    image = torch.rand(2, 3, 5, 4)
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    torch.testing.assert_close(common.lab_input(image), (rgb_to_lab(image) - mean) / std)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cmc_export_is_both_encoders_side_by_side(arch):
    """last.pt's backbone for CMC: one common.py ResNet of --width (what an evaluator builds from the
    args) whose features on a Lab image are [L backbone(L), ab backbone(ab)]; the head likewise."""
    torch.manual_seed(0)
    args = make_args("cmc", "--arch", arch)
    model = ring_nce.Ring(args, 10)
    x = torch.randn(6, 3, 8, 8)
    model.encoder_q(x)  # a training-mode pass: BatchNorm running statistics that differ between the two
    model.eval()
    backbone_state, head = ring_nce.export(model.encoder_q)
    backbone = common.build_backbone(arch, "cifar", 4)
    backbone.load_state_dict(backbone_state)
    enc = model.encoder_q
    features = torch.cat([enc.l.backbone(x[:, :1]), enc.ab.backbone(x[:, 1:])], 1)
    torch.testing.assert_close(backbone.eval()(x), features)
    linears = [layer for layer in head["layout"] if layer[1] == "linear"]
    assert [layer[1] for layer in head["layout"]] == ["linear", "relu", "linear"]
    assert [layer[2:] for layer in linears] == [[features.shape[1], 12, True], [12, 10, True]]
    rebuilt = torch.nn.Sequential(torch.nn.Linear(*linears[0][2:4]), torch.nn.ReLU(), torch.nn.Linear(*linears[1][2:4]))
    rebuilt.load_state_dict(head["state"])
    half = features.shape[1] // 2
    torch.testing.assert_close(rebuilt(features), torch.cat([enc.l.head(features[:, :half]),
                                                             enc.ab.head(features[:, half:])], 1))


# -------------------------------------------------------------------------------------------------
# Reference steps: the script's train_step against the original training loops
# -------------------------------------------------------------------------------------------------

N, B = 20, 4  # images in the bank, batch
CLASSES = torch.tensor([i % 3 if i not in (5, 11) else -1 for i in range(N)])  # -1: unknown class


def make_args(method, *flags):
    args = ring_nce.get_parser().parse_args(["--method", method, "--width", "4", "--hidden_dim", "6", "--feature_dim",
                                             "5", "--queue_size", "16", "--num_negatives", "7", "--batch_size", str(B),
                                             "--ema", "0.5", *flags])
    ring_nce.rules(args)  # the per-method --bank_momentum
    return args


def l2(x):
    """The Ring code's utils.l2_normalize (src/utils/utils.py line 71) and CMC's Normalize(2)."""
    return x / torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True))


def expected_rates(sims, rows, lo, hi, draws, y, pool_classes):
    """The monitor for one anchor, by hand: sims [K] over the whole pool; the negatives are the
    ring ranks [lo, hi) (or the ring positions `draws`; rows given: the draws are pool rows)."""
    order = torch.sort(sims, descending=True).indices.tolist()
    negatives = rows if rows is not None else [order[lo:hi][j] for j in draws] if draws is not None else order[lo:hi]
    known = [r for r in negatives if pool_classes[r] >= 0]
    above = [r for r in order[:lo] if pool_classes[r] >= 0]
    if y < 0 or not known:
        return [math.nan] * 3
    hardest = max(known, key=lambda r: sims[r].item())  # at most 100 negatives here: the 1% is one
    return [sum(pool_classes[r] == y for r in known) / len(known), float(pool_classes[hardest] == y),
            sum(pool_classes[r] == y for r in above) / len(above) if above else math.nan]


def script_step(model, optimizer, views, ids, args, seed):
    torch.manual_seed(seed)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return ring_nce.train_step(model.encoder_q, model, optimizer, scaler, views, ids, CLASSES, args, None)


def reference_moco_step(ref, opt, x1, x2, ids, lo, hi, seed, t=0.07, m=0.5):
    """mhw32/contrastive-ring-public src/systems/systems.py PretrainMoCoSystem.get_losses_for_batch
    (lines 284-347; as facebookresearch/moco builder.py forward, lines 124-158: queries, momentum
    update, shuffled keys under no_grad, logits, then the queue) with _momentum_update_key_encoder
    (349-353) and _dequeue_and_enqueue (355-372); the losses of src/objectives/moco.py: MoCo.get_loss
    (24-31) without a ring, MoCoRing.get_loss (111-145, explicit ranks) with one; Lightning's step
    after the loss. The queue also keeps each key's image id (the project's addition)."""
    outputs1 = ref.encoder_q(x1)
    with torch.no_grad():
        for param_q, param_k in zip(ref.encoder_q.parameters(), ref.encoder_k.parameters()):
            param_k.data = param_k.data * m + param_q.data * (1. - m)
        torch.manual_seed(seed)
        idx = torch.randperm(x2.size(0))  # shuffle_bn on one GPU (lines 295-297)
        outputs2 = ref.encoder_k(x2[idx])
        outputs2_tmp = torch.zeros_like(outputs2)
        for i, j in enumerate(idx):
            outputs2_tmp[j] = outputs2[i]
        outputs2 = outputs2_tmp
    q, k, queue = l2(outputs1), l2(outputs2), ref.queue.clone().detach()
    if (lo, hi) == (0, len(queue)):
        logits = torch.cat([torch.sum(q * k, dim=1, keepdim=True), q @ queue.T], dim=1) / t
        loss = F.cross_entropy(logits, torch.zeros(len(q)).long())
    else:
        witness_pos = torch.sum(q * k, dim=1) / t
        sorted_dps, _ = torch.sort(q @ queue.T / t, dim=1, descending=True)
        ring_dps = torch.cat((witness_pos.unsqueeze(1), sorted_dps[:, lo:hi]), dim=1)
        loss = -torch.mean(witness_pos - torch.logsumexp(ring_dps, dim=1))
    queue_classes = [CLASSES[i].item() if i >= 0 else -1 for i in ref.queue_ids.tolist()]
    rates = [expected_rates((q[i] @ queue.T).detach(), None, lo, hi, None, CLASSES[ids[i]].item(), queue_classes)
             for i in range(len(q))]
    opt.zero_grad()
    loss.backward()
    opt.step()
    ptr = int(ref.queue_ptr)
    ref.queue[ptr:ptr + len(k)], ref.queue_ids[ptr:ptr + len(k)] = k, ids
    ref.queue_ptr.fill_((ptr + len(k)) % len(queue))
    return loss, rates


def reference_ir_step(ref, opt, x, ids, lo, hi, n, seed, t=0.07, m=0.0):
    """src/systems/systems.py PretrainNCESystem.get_losses_for_batch (lines 165-195) with
    src/objectives/instdisc.py NCE.get_loss (31-39) without a ring, NCERing.get_loss (119-159,
    explicit ranks, self_negative) with one, updated_new_data_memory (26-29) and
    src/objectives/memory.py MemoryBank.update (82-86). The project draws n negatives (theirs k - 1)."""
    outputs = l2(ref.encoder_q(x))
    bank = ref.bank[:, 0].clone()
    witness_pos = torch.sum(bank[ids] * outputs, dim=1) / t
    all_dps = outputs @ bank.T / t
    torch.manual_seed(seed)
    if (lo, hi) == (0, N):
        noise_indx = torch.randint(0, N, (len(x), n))
        idx = torch.cat([ids.unsqueeze(1), noise_indx], dim=1)
        witness_partition = torch.logsumexp(torch.sum(bank[idx] * outputs[:, None], dim=2) / t, dim=1)
        rows = noise_indx.tolist()
    else:
        sorted_dps, _ = torch.sort(all_dps, dim=1, descending=True)
        noise_indx = torch.randint(0, hi - lo, (len(x), n))
        ring_dps = torch.gather(sorted_dps[:, lo:hi], 1, noise_indx)
        witness_partition = torch.logsumexp(torch.cat((witness_pos.unsqueeze(1), ring_dps), dim=1), dim=1)
        rows = [None] * len(x)
    loss = -torch.mean(witness_pos - witness_partition)
    rates = [expected_rates(all_dps[i].detach(), rows[i], lo, hi, noise_indx[i].tolist(), CLASSES[ids[i]].item(),
                            CLASSES.tolist()) for i in range(len(x))]
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        new_data_memory = l2(bank[ids] * m + (1 - m) * outputs)
        ref.bank[:, 0] = bank.scatter(0, ids.unsqueeze(1).repeat(1, bank.size(1)), new_data_memory)
    return loss, rates


def reference_cmc_step(ref, opt, x, ids, lo, hi, n, seed, t=0.07, momentum=0.5):
    """HobbitLong/CMC train_CMC.py train() (lines 213-240): feat_l, feat_ab = model(inputs) (L
    channel to the L network, ab to the ab one, L2-normalised outputs), NCEAverage.forward with
    use_softmax (NCE/NCEAverage.py lines 23-85: ab anchors against memory_l, L anchors against
    memory_ab, the same idx for both, idx[:, 0] = y; then each memory row moves with momentum and is
    renormalised), NCESoftmaxLoss (NCE/NCECriterion.py 35-46) for each, loss = l_loss + ab_loss.
    The alias-method draw is replaced by the script's uniform draw (same stream). With a ring (no
    original: the project's Ring-CMC) each direction keeps ranks [lo, hi) of its own similarities
    to the other view's memory, and the draws are positions in it, shared by both directions."""
    feat_l, feat_ab = l2(ref.encoder_q.l(x[:, :1])), l2(ref.encoder_q.ab(x[:, 1:]))
    memory_l, memory_ab = ref.bank[:, 0].clone(), ref.bank[:, 1].clone()
    torch.manual_seed(seed)
    draws = torch.randint(0, hi - lo, (len(x), n))
    out, rates = [], []
    for anchor, memory in ((feat_l, memory_ab), (feat_ab, memory_l)):  # out_l, then out_ab
        all_dps = anchor @ memory.T / t
        if (lo, hi) == (0, N):
            idx = torch.cat([ids[:, None], draws], dim=1)
            out.append(torch.bmm(memory[idx], anchor.view(len(x), -1, 1))[:, :, 0] / t)  # out_l, out_ab
        else:
            ring = torch.sort(all_dps, dim=1, descending=True).values[:, lo:hi].gather(1, draws)
            out.append(torch.cat([(memory[ids] * anchor).sum(1, keepdim=True) / t, ring], dim=1))
        rates += [expected_rates(all_dps[i].detach(), draws[i].tolist() if (lo, hi) == (0, N) else None, lo, hi,
                                 draws[i].tolist(), CLASSES[ids[i]].item(), CLASSES.tolist()) for i in range(len(x))]
    loss = sum(F.cross_entropy(o, torch.zeros(len(x)).long()) for o in out)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for v, (memory, feat) in enumerate(((memory_l, feat_l), (memory_ab, feat_ab))):
            pos = memory[ids] * momentum + feat * (1 - momentum)
            ref.bank[:, v] = memory.index_copy(0, ids, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    return loss, rates


VARIANTS = {  # name: (method, flags, the ring's ranks in the pool of 16 keys or 20 bank rows)
    "IR": ("ir", [], (0, N)), "Ring-IR": ("ir", ["--ring_lower", "0.1", "--ring_upper", "0.6"], (2, 12)),
    "MoCo": ("moco", [], (0, 16)), "Ring-MoCo": ("moco", ["--ring_lower", "0.125", "--ring_upper", "0.75"], (2, 12)),
    "CMC": ("cmc", [], (0, N)), "Ring-CMC": ("cmc", ["--ring_lower", "0.25", "--ring_upper", "0.9"], (5, 18))}


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_against_the_original_loop(variant):
    method, flags, (lo, hi) = VARIANTS[variant]
    args = make_args(method, *flags)
    torch.manual_seed(0)
    model = ring_nce.Ring(args, N).double()  # float64: the two sides agree to 1e-7, not float32's noise
    with torch.no_grad():
        for p in model.encoder_q.parameters():  # as after some steps: the key encoder lags behind
            p.add_(0.2 * torch.randn_like(p))
        for name in ("queue", "bank"):  # unit rows in float64 (the script renormalises, the originals do not)
            if hasattr(model, name):
                getattr(model, name).copy_(F.normalize(getattr(model, name), dim=-1))
        if method == "moco":  # a queue partly of known images, partly still random (-1)
            model.queue_ids.copy_(torch.tensor([3, 7, -1, 0, 12, -1, 5, 18, 9, 1, -1, 14, 2, 6, -1, 10]))
    ref = copy.deepcopy(model)
    optimizer = ring_nce.make_optimizer(model, args, torch.device("cpu"))
    # the Ring code's configure_optimizers (systems.py 145-151) with its configs' optim_params
    ref_opt = torch.optim.SGD(ref.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    # seeds 1, 3: key permutations [1, 3, 2, 0], [2, 3, 1, 0] of 4 (not their own inverses)
    for step, (ids, seed) in enumerate([(torch.tensor([3, 17, 5, 11]), 1), (torch.tensor([0, 3, 19, 8]), 3)]):
        views = [torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(1 + (method == "moco"))]
        stats = script_step(model, optimizer, views, ids, args, seed=seed)
        if method == "moco":
            loss, rates = reference_moco_step(ref, ref_opt, *views, ids, lo, hi, seed=seed)
        elif method == "ir":
            loss, rates = reference_ir_step(ref, ref_opt, views[0], ids, lo, hi, 7, seed=seed)
        else:
            loss, rates = reference_cmc_step(ref, ref_opt, views[0], ids, lo, hi, 7, seed=seed)
        torch.testing.assert_close(stats["loss"], loss.detach())
        got = torch.stack([stats["fn_rate"], stats["fn_rate_hard"], stats["fn_rate_above"]], 1)
        torch.testing.assert_close(got, torch.tensor(rates, dtype=got.dtype), equal_nan=True)
        for name, value in ref.state_dict().items():  # every parameter and buffer
            torch.testing.assert_close(model.state_dict()[name], value, msg=lambda m: f"{name} (step {step}): {m}")
        for mine, theirs in zip(optimizer.state_dict()["state"].values(), ref_opt.state_dict()["state"].values()):
            torch.testing.assert_close(mine["momentum_buffer"], theirs["momentum_buffer"])
    assert not torch.isnan(got[:, 0]).all()


def test_the_monitor_changes_nothing(monkeypatch):
    """The loss, the parameters and the pools are the same, bit for bit, with the monitor stubbed."""
    results = []
    for stub in (False, True):
        if stub:
            monkeypatch.setattr(ring_nce, "negative_rates", lambda sim, *a: {"fn_rate": sim[:, 0] * 0})
        for method in ("moco", "cmc"):
            args = make_args(method, "--ring_lower", "0.1", "--ring_upper", "0.6")
            torch.manual_seed(0)
            model = ring_nce.Ring(args, N)
            optimizer = ring_nce.make_optimizer(model, args, torch.device("cpu"))
            views = [torch.randn(B, 3, 8, 8) for _ in range(2)]
            loss = script_step(model, optimizer, views, torch.tensor([3, 17, 5, 11]), args, 0)["loss"]
            results.append([loss, *model.state_dict().values()])
    for a, b in zip(results[:2], results[2:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# -------------------------------------------------------------------------------------------------
# The negatives monitor on constructed embeddings
# -------------------------------------------------------------------------------------------------

def pool_at(sims):
    """Unit vectors in 2-d whose cosine to the anchor e0 is each of `sims` (most similar first)."""
    sims = torch.tensor(sims, dtype=torch.float64)
    return torch.stack([sims, torch.sqrt(1 - sims ** 2)], 1)


def monitor(lower, upper, sims, pool_classes, anchor_class, draws=None):
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    terms = [ring_nce_terms(q, q, pool_at(sims), 0.1, lower, upper, draws)]
    stats = ring_nce.ring_monitor(terms, torch.tensor([anchor_class]), torch.tensor(pool_classes))
    return [stats[n].item() for n in ("fn_rate", "fn_rate_hard", "fn_rate_above")]


def test_monitor_on_a_ring():
    # 10 candidates, most similar first; ring [0.2, 0.7) = ranks [2, 7); class 1 is the anchor's
    sims = [0.99 - 0.1 * i for i in range(10)]
    classes = [1, 1, 0, 1, -1, 1, 0, 1, 1, 1]  # ranks 2..6: 0, 1, unknown, 1, 0 -> 2 of 4 known
    assert monitor(0.2, 0.7, sims, classes, 1) == [0.5, 0.0, 1.0]  # the hardest in the ring (rank 2) is class 0
    assert monitor(0.3, 0.7, sims, classes, 1) == [pytest.approx(2 / 3), 1.0, pytest.approx(2 / 3)]
    fn, hard, above = monitor(0.0, 0.5, sims, classes, 1)  # no band above the ring: NaN
    assert (fn, hard) == (0.75, 1.0) and math.isnan(above)
    assert all(math.isnan(v) for v in monitor(0.2, 0.7, sims, classes, -1))  # an anchor of unknown class
    assert all(math.isnan(v) for v in monitor(0.4, 0.5, sims, classes, 1)[:2])  # only an unknown in the ring


def test_monitor_counts_the_draws_with_their_multiplicity():
    sims = [0.99 - 0.1 * i for i in range(10)]
    classes = [1, 1, 0, 1, -1, 1, 0, 1, 1, 1]
    draws = torch.tensor([[0, 0, 0, 3, 2]])  # ring [2, 7): ranks 2, 2, 2, 5, 4 -> classes 0, 0, 0, 1, unknown
    assert monitor(0.2, 0.7, sims, classes, 1, draws) == [0.25, 0.0, 1.0]
    draws = torch.tensor([[9, 9, 2]])  # no ring: draws are pool rows 9, 9, 2 -> 1, 1, 0 (row 2 the hardest)
    assert monitor(0.0, 1.0, sims, classes, 1, draws)[:2] == [pytest.approx(2 / 3), 0.0]


def test_monitor_hard_rate_is_the_most_similar_percent():
    # a ring of 300 candidates: 1% = the 3 most similar; they are of class 0, 1, 1 (anchor: 1)
    sims = [0.999 - 0.003 * i for i in range(300)]
    classes = [0, 1, 1] + [0] * 297
    fn, hard, _ = monitor(0.0, 1.0, sims, classes, 1)
    assert fn == pytest.approx(2 / 300) and hard == pytest.approx(2 / 3)
    classes = [-1, -1, 0, 1, 1] + [0] * 295  # unknowns leave the count: 298 known, still 2 hardest known of 1%
    fn, hard, _ = monitor(0.0, 1.0, sims, classes, 1)
    assert fn == pytest.approx(2 / 298) and hard == pytest.approx(1 / 2)


# -------------------------------------------------------------------------------------------------
# Two gloo processes against one: the pools stay identical and the statistics are global
# -------------------------------------------------------------------------------------------------

WORLD = 2
TWO_PROCESS = {"moco": ["--ring_lower", "0.25", "--ring_upper", "0.75"],
               "cmc": ["--ring_lower", "0.2", "--ring_upper", "0.25"]}  # CMC: a ring of one rank, deterministic draws


def step_on(method, rows, seed):
    """One eval-mode train_step (BatchNorm per sample, so a process's half equals its rows of the
    whole batch) on `rows` of a fixed batch of 8; (epoch statistics, model state)."""
    args = make_args(method, *TWO_PROCESS[method], "--batch_size", "8")
    torch.manual_seed(0)
    model = ring_nce.Ring(args, N).eval()
    if method == "moco":
        model.queue_ids.copy_(torch.where(torch.arange(16) % 5 == 0, -1, torch.arange(16) + 2))  # some unknown
    net = ring_nce.distribute(model, model.encoder_q, args, torch.device("cpu"))
    optimizer = ring_nce.make_optimizer(model, args, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 8, 8, generator=g)[rows] for _ in range(2)]
    ids = torch.tensor([3, 17, 5, 11, 0, 19, 8, 12])[rows]
    torch.manual_seed(seed)
    stats = ring_nce.train_step(net, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), views, ids,
                                CLASSES, args, None)
    return ring_nce.epoch_stats([stats]), {k: v.clone() for k, v in model.state_dict().items()}


def worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    result = {m: step_on(m, slice(4 * rank, 4 * rank + 4), seed=rank) for m in TWO_PROCESS}
    dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring_dist")
    mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method", TWO_PROCESS)
def test_two_processes_equal_one(two_processes, method):
    stats, state = step_on(method, slice(0, 8), seed=0)
    assert stats["fn_rate"] != "" and stats["fn_rate_above"] != ""
    for result in two_processes:
        got_stats, got_state = result[method]
        assert set(got_stats) == set(stats)
        for name in stats:
            assert got_stats[name] == pytest.approx(stats[name], rel=1e-5), name
        for name, value in state.items():  # weights, key encoder, queue, ids, pointer, banks
            torch.testing.assert_close(got_state[name], value, msg=lambda m: f"{name}: {m}")
    assert all(torch.equal(a, b) for a, b in zip(two_processes[0][method][1].values(),
                                                 two_processes[1][method][1].values()))

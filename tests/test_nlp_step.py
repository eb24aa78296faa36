"""nlp_similar_words.py's training step pinned to Nozawa & Sato's: one step of the script's own
train_step (with the optimizer main builds) against a step written independently from their code
(nzw0301/Understanding-Negative-Samples at 8a6c757, and NVIDIA/apex's LARC), the lr schedule
against their loop, the published constants as literals, and the negatives monitor on
constructed embeddings."""
import inspect
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nlp_similar_words as nlp


# -------------------------------------------------------------------------------------------------
# Nozawa & Sato's step, written from their code (nothing of nlp_similar_words.py is used)
# -------------------------------------------------------------------------------------------------

class OriginalModel(nn.Module):
    """code/src/model.py:91-108, 243-283: ContrastiveFastText(num_embeddings, embedding_dim,
    num_last_hidden_units=embedding_dim, with_projection_head=True): f = EmbeddingBag (mean of
    the bag given by offsets), g = linear1 -> bn1 -> relu1 -> linear2 (no bias)."""

    def __init__(self, num_words, dim):
        super().__init__()
        self.f = nn.EmbeddingBag(num_words, dim)
        self.g = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(dim, dim)), ("bn1", nn.BatchNorm1d(dim)), ("relu1", nn.ReLU()),
            ("linear2", nn.Linear(dim, dim, bias=False))]))

    def forward(self, inputs, offsets):
        return self.g(self.f(inputs, offsets))


class ApexLARC:
    """NVIDIA/apex apex/parallel/LARC.py LARC.step() as nlp_self_supervised.py:47 builds it
    (trust_coefficient=0.001, clip=False, eps=1e-8): per parameter, the optimizer's weight
    decay moves into the gradient, scaled by trust |p| / (|g| + wd |p| + eps) unless |p| or |g|
    is 0; the wrapped SGD then steps with weight decay 0."""

    def __init__(self, optimizer, trust_coefficient=0.001, eps=1e-8):
        self.optim, self.trust, self.eps = optimizer, trust_coefficient, eps
        self.param_groups = optimizer.param_groups

    def step(self):
        decays = []
        with torch.no_grad():
            for group in self.optim.param_groups:
                decays.append(group.get("weight_decay", 0))
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                    if p_norm != 0 and g_norm != 0:
                        adaptive = self.trust * p_norm / (g_norm + p_norm * decays[-1] + self.eps)
                        p.grad += decays[-1] * p
                        p.grad *= adaptive
        self.optim.step()
        for group, decay in zip(self.optim.param_groups, decays):
            group["weight_decay"] = decay


def original_nt_xent(views, temperature):
    """code/src/loss.py:44-103 (NT_Xent.forward, reduction "mean") for two views [N, D]."""
    n = len(views[0])
    v0, v1 = (F.normalize(v, p=2, dim=1) for v in views)
    mask = ~torch.eye(n, dtype=torch.bool)
    sim00 = (v0 @ v0.t() / temperature)[mask].view(n, -1)
    sim11 = (v1 @ v1.t() / temperature)[mask].view(n, -1)
    sim01 = v0 @ v1.t() / temperature
    targets = torch.arange(n)
    total = F.cross_entropy(torch.cat([sim01, sim00], dim=1), targets, reduction="sum") + \
        F.cross_entropy(torch.cat([sim01.t(), sim11], dim=1), targets, reduction="sum")
    return total / 2.0 / n / 1


def flat(docs):
    """code/src/data/ag_news.py:229-233: a view as (all tokens, start offset of each document)."""
    lengths = torch.tensor([0] + [len(d) for d in docs[:-1]])
    return torch.cat(docs), lengths.cumsum(0)


class OriginalRun:
    """code/nlp_self_supervised.py:27-91, with the config of conf/optimizer/nlp/simclr_sgd.yaml
    and src/lr_utils.py: SGD(lr=calculate_initial_lr, momentum, nesterov=False, weight_decay)
    under LARC; CosineAnnealingLR(T_max = total - warm-up steps); per step: warm-up lr while
    current_step <= warmup_steps, zero_grad, one forward per view, NT_Xent, backward, LARC step,
    then the cosine scheduler's step once current_step > warmup_steps."""

    def __init__(self, model, lr, batches, linear_schedule, momentum, decay, warmup_epochs,
                 epochs, steps_per_epoch, temperature=0.5):
        self.model, self.temperature, self.step_index = model, temperature, 0
        self.initial_lr = lr * batches / 256.0 if linear_schedule else lr * math.sqrt(batches)
        self.warmup_steps = warmup_epochs * steps_per_epoch
        sgd = torch.optim.SGD(model.parameters(), lr=self.initial_lr, momentum=momentum,
                              nesterov=False, weight_decay=decay)
        self.optimizer = ApexLARC(sgd, trust_coefficient=0.001)
        self.cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            sgd, T_max=epochs * steps_per_epoch - self.warmup_steps)

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def step(self, view1, view2):
        if self.step_index <= self.warmup_steps:
            lr = self.step_index / self.warmup_steps * self.initial_lr if self.warmup_steps > 0 \
                else self.initial_lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        used = self.lr()
        self.optimizer.optim.zero_grad()
        loss = original_nt_xent([self.model(*flat(view1)), self.model(*flat(view2))],
                                self.temperature)
        loss.backward()
        self.optimizer.step()
        if self.step_index > self.warmup_steps:
            self.cosine.step()
        self.step_index += 1
        return loss.item(), used


# -------------------------------------------------------------------------------------------------
# The script's step against it
# -------------------------------------------------------------------------------------------------

def script_args(*flags):
    return nlp.get_parser().parse_args(["--augmentation", "erase", *flags])


def copy_into_original(model, num_words, dim):
    """The script's initial weights in the original's module (its padding row left out)."""
    original = OriginalModel(num_words, dim)
    head = model.projector
    with torch.no_grad():
        original.f.weight.copy_(model.backbone.embedding.weight[:num_words])
        for mine, theirs in ((head[0], original.g.linear1), (head[3], original.g.linear2)):
            theirs.weight.copy_(mine.weight)
        original.g.linear1.bias.copy_(head[0].bias)
        original.g.bn1.load_state_dict(head[1].state_dict())
    return original


def pairs_of_views(step, b, num_words):
    """b documents of 0..9 tokens (one empty) and two different views of them."""
    g = torch.Generator().manual_seed(100 + step)
    docs = [torch.randint(num_words, (int(n),), generator=g)
            for n in torch.randint(1, 10, (b,), generator=g)]
    docs[step % b] = docs[step % b][:0]
    view2 = [d[torch.rand(len(d), generator=g) > 0.2] for d in docs]  # erase-like, 2nd view
    return docs, view2


@pytest.mark.parametrize("lr_scaling,weight_decay", [("sqrt", 0.0), ("linear", 0.01)])
def test_six_steps_equal_nozawa_and_satos(lr_scaling, weight_decay):
    """Six steps (2 epochs of 3 steps, 1 warm-up epoch: lr 0, 1/3, 2/3, 1, 1, then the cosine):
    the loss, every parameter and buffer, every momentum buffer, the lr, after every step.
    One quirk, the original's too: the bias of the Linear before BatchNorm has a gradient of
    exactly 0 in exact arithmetic; float32 leaves noise, which LARC scales up to 1e-3 |b| a step
    (at weight decay 0). Its direction is noise in either code, so that bias and the BatchNorm
    running mean it feeds are held to the bound of that drift, |m_s| <= (s + 1) 1e-3 |b|."""
    b, num_words, dim, per_epoch = 6, 20, 8, 3
    args = script_args("--batch_size", str(b), "--embedding_dim", str(dim), "--epochs", "2",
                       "--warmup_epochs", "1", "--lr_scaling", lr_scaling,
                       "--weight_decay", str(weight_decay))
    torch.manual_seed(0)
    model = nlp.ContrastiveFastText(num_words, dim)
    optimizer = nlp.make_optimizer(model, args, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    original = copy_into_original(model, num_words, dim)
    run = OriginalRun(original, lr=1.0, batches=b, linear_schedule=lr_scaling == "linear",
                      momentum=0.9, decay=weight_decay, warmup_epochs=1, epochs=2,
                      steps_per_epoch=per_epoch)
    pad = nlp.TextDataset(torch.zeros(0, dtype=torch.long), torch.zeros(1), [], num_words).collate
    drift = 0.0
    for step in range(6):
        docs, view2 = pairs_of_views(step, b, num_words)
        expected_loss, expected_lr = run.step(docs, view2)
        lr = nlp.learning_rate(args, step, per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x1, x2 = pad([(d,) for d in docs])[0], pad([(d,) for d in view2])[0]
        stats = nlp.train_step(model, optimizer, scaler, x1, x2, torch.zeros(b, dtype=torch.long),
                               args, None)
        assert lr == pytest.approx(expected_lr, rel=1e-12, abs=1e-15)
        assert stats["loss"].item() == pytest.approx(expected_loss, rel=1e-5)
        if weight_decay == 0:
            drift += 2 * lr * (step + 1) * 1e-3 * model.projector[0].bias.norm().item()
        else:  # wd |b| outweighs the noise
            drift = None
        assert_same_state(model, optimizer, original, run.optimizer.optim, num_words, drift)
    assert expected_lr > 0 and lr < run.initial_lr  # the last step is on the cosine


def assert_same_state(model, optimizer, original, sgd, num_words, drift):
    mine = dict(model.named_parameters())
    theirs = dict(original.named_parameters())
    names = {"backbone.embedding.weight": "f.weight", "projector.0.weight": "g.linear1.weight",
             "projector.0.bias": "g.linear1.bias", "projector.1.weight": "g.bn1.weight",
             "projector.1.bias": "g.bn1.bias", "projector.3.weight": "g.linear2.weight"}
    assert set(names) == set(mine)
    for name, their_name in names.items():
        p, q = mine[name], theirs[their_name]
        momentum, their_momentum = (o.state[x]["momentum_buffer"] for o, x in
                                    ((optimizer, p), (sgd, q)))
        if name.startswith("backbone"):  # the padding row: no gradient, no update, zero
            assert (p[num_words] == 0).all() and (momentum[num_words] == 0).all()
            p, momentum = p[:num_words], momentum[:num_words]
        noise = drift if name == "projector.0.bias" and drift is not None else None
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7 + (noise or 0.0), msg=name)
        if noise is None:
            torch.testing.assert_close(momentum, their_momentum, rtol=1e-4, atol=1e-7, msg=name)
    bn, their_bn = model.projector[1], original.g.bn1  # two forwards a step: two updates
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, key), getattr(their_bn, key), rtol=1e-5,
                                   atol=1e-7 + (drift or 0.0 if key == "running_mean" else 0))


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("warmup_epochs,epochs,per_epoch,scaling", [
    (2, 5, 7, "sqrt"), (0, 3, 4, "linear"), (1, 1, 5, "sqrt"), (0.5, 3, 4, "sqrt")])
def test_learning_rate_is_the_original_loops(warmup_epochs, epochs, per_epoch, scaling):
    """Every step's lr of a whole run, as OriginalRun sets it (real CosineAnnealingLR)."""
    args = script_args("--batch_size", "64", "--epochs", str(epochs), "--warmup_epochs",
                       str(warmup_epochs), "--lr_scaling", scaling, "--lr", "0.1")
    dummy = nn.Linear(1, 1)
    run = OriginalRun(dummy, 0.1, 64, scaling == "linear", 0.9, 0.0, warmup_epochs, epochs,
                      per_epoch)
    for step in range(epochs * per_epoch):
        if run.step_index <= run.warmup_steps:  # the lr part of OriginalRun.step alone
            for group in run.optimizer.param_groups:
                group["lr"] = (run.step_index / run.warmup_steps * run.initial_lr
                               if run.warmup_steps > 0 else run.initial_lr)
        assert nlp.learning_rate(args, step, per_epoch) == \
            pytest.approx(run.lr(), rel=1e-12, abs=1e-15), step
        if run.step_index > run.warmup_steps:
            run.cosine.step()
        run.step_index += 1
    assert run.initial_lr == pytest.approx(0.1 * 8.0 if scaling == "sqrt" else 0.1 * 64 / 256)


def test_published_constants():
    a = nlp.get_parser().parse_args([])
    assert a.temperature == 0.5                  # code/conf/loss/simclr.yaml:3
    assert a.embedding_dim == 50                 # code/conf/architecture/fasttext.yaml:3
    assert a.min_freq == 5 and a.mask_ratio == 0.2 and a.augmentation == "replace"
    # ^ code/conf/dataset/ag_news.yaml:6-9; v code/conf/experiment/training/ag_news.yaml:3-8
    assert a.batch_size == 512 and a.epochs == 100 and a.seed == 7
    # code/conf/optimizer/nlp/simclr_sgd.yaml:3-8: linear_schedule false (sqrt), momentum 0.9,
    # warmup_epochs 2, lr 1.0, decay 0
    assert (a.lr_scaling, a.momentum, a.warmup_epochs, a.lr, a.weight_decay) == \
        ("sqrt", 0.9, 2.0, 1.0, 0.0)
    assert nlp.NEIGHBOURS == 5                   # code/nlp_construct_similar_data.py:26 (top_k)
    larc = inspect.signature(nlp.larc_).parameters  # nlp_self_supervised.py:47; apex LARC's eps
    assert (larc["trust"].default, larc["eps"].default) == (1e-3, 1e-8)
    model = nlp.ContrastiveFastText(10000)      # code/src/model.py:100-105, 263
    layers = list(model.projector)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[3].out_features) == (50, 50, 50)
    assert layers[0].bias is not None and layers[3].bias is None
    embedding = model.backbone.embedding
    assert embedding.mode == "mean" and embedding.embedding_dim == 50
    weight = embedding.weight[:-1]               # EmbeddingBag's default init: N(0, 1)
    assert abs(weight.mean().item()) < 0.01 and abs(weight.std().item() - 1) < 0.01


# -------------------------------------------------------------------------------------------------
# The negatives monitor (issue 20): the 2B - 2 in-batch negatives of the loss
# -------------------------------------------------------------------------------------------------

class Fixed(nn.Module):
    """A network whose view-v output for the document with first token i is scale * z_v[i]."""

    def __init__(self, z1, z2):
        super().__init__()
        self.z1, self.z2, self.scale = z1, z2, nn.Parameter(torch.ones(()))

    def forward(self, x1, x2):
        return self.scale * self.z1[x1[:, 0]], self.scale * self.z2[x2[:, 0]]


def monitor(z1, z2, labels):
    net, args = Fixed(z1, z2), script_args("--batch_size", str(len(z1)))
    optimizer = nlp.make_optimizer(net, args, torch.device("cpu"))
    x = torch.arange(len(z1))[:, None]
    stats = nlp.train_step(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), x, x,
                           torch.tensor(labels), args, None)
    return stats["fn_rate"], stats["fn_rate_hard"]


def degrees(*angles):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])


def test_rates_of_constructed_embeddings():
    """4 documents at 0, -30, 20 and 5 degrees (both views alike), classes 0, 0, 1, unknown. Doc 0:
    negatives docs 1-3 (twice); known: docs 1, 2 -> fn_rate 2/4; its most similar known negative
    is doc 2 (doc 3, closer, has no class; its own other view is its positive) -> hard 0. Doc 1:
    nearest doc 0, same class -> hard 1. Doc 2: no negative of its class. Doc 3: none known.
    The lengths 1, 3, 0.5, 2 leave cosines alone (inner products would make doc 1 doc 0's
    nearest)."""
    z = degrees(0, -30, 20, 5) * torch.tensor([1, 3, 0.5, 2])[:, None]
    fn_rate, hard = monitor(z, z, [0, 0, 1, -1])
    nan = math.nan
    torch.testing.assert_close(fn_rate, torch.tensor([0.5, 0.5, 0, nan] * 2, dtype=fn_rate.dtype),
                               equal_nan=True)
    torch.testing.assert_close(hard, torch.tensor([0, 1, 0, nan] * 2, dtype=hard.dtype),
                               equal_nan=True)


def test_the_one_percent_rule():
    """101 documents: 200 negatives an anchor, its 2 (1%) most similar count. Doc 0 = e0; view 1
    of doc 1 (class 0) at cosine 0.9, doc 2 (class 1) at 0.8 in both views, view 2 of doc 1 at
    0.7, the rest orthogonal: the top 2 are doc 1's view 1 and a view of doc 2 -> 1/2 (k = 1
    would give 1, k = 3 1/3). fn_rate of doc 0: docs of class 0 among 1..100 (doc 1 and the 25
    multiples of 4 from 4 to 100) twice, over 200."""
    z1 = torch.eye(101)
    z1[1] = 0.9 * z1[0] + math.sqrt(1 - 0.81) * z1[1]
    z1[2] = 0.8 * z1[0] + 0.6 * z1[2]
    z2 = z1.clone()
    z2[1] = 0.7 * z1[0] + math.sqrt(1 - 0.49) * torch.eye(101)[1]
    labels = [0, 0, 1] + [i % 4 for i in range(3, 101)]
    fn_rate, hard = monitor(z1, z2, labels)
    assert fn_rate[0].item() == pytest.approx(2 * 26 / 200) and hard[0].item() == 0.5
    assert hard[101].item() == 0.5  # view 2 of doc 0 (also e0) against the same negatives


def test_the_monitor_leaves_the_step_bit_for_bit(monkeypatch):
    args = script_args("--batch_size", "6", "--embedding_dim", "8")
    docs, view2 = pairs_of_views(0, 6, 20)
    pad = nlp.TextDataset(torch.zeros(0, dtype=torch.long), torch.zeros(1), [], 20).collate
    x1, x2 = pad([(d,) for d in docs])[0], pad([(d,) for d in view2])[0]
    states = []
    for stub in (False, True):
        if stub:
            monkeypatch.setattr(nlp, "negative_rates", lambda *a: {})
        torch.manual_seed(0)
        model = nlp.ContrastiveFastText(20, 8)
        optimizer = nlp.make_optimizer(model, args, torch.device("cpu"))
        for group in optimizer.param_groups:
            group["lr"] = 1.0
        nlp.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), x1, x2,
                       torch.tensor([0, 1, 2, 3, 0, 1]), args, None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])

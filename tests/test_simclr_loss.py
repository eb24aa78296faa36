"""contrastive_loss (SimCLR / DCL / HCL) against an independent loop-based float64 reference,
closed forms, the spec's test vectors, gradcheck and bf16 autocast."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclr_debiased import contrastive_loss, contrastive_loss_terms


def reference_loss(z1, z2, temperature, tau_plus, beta):
    """Probability-domain loss, one anchor at a time, in float64 numpy, written from the papers'
    definitions (and the official code's choices: M = 1, the floor always on, mean over 2B)."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    b = z1.shape[0]
    n = 2 * b - 2
    losses, clamped = [], []
    for i in range(2 * b):
        partner = i + b if i < b else i - b
        pos = math.exp(float(z[i] @ z[partner]) / temperature)
        sims = np.array([float(z[i] @ z[j]) / temperature for j in range(2 * b) if j not in (i, partner)])
        neg = np.exp(sims)
        weights = np.exp(beta * sims)
        reweighted = (weights * neg).sum() / weights.mean()
        ng = (reweighted - tau_plus * n * pos) / (1 - tau_plus)
        floor = n * math.exp(-1 / temperature)
        is_clamped = ng <= floor
        ng = max(ng, floor)
        losses.append(-math.log(pos / (pos + ng)))
        clamped.append(is_clamped)
    return float(np.mean(losses)), np.array(clamped)


def views(seed, b, d, noise=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype)
    z2 = torch.randn(b, d, generator=g, dtype=dtype) if noise is None else z1 + noise * torch.randn(b, d, generator=g, dtype=dtype)
    return z1, z2


SETTINGS = [(0.0, 0.0, 0.5), (0.1, 0.0, 0.5), (0.1, 1.0, 0.5), (0.05, 6.0, 0.5), (0.0, 2.0, 0.2), (0.1, 1.0, 0.1),
            (0.3, 0.5, 1.0), (0.0, 0.0, 0.07)]


@pytest.mark.parametrize("tau_plus,beta,temperature", SETTINGS)
@pytest.mark.parametrize("seed,b,d,noise", [(0, 2, 3, None), (1, 5, 8, 0.3), (2, 8, 16, None), (3, 16, 4, 0.05)])
def test_matches_loop_reference(tau_plus, beta, temperature, seed, b, d, noise):
    z1, z2 = views(seed, b, d, noise)
    terms, clamped, *_ = contrastive_loss_terms(z1, z2, temperature, tau_plus, beta)
    expected, expected_clamped = reference_loss(z1.numpy(), z2.numpy(), temperature, tau_plus, beta)
    assert terms.mean().item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    np.testing.assert_array_equal(clamped.numpy(), expected_clamped)
    # float32 inputs are computed in float32 and stay close
    loss32 = contrastive_loss(z1.float(), z2.float(), temperature, tau_plus, beta)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


# The spec's test vectors (shared/specs/simclr_debiased.md section 8): official code = reference.
@pytest.mark.parametrize("case,temperature,tau_plus,beta,expected", [
    ("A", 0.5, 0.0, 0.0, 2.851698456), ("A", 0.5, 0.1, 0.0, 2.856623543), ("A", 0.5, 0.0, 1.0, 3.036390169),
    ("A", 0.5, 0.1, 1.0, 3.058919994), ("A", 0.5, 0.1, 6.0, 3.500388955),
    ("C", 0.5, 0.0, 0.0, 1.137635324), ("C", 0.5, 0.1, 0.0, 0.5743410772), ("C", 0.5, 0.0, 1.0, 1.287869504),
    ("C", 0.5, 0.1, 1.0, 0.8444468606), ("C", 0.5, 0.1, 6.0, 1.259791948), ("C", 0.5, 0.5, 0.0, 0.23051388),
    ("C", 0.1, 0.0, 0.0, 0.009298146463), ("C", 0.1, 0.0, 1.0, 0.0418179603), ("C", 0.1, 0.1, 0.0, 3.049212134e-08),
    ("C", 0.1, 0.1, 1.0, 3.049212134e-08)])
def test_spec_vectors(case, temperature, tau_plus, beta, expected):
    torch.manual_seed(0)
    z1 = torch.randn(8, 16, dtype=torch.float64)
    z2 = torch.randn(8, 16, dtype=torch.float64) if case == "A" else z1 + 0.1 * torch.randn(8, 16, dtype=torch.float64)
    assert z1[0, 0].item() == pytest.approx(-2.310412, abs=1e-6)
    # half a unit in the last digit the spec prints (10 significant digits; 8 for 0.23051388)
    tolerance = 5e-9 if expected != 0.23051388 else 5e-8
    assert contrastive_loss(z1, z2, temperature, tau_plus, beta).item() == pytest.approx(expected, rel=tolerance)


def test_identical_embeddings_closed_form():
    # All 2B views equal: every logit is 1/t, so SimCLR gives log(1 + N) = log(2B - 1). The
    # debiasing is then exactly neutral: (N e^{1/t} - tau+ N e^{1/t}) / (1 - tau+) = N e^{1/t}.
    z = torch.ones(6, 4, dtype=torch.float64)
    assert contrastive_loss(z, z, 0.5).item() == pytest.approx(math.log(11), rel=1e-12)
    for tau_plus, beta in [(0.0, 0.0), (0.0, 3.0), (0.1, 1.0), (0.6, 6.0)]:
        assert contrastive_loss(z, z, 0.5, tau_plus, beta).item() == pytest.approx(math.log(11), rel=1e-12)


def test_orthogonal_images_closed_form():
    # Views of an image identical, images mutually orthogonal: pos = e^{1/t}, every negative e^0.
    # rew = N whatever beta; Ng = N (1 - tau+ e^{1/t}) / (1 - tau+) unless the floor N e^{-1/t} binds.
    z = torch.eye(6, dtype=torch.float64)
    n, t = 10, 0.5
    for tau_plus, beta in [(0.0, 0.0), (0.1, 0.0), (0.1, 4.0)]:
        ng = n * (1 - tau_plus * math.exp(1 / t)) / (1 - tau_plus)
        expected = math.log1p(ng / math.exp(1 / t))
        terms, clamped, *_ = contrastive_loss_terms(z, z, t, tau_plus, beta)
        assert not clamped.any()
        assert terms.mean().item() == pytest.approx(expected, rel=1e-12)
    terms, clamped, *_ = contrastive_loss_terms(z, z, t, 0.2, 2.0)  # 1 - 0.2 e^2 < 0: the floor binds
    assert clamped.all()
    assert terms.mean().item() == pytest.approx(math.log1p(n * math.exp(-2 / t)), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_no_prior_and_no_hardness_is_simclr(seed):
    z1, z2 = views(seed, 7, 5)
    hard = contrastive_loss(z1, z2, 0.3, tau_plus=0.0, beta=0.0)
    # NT-Xent written as a cross-entropy over the 2B-1 other views (leftthomas/SimCLR).
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.3).fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(7, 14), torch.arange(0, 7)])
    assert hard.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-12)


def test_floor_binds_at_large_tau_plus():
    z1, z2 = views(0, 8, 16, noise=0.1)
    terms, clamped, *_ = contrastive_loss_terms(z1, z2, 0.5, 0.9, 0.0)
    assert clamped.all()
    pos = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(1) / 0.5
    floor = 14 * math.exp(-2.0)
    expected = torch.log1p(floor / torch.exp(torch.cat([pos, pos])))
    torch.testing.assert_close(terms, expected, rtol=1e-12, atol=0)
    # where it binds, the negatives get no gradient: the gradient is that of the positive term alone
    z1.requires_grad_(True)
    contrastive_loss(z1, z2, 0.5, 0.9, 0.0).backward()
    a = z1.detach().clone().requires_grad_(True)
    p = (F.normalize(a, dim=1) * F.normalize(z2, dim=1)).sum(1) / 0.5
    torch.log1p(floor / torch.exp(torch.cat([p, p]))).mean().backward()
    torch.testing.assert_close(z1.grad, a.grad, rtol=1e-12, atol=1e-15)


def test_inputs_are_normalised_inside():
    z1, z2 = views(5, 6, 8)
    raw = contrastive_loss(3.0 * z1, 0.2 * z2, 0.5, 0.1, 1.0)
    unit = contrastive_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.5, 0.1, 1.0)
    assert raw.item() == pytest.approx(unit.item(), rel=1e-13)


def test_swapping_views_and_permuting_images():
    z1, z2 = views(6, 9, 5)
    base = contrastive_loss(z1, z2, 0.5, 0.1, 1.0).item()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert contrastive_loss(z2, z1, 0.5, 0.1, 1.0).item() == pytest.approx(base, rel=1e-13)
    assert contrastive_loss(z1[perm], z2[perm], 0.5, 0.1, 1.0).item() == pytest.approx(base, rel=1e-13)


@pytest.mark.parametrize("tau_plus,beta,temperature", [
    (0.0, 0.0, 0.5), (0.1, 0.0, 0.5), (0.1, 1.0, 0.5), (0.2, 6.0, 0.3), (0.0, 2.0, 0.1)])
def test_gradcheck(tau_plus, beta, temperature):
    z1, z2 = views(11, 4, 3, noise=0.8)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, temperature, tau_plus, beta),
                                    (z1, z2), eps=1e-6, atol=1e-8)


def test_hcl_weights_are_not_detached():
    # The official HCL code backpropagates through the importance weights; detaching them keeps
    # the value but changes the gradient (spec 2.5). Our gradient must be the non-detached one.
    z1, z2 = views(0, 8, 16)
    z1.requires_grad_(True)
    contrastive_loss(z1, z2, 0.5, 0.1, 1.0).backward()
    ours = z1.grad.clone()

    def detached(a, b):
        z = F.normalize(torch.cat([a, b]), dim=1)
        n, t = 14, 0.5
        sims = z @ z.T / t
        mask = torch.ones(16, 16, dtype=torch.bool)
        idx = torch.arange(16)
        mask[idx, idx] = False
        mask[idx, (idx + 8) % 16] = False
        neg = sims[mask].view(16, -1)
        pos = sims[idx, (idx + 8) % 16]
        w = torch.softmax(1.0 * neg, dim=1).detach()
        rew = n * (w * neg.exp()).sum(1)
        ng = torch.clamp((rew - 0.1 * n * pos.exp()) / 0.9, min=n * math.exp(-1 / t))
        return -(pos.exp() / (pos.exp() + ng)).log().mean()

    a = z1.detach().clone().requires_grad_(True)
    value = detached(a, z2)
    value.backward()
    assert value.item() == pytest.approx(contrastive_loss(z1, z2, 0.5, 0.1, 1.0).item(), rel=1e-12)
    assert (ours - a.grad).abs().max() > 1e-4


def test_bf16_autocast_low_temperature_high_beta():
    # Embeddings come out of a bf16 autocast region; the loss must still be finite and as accurate
    # as float64 on those same inputs (spec 7.2: t = 0.1, beta = 6 overflows in fp16 arithmetic).
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(64, 32, generator=g)
    x2 = x + 0.05 * torch.randn(64, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x), layer(x2)
        assert z1.dtype == torch.bfloat16
        loss = contrastive_loss(z1, z2, temperature=0.1, tau_plus=0.1, beta=6.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    exact = contrastive_loss(z1.double(), z2.double(), 0.1, 0.1, 6.0)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_no_prior = contrastive_loss(z1, z2, temperature=0.1, tau_plus=0.0, beta=6.0)
    assert torch.isfinite(loss_no_prior)
    assert loss_no_prior.item() == pytest.approx(contrastive_loss(z1.double(), z2.double(), 0.1, 0.0, 6.0).item(), rel=1e-4)


def test_extreme_temperature_stays_finite():
    z1, z2 = views(3, 16, 8, noise=0.01, dtype=torch.float32)
    z1.requires_grad_(True)
    loss = contrastive_loss(z1, z2, temperature=0.005, tau_plus=0.05, beta=8.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.0), "temperature"), (dict(tau_plus=1.0), "tau_plus"), (dict(tau_plus=-0.1), "tau_plus"),
    (dict(beta=-1.0), "beta")])
def test_invalid_arguments(kwargs, message):
    z1, z2 = views(0, 4, 3)
    with pytest.raises(ValueError, match=message):
        contrastive_loss(z1, z2, **kwargs)


def test_invalid_shapes():
    with pytest.raises(ValueError, match="B, D"):
        contrastive_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_loss(torch.randn(1, 3), torch.randn(1, 3))

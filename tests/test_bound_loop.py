"""bound.py, the bound loop as functions of tensors: the theorem's lower bounds batch by batch
where they must hold exactly, the "perfect encoder" closed forms, the notebook's simulation cell,
the estimator's combinatorics and the loop's analytic upsilon, tau and E ln(1 + Col) against
exact enumeration, the collision statistic, and the report's bounds against the paper's formulas
at tau and upsilon far from 1/2."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bound


@pytest.mark.parametrize("k_plus_1", [3, 6, 12, 30])
def test_both_lower_bounds_hold_batch_by_batch_at_the_class_means(k_plus_1):
    # With every view-1 feature at its class mean (unit vectors mu_c, f-bar = mu_c, so d = 0) the
    # contrastive loss of an anchor of class c is -s_c + ln sum_{j in U} n_j e^{s_j}, and the
    # paper's steps hold per anchor: >= 1/2 (-s_c + ln sum_U e^{s_j}) + 1/2 ln n_c (Nozawa &
    # Sato), >= the sub-class loss if n_c = 1 and >= ln n_c otherwise (Arora et al.).
    C, dim, t = 5, 8, 0.5
    g = torch.Generator().manual_seed(k_plus_1)
    for _ in range(50):
        mu = F.normalize(torch.randn(C, dim, generator=g, dtype=torch.float64), dim=1)
        labels = torch.randint(0, C, (k_plus_1,), generator=g)
        z0 = 3 * torch.randn(k_plus_1, dim, generator=g, dtype=torch.float64)
        s = bound.batch_bound_sums(z0, mu[labels], labels, mu[labels], mu, t, C)
        assert s["assumption_value"] == 0.0
        ours = 0.5 * (s["sup_loss"] + s["partial_sup_loss"] + s["conflict_term"])
        arora = s["curl_partial_sup_loss"] + s["conflict_term"]
        assert s["SimCLR_loss"] >= ours - 1e-12 and s["SimCLR_loss"] >= arora - 1e-12, s


def one_hot_batch(labels, dim):
    return F.one_hot(labels, dim).double()


@pytest.mark.parametrize("k_plus_1", [4, 16, 32])
def test_perfect_encoder_closed_forms(k_plus_1):
    # Features = exact class directions, no augmentation noise: f-bar = mu_c = e_c, d(f) = 0,
    # z.mu_j = 1 for j = c and 0 otherwise (bound_and_nlp.md 8.4 item 5).
    C, dim, t = 10, 12, 0.5
    mu = torch.eye(C, dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(k_plus_1)
    total, covered_batches = {}, 0
    for _ in range(40):
        labels = torch.randint(0, C, (k_plus_1,), generator=g)
        z = one_hot_batch(labels, dim)
        sums = bound.batch_bound_sums(z, z.clone(), labels, z.clone(), mu, t, C)
        n = torch.bincount(labels, minlength=C).double()[labels]  # n_c of each sample = 1 + Col
        U = labels.unique().numel()
        e = math.exp(-1 / t)
        assert sums["SimCLR_loss"] == pytest.approx(
            float(torch.log(n + (k_plus_1 - n) * e).sum()), rel=1e-12)
        assert sums["assumption_value"] == 0.0
        full = math.log(1 + (C - 1) * e)
        sub = math.log(1 + (U - 1) * e)
        singles = float((n == 1).sum())
        assert sums["sup_loss_all"] == pytest.approx(k_plus_1 * full, rel=1e-12)
        if U == C:
            covered_batches += 1
            assert sums["upsilon"] == k_plus_1 and sums["partial_sup_loss"] == 0
            assert sums["sup_loss"] == pytest.approx(k_plus_1 * full, rel=1e-12)
            assert sums["curl_sup_loss"] == pytest.approx(singles * full, rel=1e-12)
        else:
            assert sums["upsilon"] == 0 and sums["sup_loss"] == 0 and sums["curl_sup_loss"] == 0
            assert sums["partial_sup_loss"] == pytest.approx(k_plus_1 * sub, rel=1e-12)
        assert sums["curl_partial_sup_loss"] == pytest.approx(singles * (full if U == C else sub),
                                                              rel=1e-12)
        assert sums["curl_tau"] == float((n >= 2).sum())
        assert sums["conflict_term"] == pytest.approx(float(torch.log(n).sum()), rel=1e-12)
        bound.add_sums(total, sums)
    # L_sup of the mean classifier: ln(1 + (C - 1) e^{-1/t}) = ln(1 + 9 e^-2) = 0.7966138 for
    # C = 10, t = 0.5 (the spec's "0.79667..." has a slip in the 5th digit)
    report = bound.bound_report(total, C, k_plus_1,
                                bound.analytic_terms(k_plus_1, [k_plus_1 * 40] * C))
    terms = report["terms"]
    assert terms["sup_loss_all"] == pytest.approx(0.7966138, abs=1e-7)
    # here the per-sample inequalities hold batch by batch, so both lower bounds hold exactly
    assert terms["SimCLR_loss"] >= report["table"]["bound"]
    assert terms["SimCLR_loss"] >= report["table"]["curl_bound"]
    if covered_batches:  # the proposed upper bound then really bounds L_sup
        assert report["upper_bounds"]["ours_theorem"] >= terms["sup_loss_all"]
        assert report["upper_bounds"]["ours_notebook"] >= report["upper_bounds"]["ours_theorem"]


def test_one_view_info_nce_against_a_loop():
    # the contrastive loss of the bound: cross-entropy of normalize(z0) normalize(z1)^T / t
    g = torch.Generator().manual_seed(3)
    z0, z1 = torch.randn(2, 12, 8, generator=g, dtype=torch.float64)
    a, b = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    loop = [float(-F.log_softmax(a[i] @ b.T / 0.5, 0)[i]) for i in range(12)]
    assert bound.info_nce_one_view(z0, z1, 0.5).tolist() == pytest.approx(loop, rel=1e-12)


def test_gap_term_and_subclass_loss_on_random_features():
    g = torch.Generator().manual_seed(4)
    C, t = 5, 0.5
    labels = torch.tensor([0, 0, 1, 3, 3, 3])  # classes 2 and 4 missing: U = {0, 1, 3}
    z0, z1, fbar = (torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3))
    mu = torch.randn(C, 7, generator=g, dtype=torch.float64) * 0.3
    sums = bound.batch_bound_sums(z0, z1, labels, fbar, mu, t, C)
    z = F.normalize(z0, dim=1)
    inner = [float(z[i] @ (mu[labels[i]] - fbar[i])) for i in range(6)]
    assert sums["assumption_value"] == pytest.approx(sum(min(0.0, x) for x in inner) / t,
                                                     rel=1e-12)
    U = [0, 1, 3]
    sub = [float(-(z[i] @ mu[labels[i]]) / t + torch.logsumexp(z[i] @ mu[U].T / t, 0))
           for i in range(6)]
    assert sums["partial_sup_loss"] == pytest.approx(sum(sub), rel=1e-12)
    assert sums["curl_partial_sup_loss"] == pytest.approx(sub[2], rel=1e-12)  # the only single
    assert sums["upsilon"] == 0 and sums["sup_loss"] == 0 and sums["curl_tau"] == 5
    assert sums["conflict_term"] == pytest.approx(2 * math.log(2) + 3 * math.log(3))


def test_notebook_simulation_cell_is_reproduced():
    # coupon.ipynb "Simulation": 100 classes x 100 labels, RandomState(7), 10 shuffles per N,
    # consecutive batches of N, the last partial one dropped; printed fraction of covered batches
    printed = {128: 0.0, 256: 0.0, 384: 0.13076923076923075, 512: 0.5789473684210534,
               640: 0.8733333333333351, 768: 0.984615384615382, 896: 0.9999999999999972,
               1024: 0.9999999999999984}
    rnd = np.random.RandomState(7)
    labels = np.arange(100).repeat(100)
    for n in printed:
        total = {}
        for _ in range(10):
            rnd.shuffle(labels)
            for b in range(len(labels) // n):
                batch = torch.from_numpy(labels[n * b:n * (b + 1)])
                bound.add_sums(total, bound.batch_label_sums(batch, 100))
        assert total["upsilon"] / total["samples"] == pytest.approx(printed[n], abs=1e-12), n


def hypergeometric_terms(k_plus_1, C, m):
    """Exact upsilon, tau, E ln(1 + Col) of batches of K+1 drawn without replacement from C x m
    items (bound_and_nlp.md 2.7-2.8), in rationals (the last as a float)."""
    M, K = C * m, k_plus_1 - 1
    upsilon = Fraction(sum((-1) ** j * math.comb(C, j) * math.comb(M - j * m, k_plus_1)
                           for j in range(C + 1)), math.comb(M, k_plus_1))
    pmf = [Fraction(math.comb(m - 1, c) * math.comb(M - m, K - c), math.comb(M - 1, K))
           for c in range(min(K, m - 1) + 1)]
    return upsilon, 1 - pmf[0], math.fsum(float(p) * math.log1p(c) for c, p in enumerate(pmf))


def test_estimator_combinatorics_match_the_hypergeometric_closed_forms():
    # balanced labels (m = 100 per class, C = 100), shuffled, batches of K+1 = 512 as the loop makes
    C, m, k = 100, 100, 512
    labels = torch.arange(C).repeat_interleave(m)
    g = torch.Generator().manual_seed(5)
    covered, tau, conflict = [], [], []
    for _ in range(60):
        order = torch.randperm(C * m, generator=g)
        for b in range(C * m // k):
            s = bound.batch_label_sums(labels[order[b * k:(b + 1) * k]], C)
            covered.append(s["upsilon"] / k)
            tau.append(s["curl_tau"] / k)
            conflict.append(s["conflict_term"] / k)
    exact = hypergeometric_terms(k, C, m)
    for values, value in zip((covered, tau, conflict), exact):
        values = np.asarray(values)
        assert abs(values.mean() - float(value)) < 4 * values.std() / math.sqrt(values.size) \
            + 1e-12, (values.mean(), float(value))
    # the full per-batch function gives the same label sums with any features; K+1 < C: no cover
    feats = torch.randn(k, 16, generator=g)
    batch = labels[order[:k]]
    full = bound.batch_bound_sums(feats, feats + 0.1, batch, feats,
                                  torch.randn(C, 16, generator=g), 0.5, C)
    assert all(full[key] == value for key, value in bound.batch_label_sums(batch, C).items())
    small = bound.batch_bound_sums(feats[:50], feats[:50], batch[:50], feats[:50],
                                   torch.randn(C, 16), 0.5, C)
    assert small["upsilon"] == 0 and small["sup_loss"] == 0 and small["partial_sup_loss"] > 0


@pytest.mark.parametrize("counts,k_plus_1", [([3, 3, 3], 4), ([3, 2, 4], 4), ([3, 2, 4], 5),
                                             ([2, 5], 3), ([1, 4, 2, 3], 6), ([4, 4], 8)])
def test_loop_upsilon_tau_and_collision_against_enumeration(counts, k_plus_1):
    # analytic_terms: what the bound loop's batches (K+1 test items without replacement) give.
    # Enumerated here: every subset of K+1 items is equally likely, its anchor any of its items.
    items = [c for c, m in enumerate(counts) for _ in range(m)]
    covered = collided = 0
    log_col, batches = [], 0
    for batch in itertools.combinations(range(len(items)), k_plus_1):
        labels = [items[i] for i in batch]
        batches += 1
        covered += len(set(labels)) == len(counts)
        for c in labels:
            collided += labels.count(c) > 1
            log_col.append(math.log(labels.count(c)))
    terms = bound.analytic_terms(k_plus_1, counts)
    assert terms["upsilon"] == pytest.approx(covered / batches, rel=1e-12, abs=1e-15)
    assert terms["tau"] == pytest.approx(collided / (batches * k_plus_1), rel=1e-12, abs=1e-15)
    assert terms["expected_log_collision"] == pytest.approx(math.fsum(log_col) / len(log_col),
                                                            rel=1e-12, abs=1e-15)


def collision_reference(v0, v1, labels):
    """collision_analysis.ipynb, one sample at a time: b_j = sum_i |S_ij - S_jj| / (n_c - 1) over
    the samples i of j's class, S_ij = cos(view0_i, view1_j); the mean of b_j."""
    v0, v1 = F.normalize(v0.double(), dim=1), F.normalize(v1.double(), dim=1)
    values = []
    for j in range(len(labels)):
        same = [i for i in range(len(labels)) if labels[i] == labels[j]]
        if len(same) > 1:
            s_jj = float(v0[j] @ v1[j])
            values.append(sum(abs(float(v0[i] @ v1[j]) - s_jj) for i in same) / (len(same) - 1))
    return sum(values) / len(values)


def test_collision_statistic():
    # identical views and identical same-class features: 0
    base = torch.randn(4, 8)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    v = base[labels]
    assert bound.collision_statistic(v, v.clone(), labels) == pytest.approx(0.0, abs=1e-12)
    # 3 samples of one class with cosines 1, 0, 1/sqrt 2 (views equal); a singleton is skipped
    scale = torch.tensor([[2.0], [1.0], [3.0], [1.0]])
    view = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -1.0]]) * scale
    lab = torch.tensor([0, 0, 0, 1])
    r = 1 / math.sqrt(2)
    b = [(0 + 1 + (1 - r)) / 2, (1 + 0 + (1 - r)) / 2, (2 * (1 - r)) / 2]
    assert bound.collision_statistic(view, view, lab) == pytest.approx(sum(b) / 3, rel=1e-12)
    # random views, column blocks of 7: the loop reference
    x0, x1 = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(9))
    assert bound.collision_statistic(x0, x1, y, chunk=7) == pytest.approx(
        collision_reference(x0, x1, y), rel=1e-12)


def published_sums(L, d, L_sup, L_sub, collision, upsilon, tau, curl_sup=0.0, curl_sub=0.0,
                   n=1000.0):
    """Sums whose per-sample means are the given (halved, as in the tables) rows."""
    return {"samples": n, "SimCLR_loss": L * n, "assumption_value": d * n,
            "upsilon": upsilon * n, "curl_tau": tau * n, "sup_loss": 2 * L_sup * n,
            "partial_sup_loss": 2 * L_sub * n, "conflict_term": collision * n,
            "curl_sup_loss": curl_sup * n, "curl_partial_sup_loss": (curl_sup + curl_sub) * n,
            "sup_loss_all": 0.0}


@pytest.mark.parametrize("tau,upsilon", [(0.05, 0.3), (0.2, 0.95), (0.9, 0.69)])
def test_upper_and_lower_bounds_are_the_papers_formulas(tau, upsilon):
    # bound_and_nlp.md 2.3, 2.4, 2.6: with the per-sample means L (L_Info), d, L_sup = sup/2,
    # L_sub = partial/2 (halved, as the tables print them), Col = E ln(1 + Col):
    #   Nozawa & Sato (theorem)  [2 (L - d) - 2 L_sub - Col] / upsilon
    #   their notebook           [2 L - L_sub - Col - 2 d] / upsilon
    #   Arora et al.             [L - curl_sub - Col - d] / (1 - tau)
    #   lower bounds             L_sup + L_sub + Col / 2 + d;  Col + curl_sup + curl_sub + d
    L, d, L_sup, L_sub, col, curl_sup, curl_sub = 3.1, -0.4, 0.7, 0.3, 1.2, 0.05, 0.25
    sums = published_sums(L, d, L_sup, L_sub, col, upsilon, tau, curl_sup, curl_sub)
    r = bound.bound_report(sums, 10, 64, bound.analytic_terms(64, [100] * 10))
    u, table = r["upper_bounds"], r["table"]
    theorem = (2 * (L - d) - 2 * L_sub - col) / upsilon
    notebook = (2 * L - L_sub - col - 2 * d) / upsilon
    arora = (L - curl_sub - col - d) / (1 - tau)
    assert u["ours_theorem"] == pytest.approx(theorem, rel=1e-12)
    assert u["ours_notebook"] == pytest.approx(notebook, rel=1e-12)
    assert u["arora"] == pytest.approx(arora, rel=1e-12)
    assert (u["upsilon_source"], u["tau_source"]) == ("empirical", "empirical")
    expected = {"tau": tau, "upsilon": upsilon, "L_Info": L, "d": d, "L_sup": L_sup,
                "L_sub": L_sub, "curl_collision": col, "curl_L_sup": curl_sup,
                "curl_L_sub": curl_sub, "bound": L_sup + L_sub + col / 2 + d,
                "curl_bound": col + curl_sup + curl_sub + d,
                "ln_upper_bound_theorem": math.log(theorem),
                "ln_upper_bound": math.log(notebook), "ln_curl_upper_bound": math.log(arora)}
    assert {k: table[k] for k in expected} == pytest.approx(expected, rel=1e-12)


def test_report_recomposes_the_published_rows():
    # CIFAR-10, K+1 = 32 (Table 2): bound = L_sup + L_sub + Collision/2 + d
    # = 0.63 + 0.26 + 0.66 - 1.16 = 0.39; CURL 1.32 + 0.05 + 0.01 - 1.16 = 0.22 (table: 0.23)
    r = bound.bound_report(published_sums(2.02, -1.16, 0.63, 0.26, 1.32, 0.69, tau=0.96,
                                          curl_sup=0.05, curl_sub=0.01),
                           10, 32, bound.analytic_terms(32, [1000] * 10))
    assert r["table"]["bound"] == pytest.approx(0.39, abs=0.01)
    assert r["table"]["curl_bound"] == pytest.approx(0.22, abs=0.01)
    # AG News, K+1 = 16: (2 * 1.23 - 0.02 - 1.49 + 3.44) / 0.96 = 4.57, ln = 1.52 (the notebook)
    r = bound.bound_report(published_sums(1.23, -1.72, 0.0, 0.02, 1.49, 0.96, tau=0.99),
                           4, 16, bound.analytic_terms(16, [1900] * 4))
    assert r["upper_bounds"]["ln_ours_notebook"] == pytest.approx(1.52, abs=0.005)


def test_report_falls_back_to_exact_values_and_flags_vacuous_bounds():
    # empirical upsilon 0 but K+1 >= C: the exact upsilon (tiny), with a warning
    analytic = bound.analytic_terms(128, [100] * 100)
    r = bound.bound_report(published_sums(3.32, -0.99, 0.0, 1.82, 0.69, 0.0, tau=1.0), 100, 128,
                           analytic)
    u = r["upper_bounds"]
    exact_upsilon = hypergeometric_terms(128, 100, 100)[0]
    assert u["upsilon_source"].startswith("exact") and u["ln_ours_theorem"] > 40
    assert u["upsilon_used"] == pytest.approx(float(exact_upsilon), rel=1e-10)
    assert any("astronomically loose" in w for w in r["warnings"])
    # every anchor collided (empirical tau = 1): the exact 1 - tau = binom(M-m, K)/binom(M-1, K)
    exact_none = Fraction(math.comb(10000 - 100, 127), math.comb(10000 - 1, 127))
    assert u["tau_source"].startswith("exact")
    assert u["one_minus_tau_used"] == pytest.approx(float(exact_none), rel=1e-10)
    # K+1 < C: no batch can cover, the bound is vacuous (null), not an error
    r = bound.bound_report(published_sums(2.0, -0.5, 0.0, 1.0, 0.3, 0.0, tau=0.5), 100, 64,
                           bound.analytic_terms(64, [100] * 100))
    assert r["upper_bounds"]["ours_theorem"] is None
    assert r["upper_bounds"]["ln_ours_notebook"] is None
    assert any("vacuous" in w and "64 < C = 100" in w for w in r["warnings"])
    assert r["upper_bounds"]["ln_arora"] == pytest.approx(math.log((2.0 - 0.3 + 0.5) / 0.5))

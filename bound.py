"""bound.py: Nozawa & Sato's analysis of negative samples, as one script.

    python bound.py table3                                    # Table 3: expected K+1 to see every class
    python bound.py table3 --imagenet_counts counts.json --csv table3.csv
    python bound.py coverage --classes 100 --draws 128 256 512          # upsilon, tau, E ln(1+Col)
    python bound.py coverage --classes 10 --per_class 1000 --draws 32 64 --json coverage.json
    python bound.py evaluate --checkpoint runs/k32/last.pt              # writes runs/k32/bounds.json
    python bound.py plot runs/k32 runs/k64 runs/k128 --out figure1.png --csv table2.csv --markdown table2.md

(One process: the analysis is cheap next to training, so there is no torchrun form.)

Paper: K. Nozawa and I. Sato, "Understanding Negative Samples in Instance Discriminative
Self-supervised Representation Learning" (NeurIPS 2021; code nzw0301/Understanding-Negative-Samples),
compared with S. Arora et al., "A Theoretical Analysis of Contrastive Unsupervised Representation
Learning" (ICML 2019, "CURL"). K+1 is the batch: an anchor and K negatives, drawn from C latent
classes. The theorem, as the authors' code computes it (f-bar the augmentation mean of the
normalised head output, mu_c the class means of f-bar, t the temperature):

    L_Info >= 1/2 [ upsilon L_sup + (1 - upsilon) L_sub + E ln(1 + Col) ] + d(f)
    L_sup  <= [ 2 (L_Info - d(f)) - (1 - upsilon) L_sub - E ln(1 + Col) ] / upsilon

upsilon = P(the K+1 classes cover all C), Col = number of negatives sharing the anchor's class,
d(f) = E min(0, z.(mu_c - f-bar(x))) / t <= 0. Arora et al.'s bound divides by 1 - tau instead,
tau = P(Col >= 1) -> 1 exponentially in K, so it explodes while upsilon -> 1 keeps this one finite.

Analytic part: upsilon, E[K+1 to cover], tau and E ln(1 + Col) for i.i.d. draws (uniform or not)
and for draws without replacement from a balanced pool, computed without cancellation (a
dynamic programme over the classes seen, a Poissonised convolution, Gauss-Legendre quadrature),
never with the alternating sum of `coupon.ipynb`, which is off by ~4.5e-4 at C = 100.
Empirical part: the bound loop of the authors' `bound.py` on a checkpoint, both upper bounds, the
collision statistic of `collision_analysis.ipynb`, and Figure 1 / Table 2 from a set of runs.
"""
import argparse
import copy
import csv
import io
import json
import math
import numbers
import os
import sys
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import common

PROG = "bound.py"
# Table 3 of the paper (coupon.ipynb): uniform classes. ImageNet needs its class counts.
TABLE3 = (("Binary", 2, 3), ("AG News", 4, 9), ("CIFAR-10", 10, 30), ("CIFAR-100", 100, 519),
          ("Wiki-3029", 3029, 26030))  # (name, C, the paper's value)
TABLE3_IMAGENET = 7709  # from per-class ImageNet training counts (a file not in the authors' repository)


# ------------------------------------------------------------------------------------------------
# Analytic part: coverage (upsilon), expected draws, collisions (tau, E ln(1 + Col))
# ------------------------------------------------------------------------------------------------

def _count(name, value, minimum=0):
    """An integer >= minimum (numpy integers too), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _class_model(num_classes, class_probs, per_class):
    """Validate the arguments shared by the analytic functions; returns (C, probs or None, m or None)."""
    if class_probs is None and num_classes is None:
        raise ValueError("give num_classes (uniform classes) or class_probs")
    probs = None
    if class_probs is not None:
        probs = np.asarray(class_probs, dtype=np.float64)
        if probs.ndim != 1 or probs.size == 0:
            raise ValueError("class_probs must be a non-empty list of probabilities")
        if not np.all(np.isfinite(probs)) or np.any(probs <= 0):
            raise ValueError("class probabilities must be positive (a class that never occurs is not a class)")
        total = math.fsum(probs.tolist())
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"class probabilities sum to {total:.12g}, not 1")
        if num_classes is not None and _count("num_classes", num_classes, 1) != probs.size:
            raise ValueError(f"num_classes = {num_classes} but {probs.size} class probabilities")
        if per_class is not None:
            raise ValueError("per_class (a balanced pool) and class_probs cannot be combined")
    C = probs.size if probs is not None else _count("num_classes", num_classes, 1)
    m = None if per_class is None else _count("per_class", per_class, 1)
    return C, probs, m


def _draws_dp(n, C, m=None):
    """(upsilon, 1 - upsilon) for n uniform draws over C classes, i.i.d. (m None) or without
    replacement from a pool of m per class. Markov chain on j = number of classes seen, all terms
    positive (no cancellation): after t draws a new class comes with probability (C - j)/C, or
    (C - j) m / (Cm - t) without replacement (unseen classes are still whole). O(n C)."""
    p = np.zeros(C + 1)
    p[0] = 1.0
    j = np.arange(C + 1, dtype=np.float64)
    for t in range(n):
        # Multiply by exact integers and divide once per step: no systematically rounded factor
        # j/C is reused n times, so rounding errors stay random (~1e-15 at n = 10^4, C = 10^3).
        if m is None:
            q = p * j
            q[1:] += p[:-1] * (C - j[:-1])
            q /= C
        else:
            q = p * np.maximum(j * m - t, 0.0)
            q[1:] += p[:-1] * ((C - j[:-1]) * m)
            q /= C * m - t
        p = q
    return float(p[C]), math.fsum(p[:C].tolist())


def _log_pmf_window(kind, param, trials=None, lo=None, hi=None, tail=14.0):
    """(first k, log of unnormalised weights) of Poisson(param) or Binomial(trials, param) on a
    window around the mean (+-tail sd + 40, widened to [lo, hi]). The weights are built from the
    ratios w(k+1)/w(k), summed outward from the mode: no huge lgamma terms that cancel."""
    if kind == "poisson":
        mean, sd, top = param, math.sqrt(param), math.inf
    else:
        mean, sd, top = trials * param, math.sqrt(trials * param * (1.0 - param)), trials
    first = max(0, int(math.floor(mean - tail * sd - 40)))
    last = int(min(top, math.ceil(mean + tail * sd + 40)))
    if lo is not None:
        first = max(min(first, lo), 0)
    if hi is not None:
        last = int(min(max(last, hi), top))
    k = np.arange(first, last, dtype=np.float64)  # ratio from k to k + 1
    if kind == "poisson":
        log_ratio = math.log(param) - np.log(k + 1.0)
    else:
        log_ratio = np.log(trials - k) - np.log(k + 1.0) + (math.log(param) - math.log1p(-param))
    mode = int(min(max(math.floor(mean), first), last)) - first
    logw = np.zeros(last - first + 1)
    logw[mode + 1:] = np.cumsum(log_ratio[mode:])
    logw[:mode] = -np.cumsum(log_ratio[:mode][::-1])[::-1]
    return first, logw


def _log_coverage_poissonized(n, probs=None, counts=None):
    """ln upsilon for n i.i.d. draws with class probabilities `probs`, or n draws without
    replacement from a pool with `counts[c]` items of class c, by "Poissonisation":

        i.i.d.:  upsilon = n! [x^n] prod_c (e^{p_c x} - 1)
                         = prod_c (1 - e^{-lam_c}) P(sum_c K_c = n) / Poisson(r)(n),
                 K_c ~ Poisson(lam_c = p_c r) given K_c >= 1, any r > 0;
        pool:    upsilon = [x^n] prod_c ((1 + x)^{m_c} - 1) / binom(M, n)
                         = prod_c (1 - (1-q)^{m_c}) P(sum_c K_c = n) / Binomial(M, q)(n),
                 K_c ~ Binomial(m_c, q) given K_c >= 1, any 0 < q < 1.

    r (or q) is the saddle point E[sum K_c] = n, so every factor is moderate; the law of the sum
    is a convolution of positive terms. Works for tiny upsilon (returns its log) and non-uniform
    classes; about 1e-14 relative. O(C * n) at worst, much less with the trimmed supports."""
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        C = probs.size
        if n < C:
            return -math.inf
        target = max(n, C + 0.5)  # n = C: E[sum K] -> C only as r -> 0; any r is exact anyway

        def mean_sum(r):
            x = probs * r
            return float(np.sum(x / -np.expm1(-x)))

        lo, hi = max(target - C, 1e-300), target  # r <= E[sum K] <= C + r
    else:
        counts = np.asarray(counts, dtype=np.float64)
        C, M = counts.size, int(counts.sum())
        if n < C:
            return -math.inf
        if n >= M:
            return 0.0
        target = min(max(n, C + 0.5), M - 0.5)

        def mean_sum(q):
            return float(np.sum(counts * q / -np.expm1(counts * math.log1p(-q))))

        lo, hi = 0.0, 1.0
    for _ in range(200):  # bisection: mean_sum is increasing
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_sum(mid) < target else (lo, mid)
    s = 0.5 * (lo + hi)
    if probs is not None:
        lam = probs * s
        log_prefactor = math.fsum(np.log(-np.expm1(-lam)).tolist())
        # Poisson(sum lam): the identity needs the exact sum of the rates, not s (probs sum to 1
        # only up to rounding, which would cost ~n * 1e-16 relative).
        first, logw = _log_pmf_window("poisson", math.fsum(lam.tolist()), lo=n, hi=n)
        laws = [_log_pmf_window("poisson", x) for x in lam]
    else:
        log_prefactor = math.fsum(np.log(-np.expm1(counts * math.log1p(-s))).tolist())
        first, logw = _log_pmf_window("binomial", s, M, lo=n, hi=n)
        laws = [_log_pmf_window("binomial", s, int(mc)) for mc in counts]
    log_denominator = logw[n - first] - (logw.max() + math.log(np.exp(logw - logw.max()).sum()))
    offset, dist = 0, np.ones(1)
    for i, (k0, lw) in enumerate(laws):
        if k0 == 0:  # conditioned on K >= 1
            k0, lw = 1, lw[1:]
        w = np.exp(lw - lw.max())
        dist = np.convolve(dist, w / w.sum())
        offset += k0
        # Sums above n - (classes left) cannot end at n; negligible tails only cost time.
        dist = dist[: max(0, n - (C - i - 1) - offset + 1)]
        keep = np.nonzero(dist > dist.max() * 1e-40)[0]
        dist, offset = dist[keep[0]: keep[-1] + 1], offset + keep[0]
    p_sum = dist[n - offset] if 0 <= n - offset < dist.size else 0.0
    return log_prefactor + math.log(p_sum) - log_denominator if p_sum > 0 else -math.inf


def _coverage(n, num_classes=None, class_probs=None, per_class=None):
    """(ln upsilon, 1 - upsilon) with the method that suits the case (see coverage_probability)."""
    n = _count("the number of draws", n)
    C, probs, m = _class_model(num_classes, class_probs, per_class)
    if m is not None and n > C * m:
        raise ValueError(f"cannot draw {n} items without replacement from a pool of {C} x {m}")
    if n < C:
        return -math.inf, 1.0
    if probs is not None:
        log_u = _log_coverage_poissonized(n, probs=probs)
        return log_u, -math.expm1(log_u)
    value, complement = _draws_dp(n, C, m)
    if complement < 0.5:  # near 1, the small sum of the other states is the accurate quantity
        return math.log1p(-complement), complement
    if value > 1e-280:
        return math.log(value), complement
    # Below ~1e-280 the DP's intermediate states may have underflowed: use the log-space method.
    if m is None:
        return _log_coverage_poissonized(n, probs=np.full(C, 1.0 / C)), complement
    return _log_coverage_poissonized(n, counts=np.full(C, float(m))), complement


def coverage_probability(n, num_classes=None, class_probs=None, per_class=None):
    """upsilon: the probability that n draws (n = K + 1) contain every class.

    Uniform over `num_classes`, or with `class_probs` (i.i.d. draws); with `per_class`, n draws
    without replacement from a balanced pool of `per_class` items per class. 0 when n < C.
    Uniform: the DP over the number of classes seen (exact-integer multipliers, all terms
    positive); non-uniform or below 1e-280: the Poissonised convolution. Both agree with exact
    rationals to ~1e-14 relative for C <= 1000, n <= 10000 (inclusion-exclusion
    sum_j (-1)^j binom(C, j) (1 - j/C)^n in float64 would lose everything to cancellation)."""
    return math.exp(_coverage(n, num_classes, class_probs, per_class)[0])


def log_coverage_probability(n, num_classes=None, class_probs=None, per_class=None):
    """ln upsilon (finite where upsilon underflows a float, e.g. C = 1000, n = 1000: ln = -995.6)."""
    return _coverage(n, num_classes, class_probs, per_class)[0]


def coverage_complement(n, num_classes=None, class_probs=None, per_class=None):
    """1 - upsilon, accurate near upsilon = 1 for uniform classes (a sum of positive DP states:
    C = 10, n = 512 gives 3.7339185e-23); for class_probs, -expm1(ln upsilon) (absolute ~1e-15)."""
    return _coverage(n, num_classes, class_probs, per_class)[1]


def coverage_probability_exact(n, num_classes, per_class=None):
    """upsilon as an exact Fraction (uniform classes), by inclusion-exclusion in integers:
    i.i.d. sum_j (-1)^j binom(C, j) (C - j)^n / C^n; without replacement
    sum_j (-1)^j binom(C, j) binom(Cm - jm, n) / binom(Cm, n). Seconds at C = 1000, n = 10^4."""
    n, C = _count("the number of draws", n), _count("num_classes", num_classes, 1)
    if per_class is None:
        return Fraction(sum((-1) ** j * math.comb(C, j) * (C - j) ** n for j in range(C + 1)), C ** n)
    m = _count("per_class", per_class, 1)
    if n > C * m:
        raise ValueError(f"cannot draw {n} items without replacement from a pool of {C} x {m}")
    total = sum((-1) ** j * math.comb(C, j) * math.comb(C * m - j * m, n) for j in range(C + 1))
    return Fraction(total, math.comb(C * m, n))


def expected_draws_exact(num_classes):
    """E[draws until all C uniform classes are seen] = C * H_C as an exact Fraction (Table 3 is its
    ceiling; the notebook's quad gave 2.9999999999999982 for C = 2)."""
    C = _count("num_classes", num_classes, 1)
    return sum((Fraction(C, k) for k in range(1, C + 1)), Fraction(0))


def expected_draws_to_cover(num_classes=None, class_probs=None):
    """E[draws until every class is seen] (the coupon collector).

    Uniform: C * H_C (exact, then rounded). Non-uniform: the Poissonisation integral
    E[T] = int_0^inf [1 - prod_c (1 - e^{-p_c t})] dt, by 20-point Gauss-Legendre on geometric
    panels (ratio 1.25) up to where the integrand is < e^-45; ~1e-15 relative."""
    C, probs, _ = _class_model(num_classes, class_probs, None)
    if probs is None:
        return float(expected_draws_exact(C))
    t_hi = (math.log(C) + 45.0) / probs.min()
    t_lo = 0.05 / probs.max()  # below this the integrand is ~1 and nearly polynomial
    panels = max(1, math.ceil(math.log(t_hi / t_lo) / math.log(1.25)))
    edges = np.concatenate([[0.0], t_lo * (t_hi / t_lo) ** (np.arange(panels + 1) / panels)])
    x, w = np.polynomial.legendre.leggauss(20)
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * x + 0.5 * (a + b)).ravel()
    weights = (0.5 * (b - a) * w).ravel()
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf at t = 0 is right: the integrand is 1
        log_all_seen = np.log1p(-np.exp(-np.outer(t, probs))).sum(axis=1)
    return math.fsum((weights * -np.expm1(log_all_seen)).tolist())


def _collision_law(num_negatives, prob=None, count=None, total=None):
    """(values, probabilities) of Col, the negatives sharing the anchor's class: Binomial(K, prob)
    for i.i.d. classes, or Hypergeometric(total - 1, count - 1, K) for an anchor of a class with
    `count` items in a pool of `total`. Weights from the ratios p(c+1)/p(c) summed outward from
    the mode, then normalised (no lgamma differences of size K ln K)."""
    K = num_negatives
    if prob is not None:
        if prob >= 1.0:  # a single class: every negative collides
            return np.array([float(K)]), np.array([1.0])
        lo, hi = 0, K
        c = np.arange(lo, hi, dtype=np.float64)
        log_ratio = np.log(K - c) - np.log(c + 1.0) + (math.log(prob) - math.log1p(-prob))
        mode = int(min(math.floor((K + 1) * prob), K))
    else:
        pool, good = total - 1, count - 1
        lo, hi = max(0, K - (pool - good)), min(K, good)
        c = np.arange(lo, hi, dtype=np.float64)
        log_ratio = np.log(good - c) + np.log(K - c) - np.log(c + 1.0) - np.log(pool - good - K + c + 1.0)
        mode = int(min(max(math.floor((K + 1) * (good + 1) / (pool + 2)), lo), hi)) - lo
    logw = np.zeros(hi - lo + 1)
    logw[mode + 1:] = np.cumsum(log_ratio[mode:])
    logw[:mode] = -np.cumsum(log_ratio[:mode][::-1])[::-1]
    w = np.exp(logw - logw.max())
    return np.arange(lo, hi + 1, dtype=np.float64), w / w.sum()


def _collision_terms(num_negatives, num_classes, per_class=None, counts=None):
    """(tau, 1 - tau, E ln(1 + Col)): i.i.d. uniform classes, a balanced pool of per_class items
    per class, or a pool with class counts `counts` (the anchor of class c with probability m_c/M).
    1 - tau = (1 - 1/C)^K, or prod_{i < K} (M - m - i) / (M - 1 - i), both as sums of log1p."""
    K = _count("the number of negatives", num_negatives)
    if counts is None:
        C = _count("num_classes", num_classes, 1)
        if per_class is not None:
            counts = [_count("per_class", per_class, 1)] * C
    if counts is None:
        log_none = K * math.log1p(-1.0 / C) if C > 1 else (0.0 if K == 0 else -math.inf)
        values, probs = _collision_law(K, prob=1.0 / C)
        return -math.expm1(log_none), math.exp(log_none), math.fsum((probs * np.log1p(values)).tolist())
    total = int(sum(counts))
    if K > total - 1:
        raise ValueError(f"cannot draw {K} negatives without replacement from the {total - 1} other items of the pool")
    log_none, log_col = [], []
    for m in counts:
        if K > total - m:  # fewer other-class items than negatives: a collision is certain
            log_none.append(-math.inf)
        else:
            i = np.arange(K, dtype=np.float64)
            log_none.append(math.fsum(np.log1p(-(m - 1) / (total - 1 - i)).tolist()))
        values, probs = _collision_law(K, count=int(m), total=total)
        log_col.append(math.fsum((probs * np.log1p(values)).tolist()))
    weights = np.asarray(counts, dtype=np.float64) / total
    log_none = np.asarray(log_none)
    return (math.fsum((weights * -np.expm1(log_none)).tolist()), math.fsum((weights * np.exp(log_none)).tolist()),
            math.fsum((weights * log_col).tolist()))


def collision_probability(num_negatives, num_classes, per_class=None):
    """tau_K = P(Col >= 1), the anchor's class occurs among the K negatives: 1 - (1 - 1/C)^K for
    i.i.d. uniform classes; 1 - binom(M - m, K) / binom(M - 1, K) without replacement from a
    balanced pool (M = C m) (Arora et al.'s collision probability)."""
    return _collision_terms(num_negatives, num_classes, per_class)[0]


def expected_log_collision(num_negatives, num_classes, per_class=None):
    """E[ln(1 + Col)] with Col ~ Binomial(K, 1/C) (i.i.d.) or Hypergeometric(M - 1, m - 1, K)
    (balanced pool, the batches of the bound loop): the "Collision" rows of Tables 2, 4, 5."""
    return _collision_terms(num_negatives, num_classes, per_class)[2]


# ------------------------------------------------------------------------------------------------
# The bound loop (code/bound.py of the authors), as pure functions of tensors
# ------------------------------------------------------------------------------------------------

SUM_KEYS = ("samples", "SimCLR_loss", "Original_SimCLR_loss", "assumption_value", "upsilon", "curl_tau",
            "sup_loss", "partial_sup_loss", "conflict_term", "curl_sup_loss", "curl_partial_sup_loss",
            "sup_loss_all", "centroid_correct")


def batch_label_sums(labels, num_classes):
    """The label-only sums of one batch of K+1: samples; upsilon (K+1 if all C classes occur,
    else 0); curl_tau (samples whose class occurs twice or more, i.e. Col >= 1); conflict_term
    (sum over classes with n_c >= 2 of n_c ln n_c = sum over samples of ln(1 + Col_i))."""
    _, counts = torch.unique(labels, return_counts=True)
    counts = counts.double()
    repeated = counts[counts >= 2]
    return {"samples": float(labels.numel()),
            "upsilon": float(labels.numel()) if counts.numel() == num_classes else 0.0,
            "curl_tau": float(repeated.sum()),
            "conflict_term": float((repeated * repeated.log()).sum())}


def info_nce_one_view(z0, z1, temperature):
    """Per-anchor loss of the bound's contrastive loss (view-0 anchors, view-1 positive and
    negatives): l_i = -s_ii + ln sum_j exp(s_ij), s_ij = normalize(z0_i).normalize(z1_j) / t."""
    logits = F.normalize(z0, dim=1) @ F.normalize(z1, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(z0.shape[0], device=z0.device), reduction="none")


def nt_xent_per_sample(z0, z1, temperature):
    """The standard NT-Xent (SimCLR) loss per image, averaged over its two views' anchors: each
    anchor against its positive and the 2B - 2 other views. The reference `Original_SimCLR_loss`
    (the same as simclr_debiased.contrastive_loss(..., estimator="easy") per image)."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    b = z0.shape[0]
    logits = (z @ z.T / temperature).fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    per_anchor = F.cross_entropy(logits, target, reduction="none")
    return 0.5 * (per_anchor[:b] + per_anchor[b:])


def batch_bound_sums(z0, z1, labels, fbar, mu, temperature, num_classes):
    """All sums of one batch of K+1 test items, as the authors' eval_bound accumulates them.

    z0, z1: raw head outputs of two fresh augmentations [B, D]; fbar: the items' augmentation
    means [B, D]; mu: the class means [C, D] (train split, not re-normalised); labels [B].
    With z = normalize(z0) and l(z, y; Y) = -z.mu_y / t + ln sum_{j in Y} exp(z.mu_j / t):
      SimCLR_loss       sum of the one-view InfoNCE (the L_Info of the bound)
      assumption_value  sum of min(0, z.(mu_y - fbar)) / t                   (d(f))
      sup_loss          sum of l(z, y; [C]) if the batch covers all C classes, else 0
      partial_sup_loss  sum of l(z, y; U) over U = the batch's classes, if it does not
      curl_*            the same restricted to samples whose class occurs once in the batch
      sup_loss_all      sum of l(z, y; [C]) for every batch (the L_sup being bounded)
      centroid_correct  argmax_c ((z0 + z1) / 2 normalised views).mu_c == y
    plus the label sums of batch_label_sums."""
    t = temperature
    sums = batch_label_sums(labels, num_classes)
    z = F.normalize(z0, dim=1)
    sums["SimCLR_loss"] = float(info_nce_one_view(z0, z1, t).sum())
    sums["Original_SimCLR_loss"] = float(nt_xent_per_sample(z0, z1, t).sum())
    inner = (z * (mu[labels] - fbar)).sum(dim=1)
    sums["assumption_value"] = float(inner.clamp(max=0.0).sum() / t)
    classes, position, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    single = counts[position] == 1  # no collision for this anchor: what CURL's sub-class loss uses
    full = F.cross_entropy(z @ mu.T / t, labels, reduction="none")
    sums["sup_loss_all"] = float(full.sum())
    if classes.numel() == num_classes:
        sums.update(sup_loss=float(full.sum()), partial_sup_loss=0.0, curl_sup_loss=float(full[single].sum()),
                    curl_partial_sup_loss=float(full[single].sum()))
    else:
        part = F.cross_entropy(z @ mu[classes].T / t, position, reduction="none")
        sums.update(sup_loss=0.0, partial_sup_loss=float(part.sum()), curl_sup_loss=0.0,
                    curl_partial_sup_loss=float(part[single].sum()))
    both = 0.5 * (F.normalize(z0, dim=1) + F.normalize(z1, dim=1))
    sums["centroid_correct"] = float(((both @ mu.T).argmax(dim=1) == labels).sum())
    return sums


def add_sums(total, sums):
    """Accumulate batch sums in Python floats (as the authors' code; float64)."""
    for key in SUM_KEYS:
        total[key] = total.get(key, 0.0) + sums.get(key, 0.0)
    return total


def collision_statistic(view0, view1, labels, chunk=2048):
    """Mean over samples of b_j = sum_{i in class(j)} |S_ij - S_jj| / (n_c - 1), with
    S = normalize(V0_c) normalize(V1_c)^T over the samples of class c (collision_analysis.ipynb:
    how far a sample's positive-pair cosine is from its cosines to same-class samples; no
    temperature). Classes with a single sample have no b_j and are skipped."""
    v0, v1 = F.normalize(view0.double(), dim=1), F.normalize(view1.double(), dim=1)
    total, count = 0.0, 0
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).squeeze(1)
        if idx.numel() < 2:
            continue
        a = v0[idx]
        for start in range(0, idx.numel(), chunk):  # column blocks: S is n_c x n_c
            cols = idx[start:start + chunk]
            s = a @ v1[cols].T
            diag = (v0[cols] * v1[cols]).sum(dim=1)
            total += float((s - diag[None, :]).abs().sum()) / (idx.numel() - 1)
        count += idx.numel()
    return total / count if count else math.nan


def _log(x):
    return math.log(x) if x > 0 else None


def bound_report(sums, num_classes, k_plus_1, analytic, collision=None):
    """bounds.json's content from the accumulated sums.

    terms: the sums divided by the number of samples, named as the authors' bounds.json, with
    bound = 1/2 (sup_loss + partial_sup_loss + conflict_term) (d not added) and
    curl_bound = curl_partial_sup_loss + conflict_term.
    table: the rows of Tables 2/4/5 as bound.ipynb makes them (L_sup, L_sub halved; Collision not;
    "bound" rows with d added).
    upper_bounds of L_sup: theorem [2 (L_Info - d) - partial - collision] / upsilon; notebook
    [2 L_Info - partial / 2 - collision - 2 d] / upsilon (subtracts half the sub-class term: valid,
    looser); Arora et al. [L_Info - (curl_partial - curl_sup) - collision - d] / (1 - tau).
    When the empirical upsilon is 0 the exact upsilon of the loop's sampling is used (a warning:
    the bound is then astronomically loose); when it is exactly 0 (K+1 < C) the bound is vacuous
    (null). When the empirical tau is 1 (the notebook divided by float rounding, ln ~ 37), the
    exact 1 - tau is used."""
    n = sums["samples"]
    terms = {key: sums[key] / n for key in SUM_KEYS if key not in ("samples", "centroid_correct")}
    terms["bound"] = 0.5 * (terms["sup_loss"] + terms["partial_sup_loss"] + terms["conflict_term"])
    terms["curl_bound"] = terms["curl_partial_sup_loss"] + terms["conflict_term"]
    terms["centroid_accuracy"] = 100.0 * sums["centroid_correct"] / n
    L, d = terms["SimCLR_loss"], terms["assumption_value"]
    warnings = []
    log_u, source = (_log(terms["upsilon"]), "empirical")
    if terms["upsilon"] == 0:
        log_u, source = analytic["log_upsilon"], "exact (empirical upsilon is 0)"
        if log_u == -math.inf or log_u is None:
            log_u = None
            warnings.append(f"K+1 = {k_plus_1} < C = {num_classes}: no batch can contain every class (upsilon = 0), "
                            f"so the upper bound of the supervised loss is vacuous (null)")
        else:
            warnings.append(f"no batch of K+1 = {k_plus_1} covered all {num_classes} classes; the upper bound uses the "
                            f"exact upsilon = exp({log_u:.4g}) and is astronomically loose")
    one_minus_tau, tau_source = 1.0 - terms["curl_tau"], "empirical"
    if one_minus_tau <= 0:
        one_minus_tau, tau_source = analytic["one_minus_tau"], "exact (every anchor collided)"
        warnings.append("every anchor had a same-class negative (empirical tau = 1); Arora et al.'s bound uses "
                        f"the exact 1 - tau = {one_minus_tau:.4g}" + (" (vacuous: 0)" if one_minus_tau <= 0 else ""))
    numerators = {"ours_theorem": 2 * (L - d) - terms["partial_sup_loss"] - terms["conflict_term"],
                  "ours_notebook": 2 * L - terms["partial_sup_loss"] / 2 - terms["conflict_term"] - 2 * d,
                  "arora": L - (terms["curl_partial_sup_loss"] - terms["curl_sup_loss"]) - terms["conflict_term"] - d}
    upper = {"upsilon_used": math.exp(log_u) if log_u is not None else 0.0, "upsilon_source": source,
             "one_minus_tau_used": one_minus_tau, "tau_source": tau_source}
    for name, num in numerators.items():
        log_den = log_u if name != "arora" else _log(one_minus_tau)
        ln = math.log(num) - log_den if (num > 0 and log_den is not None) else None
        upper[name] = math.exp(ln) if ln is not None and ln < 700 else (None if ln is None else math.inf)
        upper["ln_" + name] = ln
        if num <= 0:
            warnings.append(f"{name}: the numerator is {num:.4g} <= 0, so the estimated upper bound is not informative")
    table = {"tau": terms["curl_tau"], "upsilon": terms["upsilon"], "mu_acc": terms["centroid_accuracy"],
             "L_Info": L, "d": d,
             "curl_bound": terms["curl_bound"] + d, "curl_collision": terms["conflict_term"],
             "curl_L_sup": terms["curl_sup_loss"], "curl_L_sub": terms["curl_partial_sup_loss"] - terms["curl_sup_loss"],
             "bound": terms["bound"] + d, "L_sup": terms["sup_loss"] / 2, "L_sub": terms["partial_sup_loss"] / 2,
             "collision_bound": (collision or {}).get("head"),
             "ln_curl_upper_bound": upper["ln_arora"], "ln_upper_bound": upper["ln_ours_notebook"],
             "ln_upper_bound_theorem": upper["ln_ours_theorem"]}
    return {"terms": terms, "table": table, "upper_bounds": upper, "analytic": analytic,
            "collision_statistic": collision or {}, "warnings": warnings}


# ------------------------------------------------------------------------------------------------
# Empirical part: model, data, passes
# ------------------------------------------------------------------------------------------------

def run_k_plus_1(run_args, world_size=1):
    """K+1 of a run: the batch one loss computation saw (per process with local negatives, per
    chunk with --num_chunks), from its arguments."""
    batch = run_args.get("batch_size")
    if batch is None:
        return None
    if run_args.get("negatives", "global") == "local":
        batch //= max(world_size, 1)
    return batch // max(run_args.get("num_chunks", 1), 1)


def with_augmentation(plain, augmented):
    """A copy of `plain` that draws its items the way `augmented` does: its `transform` (images:
    the run's SimCLR augmentation; text: erase/replace per item) and its `collate_fn` (a script may
    augment at batching instead). The bound needs fresh augmented views of the test items;
    eval_datasets only augments the train split, so the test split borrows its augmentation."""
    out = copy.copy(plain)
    found = False
    for attr in ("transform", "collate_fn"):
        if getattr(augmented, attr, None) is not None:
            setattr(out, attr, getattr(augmented, attr))
            found = True
    if not found:
        raise common.UserError("the run's eval_datasets(train_augment=True) set has neither a transform nor a "
                               "collate_fn to augment the test split with")
    return out


def head_and_features(model, inputs):
    """(backbone features, head output) in float32: the head output is what the loss saw."""
    h = model.backbone(inputs)
    return h.float(), model.projector(h).float()


@torch.no_grad()
def augmentation_means(model, dataset, views, batch_size, workers, device, keep=0, bar=None):
    """f-bar(x) = (1/V) sum_v normalize(g(f(a_v(x)))) over V independent augmentations (the
    authors: 5 passes x 2 views = 10), not re-normalised; also the labels, the class means
    mu = (1/V) sum_v common.class_means(view v) (= the class means of f-bar), and the raw
    (backbone, head) outputs of the first `keep` views (the collision statistic's two views)."""
    loader = common.eval_loader(dataset, batch_size, workers, device)
    fbar, labels, mu, kept = None, None, None, []
    for v in range(views):
        hs, zs, ys = [], [], []
        for batch in loader:
            h, z = head_and_features(model, batch[0].to(device, non_blocking=True))
            zs.append(F.normalize(z, dim=1))
            ys.append(torch.as_tensor(batch[1]).to(device))
            if v < keep:
                hs.append(h)
            if bar is not None:
                bar.update(1)
        z, labels = torch.cat(zs), torch.cat(ys)
        fbar = z if fbar is None else fbar + z
        num_classes = max(len(getattr(dataset, "classes", []) or []), int(labels.max()) + 1)
        means = common.class_means(z, labels, num_classes)
        mu = means if mu is None else mu + means
        if v < keep:
            kept.append((torch.cat(hs), z))
    return fbar / views, labels, mu / views, kept


@torch.no_grad()
def bound_loop(model, dataset, fbar, labels, mu, k_plus_1, passes, temperature, workers, device, generator, bar=None):
    """`passes` shuffled passes over `dataset` (augmented test items) in batches of exactly K+1
    (the last partial batch dropped); each batch gets two fresh augmentations (two loaders over
    the same index lists) and adds batch_bound_sums. Returns the accumulated sums."""
    collate = getattr(dataset, "collate_fn", None)
    total = {}
    num_classes = mu.shape[0]
    n_batches = len(dataset) // k_plus_1
    for _ in range(passes):
        order = torch.randperm(len(dataset), generator=generator)[: n_batches * k_plus_1]
        batches = order.view(n_batches, k_plus_1).tolist()
        view0 = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                           pin_memory=device.type == "cuda")
        view1 = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                           pin_memory=device.type == "cuda")
        for index, b0, b1 in zip(batches, view0, view1):
            index = torch.as_tensor(index, device=device)
            z0 = head_and_features(model, b0[0].to(device, non_blocking=True))[1]
            z1 = head_and_features(model, b1[0].to(device, non_blocking=True))[1]
            add_sums(total, batch_bound_sums(z0, z1, labels[index], fbar[index], mu, temperature, num_classes))
            # Identical views mean the augmentation is not random per loader (e.g. a RandomState
            # owned by the data set and copied into each worker): the bound would be meaningless.
            total["identical_view_batches"] = total.get("identical_view_batches", 0) + int(torch.equal(z0, z1))
            if bar is not None:
                bar.update(1)
    return total


def analytic_terms(k_plus_1, counts):
    """upsilon, tau, E ln(1 + Col) of the loop's sampling: batches of K+1 drawn without
    replacement from the evaluated test items (class counts `counts`)."""
    missing = sum(1 for c in counts if c <= 0)  # a class without test items is never covered
    counts = [int(c) for c in counts if c > 0]
    C, M = len(counts), sum(counts)
    if missing or k_plus_1 < C:
        log_u, complement = -math.inf, 1.0
    elif len(set(counts)) == 1:
        log_u, complement = _coverage(k_plus_1, C, per_class=counts[0])
    else:
        log_u = _log_coverage_poissonized(k_plus_1, counts=np.asarray(counts, dtype=np.float64))
        complement = -math.expm1(log_u)
    tau, one_minus_tau, log_col = _collision_terms(k_plus_1 - 1, C, counts=counts)
    return {"model": f"batches of K+1 = {k_plus_1} without replacement from {M} test items "
                     f"({'balanced, %d per class' % counts[0] if len(set(counts)) == 1 else 'unbalanced'})",
            "upsilon": math.exp(log_u), "log_upsilon": log_u, "one_minus_upsilon": complement,
            "tau": tau, "one_minus_tau": one_minus_tau, "expected_log_collision": log_col,
            "upsilon_iid": coverage_probability(k_plus_1, C), "tau_iid": collision_probability(k_plus_1 - 1, C),
            "expected_log_collision_iid": expected_log_collision(k_plus_1 - 1, C)}


def evaluate(args):
    """`bound.py evaluate`: everything of §2.5 of the spec for one checkpoint -> bounds.json."""
    ckpt = common.load_checkpoint(args.checkpoint, keys=("args", "epoch", "model"))
    run = dict(ckpt["args"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = common.model_from_checkpoint(ckpt).to(device)  # imports the script, or a one-line error
    k_plus_1 = args.batch or run_k_plus_1(run, ckpt.get("world_size", 1))
    if not k_plus_1:
        raise common.UserError("the checkpoint's arguments have no batch_size; give K+1 with --batch")
    temperature = args.temperature or run.get("temperature", 0.5)
    data_dir = args.data_dir or run.get("data_dir")
    # A training script with its own data (text) provides eval_datasets; images use common's.
    train_aug, test_plain = common.run_datasets(ckpt, train_augment=True, data_dir=data_dir)
    if test_plain is None:
        raise common.UserError(f"{data_dir} has no test split; the bound loop runs on test/<class>/*")
    test_aug = with_augmentation(test_plain, train_aug)  # before subsetting: a Subset has no transform
    train_aug = common.subset(train_aug, args.train_subset)
    test_plain = common.subset(test_plain, args.test_subset)
    test_aug = common.subset(test_aug, args.test_subset)
    if len(test_aug) < k_plus_1:
        raise common.UserError(f"the test split has {len(test_aug)} items, fewer than one batch of K+1 = {k_plus_1}")
    common.seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    views = 2 * args.num_augmentations
    show = sys.stderr.isatty()
    steps = views * (math.ceil(len(train_aug) / args.feature_batch) + math.ceil(len(test_aug) / args.feature_batch)) \
        + args.passes * (len(test_aug) // k_plus_1) + math.ceil(len(test_plain) / args.feature_batch)
    bar = common.progress_bar(steps, "bound", show)

    train_fbar, train_labels, mu, kept = augmentation_means(model, train_aug, views, args.feature_batch, args.workers,
                                                            device, keep=2, bar=bar)
    test_fbar, test_labels, _, _ = augmentation_means(model, test_aug, views, args.feature_batch, args.workers,
                                                      device, bar=bar)
    num_classes = max(mu.shape[0], int(test_labels.max()) + 1)
    if num_classes > mu.shape[0]:  # a class the (sub)set of training items lacks: a zero mean
        mu = torch.cat([mu, mu.new_zeros(num_classes - mu.shape[0], mu.shape[1])])
    sums = bound_loop(model, test_aug, test_fbar, test_labels, mu, k_plus_1, args.passes, temperature,
                      args.workers, device, generator, bar)
    clean_loader = common.eval_loader(test_plain, args.feature_batch, args.workers, device)
    clean, clean_labels = common.extract_features(lambda x: head_and_features(model, x)[1], clean_loader, device,
                                                  progress=bar)
    if bar is not None:
        bar.close()
    top1, top5 = common.topk_correct(clean @ mu.T, clean_labels, ks=(1, 5))
    collision = {"head": collision_statistic(kept[0][1], kept[1][1], train_labels),
                 "without_head": collision_statistic(kept[0][0], kept[1][0], train_labels)}
    counts = torch.bincount(test_labels, minlength=num_classes).tolist()
    report = bound_report(sums, num_classes, k_plus_1, analytic_terms(k_plus_1, counts), collision)
    if sums.get("identical_view_batches"):
        report["warnings"].append(f"{sums['identical_view_batches']} batches had two identical augmented views: the "
                                  f"run's augmentation does not draw fresh randomness per view")
    report["mean_classifier"] = {"accuracy_augmented": report["terms"]["centroid_accuracy"],
                                 "accuracy_clean_top1": 100.0 * top1 / len(clean_labels),
                                 "accuracy_clean_top5": 100.0 * top5 / len(clean_labels)}
    report["settings"] = {"checkpoint": os.path.abspath(args.checkpoint), "script": ckpt["script"],
                          "epoch": ckpt["epoch"], "k_plus_1": k_plus_1, "num_classes": num_classes,
                          "temperature": temperature, "passes": args.passes,
                          "num_augmentations": args.num_augmentations, "views_per_item": views,
                          "batches_per_pass": len(test_aug) // k_plus_1, "samples": int(sums["samples"]),
                          "train_items": len(train_aug), "test_items": len(test_aug), "seed": args.seed,
                          "run_seed": run.get("seed"), "data_dir": data_dir}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "bounds.json")
    common.write_text(out, json.dumps(_plain(report), indent=2) + "\n")
    if args.save_features:
        common.save_checkpoint({"train_fbar": train_fbar.cpu(), "test_fbar": test_fbar.cpu(), "mu": mu.cpu(),
                                "train_labels": train_labels.cpu(), "test_labels": test_labels.cpu()},
                               os.path.splitext(out)[0] + "_features.pt")
    for warning in report["warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(summary_text(report))
    print(f"wrote {out}")
    return report


def summary_text(report):
    s, t, u = report["settings"], report["terms"], report["upper_bounds"]

    def fmt(x):
        return "null" if x is None else f"{x:.4g}"

    return "\n".join([
        f"{s['script']} epoch {s['epoch']}: K+1 = {s['k_plus_1']}, C = {s['num_classes']}, t = {s['temperature']}, "
        f"{s['passes']} passes x {s['batches_per_pass']} batches, f-bar from {s['views_per_item']} views",
        f"  L_Info {t['SimCLR_loss']:.4f}  NT-Xent {t['Original_SimCLR_loss']:.4f}  d(f) {t['assumption_value']:.4f}  "
        f"upsilon {t['upsilon']:.4f}  tau {t['curl_tau']:.4f}  E ln(1+Col) {t['conflict_term']:.4f}",
        f"  lower bound (with d): ours {report['table']['bound']:.4f}  "
        f"Arora et al. {report['table']['curl_bound']:.4f}; "
        f"L_sup over all batches {t['sup_loss_all']:.4f}",
        f"  ln upper bound of L_sup: ours (theorem) {fmt(u['ln_ours_theorem'])}  ours (notebook) "
        f"{fmt(u['ln_ours_notebook'])}  Arora et al. {fmt(u['ln_arora'])}",
        f"  mean classifier: {t['centroid_accuracy']:.2f}% (2 augmented views), "
        f"{report['mean_classifier']['accuracy_clean_top1']:.2f}% (clean test inputs)",
        f"  collision statistic: head {fmt(report['collision_statistic'].get('head'))}  "
        f"without head {fmt(report['collision_statistic'].get('without_head'))}"])


# ------------------------------------------------------------------------------------------------
# Output helpers
# ------------------------------------------------------------------------------------------------

def _plain(value):
    """JSON-safe: non-finite floats become null (JSON has no inf/nan)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def csv_text(rows, columns):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(rows, columns, csv_path=None, json_path=None):
    if csv_path:
        common.write_text(csv_path, csv_text(rows, columns))
    if json_path:
        common.write_text(json_path, json.dumps(_plain(rows), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# table3 and coverage
# ------------------------------------------------------------------------------------------------

def read_counts(path):
    """Per-class counts from JSON (a list, or a dict name -> count, as imagenet_count.json) or
    text (one count per line, optionally 'name count')."""
    if not os.path.isfile(path):
        raise common.UserError(f"class-count file {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        values = list(data.values()) if isinstance(data, dict) else list(data)
    except json.JSONDecodeError:
        values = [line.split()[-1] for line in text.splitlines() if line.strip()]
    try:
        counts = [float(v) for v in values]
    except (TypeError, ValueError):
        raise common.UserError(f"{path}: expected numbers (a JSON list/dict of counts or one count per line)") from None
    if not counts or any(c <= 0 or not math.isfinite(c) for c in counts):
        raise common.UserError(f"{path}: counts must be positive numbers")
    return counts


def table3(args):
    rows = [{"dataset": name, "classes": C, "expected": float(expected_draws_exact(C)),
             "ceil": math.ceil(expected_draws_exact(C)), "paper": paper} for name, C, paper in TABLE3]
    if args.imagenet_counts:
        counts = read_counts(args.imagenet_counts)
        probs = np.asarray(counts) / math.fsum(counts)
        value = expected_draws_to_cover(class_probs=probs / math.fsum(probs.tolist()))
        rows.append({"dataset": "ImageNet", "classes": len(counts), "expected": value, "ceil": math.ceil(value),
                     "paper": TABLE3_IMAGENET})
    print(f"{'dataset':<10} {'classes':>8} {'E[K+1]':>14} {'ceil':>7} {'paper':>7}")
    for r in rows:
        print(f"{r['dataset']:<10} {r['classes']:>8} {r['expected']:>14.6f} {r['ceil']:>7} {r['paper']:>7}")
    if not args.imagenet_counts:
        print("note: the paper's ImageNet row (7709, non-uniform classes) needs per-class training counts: "
              "--imagenet_counts FILE (imagenet_count.json is not in the authors' repository)", file=sys.stderr)
    write_outputs(rows, ["dataset", "classes", "expected", "ceil", "paper"], args.csv, args.json)
    return rows


def coverage(args):
    probs = None
    if args.probs or args.counts_file:
        values = args.probs or read_counts(args.counts_file)
        total = math.fsum(values)
        probs = [v / total for v in values] if args.counts_file else values
    C = len(probs) if probs is not None else args.classes
    rows = []
    for n in args.draws:
        log_u, complement = _coverage(n, None if probs is not None else C, probs, args.per_class)
        tau = log_col = None  # tau and E ln(1 + Col) for uniform classes
        if probs is None and n >= 1:
            tau, _, log_col = _collision_terms(n - 1, C, args.per_class)
        rows.append({"draws": n, "upsilon": math.exp(log_u), "log_upsilon": log_u, "one_minus_upsilon": complement,
                     "tau": tau, "expected_log_collision": log_col})
        if n < C:
            print(f"{PROG}: warning: {n} draws < {C} classes: no batch of {n} contains every class (upsilon = 0), "
                  f"so a bound divided by upsilon is vacuous", file=sys.stderr)
    kind = (f"without replacement from {C} x {args.per_class}" if args.per_class else "i.i.d.") + \
           (" (non-uniform classes)" if probs is not None else " (uniform classes)")
    print(f"C = {C} classes, draws {kind}; tau and E ln(1+Col) are for K = draws - 1 negatives")
    print(f"{'K+1':>7} {'upsilon':>16} {'1 - upsilon':>16} {'ln upsilon':>14} {'tau_K':>12} {'E ln(1+Col)':>12}")
    for r in rows:
        extra = "" if r["tau"] is None else f" {r['tau']:>12.8g} {r['expected_log_collision']:>12.8g}"
        print(f"{r['draws']:>7} {r['upsilon']:>16.10g} {r['one_minus_upsilon']:>16.10g} "
              f"{r['log_upsilon']:>14.8g}{extra}")
    write_outputs(rows, ["draws", "upsilon", "one_minus_upsilon", "log_upsilon", "tau", "expected_log_collision"],
                  args.csv, args.json)
    return rows


# ------------------------------------------------------------------------------------------------
# plot: Figure 1 and Table 2 from a set of runs
# ------------------------------------------------------------------------------------------------

TABLE_ROWS = (("tau", "τ"), ("upsilon", "υ"), ("accuracy", "accuracy"), ("L_Info", "L_Info"), ("d", "d(f)"),
              ("curl_bound", "†bound"), ("curl_collision", "†Collision"), ("curl_L_sup", "†L_sup"),
              ("curl_L_sub", "†L_sub"), ("bound", "bound"), ("L_sup", "L_sup"), ("L_sub", "L_sub"),
              ("collision_bound", "Collision bound"), ("ln_curl_upper_bound", "ln †upper bound of L_sup"),
              ("ln_upper_bound", "ln upper bound of L_sup (notebook)"),
              ("ln_upper_bound_theorem", "ln upper bound of L_sup (theorem)"))


def _lookup(data, dotted):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def load_runs(paths, accuracy_file=None, accuracy_key=None):
    """One dict per run: K+1, the table rows of its bounds.json and the accuracy shown (the
    mean classifier of the bound loop, or `accuracy_key` of RUN_DIR/accuracy_file, e.g. a linear
    probe's result; a value <= 1 is read as a fraction)."""
    runs = []
    for path in paths:
        file = os.path.join(path, "bounds.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise common.UserError(f"{file} does not exist (run `bound.py evaluate` on that run first)")
        try:
            with open(file) as f:
                report = json.load(f)
            row = dict(report["table"])
            row["k_plus_1"] = int(report["settings"]["k_plus_1"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise common.UserError(f"{file} is not a bounds.json written by bound.py evaluate") from None
        row["accuracy"] = row["mu_acc"]
        if accuracy_file:
            acc_path = os.path.join(os.path.dirname(file), accuracy_file)
            try:
                with open(acc_path) as f:
                    value = _lookup(json.load(f), accuracy_key)
            except (OSError, json.JSONDecodeError):
                raise common.UserError(f"cannot read {acc_path}") from None
            if not isinstance(value, (int, float)):
                raise common.UserError(f"{acc_path} has no number at key {accuracy_key!r}")
            row["accuracy"] = 100.0 * value if value <= 1 else float(value)
        runs.append(row)
    return runs


def group_runs(runs):
    """{K+1: {row: (mean, std, n)}} over the runs (seeds) of each K+1; rows with a null skipped."""
    groups = {}
    for run in runs:
        groups.setdefault(run["k_plus_1"], []).append(run)
    out = {}
    for k in sorted(groups):
        out[k] = {}
        for key, _ in TABLE_ROWS:
            values = [r[key] for r in groups[k] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if values:
                out[k][key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                               len(values))
    return out


def plot(args):
    runs = load_runs(args.runs, args.accuracy_file, args.accuracy_key)
    groups = group_runs(runs)
    ks = list(groups)
    header = ["row"] + [f"K+1={k}" for k in ks]
    csv_rows = [dict({"row": key}, **{f"K+1={k}": groups[k].get(key, (None,))[0] for k in ks}) for key, _ in TABLE_ROWS]
    if args.csv:
        common.write_text(args.csv, csv_text(csv_rows, header))
    lines = ["| row | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for key, label in TABLE_ROWS:
        cells = [f"{groups[k][key][0]:.2f}" if key in groups[k] else "–" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    if args.markdown:
        common.write_text(args.markdown, markdown)
    print(markdown, end="")

    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = np.arange(len(ks))
    bars = (("ln_curl_upper_bound", "Arora et al.", "tab:gray"), ("ln_upper_bound", "Ours (notebook)", "tab:blue"),
            ("ln_upper_bound_theorem", "Ours (theorem)", "tab:cyan"))
    width = 0.8 / len(bars)
    for i, (key, label, color) in enumerate(bars):
        mean = [groups[k][key][0] if key in groups[k] else np.nan for k in ks]
        std = [groups[k][key][1] if key in groups[k] else 0.0 for k in ks]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, mean, width, yerr=std, label=label, color=color)
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set_xlabel("K + 1")
    # ln of the bound on a linear axis = the paper's log-scale bars, and finite where the bound
    # itself overflows a float (Arora et al. at large K).
    ax.set_ylabel("ln (upper bound of supervised loss)")
    acc = ax.twinx()
    acc.errorbar(x, [groups[k].get("accuracy", (np.nan,))[0] for k in ks],
                 yerr=[groups[k].get("accuracy", (0, 0.0))[1] for k in ks], color="tab:red", marker="o",
                 label="accuracy")
    acc.set_ylabel(args.accuracy_label or ("mean-classifier accuracy (%)" if not args.accuracy_file else "accuracy (%)"))
    handles = ax.get_legend_handles_labels()
    handles2 = acc.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper left", fontsize="small")
    fig.tight_layout()
    try:
        with common.atomic_path(args.out) as tmp:  # keeps the extension: savefig picks the format from it
            fig.savefig(tmp, dpi=args.dpi)
    finally:
        plt.close(fig)
    print(f"wrote {args.out}" + "".join(f", {p}" for p in (args.csv, args.markdown) if p))
    return groups


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _nonnegative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description="Nozawa & Sato's analysis of negative samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{table3,coverage,evaluate,plot}")

    t = sub.add_parser("table3", help="Table 3: expected K+1 to see every class",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--imagenet_counts", default=None,
                   help="per-class training counts of ImageNet (JSON list/dict or one per line) to add its row")
    t.add_argument("--csv", default=None, help="also write the table as CSV here")
    t.add_argument("--json", default=None, help="also write the table as JSON here")

    c = sub.add_parser("coverage", help="upsilon (all classes seen), tau and E ln(1+Col) for given K+1",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = c.add_argument_group("classes")
    g.add_argument("--classes", type=_positive, default=None, help="C, uniform classes")
    g.add_argument("--probs", type=float, nargs="+", default=None, help="class probabilities (must sum to 1)")
    g.add_argument("--counts_file", default=None, help="class probabilities from per-class counts (JSON or text)")
    g.add_argument("--per_class", type=_positive, default=None,
                   help="draw without replacement from a balanced pool of this many items per class (uniform only)")
    g = c.add_argument_group("draws and output")
    g.add_argument("--draws", type=int, nargs="+", required=True, help="numbers of draws n = K+1")
    g.add_argument("--csv", default=None, help="also write the rows as CSV here")
    g.add_argument("--json", default=None, help="also write the rows as JSON here")

    e = sub.add_parser("evaluate", help="the bound loop on a checkpoint -> bounds.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = e.add_argument_group("run")
    g.add_argument("--checkpoint", required=True, help="last.pt of a training script with build_model(args)")
    g.add_argument("--data_dir", default=None, help="data root; if unset, the run's own --data_dir")
    g.add_argument("--out", default=None, help="output JSON; if unset, bounds.json next to the checkpoint")
    g.add_argument("--save_features", action="store_true", help="also save f-bar and mu to <out>_features.pt")
    g = e.add_argument_group("bound")
    g.add_argument("--batch", type=_positive, default=None,
                   help="K+1; if unset, the run's per-loss batch (per process with --negatives local, per chunk)")
    g.add_argument("--temperature", type=float, default=None, help="temperature t; if unset, the run's (else 0.5)")
    g.add_argument("--passes", type=_positive, default=10,
                   help="shuffled passes over the test split (the authors' epochs)")
    g.add_argument("--num_augmentations", type=_positive, default=5,
                   help="f-bar is the mean of 2 x this many augmented views (the authors: 5 -> 10)")
    g.add_argument("--test_subset", type=_nonnegative, default=0, help="use N test items evenly spaced (0: all)")
    g.add_argument("--train_subset", type=_nonnegative, default=0,
                   help="class means from N training items evenly spaced (0: all)")
    g = e.add_argument_group("system")
    g.add_argument("--feature_batch", type=_positive, default=1024, help="batch for the f-bar passes")
    g.add_argument("--workers", type=_nonnegative, default=4, help="data-loading processes")
    g.add_argument("--seed", type=int, default=0, help="seed of the augmentations and of the batch order")

    q = sub.add_parser("plot", help="Figure 1 and Table 2 from runs that differ in K",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("runs", nargs="+", help="run directories with bounds.json (or bounds.json files)")
    q.add_argument("--out", default="figure1.png", help="the figure (png, pdf, svg)")
    q.add_argument("--csv", default=None, help="Table 2 rows as CSV (means over the runs of each K+1)")
    q.add_argument("--markdown", default=None, help="Table 2 rows as Markdown")
    q.add_argument("--accuracy_file", default=None,
                   help="JSON file in each run directory holding the accuracy to show; if unset, the bound loop's mean classifier")
    q.add_argument("--accuracy_key", default="highest_val_acc", help="dotted key of the accuracy in --accuracy_file")
    q.add_argument("--accuracy_label", default=None, help="label of the accuracy axis")
    q.add_argument("--dpi", type=_positive, default=150, help="resolution of raster figures")
    return p


def check_args(parser, args):
    """Reject bad values argparse-style (one line, exit status 2)."""
    if args.command == "coverage":
        chosen = [name for name in ("classes", "probs", "counts_file") if getattr(args, name)]
        if len(chosen) != 1:
            parser.error("give exactly one of --classes, --probs, --counts_file")
        if any(n < 0 for n in args.draws):
            parser.error(f"--draws must be >= 0, got {min(args.draws)}")
        if args.per_class and not args.classes:
            parser.error("--per_class needs --classes (a balanced pool)")
    if args.command == "evaluate" and args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    with common.exit_on_user_error(PROG):
        try:
            return {"table3": table3, "coverage": coverage, "evaluate": evaluate, "plot": plot}[args.command](args)
        except ValueError as err:  # a library function's message is the user's message here
            raise common.UserError(str(err)) from None


if __name__ == "__main__":
    main()

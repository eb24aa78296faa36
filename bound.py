"""bound.py: Nozawa & Sato's analysis of negative samples, as one script.

    python bound.py table3                         # Table 3: expected K+1 to see every class
    python bound.py coverage --classes 100 --draws 128 256 512     # upsilon, tau, E ln(1+Col)
    python bound.py coverage --classes 10 --per_class 1000 --draws 32 64   # without replacement
    python bound.py evaluate --checkpoint runs/k32/last.pt         # writes runs/k32/bounds.json
    python bound.py evaluate --checkpoint runs/ag/last.pt --sub_classes 2  # -> bounds_sub2.json
    python bound.py plot runs/k32 runs/k64 runs/k128 --out figure1.png --markdown table2.md

(One process: the analysis is cheap next to training, so there is no torchrun form.)

Paper: K. Nozawa and I. Sato, "Understanding Negative Samples in Instance Discriminative
Self-supervised Representation Learning" (NeurIPS 2021; code
nzw0301/Understanding-Negative-Samples), compared with S. Arora et al., "A Theoretical Analysis
of Contrastive Unsupervised Representation Learning" (ICML 2019, "CURL"). K+1 is the batch: an
anchor and K negatives, drawn from C latent classes. The theorem, as the authors' code computes
it (f-bar the augmentation mean of the normalised head output, mu_c the class means of the
training f-bar, t the temperature):

    L_Info >= 1/2 [ upsilon L_sup + (1 - upsilon) L_sub + E ln(1 + Col) ] + d(f)
    L_sup  <= [ 2 (L_Info - d(f)) - (1 - upsilon) L_sub - E ln(1 + Col) ] / upsilon

upsilon = P(the K+1 classes cover all C), Col = number of negatives sharing the anchor's class,
d(f) = E min(0, z.(mu_c - f-bar(x))) / t <= 0. Arora et al.'s bound divides by 1 - tau instead,
tau = P(Col >= 1) -> 1 exponentially in K, so it explodes while upsilon -> 1 keeps this one finite.

Analytic part: upsilon exactly (inclusion-exclusion in integers; coupon.ipynb's float64 sum is off
by ~4.5e-4 at C = 100) or, where that series is well conditioned, in floats (any number of draws
in constant time); a Poissonised convolution for non-uniform classes; E[K+1 to cover] = C H_C;
tau and E ln(1 + Col) from their laws. Empirical part: the authors' bound loop on a checkpoint
(rebuilt from the checkpoint alone), k-means sub-classes (nlp_bound.py), the collision statistic
(collision_analysis.ipynb), Figure 1 / Table 2.
"""
import argparse
import copy
import csv
import html
import json
import math
import numbers
import os
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import common

PROG = "bound.py"
# Table 3 of the paper (coupon.ipynb): uniform classes. ImageNet needs its class counts.
TABLE3 = (("Binary", 2, 3), ("AG News", 4, 9), ("CIFAR-10", 10, 30), ("CIFAR-100", 100, 519),
          ("Wiki-3029", 3029, 26030))  # (name, C, the paper's value)
TABLE3_IMAGENET = 7709  # from per-class ImageNet training counts (not in the authors' repository)


# ------------------------------------------------------------------------------------------------
# Analytic part: coverage (upsilon), expected draws, collisions (tau, E ln(1 + Col))
# ------------------------------------------------------------------------------------------------

def _count(name, value, minimum=0):
    """An integer >= minimum (numpy integers too), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _class_model(num_classes, class_probs, per_class):
    """Validate the arguments shared by the analytic functions: (C, probs or None, m or None)."""
    if class_probs is None:
        if num_classes is None:
            raise ValueError("give num_classes (uniform classes) or class_probs")
        m = None if per_class is None else _count("per_class", per_class, 1)
        return _count("num_classes", num_classes, 1), None, m
    probs = np.asarray(class_probs, dtype=np.float64)
    total = math.fsum(probs.ravel().tolist())
    if probs.ndim != 1 or probs.size == 0 or not np.all(np.isfinite(probs)) or np.any(probs <= 0):
        raise ValueError("class probabilities must be positive (a class that never occurs is not "
                         "a class)")
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"class probabilities sum to {total:.12g}, not 1")
    if num_classes is not None and _count("num_classes", num_classes, 1) != probs.size:
        raise ValueError(f"num_classes = {num_classes} but {probs.size} class probabilities")
    if per_class is not None:
        raise ValueError("per_class (a balanced pool) and class_probs cannot be combined")
    return probs.size, probs, None


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


def _log_fraction(x):
    """ln of a positive Fraction, also far below the float range."""
    shift = x.denominator.bit_length() - x.numerator.bit_length()
    return math.log(float(x * Fraction(2) ** shift)) - shift * math.log(2)


def _log_falling_ratio(M, a, n):
    """ln[binom(M - a, n) / binom(M, n)]: the probability that n draws without replacement from M
    items miss a given a of them, = sum_{i < min(a, n)} ln(1 - max(a, n) / (M - i)) (all terms of
    one sign: accurate); -inf when they cannot (a + n > M)."""
    if a + n > M:
        return -math.inf
    k, x, total = min(a, n), max(a, n), 0.0
    for start in range(0, k, 1 << 20):
        i = np.arange(start, min(k, start + (1 << 20)), dtype=np.float64)
        total += float(np.sum(np.log1p(-x / (M - i))))
    return total


def _complement_series(n, C, m=None):
    """1 - upsilon = sum_{j >= 1} (-1)^(j+1) a_j, a_j = binom(C, j) P(n draws miss j given
    classes), in floats where that is safe: a_2 <= a_1 / 2. ln a_j is concave in j, so the terms
    then shrink at least geometrically, the sum lies in [a_1 / 2, a_1] and it costs a few
    roundings, however large n is (its terms are exp(n ln(1 - j/C)), no loop over draws). None
    where it is not safe (n below about C ln C); the caller then sums exactly."""
    M = None if m is None else C * m

    def log_term(j):
        if m is None:
            miss = n * math.log1p(-j / C) if j < C else -math.inf
        else:
            miss = _log_falling_ratio(M, j * m, n)
        return math.log(math.comb(C, j)) + miss

    if C < 2:
        return None
    logs = [log_term(1), log_term(2)]
    if logs[0] == -math.inf:  # no n draws can miss a class: upsilon = 1
        return 0.0
    if logs[1] > logs[0] - math.log(2):
        return None
    while len(logs) < C and logs[-1] > logs[0] - 60:  # e^-60: far below a float's precision
        logs.append(log_term(len(logs) + 1))
    total = math.fsum((-1) ** j * math.exp(value - logs[0]) for j, value in enumerate(logs))
    return math.exp(logs[0] + math.log(total))


def _complement_bonferroni(n, probs):
    """1 - upsilon for class probabilities when s = sum_c (1 - p_c)^n < 1e-13: inclusion-exclusion
    (Bonferroni) gives s - s^2 / 2 <= 1 - upsilon <= s, so s itself is within 5e-14 relative, for
    any n in constant time. None otherwise."""
    logs = n * np.log1p(-probs)
    top = float(logs.max())
    log_s = top + math.log(float(np.sum(np.exp(logs - top))))
    return math.exp(log_s) if log_s < math.log(1e-13) else None


def _coverage(n, num_classes=None, class_probs=None, per_class=None):
    """(ln upsilon, 1 - upsilon): the float series where it is safe (any n), else exact rationals
    for uniform classes and the Poissonised convolution for class probabilities."""
    n = _count("the number of draws", n)
    C, probs, m = _class_model(num_classes, class_probs, per_class)
    if m is not None and n > C * m:
        raise ValueError(f"cannot draw {n} items without replacement from a pool of {C} x {m}")
    if n < C:
        return -math.inf, 1.0
    complement = _complement_bonferroni(n, probs) if probs is not None else \
        _complement_series(n, C, m)
    if complement is not None:
        return (math.log1p(-complement) if complement else 0.0), complement
    if probs is not None:
        log_u = _log_coverage_poissonized(n, probs=probs)
        return log_u, -math.expm1(log_u)
    exact = coverage_probability_exact(n, C, per_class=m)
    return _log_fraction(exact), float(1 - exact)


def coverage_probability(n, num_classes=None, class_probs=None, per_class=None):
    """upsilon: the probability that n draws (n = K + 1) contain every class.

    Uniform over `num_classes`, or with `class_probs` (i.i.d. draws); with `per_class`, n draws
    without replacement from a balanced pool of `per_class` items per class. 0 when n < C.
    Uniform: the inclusion-exclusion series, in floats once n is about C ln C or more (constant
    time in n), else `coverage_probability_exact` (integers; well under a second at C = 1000);
    non-uniform: the Poissonised convolution (~1e-14 relative). coupon.ipynb's float64 sum of
    sum_j (-1)^j binom(C, j) (1 - j/C)^n at any n loses everything to cancellation at C = 100."""
    return math.exp(_coverage(n, num_classes, class_probs, per_class)[0])


def log_coverage_probability(n, num_classes=None, class_probs=None, per_class=None):
    """ln upsilon (finite where upsilon underflows a float: C = 1000, n = 1000 gives -995.6)."""
    return _coverage(n, num_classes, class_probs, per_class)[0]


def coverage_complement(n, num_classes=None, class_probs=None, per_class=None):
    """1 - upsilon, accurate near upsilon = 1 (C = 10, n = 512: 3.7339185e-23); for class_probs
    away from the Bonferroni regime, -expm1(ln upsilon) (absolute ~1e-15)."""
    return _coverage(n, num_classes, class_probs, per_class)[1]


def coverage_probability_exact(n, num_classes, per_class=None):
    """upsilon as an exact Fraction (uniform classes), by inclusion-exclusion in integers:
    i.i.d. sum_j (-1)^j binom(C, j) (C - j)^n / C^n; without replacement
    sum_j (-1)^j binom(C, j) binom(Cm - jm, n) / binom(Cm, n). Seconds at C = 1000, n = 10^4;
    the size of its integers grows with n."""
    n, C = _count("the number of draws", n), _count("num_classes", num_classes, 1)
    if per_class is None:
        total = sum((-1) ** j * math.comb(C, j) * (C - j) ** n for j in range(C + 1))
        return Fraction(total, C ** n)
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


def _collision_law(num_negatives, prob=None, count=None, total=None, tail=14.0):
    """(values, probabilities) of Col, the negatives sharing the anchor's class: Binomial(K, prob)
    for i.i.d. classes, or Hypergeometric(total - 1, count - 1, K) for an anchor of a class with
    `count` items in a pool of `total`, on a window of +-tail sd (+40) around the mean. Weights
    from the ratios p(c+1)/p(c) summed outward from the mode, then normalised (no lgamma
    differences of size K ln K). (None, (mean, variance)) when the window would exceed 2e6
    values: the caller then uses the moments."""
    K = num_negatives
    if prob is not None:
        if prob >= 1.0:  # a single class: every negative collides
            return np.array([float(K)]), np.array([1.0])
        lo, hi, mean, var = 0, K, K * prob, K * prob * (1.0 - prob)
    else:
        pool, good = total - 1, count - 1
        lo, hi = max(0, K - (pool - good)), min(K, good)
        share = good / pool if pool else 0.0
        mean = K * share
        var = mean * (1.0 - share) * (pool - K) / (pool - 1) if pool > 1 else 0.0
    spread = tail * math.sqrt(var) + 40
    lo, hi = max(lo, int(math.floor(mean - spread))), min(hi, int(math.ceil(mean + spread)))
    if hi - lo > 2_000_000:
        return None, (mean, var)
    c = np.arange(lo, hi, dtype=np.float64)  # the ratio from c to c + 1
    if prob is not None:
        log_ratio = np.log(K - c) - np.log(c + 1.0) + (math.log(prob) - math.log1p(-prob))
        mode = math.floor((K + 1) * prob)
    else:
        log_ratio = (np.log(good - c) + np.log(K - c) - np.log(c + 1.0)
                     - np.log(pool - good - K + c + 1.0))
        mode = math.floor((K + 1) * (good + 1) / (pool + 2))
    mode = int(min(max(mode, lo), hi)) - lo
    logw = np.zeros(hi - lo + 1)
    logw[mode + 1:] = np.cumsum(log_ratio[mode:])
    logw[:mode] = -np.cumsum(log_ratio[:mode][::-1])[::-1]
    w = np.exp(logw - logw.max())
    return np.arange(lo, hi + 1, dtype=np.float64), w / w.sum()


def _expected_log1p(K, **law):
    """E ln(1 + Col) under _collision_law; for a huge window (sd > 7e4, so the mean > 5e9) the
    delta method ln(1 + m) - v / (2 (1 + m)^2), whose next term is ~1/m^2 (below 1e-19)."""
    values, probs = _collision_law(K, **law)
    if values is None:
        mean, var = probs
        return math.log1p(mean) - var / (2.0 * (1.0 + mean) ** 2)
    return math.fsum((probs * np.log1p(values)).tolist())


def _collision_terms(num_negatives, num_classes, per_class=None, counts=None):
    """(tau, 1 - tau, E ln(1 + Col)): i.i.d. uniform classes, a balanced pool of per_class items
    per class, or a pool with class counts `counts` (the anchor of class c with probability m_c/M).
    1 - tau = (1 - 1/C)^K, or binom(M - m, K) / binom(M - 1, K) by _log_falling_ratio. Constant
    time in K for i.i.d. classes."""
    K = _count("the number of negatives", num_negatives)
    if counts is None:
        C = _count("num_classes", num_classes, 1)
        if per_class is not None:
            counts = [_count("per_class", per_class, 1)] * C
    if counts is None:
        log_none = K * math.log1p(-1.0 / C) if C > 1 else (0.0 if K == 0 else -math.inf)
        return -math.expm1(log_none), math.exp(log_none), _expected_log1p(K, prob=1.0 / C)
    total = int(sum(counts))
    if K > total - 1:
        raise ValueError(f"cannot draw {K} negatives without replacement from the {total - 1} "
                         f"other items of the pool")
    per_count = {}
    for m in set(int(m) for m in counts):
        per_count[m] = (_log_falling_ratio(total - 1, m - 1, K),
                        _expected_log1p(K, count=m, total=total))
    weights = np.asarray(counts, dtype=np.float64) / total
    log_none = np.array([per_count[int(m)][0] for m in counts])
    log_col = np.array([per_count[int(m)][1] for m in counts])
    return (math.fsum((weights * -np.expm1(log_none)).tolist()),
            math.fsum((weights * np.exp(log_none)).tolist()),
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

SUM_KEYS = ("samples", "SimCLR_loss", "assumption_value", "upsilon", "curl_tau", "sup_loss",
            "partial_sup_loss", "conflict_term", "curl_sup_loss", "curl_partial_sup_loss",
            "sup_loss_all")


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
    plus the label sums of batch_label_sums."""
    t = temperature
    sums = batch_label_sums(labels, num_classes)
    z = F.normalize(z0, dim=1)
    sums["SimCLR_loss"] = float(info_nce_one_view(z0, z1, t).sum())
    inner = (z * (mu[labels] - fbar)).sum(dim=1)
    sums["assumption_value"] = float(inner.clamp(max=0.0).sum() / t)
    classes, position, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    single = counts[position] == 1  # no collision for this anchor: what CURL's sub-class loss uses
    full = F.cross_entropy(z @ mu.T / t, labels, reduction="none")
    sums["sup_loss_all"] = float(full.sum())
    if classes.numel() == num_classes:
        sums.update(sup_loss=float(full.sum()), partial_sup_loss=0.0,
                    curl_sup_loss=float(full[single].sum()),
                    curl_partial_sup_loss=float(full[single].sum()))
    else:
        part = F.cross_entropy(z @ mu[classes].T / t, position, reduction="none")
        sums.update(sup_loss=0.0, partial_sup_loss=float(part.sum()), curl_sup_loss=0.0,
                    curl_partial_sup_loss=float(part[single].sum()))
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


def bound_report(sums, num_classes, k_plus_1, analytic, statistic=None, mu_acc=None):
    """bounds.json's content from the accumulated sums. `terms`: per-sample means, the authors'
    names (bound = (sup + partial + conflict) / 2, curl_bound = curl_partial + conflict, d not
    added). `table`: the rows of Tables 2/4/5 as bound.ipynb makes them (L_sup, L_sub halved, d
    added to the bounds). `upper_bounds` of L_sup: theorem [2 (L - d) - partial - collision] /
    upsilon; notebook [2 L - partial / 2 - collision - 2 d] / upsilon (valid, looser); Arora et al.
    [L - (curl_partial - curl_sup) - collision - d] / (1 - tau). An empirical upsilon of 0 becomes
    the exact one (null: vacuous when K+1 < C), an empirical tau of 1 the exact tau; both warned."""
    n = sums["samples"]
    terms = {key: sums[key] / n for key in SUM_KEYS if key != "samples"}
    terms["bound"] = 0.5 * (terms["sup_loss"] + terms["partial_sup_loss"] + terms["conflict_term"])
    terms["curl_bound"] = terms["curl_partial_sup_loss"] + terms["conflict_term"]
    L, d, warnings = terms["SimCLR_loss"], terms["assumption_value"], []
    log_u, source = (math.log(terms["upsilon"]) if terms["upsilon"] > 0 else None), "empirical"
    if log_u is None:
        log_u, source = analytic["log_upsilon"], "exact (empirical upsilon is 0)"
        if log_u == -math.inf:
            log_u = None
            warnings.append(f"K+1 = {k_plus_1} < C = {num_classes}: no batch can contain every "
                            f"class (upsilon = 0), so the upper bound of the supervised loss is "
                            f"vacuous (null)")
        else:
            warnings.append(f"no batch of K+1 = {k_plus_1} covered all {num_classes} classes; "
                            f"the upper bound uses the exact upsilon = exp({log_u:.4g}) and is "
                            f"astronomically loose")
    one_minus_tau, tau_source = 1.0 - terms["curl_tau"], "empirical"
    if one_minus_tau <= 0:
        one_minus_tau, tau_source = analytic["one_minus_tau"], "exact (every anchor collided)"
        warnings.append(f"every anchor had a same-class negative (empirical tau = 1); Arora et "
                        f"al.'s bound uses the exact 1 - tau = {one_minus_tau:.4g}")
    partial, collision = terms["partial_sup_loss"], terms["conflict_term"]
    curl_sub = terms["curl_partial_sup_loss"] - terms["curl_sup_loss"]
    numerators = {"ours_theorem": 2 * (L - d) - partial - collision,
                  "ours_notebook": 2 * L - partial / 2 - collision - 2 * d,
                  "arora": L - curl_sub - collision - d}
    upper = {"upsilon_used": math.exp(log_u) if log_u is not None else 0.0,
             "upsilon_source": source, "one_minus_tau_used": one_minus_tau,
             "tau_source": tau_source}
    log_one_minus_tau = math.log(one_minus_tau) if one_minus_tau > 0 else None
    for name, num in numerators.items():
        log_den = log_u if name != "arora" else log_one_minus_tau
        ln = math.log(num) - log_den if (num > 0 and log_den is not None) else None
        upper[name] = None if ln is None else (math.exp(ln) if ln < 700 else math.inf)
        upper["ln_" + name] = ln
        if num <= 0:
            warnings.append(f"{name}: the numerator is {num:.4g} <= 0, so the estimated upper "
                            f"bound is not informative")
    table = {"tau": terms["curl_tau"], "upsilon": terms["upsilon"], "mu_acc": mu_acc,
             "L_Info": L, "d": d, "curl_bound": terms["curl_bound"] + d,
             "curl_collision": collision, "curl_L_sup": terms["curl_sup_loss"],
             "curl_L_sub": curl_sub, "bound": terms["bound"] + d, "L_sup": terms["sup_loss"] / 2,
             "L_sub": partial / 2, "collision_bound": (statistic or {}).get("head"),
             "ln_curl_upper_bound": upper["ln_arora"], "ln_upper_bound": upper["ln_ours_notebook"],
             "ln_upper_bound_theorem": upper["ln_ours_theorem"]}
    return {"terms": terms, "table": table, "upper_bounds": upper, "analytic": analytic,
            "collision_statistic": statistic or {}, "warnings": warnings}


# ------------------------------------------------------------------------------------------------
# Empirical part: the checkpoint's encoder and data, rebuilt without its training script
# (VERBATIM copies of linear_eval.py, whose text functions are nlp_similar_words.py's: kept so by
# tests/test_eval_copies.py)
# ------------------------------------------------------------------------------------------------

def tokenize(text):
    """torchtext's legacy `basic_english`: lower-case; pad ' . , ( ) ! ? with spaces; drop ";
    turn ; : and <br /> into spaces; split on whitespace. Applied in torchtext's order."""
    rules = ((r"'", " '  "), (r'"', ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "),
             (r"\(", " ( "), (r"\)", " ) "), (r"!", " ! "), (r"\?", " ? "), (r";", " "),
             (r":", " "), (r"\s+", " "))
    text = text.lower()
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text.split()


def clean_ag_news(text):
    """Undo AG News's escaping leftovers (optional; the original pipeline kept them): HTML entities
    with or without their '&' (`#39;` -> ', `#36;` -> $, `&lt;` -> <), `\\$` -> $, and the other
    backslashes (lost line breaks) -> spaces."""
    text = re.sub(r"&?#(\d+);", lambda m: html.unescape(f"&#{m.group(1)};"), text)
    text = re.sub(r"&(lt|gt|amp|quot);", lambda m: html.unescape(m.group(0)), text)
    return text.replace("\\$", "$").replace("\\", " ")


def read_ag_news(path):
    """(texts, labels) of an AG News CSV: no header, a class 1..C, then text columns (title,
    description) joined by a space; labels 0..C-1. FileNotFoundError / ValueError name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected an AG News CSV: class, title, "
                                f"description)")
    texts, labels, columns = [], [], None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                columns = columns or len(row)
                if len(row) < 2 or len(row) != columns:
                    raise ValueError(f"{path} line {line}: {len(row)} column(s); expected the "
                                     f"same number on every row, at least 2 (class, title, "
                                     f"description for AG News)")
                if not row[0].strip().isdigit() or int(row[0]) < 1:
                    raise ValueError(f"{path} line {line}: the class {row[0][:20]!r} is not an "
                                     f"integer >= 1")
                texts.append(" ".join(row[1:]))
                labels.append(int(row[0]) - 1)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a UTF-8 CSV file ({err})") from None
    if not texts:
        raise ValueError(f"{path} holds no documents")
    return texts, labels


def encode(texts, vocab):
    """Token ids of every text, concatenated: (ids LongTensor [total], offsets LongTensor [n + 1]).
    Words outside `vocab` map to its last entry (<unk>)."""
    stoi = {w: i for i, w in enumerate(vocab)}
    unk, ids, offsets = len(vocab) - 1, [], [0]
    for text in texts:
        ids.extend(stoi.get(t, unk) for t in tokenize(text))
        offsets.append(len(ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def erase(tokens, ratio):
    """Drop each token (1-D LongTensor) independently with probability `ratio`; order is kept.
    Random numbers from torch's RNG; the indexing runs in numpy (several times faster per
    document)."""
    keep = torch.rand(tokens.shape[0], dtype=torch.float64).numpy() >= ratio
    return torch.from_numpy(tokens.numpy()[keep])


def replace(tokens, table, ratio):
    """Replace each token independently with probability `ratio` by table[token, r], r uniform in
    0..k-1 (torch's RNG); the kept tokens come first, in order, then the replacements, in order.
    The length is kept; identity rows make some replacements no-ops."""
    ids = tokens.numpy()
    keep = torch.rand(ids.shape[0], dtype=torch.float64).numpy() >= ratio
    masked = ids[~keep]
    pick = torch.randint(table.shape[1], (masked.shape[0],)).numpy()
    return torch.from_numpy(np.concatenate([ids[keep], table.numpy()[masked, pick]]))


class Documents(Dataset):
    """(token ids, label) per document; `transform` (erase/replace) applied on every access."""

    def __init__(self, texts, labels, vocab, transform=None):
        ids, offsets = encode(texts, vocab)
        self.docs = [ids[offsets[i]:offsets[i + 1]].clone() for i in range(len(texts))]
        self.targets, self.transform, self.pad = list(labels), transform, len(vocab)

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return (self.transform(self.docs[i]) if self.transform else self.docs[i]), self.targets[i]

    def collate(self, batch):  # right-pad with len(vocab); an all-padding row is an empty document
        width = max([1] + [len(t) for t, _ in batch])
        out = torch.full((len(batch), width), self.pad, dtype=torch.long)
        for i, (t, _) in enumerate(batch):
            out[i, :len(t)] = t
        return out, torch.tensor([y for _, y in batch])


class TextAugment:
    def __init__(self, kind, ratio, table):
        self.kind, self.ratio, self.table = kind, ratio, table

    def __call__(self, tokens):
        if self.kind == "erase":
            return erase(tokens, self.ratio)
        return replace(tokens, self.table, self.ratio)


class BagOfWords(nn.Module):
    """nlp_similar_words.py's encoder: the mean of the word embeddings ([B, L] padded with
    len(vocab))."""

    def __init__(self, num_words, dim):
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_words + 1, dim, mode="mean", padding_idx=num_words)

    def forward(self, x):
        return self.embedding(x)


def load_run(path, parser):
    """The checkpoint, read with weights_only=True (tensors and plain Python values only). A file
    that is missing, damaged, foreign or incomplete ends with one line saying what is wrong."""
    if not os.path.isfile(path):
        parser.error(f"{path} is not a file" if os.path.exists(path) else f"{path} does not exist")
    if not os.access(path, os.R_OK):
        parser.error(f"{path} cannot be read (permission denied)")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, EOF, OS, key... errors, whatever the damage
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found and zipfile.is_zipfile(path):
            parser.error(f"{path} holds Python objects other than tensors, numbers, strings, "
                         f"lists and dicts ({found.group(1)}), which no checkpoint of this "
                         f"project holds; not loaded, since unpickling them could run code")
        parser.error(f"{path} is not a checkpoint (not written by torch.save, or damaged)")
    if not isinstance(ckpt, dict):
        parser.error(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this project (a "
                     f"dict with script, args, backbone, head)")
    missing = [repr(k) for k in ("script", "args", "backbone", "head") if k not in ckpt]
    if missing:
        parser.error(f"{path} lacks {', '.join(missing)}: not a checkpoint of this project's "
                     f"training scripts")
    if not isinstance(ckpt["args"], dict) or not isinstance(ckpt["script"], str):
        parser.error(f"{path}: its 'args' is not a dict or its 'script' not a string")
    if ckpt["script"] == "nlp_similar_words.py":
        missing = [repr(k) for k in ("vocab", "classes") if k not in ckpt]
    else:
        missing = [f"args['{k}']" for k in ("dataset", "data_dir", "arch") if k not in ckpt["args"]]
    if missing:
        parser.error(f"{path} lacks {', '.join(missing)}: cannot rebuild its encoder and data")
    return ckpt


def load_state(module, state, what):
    """module.load_state_dict(state), or ValueError "does not fit WHAT: DETAIL" on one line (the
    caller puts the checkpoint's path in front)."""
    if not isinstance(state, dict):
        raise ValueError(f"does not fit {what}: its weights are a {type(state).__name__}, not a "
                         f"state dict")
    try:
        module.load_state_dict(state)
    except Exception as err:  # RuntimeError for size mismatches, missing or unexpected keys
        details = [line.strip().rstrip(".") for line in str(err).splitlines()[1:] if line.strip()]
        detail = details[0] if details else str(err).strip().split("\n")[0]
        detail = detail if len(detail) <= 240 else detail[:240] + "..."
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise ValueError(f"does not fit {what}: {detail}{more}") from None


def build_head(head):
    """nn.Sequential from ckpt["head"] = {"layout": [[name, kind, sizes...]], "state": ...}."""
    make = {"linear": lambda i, o, b: nn.Linear(i, o, bias=b),
            "bn": lambda n, a: nn.BatchNorm1d(n, affine=a), "relu": nn.ReLU}
    try:
        layers = OrderedDict((name, make[kind](*sizes)) for name, kind, *sizes in head["layout"])
    except Exception as err:  # not a dict, an unknown layer kind, sizes that make no layer...
        raise ValueError(f"has a projection head layout that builds no head ({err!r})") from None
    module = nn.Sequential(layers)
    load_state(module, head.get("state"), "the projection head its layout describes")
    return module


class Encoder(nn.Module):
    """Backbone, optionally the projection head, optionally L2-normalised (float32 out)."""

    def __init__(self, backbone, head=None, normalize=False):
        super().__init__()
        self.backbone, self.head, self.normalize = backbone, head, normalize

    def forward(self, x):
        h = self.backbone(x)
        h = (self.head(h) if self.head is not None else h).float()
        return F.normalize(h, dim=1) if self.normalize else h


def build_encoder(ckpt, features, normalize):
    """The frozen encoder of a checkpoint, rebuilt without its training script. ValueError says
    what in the checkpoint does not fit (without the path: the caller puts it in front)."""
    a = ckpt["args"]
    if ckpt["script"] == "nlp_similar_words.py":
        weight = ckpt["backbone"].get("embedding.weight") if isinstance(ckpt["backbone"], dict) \
            else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("lacks backbone['embedding.weight'] (the word embeddings)")
        backbone = BagOfWords(len(ckpt["vocab"]), weight.shape[1])
    else:
        try:
            backbone = common.build_backbone(a["arch"], a.get("stem", "cifar"), a.get("width", 64),
                                             a.get("stem_padding", 1))
        except Exception as err:  # an unknown arch, a width that is not a number...
            raise ValueError(f"has arguments from which common.build_backbone builds no backbone "
                             f"({err!r})") from None
    load_state(backbone, ckpt["backbone"], "the backbone its arguments describe")
    head = build_head(ckpt["head"]) if features == "head" else None
    return Encoder(backbone, head, normalize).eval().requires_grad_(False)


def image_error(err):
    """The one line `cannot read image PATH: ...` of a common.ImageList OSError, also when a
    DataLoader worker raised it (torch re-raises it with the worker's traceback in the message);
    None for any other error."""
    found = re.findall(r"cannot read image [^\n]*", str(err))
    return found[-1].strip() if found else None


class LabInput:
    """ring_nce.py's CMC input: an RGB transform (tensor in [0, 1]), then common.lab_input with the
    run's `lab_mean` and `lab_std` (its checkpoint's args)."""

    def __init__(self, transform, mean, std):
        self.transform, self.stats = transform, (mean, std)

    def __call__(self, img):
        return common.lab_input(self.transform(img), self.stats)


def build_data(ckpt, data_dir, views=()):
    """{"train", "test", *views} data sets of (input, label), and the collate function (text) or
    None: plain train/test, "run"/"test_run" = train/test under the run's own augmentation (one
    fresh draw per access), "crop_flip" = train under random resized crop + flip (images)."""
    a = ckpt["args"]
    root = data_dir or a["data_dir"]
    if ckpt["script"] == "nlp_similar_words.py":
        files = [os.path.join(root, f"{split}.csv") for split in ("train", "test")]
        if not all(os.path.isfile(f) for f in files):
            raise FileNotFoundError(f"{root} needs train.csv and test.csv (AG News format)")
        vocab, texts = list(ckpt["vocab"]), [read_ag_news(f) for f in files]
        if a.get("clean_text"):
            texts = [([clean_ag_news(t) for t in x], y) for x, y in texts]
        data = {"train": Documents(*texts[0], vocab), "test": Documents(*texts[1], vocab)}
        for name in set(views) & {"run", "test_run"}:
            data[name] = copy.copy(data["test" if name == "test_run" else "train"])
            data[name].transform = TextAugment(a["augmentation"], a["mask_ratio"],
                                               ckpt.get("replace_ids"))
        return data, data["train"].collate
    lab = a.get("input_space") == "lab"  # ring_nce.py's CMC: Lab input, trained on crop + flip
    norm = None if lab else common.normalization(a.get("norm", "cifar10"), a["dataset"])
    crop = a.get("crop_size", 32)
    plain = common.eval_transform(norm, size=crop if a["dataset"] == "folder" else None)
    if lab:
        run = common.train_transform(crop, (0.2, 1.0), jitter_p=0, grayscale_p=0, blur_p=0,
                                     normalize=None)
    else:
        run = common.train_transform(crop, blur_p=a.get("blur_p", 0.5), normalize=norm)
    size = crop if a["dataset"] == "folder" else (96 if a["dataset"] == "stl10" else 32)
    flip = transforms.Compose([transforms.RandomResizedCrop(size),
                               transforms.RandomHorizontalFlip(), plain])
    if lab:
        plain, run, flip = (LabInput(t, a["lab_mean"], a["lab_std"]) for t in (plain, run, flip))
    make = {"train": ("train", plain), "test": ("test", plain), "run": ("train", run),
            "test_run": ("test", run), "crop_flip": ("train", flip)}
    data = {name: common.build_dataset(a["dataset"], root, split, t)
            for name, (split, t) in make.items() if name in ("train", "test") or name in views}
    if data["test"] is None or common.num_classes(data["train"]) == 0:
        raise FileNotFoundError(f"no labelled train and test splits in {root} (expected "
                                f"{root}/test/<class>/*)")
    if list(data["train"].classes) != list(data["test"].classes):
        raise ValueError(f"the test classes {data['test'].classes} differ from the training "
                         f"classes")
    return data, None


def run_k_plus_1(run_args, world_size=1):
    """K+1 of a run: the batch one loss computation saw (per process with local negatives, per
    chunk with --num_chunks), from its arguments."""
    batch = run_args.get("batch_size")
    if batch is None:
        return None
    if run_args.get("negatives", "global") == "local":
        batch //= max(world_size, 1)
    return batch // max(run_args.get("num_chunks", 1), 1)


@torch.no_grad()
def augmentation_means(model, dataset, views, batch_size, workers, device, collate=None, keep=0):
    """f-bar(x) = (1/V) sum_v normalize(head(a_v(x))) over V independent augmentations (the
    authors: 5 passes x 2 views = 10), NOT re-normalised; the labels; and the raw (backbone, head)
    outputs of the first `keep` passes (the collision statistic's two views)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    fbar, kept = 0.0, []
    for v in range(views):
        hs, zs, ys = [], [], []
        for x, y in loader:
            h = model.backbone(x.to(device))
            hs.append(h.float())
            zs.append(model.head(h).float())
            ys.append(torch.as_tensor(y).to(device))
        z, labels = torch.cat(zs), torch.cat(ys)
        fbar = fbar + F.normalize(z, dim=1)
        if v < keep:
            kept.append((torch.cat(hs), z))
    return fbar / views, labels, kept


def mean_of_classes(x, labels, num_classes):
    """[C, D] plain means of the rows of each class (mu_c = E f-bar, not re-normalised)."""
    sums = x.new_zeros(num_classes, x.shape[1]).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]


def kmeans(x, k, restarts=5, iterations=1000, generator=None):
    """Lloyd's k-means (squared Euclidean), `restarts` random initialisations (k distinct rows),
    the lowest inertia kept: (centroids [k, D], assignment [N]). faiss's Kmeans in the original."""
    best = None
    for _ in range(restarts):
        c = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].clone()
        for _ in range(iterations):
            assign = torch.cdist(x, c).argmin(dim=1)
            new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j]
                               for j in range(k)])
            if torch.equal(new, c):
                break
            c = new
        assign = torch.cdist(x, c).argmin(dim=1)
        inertia = float(((x - c[assign]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, c, assign)
    return best[1], best[2]


def sub_class_means(train_fbar, train_y, test_fbar, test_y, k, seed):
    """Nozawa & Sato's latent sub-classes (nlp_bound.py): k-means with k clusters (5 restarts) on
    the TRAINING f-bar of each class c; sub-class c k + j. Test items go to the nearest of their
    class's k centroids. Returns (mu [C k, D] = the centroids, train sub-labels, test
    sub-labels)."""
    mu, train_sub, test_sub = [], train_y.clone(), test_y.clone()
    for c in range(int(train_y.max()) + 1):
        rows = train_fbar[train_y == c]
        if rows.shape[0] < k:
            raise ValueError(f"class {c} has {rows.shape[0]} training items, fewer than "
                             f"--sub_classes {k}")
        generator = torch.Generator().manual_seed(seed + c)
        centroids, assign = kmeans(rows.double(), k, generator=generator)
        train_sub[train_y == c] = c * k + assign.to(train_y.device)
        if (test_y == c).any():
            nearest = torch.cdist(test_fbar[test_y == c].double(), centroids).argmin(dim=1)
            test_sub[test_y == c] = c * k + nearest
        mu.append(centroids.to(train_fbar.dtype))
    return torch.cat(mu), train_sub, test_sub


def mean_classifier_predictions(features, mu, sub_classes=1):
    """The paper's mean classifier on (sub-)class means mu [C k, D]: argmax_j normalize(z) . mu_j,
    then the class of that sub-class, j // k (nlp_bound.py maps predictions back by integer
    division)."""
    return (F.normalize(features, dim=1) @ mu.T).argmax(dim=1) // sub_classes


@torch.no_grad()
def bound_loop(model, dataset, fbar, labels, mu, k_plus_1, passes, temperature, workers, device,
               generator, collate=None):
    """`passes` shuffled passes over `dataset` (augmented test items) in batches of exactly K+1
    (the last partial batch dropped); each batch gets two fresh augmentations (two loaders over
    the same index lists) and adds batch_bound_sums. Returns the accumulated sums."""
    total, n_batches = {}, len(dataset) // k_plus_1
    for _ in range(passes):
        order = torch.randperm(len(dataset), generator=generator)[:n_batches * k_plus_1]
        batches = order.view(n_batches, -1).tolist()
        view0, view1 = (DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                   collate_fn=collate) for _ in range(2))
        for index, (x0, _), (x1, _) in zip(batches, view0, view1):
            z0, z1 = model(x0.to(device)), model(x1.to(device))
            index = torch.as_tensor(index, device=device)
            add_sums(total, batch_bound_sums(z0, z1, labels[index], fbar[index], mu, temperature,
                                             mu.shape[0]))
            # identical views: the augmentation draws no fresh randomness; the bound is meaningless
            same = int(torch.equal(z0, z1))
            total["identical_view_batches"] = total.get("identical_view_batches", 0) + same
    return total


def analytic_terms(k_plus_1, counts):
    """upsilon, tau, E ln(1 + Col) of the loop's sampling: batches of K+1 drawn without
    replacement from the evaluated test items (class counts `counts`)."""
    missing = sum(1 for c in counts if c <= 0)  # a class without test items is never covered
    counts = [int(c) for c in counts if c > 0]
    C, M = len(counts), sum(counts)
    balanced = len(set(counts)) == 1
    if missing or k_plus_1 < C:
        log_u, complement = -math.inf, 1.0
    elif balanced:
        log_u, complement = _coverage(k_plus_1, C, per_class=counts[0])
    else:
        log_u = _log_coverage_poissonized(k_plus_1, counts=np.asarray(counts, dtype=np.float64))
        complement = -math.expm1(log_u)
    tau, one_minus_tau, log_col = _collision_terms(k_plus_1 - 1, C, counts=counts)
    pool = f"balanced, {counts[0]} per class" if balanced else "unbalanced"
    return {"model": f"batches of K+1 = {k_plus_1} without replacement from {M} test items "
                     f"({pool})",
            "upsilon": math.exp(log_u), "log_upsilon": log_u, "one_minus_upsilon": complement,
            "tau": tau, "one_minus_tau": one_minus_tau, "expected_log_collision": log_col}


def evaluation_inputs(args, parser):
    """Checkpoint, K+1, temperature, output path, data and model: every refusal (one line, exit
    status 2) before any compute."""
    ckpt = load_run(args.checkpoint, parser)
    k_plus_1 = args.batch or run_k_plus_1(ckpt["args"], ckpt.get("world_size", 1))
    if not k_plus_1 or k_plus_1 < 2:
        parser.error("the checkpoint's arguments give no batch size; give K+1 with --batch")
    temperature = args.temperature or ckpt["args"].get("temperature", 0.5)
    name = "bounds.json" if args.sub_classes == 1 else f"bounds_sub{args.sub_classes}.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name)
    if not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK) or os.path.isdir(out):
        parser.error(f"cannot write --out {out}")
    try:
        model = build_encoder(ckpt, "head", False)
    except ValueError as err:
        parser.error(f"{args.checkpoint} {err}")
    try:
        data, collate = build_data(ckpt, args.data_dir, ("run", "test_run"))
    except (OSError, ValueError) as err:
        parser.error(" ".join(str(err).split()))
    data = {k: common.subset(v, args.test_subset if k.startswith("test") else args.train_subset)
            for k, v in data.items()}
    if len(data["test_run"]) < k_plus_1:
        parser.error(f"the test split has {len(data['test_run'])} items, fewer than one batch of "
                     f"K+1 = {k_plus_1}")
    return ckpt, k_plus_1, temperature, out, data, collate, model


def bound_of(args, k_plus_1, temperature, data, collate, model):
    """The bound loop's report (bound_report) and the features (f-bar, mu, sub-labels)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    # f-bar of every training and test item; mu = the class means of the TRAINING f-bar
    mean_args = (2 * args.num_augmentations, args.feature_batch, args.workers, device, collate)
    train_fbar, train_y, kept = augmentation_means(model, data["run"], *mean_args, keep=2)
    test_fbar, test_y, _ = augmentation_means(model, data["test_run"], *mean_args)
    classes = max(int(train_y.max()), int(test_y.max())) + 1
    if args.sub_classes > 1:
        mu, train_sub, test_sub = sub_class_means(train_fbar, train_y, test_fbar, test_y,
                                                  args.sub_classes, args.seed)
    else:
        mu, train_sub, test_sub = mean_of_classes(train_fbar, train_y, classes), train_y, test_y
    sums = bound_loop(model, data["test_run"], test_fbar, test_sub, mu, k_plus_1, args.passes,
                      temperature, args.workers, device, generator, collate)
    # The paper's "mu acc": clean test inputs, the training (sub-)class means
    clean, clean_y, _ = augmentation_means(model, data["test"], 1, *mean_args[1:])
    predicted = mean_classifier_predictions(clean, mu, args.sub_classes)
    mu_acc = 100.0 * float((predicted == clean_y).double().mean())
    statistic = {"head": collision_statistic(kept[0][1], kept[1][1], train_y),
                 "without_head": collision_statistic(kept[0][0], kept[1][0], train_y)}
    counts = torch.bincount(test_sub, minlength=mu.shape[0]).tolist()
    report = bound_report(sums, mu.shape[0], k_plus_1, analytic_terms(k_plus_1, counts),
                          statistic, mu_acc)
    if sums.get("identical_view_batches"):
        report["warnings"].append(f"{sums['identical_view_batches']} batches had two identical "
                                  f"augmented views: the run's augmentation draws no fresh "
                                  f"randomness per view")
    report["mean_classifier"] = {"mu_acc_clean_test": mu_acc, "sub_classes": args.sub_classes}
    report["settings"] = {"k_plus_1": k_plus_1, "num_classes": mu.shape[0],
                          "labelled_classes": classes, "samples": int(sums["samples"])}
    features = {"train_fbar": train_fbar.cpu(), "test_fbar": test_fbar.cpu(), "mu": mu.cpu(),
                "train_labels": train_sub.cpu(), "test_labels": test_sub.cpu()}
    return report, features


def evaluate(args, parser):
    """`bound.py evaluate`: the authors' bound loop on one checkpoint -> bounds.json."""
    ckpt, k_plus_1, temperature, out, data, collate, model = evaluation_inputs(args, parser)
    try:
        report, features = bound_of(args, k_plus_1, temperature, data, collate, model)
    except OSError as err:  # a corrupt or truncated image: one line naming the file
        message = image_error(err)
        if message is None:
            raise
        parser.error(message)
    except ValueError as err:  # too few training items for --sub_classes
        parser.error(str(err))
    report["settings"].update({
        "checkpoint": os.path.abspath(args.checkpoint), "script": ckpt["script"],
        "epoch": ckpt.get("epoch"), "sub_classes": args.sub_classes, "temperature": temperature,
        "passes": args.passes, "views_per_item": 2 * args.num_augmentations,
        "batches_per_pass": len(data["test_run"]) // k_plus_1, "train_items": len(data["run"]),
        "test_items": len(data["test_run"]), "seed": args.seed,
        "run_seed": ckpt["args"].get("seed")})
    write_text(out, json.dumps(_plain(report), indent=2) + "\n")
    if args.save_features:
        torch.save(features, os.path.splitext(out)[0] + "_features.pt")
    for warning in report["warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in report["table"].items())
    print(f"{ckpt['script']} epoch {ckpt.get('epoch')}, K+1 = {k_plus_1}, "
          f"C = {report['settings']['num_classes']}: {values}\nwrote {out}")
    return report


# ------------------------------------------------------------------------------------------------
# Output helpers, table3 and coverage
# ------------------------------------------------------------------------------------------------

def _plain(value):
    """JSON-safe: non-finite floats become null (JSON has no inf/nan)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_text(path, text):
    """Write atomically: a temporary file, then os.replace."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_counts(path):
    """Per-class counts from a JSON list, or a dict name -> count (as imagenet_count.json)."""
    if not os.path.isfile(path):
        raise ValueError(f"class-count file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
        counts = [float(v) for v in (data.values() if isinstance(data, dict) else data)]
    except (ValueError, TypeError):
        raise ValueError(f"{path}: expected a JSON list or dict of per-class counts") from None
    if not counts or any(c <= 0 or not math.isfinite(c) for c in counts):
        raise ValueError(f"{path}: counts must be positive numbers")
    return counts


def table3(args):
    rows = [(name, C, float(expected_draws_exact(C)), paper) for name, C, paper in TABLE3]
    if args.imagenet_counts:
        counts = np.asarray(read_counts(args.imagenet_counts))
        probs = counts / math.fsum(counts.tolist())
        rows.append(("ImageNet", counts.size, expected_draws_to_cover(class_probs=probs),
                     TABLE3_IMAGENET))
    else:
        print("note: the paper's ImageNet row (7709, non-uniform classes) needs per-class "
              "training counts: --imagenet_counts FILE (imagenet_count.json is not in the "
              "authors' repository)", file=sys.stderr)
    print(f"{'dataset':<10} {'classes':>8} {'E[K+1]':>14} {'ceil':>7} {'paper':>7}")
    for name, C, expected, paper in rows:
        print(f"{name:<10} {C:>8} {expected:>14.6f} {math.ceil(expected):>7} {paper:>7}")
    return rows


def coverage(args):
    C = len(args.probs) if args.probs else args.classes
    pool = f"without replacement from {C} x {args.per_class}" if args.per_class else "i.i.d."
    print(f"C = {C} classes, draws {pool}; tau and E ln(1+Col) (uniform classes) are for K = "
          f"draws - 1 negatives")
    print(f"{'K+1':>7} {'upsilon':>16} {'1 - upsilon':>16} {'ln upsilon':>14} {'tau_K':>12} "
          f"{'E ln(1+Col)':>12}")
    rows = []
    for n in args.draws:
        log_u, complement = _coverage(n, None if args.probs else C, args.probs, args.per_class)
        tau = log_col = None
        if not args.probs and n >= 1:
            tau, _, log_col = _collision_terms(n - 1, C, args.per_class)
        rows.append({"draws": n, "upsilon": math.exp(log_u), "log_upsilon": log_u, "tau": tau,
                     "expected_log_collision": log_col})
        extra = "" if tau is None else f" {tau:>12.8g} {log_col:>12.8g}"
        print(f"{n:>7} {math.exp(log_u):>16.10g} {complement:>16.10g} {log_u:>14.8g}{extra}")
        if n < C:
            print(f"{PROG}: warning: {n} draws < {C} classes: no batch of {n} contains every "
                  f"class (upsilon = 0), so a bound divided by upsilon is vacuous",
                  file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------------
# plot: Figure 1 and Table 2 from a set of runs
# ------------------------------------------------------------------------------------------------

TABLE_ROWS = (("tau", "τ"), ("upsilon", "υ"),
              ("mu_acc", "μ acc (mean classifier, clean test)"), ("accuracy", "linear acc"),
              ("L_Info", "L_Info"), ("d", "d(f)"),
              ("curl_bound", "†bound"), ("curl_collision", "†Collision"), ("curl_L_sup", "†L_sup"),
              ("curl_L_sub", "†L_sub"), ("bound", "bound"), ("L_sup", "L_sup"), ("L_sub", "L_sub"),
              ("collision_bound", "Collision bound"),
              ("ln_curl_upper_bound", "ln †upper bound of L_sup"),
              ("ln_upper_bound", "ln upper bound of L_sup (notebook)"),
              ("ln_upper_bound_theorem", "ln upper bound of L_sup (theorem)"))
BARS = (("ln_curl_upper_bound", "Arora et al.", "tab:gray"),
        ("ln_upper_bound", "Ours (notebook)", "tab:blue"),
        ("ln_upper_bound_theorem", "Ours (theorem)", "tab:cyan"))
ACCURACY_FILE = "eval_nozawa.json"  # linear_eval.py RUN/last.pt --protocol nozawa (Figure 1)


def bounds_file(path):
    return os.path.join(path, "bounds.json") if os.path.isdir(path) else path


def load_runs(paths, accuracy_file, accuracy_key):
    """One dict per run: K+1, the table rows of its bounds.json, and "accuracy" = `accuracy_key`
    (dotted) of RUN_DIR/accuracy_file (default eval_nozawa.json's linear.top1, linear_eval.py's
    probe; a value <= 1 is read as a fraction). Raises ValueError with the file to fix."""
    runs = []
    for path in paths:
        file = bounds_file(path)
        try:
            with open(file) as f:
                report = json.load(f)
            row = dict(report["table"], k_plus_1=int(report["settings"]["k_plus_1"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{file} is not a bounds.json written by `bound.py evaluate`") \
                from None
        if accuracy_file:
            acc_path = os.path.join(os.path.dirname(os.path.abspath(file)), accuracy_file)
            try:
                with open(acc_path) as f:
                    value = json.load(f)
            except (OSError, json.JSONDecodeError):
                raise ValueError(f"cannot read {acc_path} (run `linear_eval.py RUN/last.pt "
                                 f"--protocol nozawa` first, or give --accuracy_file '')") from None
            for part in accuracy_key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if not isinstance(value, (int, float)):
                raise ValueError(f"{acc_path} has no number at key {accuracy_key!r}")
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
            values = [r[key] for r in groups[k]
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out[k][key] = (float(np.mean(values)), std, len(values))
    return out


def figure(groups, accuracy_label):
    """Figure 1: ln upper bounds of L_sup as bars per K+1 (mean, std over seeds) and the accuracy
    on a second axis. Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ks = list(groups)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x, width = np.arange(len(ks)), 0.8 / len(BARS)
    for i, (key, label, color) in enumerate(BARS):
        heights = [groups[k].get(key, (np.nan,))[0] for k in ks]
        errors = [groups[k].get(key, (0, 0.0))[1] for k in ks]
        ax.bar(x + (i - (len(BARS) - 1) / 2) * width, heights, width, yerr=errors, label=label,
               color=color)
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set_xlabel("K + 1")
    # ln of the bound on a linear axis = the paper's log-scale bars, finite where it overflows
    ax.set_ylabel("ln (upper bound of supervised loss)")
    handles, labels = ax.get_legend_handles_labels()
    if any("accuracy" in groups[k] for k in ks):
        acc = ax.twinx()
        acc.errorbar(x, [groups[k].get("accuracy", (np.nan,))[0] for k in ks],
                     yerr=[groups[k].get("accuracy", (0, 0.0))[1] for k in ks], color="tab:red",
                     marker="o", label=accuracy_label)
        acc.set_ylabel(accuracy_label)
        handles, labels = handles + acc.get_legend_handles_labels()[0], labels + [accuracy_label]
    ax.legend(handles, labels, loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def plot_path(args):
    """--out, else the directory holding the runs (runs/fig1 for runs/fig1/k16 ... k128; the run
    directory for one run), figure1.png (figure1_sub2.png for bounds_sub2.json files)."""
    if args.out:
        return args.out
    files = [os.path.abspath(bounds_file(path)) for path in args.runs]
    folder = os.path.commonpath([os.path.dirname(file) for file in files])
    stem = os.path.splitext(os.path.basename(files[0]))[0]
    name = stem.replace("bounds", "figure1", 1) if stem.startswith("bounds") else "figure1"
    return os.path.join(folder, name + ".png")


def plot(args):
    groups = group_runs(load_runs(args.runs, args.accuracy_file, args.accuracy_key))
    out = plot_path(args)
    if not writable(out):
        raise ValueError(f"cannot write the figure {out} (give --out)")
    ks = list(groups)
    lines = ["| row | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for key, label in TABLE_ROWS:
        cells = [f"{groups[k][key][0]:.2f}" if key in groups[k] else "–" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if args.markdown:
        write_text(args.markdown, "\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib.pyplot as plt
    label = "linear probe top-1 (%)" if args.accuracy_key == "linear.top1" else \
        f"{args.accuracy_key} (%)"
    fig = figure(groups, label)
    root, ext = os.path.splitext(out)
    fig.savefig(root + ".tmp" + ext, dpi=150)  # savefig picks the format from the extension
    plt.close(fig)
    os.replace(root + ".tmp" + ext, out)
    print(f"wrote {out}" + (f", {args.markdown}" if args.markdown else ""))
    return groups


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit 2, from rank 0 alone)."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": argparse.ArgumentDefaultsHelpFormatter, **kwargs})

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _int(minimum):
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def get_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = Parser(prog=PROG, description="Nozawa & Sato's analysis of negative samples.",
               formatter_class=fmt)
    # add_subparsers makes its parsers with type(p): Parser, one-line errors for them too
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{table3,coverage,evaluate,plot}")
    t = sub.add_parser("table3", help="Table 3: expected K+1 to see every class",
                       formatter_class=fmt)
    t.add_argument("--imagenet_counts", default=None,
                   help="per-class training counts of ImageNet (JSON list or dict) to add its row")

    c = sub.add_parser("coverage", help="upsilon (all classes seen), tau and E ln(1+Col) for "
                                        "given K+1", formatter_class=fmt)
    c.add_argument("--classes", type=_int(1), default=None, help="C, uniform classes")
    c.add_argument("--probs", type=float, nargs="+", default=None,
                   help="class probabilities (must sum to 1)")
    c.add_argument("--per_class", type=_int(1), default=None,
                   help="draw without replacement from a balanced pool of this many items per "
                        "class (uniform only)")
    c.add_argument("--draws", type=int, nargs="+", required=True,
                   help="numbers of draws n = K+1 (any size: the time does not grow with n)")

    e = sub.add_parser("evaluate", help="the bound loop on a checkpoint -> bounds.json",
                       formatter_class=fmt)
    e.add_argument("--checkpoint", required=True,
                   help="last.pt of one of the project's training scripts")
    e.add_argument("--data_dir", default=None, help="data root; if unset, the run's own")
    e.add_argument("--out", default=None, help="output JSON; if unset, bounds.json next to the "
                   "checkpoint (bounds_sub<k>.json with --sub_classes k > 1)")
    e.add_argument("--save_features", action="store_true",
                   help="also save f-bar and mu to <out>_features.pt")
    e.add_argument("--batch", type=_int(2), default=None,
                   help="K+1; if unset, the run's per-loss batch (per process with --negatives "
                        "local, per chunk)")
    e.add_argument("--temperature", type=float, default=None,
                   help="temperature t; if unset, the run's (else 0.5)")
    e.add_argument("--sub_classes", type=_int(1), default=1,
                   help="latent sub-classes per class: k-means (5 restarts) on each class's "
                        "training f-bar (2: the paper's second AG News figure and 'mean acc via "
                        "sub-class')")
    e.add_argument("--passes", type=_int(1), default=10,
                   help="shuffled passes over the test split (their epochs)")
    e.add_argument("--num_augmentations", type=_int(1), default=5,
                   help="f-bar is the mean of 2 x this many augmented views (the authors: 5)")
    e.add_argument("--test_subset", type=_int(0), default=0,
                   help="use N test items evenly spaced (0: all)")
    e.add_argument("--train_subset", type=_int(0), default=0,
                   help="class means from N training items (0: all)")
    e.add_argument("--feature_batch", type=_int(1), default=1024, help="batch for the f-bar passes")
    e.add_argument("--workers", type=_int(0), default=4, help="data-loading processes")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of the augmentations, batch order and k-means")

    q = sub.add_parser("plot", help="Figure 1 and Table 2 from runs that differ in K",
                       formatter_class=fmt)
    q.add_argument("runs", nargs="+", help="run directories with bounds.json (or bounds files)")
    q.add_argument("--out", default=None, help="the figure (png, pdf, svg); if unset, "
                   "figure1.png in the directory holding the runs (figure1_sub2.png for "
                   "bounds_sub2.json files)")
    q.add_argument("--markdown", default=None, help="also write Table 2 as Markdown here")
    q.add_argument("--accuracy_file", default=ACCURACY_FILE,
                   help="JSON in each run directory holding the accuracy axis ('' for none), "
                        "written by linear_eval.py RUN/last.pt --protocol nozawa")
    q.add_argument("--accuracy_key", default="linear.top1",
                   help="dotted key of the accuracy in --accuracy_file")
    return p


def writable(path):
    return os.access(os.path.dirname(os.path.abspath(path)), os.W_OK) and not os.path.isdir(path)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.command == "coverage":
        if bool(args.classes) == bool(args.probs):
            parser.error("give exactly one of --classes, --probs")
        if min(args.draws) < 0:
            parser.error(f"--draws must be >= 0, got {min(args.draws)}")
        if args.per_class and not args.classes:
            parser.error("--per_class needs --classes (a balanced pool)")
    if args.command == "evaluate":
        t = args.temperature
        if t is not None and not (math.isfinite(t) and t > 0):
            parser.error(f"--temperature must be finite and > 0, got {t}")
        return evaluate(args, parser)
    if args.command == "plot":
        for flag, path in (("--out", args.out), ("--markdown", args.markdown)):
            if path and not writable(path):
                parser.error(f"cannot write {flag} {path}")
    try:
        return {"table3": table3, "coverage": coverage, "plot": plot}[args.command](args)
    except ValueError as err:  # a library function's message is the user's message here
        parser.error(" ".join(str(err).split()))


if __name__ == "__main__":
    main()

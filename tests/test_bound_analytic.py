"""bound.py, analytic part: coverage (upsilon), expected draws (Table 3), tau and E ln(1 + Col)
against exact rationals computed here, Monte Carlo and the spec's oracle values; the table3 and
coverage commands (bad command lines: test_eval_errors.py)."""
import itertools
import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest

import bound


def log_fraction(x):
    """ln of a positive Fraction to ~1e-15 absolute, also far below the float range."""
    shift = x.denominator.bit_length() - x.numerator.bit_length()
    return math.log(float(x * Fraction(2) ** shift)) - shift * math.log(2)


def exact_coverage(n, C, m=None):
    """upsilon by inclusion-exclusion in rationals (bound_and_nlp.md 2.7): i.i.d.
    sum_j (-1)^j binom(C, j) (1 - j/C)^n; m per class without replacement
    sum_j (-1)^j binom(C, j) binom(Cm - jm, n) / binom(Cm, n)."""
    if m is None:
        return Fraction(sum((-1) ** j * math.comb(C, j) * (C - j) ** n for j in range(C + 1)),
                        C ** n)
    return Fraction(sum((-1) ** j * math.comb(C, j) * math.comb(C * m - j * m, n)
                        for j in range(C + 1)), math.comb(C * m, n))


def complement_bracket(n, C, terms):
    """Bonferroni: the partial sums of 1 - upsilon = sum_{j >= 1} (-1)^(j+1) binom(C, j)
    (1 - j/C)^n alternate around it; exact rationals of the last two kept."""
    partial, sums = Fraction(0), []
    for j in range(1, terms + 1):
        partial += (-1) ** (j + 1) * math.comb(C, j) * Fraction(C - j, C) ** n
        sums.append(partial)
    return min(sums[-2:]), max(sums[-2:])


def stirling2(n, k):
    """S(n, k) by the recurrence S(n, k) = k S(n-1, k) + S(n-1, k-1), in integers."""
    row = [1] + [0] * k
    for _ in range(n):
        row = [0] + [j * row[j] + row[j - 1] for j in range(1, k + 1)]
    return row[k]


def exact_nonuniform(n, probs):
    """Inclusion-exclusion over subsets, in rationals: sum_S (-1)^|S| (1 - p(S))^n."""
    return sum((-1) ** r * (1 - sum(probs[i] for i in subset)) ** n
               for r in range(len(probs) + 1)
               for subset in itertools.combinations(range(len(probs)), r))


@pytest.mark.parametrize("n,C,m", [(32, 10, None), (63, 10, None), (128, 10, None),
                                   (20, 10, None), (10, 10, None), (11, 10, None), (3, 2, None),
                                   (256, 100, None), (512, 100, None), (1024, 100, None),
                                   (128, 100, None), (460, 100, None), (64, 10, 20), (33, 10, 5),
                                   (512, 100, 100), (128, 100, 100), (299, 100, 3),
                                   (40, 4, 10), (7, 2, 4)])
def test_coverage_matches_exact_rationals(n, C, m):
    exact = exact_coverage(n, C, m)
    assert bound.coverage_probability(n, C, per_class=m) == pytest.approx(float(exact),
                                                                          rel=1e-13, abs=0)
    assert bound.coverage_complement(n, C, per_class=m) == pytest.approx(float(1 - exact),
                                                                         rel=1e-12, abs=1e-300)
    assert bound.log_coverage_probability(n, C, per_class=m) == pytest.approx(
        log_fraction(exact), abs=1e-13)


def test_exact_inclusion_exclusion_is_the_stirling_identity():
    # upsilon(C, N) = C! S(N, C) / C^N: an independent exact route
    for C, n in [(3, 7), (10, 32), (10, 10), (7, 50)]:
        assert bound.coverage_probability_exact(n, C) == Fraction(
            math.factorial(C) * stirling2(n, C), C ** n)


def test_coverage_at_the_largest_sizes_and_far_below_float_range():
    # the largest case the API promises (C = 1000, n = 10^4): inside the exact Bonferroni bracket
    low, high = complement_bracket(10000, 1000, 12)
    assert (high - low) / low < 1e-14
    for value in (bound.coverage_complement(10000, 1000),
                  -math.expm1(bound.log_coverage_probability(10000,
                                                             class_probs=[1e-3] * 1000))):
        assert float(low) * (1 - 1e-12) <= value <= float(high) * (1 + 1e-12)
    # upsilon(1000, 1000) = 1000!/1000^1000 ~ e^-995.6 underflows a float: the log stays exact
    assert bound.coverage_probability(1000, 1000) == 0.0
    assert bound.log_coverage_probability(1000, 1000) == pytest.approx(
        log_fraction(Fraction(math.factorial(1000), 1000 ** 1000)), abs=1e-11)
    exact = Fraction(math.factorial(1000) * stirling2(1001, 1000), 1000 ** 1001)
    assert bound.log_coverage_probability(1001, 1000) == pytest.approx(log_fraction(exact),
                                                                       abs=1e-11)


def test_huge_numbers_of_draws_take_no_time():
    # 10^15 draws: no sum over draws (C (1 - 1/C)^n, the complement's size, underflows)
    start = time.perf_counter()
    assert bound.coverage_probability(10 ** 15, 10) == 1.0
    assert bound.coverage_complement(10 ** 15, 10) == 0.0
    assert bound.coverage_probability(10 ** 15, class_probs=[0.5, 0.3, 0.2]) == 1.0
    assert bound.collision_probability(10 ** 15 - 1, 10) == 1.0
    # E ln(1 + Col), Col ~ Binomial(K, 1/C): ln(1 + K/C) up to the delta method's -var/(2 mean^2)
    K = 10 ** 15 - 1
    mean, var = K / 10, K * 0.1 * 0.9
    assert bound.expected_log_collision(K, 10) == pytest.approx(
        math.log1p(mean) - var / (2 * (1 + mean) ** 2), rel=1e-15)
    assert time.perf_counter() - start < 2.0
    # where the complement is still a float: inside the exact Bonferroni bracket
    low, high = complement_bracket(4000, 10, 4)
    value = Fraction(bound.coverage_complement(4000, 10))
    assert low * (1 - Fraction(1, 10 ** 13)) <= value <= high * (1 + Fraction(1, 10 ** 13))


def test_spec_values_c10_to_8_digits_and_the_notebook_printout():
    # bound_and_nlp.md 8.1: upsilon(10, n) for n = v and v + 1; near 1 given as 1 - upsilon
    table = {10: (3.6288000e-4, 1.9958400e-3), 20: (0.21473732, 0.25832387),
             32: (0.69097563, 0.71857287), 64: (0.98823805, 0.98941142)}
    for v, expected in table.items():
        for n, value in zip((v, v + 1), expected):
            assert abs(bound.coverage_probability(n, 10) / value - 1) < 5e-8, n
    near_one = {128: (1.3900828e-5, 1.2510747e-5), 256: (1.9323350e-11, 1.7391015e-11),
                512: (3.7339185e-23, 3.3605266e-23)}
    for v, expected in near_one.items():
        for n, value in zip((v, v + 1), expected):
            assert abs(bound.coverage_complement(n, 10) / value - 1) < 5e-8, n
    assert bound.coverage_probability(10, 10) == pytest.approx(math.factorial(10) / 10 ** 10,
                                                               rel=1e-14)
    printed = {32: "0.6909756", 63: "0.9869351", 128: "0.9999861", 256: "1.0000000",
               512: "1.0000000"}
    for n, text in printed.items():
        assert f"{bound.coverage_probability(n, 10):.7f}" == text


def test_the_notebook_c100_values_are_cancellation_errors():
    # coupon.ipynb's float64 alternating sum printed these; each is ~4.5e-4 too large
    printed = {128: 0.0004517171443332115, 256: 0.0005750103110269027, 384: 0.10845377001311465,
               512: 0.5531327628081966, 640: 0.8510308810769567, 768: 0.956899070354311,
               896: 0.9882414056661265, 1024: 0.9970649738141432}
    for n, value in printed.items():
        ours = bound.coverage_probability(n, 100)
        assert ours == pytest.approx(float(exact_coverage(n, 100)), rel=1e-13)
        assert 4.4e-4 < value - ours < 4.6e-4, (n, value - ours)
    assert bound.coverage_probability(128, 100) < 1e-20  # "many orders of magnitude smaller"


def test_nonuniform_route_with_uniform_probabilities():
    for C, n in [(10, 32), (10, 128), (100, 512), (100, 256), (4, 9), (4, 200)]:
        exact = exact_coverage(n, C)
        assert bound.coverage_probability(n, class_probs=[1.0 / C] * C) == pytest.approx(
            float(exact), rel=1e-12)
    for C, m, n in [(10, 20, 64), (100, 100, 512)]:  # the pool version, Poissonised
        assert bound._log_coverage_poissonized(n, counts=[m] * C) == pytest.approx(
            log_fraction(exact_coverage(n, C, m)), abs=1e-12)


def test_nonuniform_coverage_against_exact_subsets():
    rng = np.random.default_rng(0)
    for C, n in [(3, 5), (5, 20), (8, 40), (10, 100), (12, 60), (3, 400)]:
        weights = rng.integers(1, 20, C)
        probs = [Fraction(int(w), int(weights.sum())) for w in weights]
        exact = exact_nonuniform(n, probs)
        value = bound.coverage_complement(n, class_probs=[float(p) for p in probs])
        assert value == pytest.approx(float(1 - exact), rel=1e-11)


def test_coverage_agrees_with_monte_carlo_within_4_sigma():
    rng = np.random.default_rng(1)
    trials = 200_000

    def check(p_hat, p):
        assert abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / trials), (p_hat, p)

    draws = rng.integers(0, 10, size=(trials, 32))  # i.i.d. uniform, C = 10, K+1 = 32
    seen = np.zeros((trials, 10), dtype=bool)
    seen[np.arange(trials)[:, None], draws] = True
    check(seen.all(axis=1).mean(), bound.coverage_probability(32, 10))
    probs = np.array([0.4, 0.3, 0.2, 0.1])  # non-uniform, K+1 = 12
    draws = rng.choice(4, size=(trials, 12), p=probs)
    seen = np.zeros((trials, 4), dtype=bool)
    seen[np.arange(trials)[:, None], draws] = True
    check(seen.all(axis=1).mean(), bound.coverage_probability(12, class_probs=probs))
    pool = np.repeat(np.arange(5), 4)  # without replacement: C = 5, 4 per class, K+1 = 8
    batches = rng.permuted(np.tile(pool, (trials, 1)), axis=1)[:, :8]
    seen = np.zeros((trials, 5), dtype=bool)
    seen[np.arange(trials)[:, None], batches] = True
    check(seen.all(axis=1).mean(), bound.coverage_probability(8, 5, per_class=4))
    # tau and E ln(1 + Col) of the anchor (column 0) among its 7 negatives, same pool
    col = (batches[:, 1:] == batches[:, :1]).sum(axis=1)
    check((col >= 1).mean(), bound.collision_probability(7, 5, per_class=4))
    values = np.log1p(col)
    assert abs(values.mean() - bound.expected_log_collision(7, 5, per_class=4)) < \
        4 * values.std() / math.sqrt(trials)


def test_table3_and_expected_draws():
    assert [math.ceil(bound.expected_draws_exact(C)) for C in (2, 4, 10, 100, 3029)] == \
        [3, 9, 30, 519, 26030]
    oracle = {2: 3.0, 4: 8.3333333, 10: 29.289683, 100: 518.73775, 3029: 26029.313,
              1000: 7485.4709}
    for C, value in oracle.items():
        assert abs(bound.expected_draws_to_cover(C) / value - 1) < 5e-8
        # the Poissonisation integral (the non-uniform route) with uniform probabilities
        harmonic = sum(Fraction(C, k) for k in range(1, C + 1))  # C H_C
        assert bound.expected_draws_to_cover(class_probs=[1.0 / C] * C) == pytest.approx(
            float(harmonic), rel=1e-12)
    assert bound.expected_draws_exact(2) == 3 and bound.expected_draws_exact(4) == Fraction(25, 3)
    # rho = (1/2, 1/4, 1/4): E[T] = sum over non-empty S of (-1)^(|S|+1) / p(S) = 19/3
    assert bound.expected_draws_to_cover(class_probs=[0.5, 0.25, 0.25]) == pytest.approx(
        19 / 3, rel=1e-13)
    rng = np.random.default_rng(2)
    for C in (5, 9):
        weights = rng.integers(1, 50, C)
        probs = [Fraction(int(w), int(weights.sum())) for w in weights]
        exact = sum((-1) ** (r + 1) / sum(probs[i] for i in subset)
                    for r in range(1, C + 1) for subset in itertools.combinations(range(C), r))
        assert bound.expected_draws_to_cover(class_probs=[float(p) for p in probs]) == \
            pytest.approx(float(exact), rel=1e-12)
    # uniform classes minimise the expected completion time
    skewed = np.linspace(1, 2, 1000)
    assert bound.expected_draws_to_cover(class_probs=skewed / skewed.sum()) > \
        bound.expected_draws_to_cover(1000)


def test_collisions_against_exact_rationals():
    for K, C, m in ((7, 5, 4), (30, 3, 12), (11, 4, 3)):
        M = C * m
        pmf = [Fraction(math.comb(m - 1, c) * math.comb(M - m, K - c), math.comb(M - 1, K))
               for c in range(K + 1)]
        assert bound.collision_probability(K, C, per_class=m) == pytest.approx(
            float(1 - pmf[0]), rel=1e-14)
        assert bound.expected_log_collision(K, C, per_class=m) == pytest.approx(
            math.fsum(float(p) * math.log1p(c) for c, p in enumerate(pmf)), rel=1e-14)
    K, C = 31, 10
    pmf_b = [math.comb(K, c) * Fraction(1, C) ** c * Fraction(C - 1, C) ** (K - c)
             for c in range(K + 1)]
    assert bound.collision_probability(K, C) == pytest.approx(1 - 0.9 ** 31, rel=1e-14)
    assert bound.expected_log_collision(K, C) == pytest.approx(
        math.fsum(float(p) * math.log1p(c) for c, p in enumerate(pmf_b)), rel=1e-13)
    assert bound.collision_probability(0, 10) == 0.0 and bound.expected_log_collision(0, 10) == 0
    assert bound.collision_probability(5, 1) == 1.0
    assert bound.expected_log_collision(5, 1) == pytest.approx(math.log(6))
    assert bound.collision_probability(3, 1, per_class=4) == 1.0  # every negative collides


def test_published_collision_and_tau_rows_are_hypergeometric():
    # Tables 2, 4, 5 and the AG News table: "Collision" and tau rows, batches drawn without
    # replacement from the balanced test split (m per class), to the printed 2 decimals
    rows = {(10, 1000): {32: 1.32, 64: 1.93, 128: 2.58, 256: 3.26, 512: 3.94},
            (100, 100): {128: 0.69, 256: 1.15, 384: 1.48, 512: 1.73, 640: 1.93, 768: 2.10,
                         896: 2.24, 1024: 2.37},
            (4, 1900): {16: 1.49, 32: 2.13, 64: 2.80, 128: 3.48, 256: 4.16, 512: 4.85}}
    for (C, m), values in rows.items():
        for k_plus_1, printed in values.items():
            value = bound.expected_log_collision(k_plus_1 - 1, C, per_class=m)
            assert round(value, 2) == printed, (C, k_plus_1)
    taus = {(10, 1000): {32: 0.96, 128: 1.00, 256: 1.00, 512: 1.00},
            (100, 100): {128: 0.72, 256: 0.92, 512: 0.99, 1024: 1.00},
            (4, 1900): {16: 0.99, 32: 1.00, 512: 1.00}}
    for (C, m), values in taus.items():
        for k_plus_1, printed in values.items():
            value = bound.collision_probability(k_plus_1 - 1, C, per_class=m)
            assert round(value, 2) == printed, (C, k_plus_1)
    # the i.i.d. (binomial) model misses CIFAR-100 at K+1 = 640, 896, 1024 by 0.01
    misses = [k for k in (640, 896, 1024)
              if round(bound.expected_log_collision(k - 1, 100), 2) != rows[(100, 100)][k]]
    assert misses == [640, 896, 1024]


@pytest.mark.parametrize("call,fragment", [
    (lambda: bound.coverage_probability(-1, 10), "must be an integer >= 0"),
    (lambda: bound.coverage_probability(5.5, 10), "must be an integer >= 0"),
    (lambda: bound.coverage_probability(10, 0), "num_classes must be an integer >= 1"),
    (lambda: bound.coverage_probability(10, class_probs=[0.5, 0.4]), "sum to 0.9, not 1"),
    (lambda: bound.coverage_probability(10, class_probs=[1.0, 0.0]), "must be positive"),
    (lambda: bound.coverage_probability(10, class_probs=[0.5, 0.5], per_class=3),
     "cannot be combined"),
    (lambda: bound.coverage_probability(31, 10, per_class=3),
     "without replacement from a pool of 10 x 3"),
    (lambda: bound.coverage_probability(10), "give num_classes"),
    (lambda: bound.expected_draws_to_cover(class_probs=[0.7, 0.7]), "not 1"),
    (lambda: bound.collision_probability(-2, 10), "negatives must be an integer >= 0"),
    (lambda: bound.expected_log_collision(20, 10, per_class=2), "without replacement"),
])
def test_bad_arguments_raise_value_error(call, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        call()
    assert bound.coverage_probability(9, 10) == 0.0  # fewer draws than classes: 0, not an error


def run_main(argv, capsys):
    capsys.readouterr()
    code = 0
    try:
        bound.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table3_command(tmp_path, capsys):
    code, out, err = run_main(["table3"], capsys)
    assert code == 0 and "7709" in err  # says how to add the ImageNet row
    rows = [line.rsplit(None, 4) for line in out.splitlines()[1:]]
    assert [(r[0], int(r[3]), int(r[4])) for r in rows] == [
        ("Binary", 3, 3), ("AG News", 9, 9), ("CIFAR-10", 30, 30), ("CIFAR-100", 519, 519),
        ("Wiki-3029", 26030, 26030)]
    assert float(rows[3][2]) == pytest.approx(518.737752, abs=1e-6)
    # a class-count file adds the non-uniform ImageNet-style row (here 3 classes, 2:1:1 -> 19/3)
    (tmp_path / "counts.json").write_text(json.dumps({"a": 600, "b": 300, "c": 300}))
    code, out, _ = run_main(["table3", "--imagenet_counts", str(tmp_path / "counts.json")], capsys)
    assert code == 0 and "ImageNet" in out and "6.333333" in out


def test_coverage_command(capsys):
    rows = bound.main(["coverage", "--classes", "100", "--draws", "50", "128", "512"])
    err = capsys.readouterr().err
    assert "warning" in err and "vacuous" in err and "50 draws < 100 classes" in err
    assert [r["draws"] for r in rows] == [50, 128, 512] and rows[0]["upsilon"] == 0.0
    exact = Fraction(math.factorial(100) * stirling2(128, 100), 100 ** 128)
    assert rows[1]["upsilon"] == pytest.approx(float(exact), rel=1e-13)
    assert rows[2]["tau"] == pytest.approx(1 - 0.99 ** 511, rel=1e-14)
    code, out, _ = run_main(["coverage", "--probs", "0.5", "0.25", "0.25", "--draws", "4"], capsys)
    exact = exact_nonuniform(4, [Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)])
    assert code == 0 and f"{float(exact):.10g}" in out

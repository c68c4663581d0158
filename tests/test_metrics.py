"""Tests of deepmil_jax.metrics against hand counts and a brute-force Mann-Whitney AUC."""

import itertools
import math

import numpy as np
import pytest

from deepmil_jax.metrics import binary_metrics, choose_threshold


def _auc_by_pairs(labels, probs):
    """AUC as the Mann-Whitney statistic: P(p_pos > p_neg) + P(p_pos == p_neg) / 2, by pairs."""
    pos = [p for y, p in zip(labels, probs, strict=True) if y == 1]
    neg = [p for y, p in zip(labels, probs, strict=True) if y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _youden(labels, probs, t):
    labels, probs = np.asarray(labels), np.asarray(probs)
    predicted = probs >= t
    sens = np.sum(predicted & (labels == 1)) / np.sum(labels == 1)
    spec = np.sum(~predicted & (labels == 0)) / np.sum(labels == 0)
    return sens + spec - 1.0


def test_binary_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = np.array([0.9, 0.5, 0.2, 0.5, 0.1, 0.7, 0.3, 0.6])
    m = binary_metrics(labels, probs, 0.5)  # p >= 0.5 is positive: the two 0.5s count
    # positives 0.9 0.5 0.2 0.6 -> 3 of 4 predicted; negatives 0.5 0.1 0.7 0.3 -> 2 of 4 right
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["threshold"] == 0.5
    assert m["auc"] == pytest.approx(_auc_by_pairs(labels, probs))
    # by hand: 0.9 beats all 4; 0.5 beats 0.1, 0.3 and ties 0.5 -> 2.5; 0.2 beats 0.1 -> 1;
    # 0.6 beats 0.5, 0.1, 0.3 -> 3.  (4 + 2.5 + 1 + 3) / 16
    assert m["auc"] == pytest.approx(10.5 / 16)
    assert all(isinstance(v, float) for v in m.values())


def test_binary_metrics_threshold_edges():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([0.2, 0.8, 0.4, 0.6])
    everything = binary_metrics(labels, probs, 0.0)
    assert everything["sensitivity"] == 1.0 and everything["specificity"] == 0.0
    assert everything["accuracy"] == 0.5
    nothing = binary_metrics(labels, probs, 1.0)
    assert nothing["sensitivity"] == 0.0 and nothing["specificity"] == 1.0
    perfect = binary_metrics(labels, probs, 0.5)
    assert perfect["auc"] == 1.0 and perfect["accuracy"] == 1.0
    # float and boolean labels mean the same
    assert binary_metrics(labels.astype(float), probs, 0.5) == perfect
    assert binary_metrics(labels.astype(bool), probs, 0.5) == perfect


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_auc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=30)
    labels[:2] = [0, 1]
    probs = np.round(rng.uniform(size=30), 1)  # many ties
    t = float(rng.uniform())
    m = binary_metrics(labels, probs, t)
    assert m["auc"] == pytest.approx(_auc_by_pairs(labels, probs))
    predicted = probs >= t
    assert m["accuracy"] == pytest.approx(np.mean(predicted == (labels == 1)))


def test_binary_metrics_with_one_class_is_nan_where_undefined():
    only_neg = binary_metrics(np.zeros(3), np.array([0.1, 0.6, 0.7]), 0.5)
    assert math.isnan(only_neg["auc"]) and math.isnan(only_neg["sensitivity"])
    assert only_neg["specificity"] == pytest.approx(1 / 3)
    assert only_neg["accuracy"] == pytest.approx(1 / 3)
    only_pos = binary_metrics(np.ones(3), np.array([0.1, 0.6, 0.7]), 0.5)
    assert math.isnan(only_pos["auc"]) and math.isnan(only_pos["specificity"])
    assert only_pos["sensitivity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(8))
def test_choose_threshold_maximises_youden_over_every_cut(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 25))
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    probs = np.round(rng.uniform(size=n), 2)
    t = choose_threshold(labels, probs)
    # every distinct cut of the data: each probability, and "nothing positive"
    best = max(_youden(labels, probs, c) for c in [*np.unique(probs), np.inf])
    assert _youden(labels, probs, t) == pytest.approx(best)
    assert t in set(probs.tolist()) | {1.0}


def test_choose_threshold_by_hand():
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
    # cuts: 0.6 -> sens 2/3, spec 1 (J 2/3); 0.5 -> 2/3, 3/4 (J 5/12); 0.4 -> 1, 3/4 (J 3/4, best)
    assert choose_threshold(labels, probs) == 0.4
    assert choose_threshold(np.array([0, 1, 1]), np.array([0.2, 0.5, 0.8])) == 0.5


def test_choose_threshold_edge_cases():
    assert choose_threshold(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4])) == 0.5
    assert choose_threshold(np.ones(2), np.array([0.1, 0.2])) == 0.5
    # a classifier that is always wrong: the best cut predicts nothing positive, threshold 1.0
    assert choose_threshold(np.array([0, 1]), np.array([0.9, 0.1])) == 1.0
    assert isinstance(choose_threshold(np.array([0, 1]), np.array([0.2, 0.8])), float)


def test_one_class_metrics_are_nan_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of an empty slice", no undefined-AUC warning
        for labels in (np.zeros(3), np.ones(3)):
            m = binary_metrics(labels, np.array([0.1, 0.6, 0.7]), 0.5)
            assert math.isnan(m["auc"])
            assert math.isnan(m["sensitivity"]) == (labels[0] == 0)
            assert math.isnan(m["specificity"]) == (labels[0] == 1)


# ---------------------------------------------------------------------------------------------
# The statistics of the report: bootstrap CI, Brier score, reliability, DeLong's test


def _two_normals(seed, n_pos, n_neg, d):
    """Negatives ~ N(0, 1), positives ~ N(d, 1): the true AUC is Phi(d / sqrt(2))."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    return labels, scores


def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_bootstrap_auc_ci_is_reproducible_and_brackets_the_auc():
    from deepmil_jax.metrics import bootstrap_auc_ci

    labels, scores = _two_normals(0, 60, 90, 1.0)
    ci = bootstrap_auc_ci(labels, scores, n=500, seed=3)
    assert ci == bootstrap_auc_ci(labels, scores, n=500, seed=3)
    assert ci != bootstrap_auc_ci(labels, scores, n=500, seed=4)
    assert ci[0] < _auc_by_pairs(labels, scores) < ci[1]
    narrow = bootstrap_auc_ci(labels, scores, n=500, seed=3, level=0.5)
    assert ci[0] < narrow[0] < narrow[1] < ci[1]
    # perfectly separated: every stratified resample has AUC 1
    assert bootstrap_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n=50) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_auc_ci([1, 1], [0.2, 0.3]))


def test_bootstrap_auc_ci_covers_the_true_auc_of_two_normals():
    from deepmil_jax.metrics import bootstrap_auc_ci

    true_auc = _phi(1.0 / math.sqrt(2))  # 0.760
    covered, widths = 0, []
    for seed in range(20):
        labels, scores = _two_normals(seed, 150, 150, 1.0)
        low, high = bootstrap_auc_ci(labels, scores, n=400, seed=seed)
        covered += low <= true_auc <= high
        widths.append(high - low)
    assert covered >= 16  # nominal 19 of 20
    # the AUC's standard error here is about 0.028 (Hanley-McNeil): a 95% interval ~ 0.11 wide
    assert 0.08 < np.mean(widths) < 0.14


def test_brier_score_by_hand_and_against_sklearn():
    from sklearn.metrics import brier_score_loss

    from deepmil_jax.metrics import brier_score

    assert brier_score([1, 0, 1], [0.9, 0.2, 0.4]) == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    assert brier_score([0, 1], [0.5, 0.5]) == 0.25
    rng = np.random.default_rng(0)
    labels, probs = rng.integers(0, 2, 50), rng.uniform(size=50)
    assert brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, probs))


def test_reliability_by_hand():
    from deepmil_jax.metrics import reliability

    probs = [0.05, 0.15, 0.12, 0.95, 1.0, 0.5, 0.1]
    labels = [0, 0, 1, 1, 1, 0, 1]
    table = reliability(labels, probs, bins=10)
    # [0, .1): 0.05 | [.1, .2): 0.15 0.12 0.1 | [.5, .6): 0.5 | [.9, 1]: 0.95 1.0
    assert table["count"].tolist() == [1, 3, 0, 0, 0, 1, 0, 0, 0, 2]
    filled = table["count"] > 0
    assert table["mean_predicted"][filled] == pytest.approx([0.05, 0.37 / 3, 0.5, 0.975])
    assert table["observed"][filled] == pytest.approx([0.0, 2 / 3, 0.0, 1.0])
    assert np.isnan(table["observed"][~filled]).all()
    assert table["edges"] == pytest.approx(np.linspace(0, 1, 11))


def test_reliability_agrees_with_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    from deepmil_jax.metrics import reliability

    rng = np.random.default_rng(1)
    probs = rng.uniform(size=200) ** 2
    labels = (rng.uniform(size=200) < probs).astype(int)
    table = reliability(labels, probs, bins=8)
    observed, predicted = calibration_curve(labels, probs, n_bins=8, strategy="uniform")
    filled = table["count"] > 0
    assert table["observed"][filled] == pytest.approx(observed)
    assert table["mean_predicted"][filled] == pytest.approx(predicted)
    assert table["count"].sum() == 200


def _delong_by_placements(labels, a, b):
    """DeLong 1988 written plainly: placement values by O(m n) pairs, 2x2 covariances, z."""
    labels = np.asarray(labels)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    m, n = len(pos), len(neg)
    v10 = np.array([[np.mean([psi(s[i], s[j]) for j in neg]) for i in pos] for s in (a, b)])
    v01 = np.array([[np.mean([psi(s[i], s[j]) for i in pos]) for j in neg] for s in (a, b)])
    auc = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (auc[0] - auc[1]) / math.sqrt(var)
    return auc[0], auc[1], math.erfc(abs(z) / math.sqrt(2))


@pytest.mark.parametrize("seed", range(4))
def test_paired_auc_test_matches_placement_values(seed):
    from deepmil_jax.metrics import paired_auc_test

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    a = np.round(labels * 0.3 + rng.uniform(size=40), 1)  # ties within and across classes
    b = np.round(labels * 0.1 + rng.uniform(size=40), 1)
    got = paired_auc_test(labels, a, b)
    assert got == pytest.approx(_delong_by_placements(labels, a, b))
    assert got[0] == pytest.approx(_auc_by_pairs(labels, a))
    assert got[1] == pytest.approx(_auc_by_pairs(labels, b))
    assert paired_auc_test(labels, b, a)[2] == pytest.approx(got[2])


def test_paired_auc_test_identical_and_clearly_different():
    from deepmil_jax.metrics import paired_auc_test

    labels, good = _two_normals(0, 80, 80, 2.0)
    assert paired_auc_test(labels, good, good)[2] == 1.0
    # a monotone transform ranks alike: the same AUC, p = 1
    assert paired_auc_test(labels, good, np.exp(good))[2] == 1.0
    noise = np.random.default_rng(1).normal(size=160)
    auc_a, auc_b, p = paired_auc_test(labels, good, noise)
    assert auc_a > 0.85 and abs(auc_b - 0.5) < 0.15 and p < 1e-6
    assert all(math.isnan(v) for v in paired_auc_test([0, 0], [0.1, 0.2], [0.3, 0.1]))


# --- tests written to kill surviving mutants of the statistics functions ---------------------


def _placements(labels, scores):
    """Brute-force DeLong placement values: v10 per positive, v01 per negative (ties 1/2)."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]

    def psi(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0

    v10 = np.array([np.mean([psi(a, b) for b in neg]) for a in pos])
    v01 = np.array([np.mean([psi(a, b) for a in pos]) for b in neg])
    return v10, v01


def _delong_p_reference(labels, a, b):
    """DeLong's two-sided p from brute-force placements; a class of one adds no variance."""
    from scipy.stats import norm

    a10, a01 = _placements(labels, a)
    b10, b01 = _placements(labels, b)
    m, n = a10.size, a01.size
    var = (np.var(a10 - b10, ddof=1) if m > 1 else 0.0) / m + (
        np.var(a01 - b01, ddof=1) if n > 1 else 0.0
    ) / n
    diff = a10.mean() - b10.mean()
    return a10.mean(), b10.mean(), float(2 * norm.sf(abs(diff) / math.sqrt(var)))


def test_brier_score_of_nothing_is_nan_without_warnings():
    import warnings

    from deepmil_jax.metrics import brier_score

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(brier_score(np.array([]), np.array([])))


def test_delong_components_match_brute_force_placements():
    from deepmil_jax.metrics import delong_components

    rng = np.random.default_rng(3)
    labels = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0])
    scores = np.round(rng.random((2, labels.size)), 1)  # rounding makes ties
    auc, v10, v01 = delong_components(labels, scores)
    for k in range(2):
        r10, r01 = _placements(labels, scores[k])
        np.testing.assert_allclose(v10[k], r10)
        np.testing.assert_allclose(v01[k], r01)
        assert auc[k] == pytest.approx(_auc_by_pairs(labels, scores[k]))
        assert v01[k].mean() == pytest.approx(auc[k])


@pytest.mark.parametrize(
    "labels",
    [
        [1, 0, 0, 0, 0, 0, 0],  # one positive
        [1, 1, 0, 0, 0, 0, 0],  # two positives
        [1, 1, 1, 1, 1, 1, 0],  # one negative
        [1, 1, 1, 1, 1, 0, 0],  # two negatives
    ],
)
def test_paired_auc_test_with_small_classes_matches_reference(labels):
    from deepmil_jax.metrics import paired_auc_test

    labels = np.array(labels)
    a = np.array([0.9, 0.3, 0.5, 0.2, 0.7, 0.4, 0.1])
    b = np.array([0.6, 0.8, 0.1, 0.5, 0.3, 0.65, 0.2])
    auc_a, auc_b, p = paired_auc_test(labels, a, b)
    ref_a, ref_b, ref_p = _delong_p_reference(labels, a, b)
    assert auc_a == pytest.approx(ref_a)
    assert auc_b == pytest.approx(ref_b)
    assert p == pytest.approx(ref_p)


def test_paired_auc_test_zero_variance_but_different_aucs_gives_p_zero():
    from deepmil_jax.metrics import paired_auc_test

    # one image per class: both variance terms are 0, yet the AUCs are 1 and 0
    assert paired_auc_test(np.array([1, 0]), np.array([0.9, 0.1]), np.array([0.1, 0.9])) == (
        1.0,
        0.0,
        0.0,
    )
    assert paired_auc_test(np.array([1, 0]), np.array([0.9, 0.1]), np.array([0.8, 0.2])) == (
        1.0,
        1.0,
        1.0,
    )


def _bootstrap_reference(labels, probs, n, seed, level):
    """The documented resampling, in 256-resample chunks, with a brute-force pair-count AUC."""
    labels, probs = np.asarray(labels), np.asarray(probs, float)
    pos, neg = probs[labels == 1], probs[labels == 0]
    rng = np.random.default_rng(seed)
    aucs = []
    done = 0
    while done < n:
        r = min(256, n - done)
        ip = rng.integers(0, pos.size, (r, pos.size))
        ineg = rng.integers(0, neg.size, (r, neg.size))
        for row in range(r):
            p, q = pos[ip[row]], neg[ineg[row]]
            aucs.append(((p[:, None] > q[None, :]) + 0.5 * (p[:, None] == q[None, :])).mean())
        done += r
    return tuple(np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2]))


@pytest.mark.parametrize("n,level", [(300, 0.9), (7, 0.5)])
def test_bootstrap_auc_ci_matches_brute_force_resampling(n, level):
    from deepmil_jax.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(11)
    labels = np.array([1, 0] * 20)
    probs = rng.random(40) + 0.3 * labels  # 400 pairs: the resampled AUCs are nearly continuous
    low, high = bootstrap_auc_ci(labels, probs, n=n, seed=5, level=level)
    ref_low, ref_high = _bootstrap_reference(labels, probs, n, 5, level)
    assert low == pytest.approx(ref_low)
    assert high == pytest.approx(ref_high)


def test_bootstrap_auc_ci_defaults_are_2000_resamples_and_seed_0():
    from deepmil_jax.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(12)
    labels = np.array([1, 0] * 20)
    probs = rng.random(40) + 0.3 * labels
    assert bootstrap_auc_ci(labels, probs) == bootstrap_auc_ci(
        labels, probs, n=2000, seed=0, level=0.95
    )


def test_bootstrap_auc_ci_single_positive_or_negative_and_absent_class():
    from deepmil_jax.metrics import bootstrap_auc_ci

    probs = np.array([0.9, 0.1, 0.4, 0.7, 0.5])
    # one positive: every resample keeps it, so the AUC spread comes from the negatives only
    low, high = bootstrap_auc_ci(np.array([1, 0, 0, 0, 0]), probs, n=200)
    assert (low, high) == pytest.approx(_bootstrap_reference([1, 0, 0, 0, 0], probs, 200, 0, 0.95))
    assert not math.isnan(low)
    low, high = bootstrap_auc_ci(np.array([1, 1, 0, 1, 1]), probs, n=200)
    assert (low, high) == pytest.approx(_bootstrap_reference([1, 1, 0, 1, 1], probs, 200, 0, 0.95))
    assert not math.isnan(low)
    import warnings

    for labels in ([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            low, high = bootstrap_auc_ci(np.array(labels), probs, n=10)
        assert math.isnan(low) and math.isnan(high)


def test_reliability_default_bins_and_empty_top_bins_without_warnings():
    import warnings

    from deepmil_jax.metrics import reliability

    labels = np.array([0, 1, 0, 1])
    probs = np.array([0.05, 0.15, 0.12, 0.31])  # bins 0, 1, 1, 3; bins 4..9 empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = reliability(labels, probs)
    assert table["edges"].shape == (11,)
    np.testing.assert_array_equal(table["count"], [1, 2, 0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(table["mean_predicted"], [0.05, 0.135, np.nan, 0.31] + [np.nan] * 6)
    np.testing.assert_allclose(table["observed"], [0.0, 0.5, np.nan, 1.0] + [np.nan] * 6)


def test_threshold_and_metrics_against_hand_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    probs = np.array([0.1, 0.2, 0.6, 0.7, 0.4, 0.9, 0.5, 0.8])
    m = binary_metrics(labels, probs, 0.5)
    # predicted positive: 0.6, 0.7, 0.9, 0.5, 0.8 -> TP=3, FP=2, FN=1 (0.4), TN=2
    assert (m["sensitivity"], m["specificity"], m["accuracy"]) == (0.75, 0.5, 5 / 8)
    # AUC by counting the positive-negative pairs ranked correctly
    pairs = [(p > n) + 0.5 * (p == n) for p in probs[labels == 1] for n in probs[labels == 0]]
    assert m["auc"] == pytest.approx(np.mean(pairs))
    # Youden's J: 0.5 at t=0.4 (sensitivity 1, specificity 0.5), 0.75 at t=0.7 (0.75 and 1)
    assert choose_threshold(labels, probs) == pytest.approx(0.7)

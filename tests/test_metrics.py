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

"""Image-level metrics of a run: AUC, and accuracy, sensitivity and specificity at a threshold
chosen on the validation set (Youden's J); and the statistics a paper reports next to them: a
bootstrap confidence interval of the AUC, the Brier score and a reliability table, and DeLong's
test of two correlated AUCs. Pure numpy/scipy/scikit-learn; no JAX."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn import metrics as skmetrics


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and accuracy, sensitivity and specificity at ``threshold`` (predict 1 if p >= t)."""
    labels = np.asarray(labels).astype(int)  # pragma: no mutate (float 0/1 labels act alike)
    predicted = np.asarray(probs) >= threshold
    pos, neg = labels == 1, labels == 0
    auc = skmetrics.roc_auc_score(labels, probs) if pos.any() and neg.any() else math.nan
    return {
        "auc": float(auc),
        "accuracy": float(np.mean(predicted == pos)),
        "sensitivity": float(predicted[pos].mean()) if pos.any() else math.nan,
        "specificity": float((~predicted[neg]).mean()) if neg.any() else math.nan,
        "threshold": float(threshold),
    }


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The validation threshold that maximises Youden's J = sensitivity + specificity - 1."""
    labels = np.asarray(labels).astype(int)  # pragma: no mutate (float 0/1 labels act alike)
    if labels.min() == labels.max():
        return 0.5
    fpr, tpr, thresholds = skmetrics.roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def _auc_by_ranks(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each row: ``pos`` (r, m) and ``neg`` (r, n) scores -> (r,).

    AUC = (sum of the positives' midranks in the pooled row - m (m + 1) / 2) / (m n): the
    probability that a positive outscores a negative, ties counting one half.
    """
    m, n = pos.shape[1], neg.shape[1]
    ranks = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)


def bootstrap_auc_ci(
    labels: np.ndarray, probs: np.ndarray, *, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC.

    Resamples images with replacement, stratified by class (each resample draws as many
    positives from the positives and negatives from the negatives as the data hold, so every
    resample has both classes), ``n`` times; the interval is the (1 - level)/2 and
    (1 + level)/2 quantiles of the resampled AUCs. The same ``seed`` gives the same interval.

    Args:
      labels: (N,) 0/1; probs: (N,) scores.

    Returns:
      ``(low, high)``; ``(nan, nan)`` when one class is absent.
    """
    labels = np.asarray(labels).astype(int)  # pragma: no mutate (float 0/1 labels act alike)
    probs = np.asarray(probs, float)  # pragma: no mutate (any numeric dtype gives the same results)
    pos, neg = probs[labels == 1], probs[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, n, 256):  # chunks bound the memory to 256 x N scores
        r = min(256, n - start)
        aucs.append(
            _auc_by_ranks(
                pos[rng.integers(0, pos.size, (r, pos.size))],
                neg[rng.integers(0, neg.size, (r, neg.size))],
            )
        )
    low, high = np.quantile(np.concatenate(aucs), [(1 - level) / 2, (1 + level) / 2])
    return (float(low), float(high))


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared difference between predicted probability and 0/1 label (lower is better;
    0.25 for a constant 0.5). ``sklearn.metrics.brier_score_loss`` with positive label 1."""
    labels = np.asarray(labels).astype(float)  # pragma: no mutate (float 0/1 labels act alike)
    probs = np.asarray(probs, float)  # pragma: no mutate (any numeric dtype gives the same results)
    return float(np.mean((probs - labels) ** 2)) if labels.size else math.nan


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability (calibration) table over ``bins`` equal-width bins of [0, 1].

    Bin i holds the probabilities in [i/bins, (i+1)/bins), the last bin also 1.0.

    Returns:
      ``{"edges": (bins + 1,), "mean_predicted": (bins,), "observed": (bins,),
      "count": (bins,)}``: per bin the mean predicted probability, the fraction of positives and
      the number of images; the means are nan for an empty bin.
    """
    labels = np.asarray(labels).astype(float)  # pragma: no mutate (float 0/1 labels act alike)
    probs = np.asarray(probs, float)  # pragma: no mutate (any numeric dtype gives the same results)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], probs, side="right")  # 0 .. bins - 1 for any value
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):  # an empty bin's 0 / 0
        mean_predicted = np.bincount(which, probs, minlength=bins) / count
        observed = np.bincount(which, labels, minlength=bins) / count
    return {"edges": edges, "mean_predicted": mean_predicted, "observed": observed, "count": count}


def delong_components(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong's structural components of k classifiers' AUCs (Sun & Xu 2014, by midranks).

    Args:
      labels: (N,) 0/1 with both classes; scores: (k, N).

    Returns:
      ``(auc (k,), v10 (k, m), v01 (k, n))``: for each positive i, v10 is the fraction of
      negatives it outscores (ties one half); for each negative j, v01 the fraction of
      positives that outscore it. The AUC is the mean of either.
    """
    labels = np.asarray(labels).astype(int)  # pragma: no mutate (float 0/1 labels act alike)
    scores = np.atleast_2d(np.asarray(scores, float))  # pragma: no mutate (ints rank alike)
    x, y = scores[:, labels == 1], scores[:, labels == 0]
    m, n = x.shape[1], y.shape[1]
    # midranks (ties share their average rank) in the pooled row, and among own class
    tz = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    tx, ty = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return v10.mean(axis=1), v10, v01


def paired_auc_test(
    labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray
) -> tuple[float, float, float]:
    """DeLong's test (DeLong, DeLong & Clarke-Pearson 1988) of two correlated ROC curves.

    Both classifiers score the same images. The AUC difference's variance is
    var(V10_a - V10_b) / m + var(V01_a - V01_b) / n over the structural components
    (``delong_components``); z = (auc_a - auc_b) / sd is referred to the normal.

    Args:
      labels: (N,) 0/1; probs_a, probs_b: (N,) scores of the same images.

    Returns:
      ``(auc_a, auc_b, p_value)``, two-sided; p = 1 when the difference and its variance are
      both 0 (identical rankings); all nan when one class is absent.
    """
    labels = np.asarray(labels).astype(int)  # pragma: no mutate (float 0/1 labels act alike)
    m, n = int((labels == 1).sum()), int((labels == 0).sum())
    if m == 0 or n == 0:
        return (math.nan, math.nan, math.nan)
    auc, v10, v01 = delong_components(labels, np.stack([probs_a, probs_b]))
    diff = float(auc[0] - auc[1])
    var = (np.var(v10[0] - v10[1], ddof=1) if m > 1 else 0.0) / m + (
        np.var(v01[0] - v01[1], ddof=1) if n > 1 else 0.0
    ) / n
    if var <= 1e-15:  # pragma: no mutate (a rounding guard: < differs only at the bound)
        p = 1.0 if abs(diff) <= 1e-12 else 0.0  # pragma: no mutate (as above)
    else:
        p = float(2 * stats.norm.sf(abs(diff) / math.sqrt(var)))
    return (float(auc[0]), float(auc[1]), p)

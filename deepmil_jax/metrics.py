"""Image-level metrics of a run: AUC, and accuracy, sensitivity and specificity at a threshold
chosen on the validation set (Youden's J). Pure numpy/scikit-learn; no JAX."""

from __future__ import annotations

import math

import numpy as np
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

"""Metrics on the real test set (scikit-learn): all fractions in [0, 1]."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_score, recall_score, roc_auc_score)


def evaluate(y_true: np.ndarray, log_proba: np.ndarray, num_classes: int) -> dict:
    labels = list(range(num_classes))
    pred = log_proba.argmax(1)
    proba = np.exp(log_proba)
    present = np.unique(y_true)
    if num_classes == 2:
        auroc = roc_auc_score(y_true, proba[:, 1]) if len(present) == 2 else float("nan")
    else:  # macro one-vs-rest over the classes present in the test set
        p = proba[:, present] / proba[:, present].sum(1, keepdims=True)
        auroc = roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=present) if len(present) > 1 else float("nan")
    cm = confusion_matrix(y_true, pred, labels=labels)
    support = cm.sum(1)
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "auroc": float(auroc),
        "f1": float(f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "precision": float(precision_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "recall": float(recall_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "per_class_accuracy": [float(cm[c, c] / support[c]) if support[c] else None for c in labels],
        "confusion_matrix": cm.tolist(),
    }

"""Metrics on real test images (scikit-learn): all fractions in [0, 1].

Two ways to the same numbers:
- `evaluate`: the test images are in one place (a coordinator's test set, a simulated federation);
- federated: each site reduces its own test images to counts (`site_counts`: a confusion matrix and,
  per class, histograms of the classifier's scores), and `pooled_metrics` combines the sites' counts.
  Accuracy, balanced accuracy, F1, precision, recall and the confusion matrix come out exactly as
  `evaluate` gives them on the union of the sites' images; AUROC from the histograms, within the
  width of a score bin (SCORE_BINS over logits in [-SCORE_RANGE, SCORE_RANGE]).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_score, recall_score, roc_auc_score)

from .errors import FedFactoryError

SCORE_BINS, SCORE_RANGE = 4096, 20.0


def evaluate(y_true: np.ndarray, log_proba: np.ndarray, num_classes: int) -> dict:
    pred = log_proba.argmax(1)
    proba = np.exp(log_proba)
    present = np.unique(y_true)
    if num_classes == 2:
        auroc = roc_auc_score(y_true, proba[:, 1]) if len(present) == 2 else float("nan")
    else:  # macro one-vs-rest over the classes present in the test set
        p = proba[:, present] / proba[:, present].sum(1, keepdims=True)
        auroc = roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=present) if len(present) > 1 else float("nan")
    return label_metrics(y_true, pred, num_classes, float(auroc))


def label_metrics(y_true: np.ndarray, pred: np.ndarray, num_classes: int, auroc: float) -> dict:
    """Every metric but AUROC depends only on the (true, predicted) pairs."""
    labels = list(range(num_classes))
    present = np.unique(y_true)
    cm = confusion_matrix(y_true, pred, labels=labels)
    support = cm.sum(1)
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "auroc": auroc,
        "f1": float(f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "precision": float(precision_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "recall": float(recall_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "per_class_accuracy": [float(cm[c, c] / support[c]) if support[c] else None for c in labels],
        "confusion_matrix": cm.tolist(),
    }


def score_bins(log_proba: np.ndarray) -> np.ndarray:
    """Each image's bin per class: its logit log p_c - log(1 - p_c), clipped to the range."""
    lp = np.asarray(log_proba, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.stack([np.logaddexp.reduce(np.delete(lp, c, axis=1), axis=1) for c in range(lp.shape[1])], 1)
        logit = np.nan_to_num(lp - rest, nan=-SCORE_RANGE, posinf=SCORE_RANGE, neginf=-SCORE_RANGE)
    edges = (np.clip(logit, -SCORE_RANGE, SCORE_RANGE) + SCORE_RANGE) / (2 * SCORE_RANGE) * SCORE_BINS
    return np.minimum(edges.astype(np.int64), SCORE_BINS - 1)


def site_counts(y_true: np.ndarray, log_proba: np.ndarray, num_classes: int) -> dict:
    """What a site sends back about its own test images: counts only, no image and no per-image score.

    `positive[c]` is the histogram of class c's score over the site's images of class c, `negative[c]`
    over its other images."""
    y_true = np.asarray(y_true, np.int64)
    bins = score_bins(log_proba)
    positive = np.zeros((num_classes, SCORE_BINS), np.int64)
    negative = np.zeros((num_classes, SCORE_BINS), np.int64)
    for c in range(num_classes):
        positive[c] = np.bincount(bins[y_true == c, c], minlength=SCORE_BINS)
        negative[c] = np.bincount(bins[y_true != c, c], minlength=SCORE_BINS)
    cm = confusion_matrix(y_true, log_proba.argmax(1), labels=list(range(num_classes)))
    return {"images": int(len(y_true)), "confusion_matrix": cm.tolist(),
            "score_bins": {"bins": SCORE_BINS, "logit_range": SCORE_RANGE},
            "positive": _sparse(positive), "negative": _sparse(negative)}


def _sparse(hist: np.ndarray) -> list[dict]:
    """A histogram per class as {bin: count} of its non-empty bins (JSON keys are strings)."""
    return [{str(b): int(row[b]) for b in np.flatnonzero(row)} for row in hist]


def _dense(rows, num_classes: int, where: str) -> np.ndarray:
    if not isinstance(rows, list) or len(rows) != num_classes:
        raise FedFactoryError(f"{where}: expected {num_classes} histograms")
    out = np.zeros((num_classes, SCORE_BINS), np.int64)
    for c, row in enumerate(rows):
        if not isinstance(row, dict) or len(row) > SCORE_BINS:
            raise FedFactoryError(f"{where}: histogram {c} is not a map of bins to counts")
        for b, n in row.items():
            if not (isinstance(b, str) and b.isdigit() and int(b) < SCORE_BINS and type(n) is int and 0 < n <= 10**9):
                raise FedFactoryError(f"{where}: histogram {c} has a bad entry {str(b)[:20]!r}: {str(n)[:20]}")
            out[c, int(b)] = n
    return out


def check_counts(counts: dict, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site's counts (untrusted: they come from a peer) as arrays, each total consistent with the others."""
    if not isinstance(counts, dict):
        raise FedFactoryError(f"{where}: not a JSON object")
    if counts.get("score_bins") != {"bins": SCORE_BINS, "logit_range": SCORE_RANGE}:
        raise FedFactoryError(f"{where}: score bins {str(counts.get('score_bins'))[:80]} are not this version's "
                              f"({SCORE_BINS} over logits in +-{SCORE_RANGE:g})")
    cm = counts.get("confusion_matrix")
    if not (isinstance(cm, list) and len(cm) == num_classes and all(
            isinstance(r, list) and len(r) == num_classes and all(type(v) is int and 0 <= v <= 10**9 for v in r)
            for r in cm)):
        raise FedFactoryError(f"{where}: the confusion matrix must be {num_classes} x {num_classes} counts")
    cm = np.asarray(cm, np.int64)
    pos, neg = _dense(counts.get("positive"), num_classes, where), _dense(counts.get("negative"), num_classes, where)
    n = int(cm.sum())
    if counts.get("images") != n or not np.array_equal(pos.sum(1), cm.sum(1)) or \
            not np.array_equal(pos.sum(1) + neg.sum(1), np.full(num_classes, n)):
        raise FedFactoryError(f"{where}: the counts do not add up (images {str(counts.get('images'))[:20]}, "
                              f"confusion matrix {n})")
    return cm, pos, neg


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties, with a tie meaning the same bin."""
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def pooled_metrics(site_counts_list: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """The metrics of the union of the sites' test images, from their counts (see check_counts)."""
    cm = sum(c for c, _, _ in site_counts_list)
    pos = sum(p for _, p, _ in site_counts_list)
    neg = sum(n for _, _, n in site_counts_list)
    if cm.sum() == 0:
        raise FedFactoryError("the sites sent no test image to evaluate on")
    present = np.flatnonzero(cm.sum(1))
    scored = [c for c in ([1] if num_classes == 2 else present) if pos[c].sum() and neg[c].sum()]
    auroc = float(np.mean([histogram_auc(pos[c], neg[c]) for c in scored])) if len(present) > 1 else float("nan")
    # The (true, predicted) pairs the confusion matrix counts, in any order: every metric below is a
    # function of their counts, so these are the numbers `evaluate` gives on the union, to the bit.
    true, pred = np.nonzero(cm)
    reps = cm[true, pred]
    return label_metrics(np.repeat(true, reps), np.repeat(pred, reps), num_classes, auroc)


def per_site_metrics(cm: np.ndarray, pos: np.ndarray, neg: np.ndarray, num_classes: int) -> dict:
    return pooled_metrics([(cm, pos, neg)], num_classes)

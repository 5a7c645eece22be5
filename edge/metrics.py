"""Classification metrics (scikit-learn) used by train, convert, bench and gate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro-F1 and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": list(class_names),
    }


def agreement(p_ref: np.ndarray, p_new: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, max and mean |delta p| and the mean KL divergence KL(ref || new) (nats;
    probabilities floored at 1e-7) between two probability arrays."""
    a = np.asarray(p_ref, np.float64)
    b = np.asarray(p_new, np.float64)
    eps = 1e-7
    kl = np.sum(a * (np.log(np.maximum(a, eps)) - np.log(np.maximum(b, eps))), axis=1) if len(a) else a
    return {
        "mean_kl": float(np.mean(kl)) if len(a) else float("nan"),
        "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))) if len(a) else float("nan"),
        "max_abs_dp": float(np.max(np.abs(a - b))) if len(a) else float("nan"),
        "mean_abs_dp": float(np.mean(np.abs(a - b))) if len(a) else float("nan"),
    }

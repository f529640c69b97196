"""Classification and regression metrics per fold, and their mean and std over folds.

All metrics come from one confusion matrix (rows = truth, columns = prediction) and agree with
scikit-learn (tests/test_metrics.py):

    ua             unweighted accuracy = mean per-class recall (balanced_accuracy_score)
    wa             weighted accuracy = plain accuracy (accuracy_score)
    macro_f1       unweighted mean F1 (f1_score average="macro")
    weighted_f1    support-weighted mean F1 (f1_score average="weighted")
    per_class_recall, confusion

A test fold may lack a class (a small corpus, or a user's fold file). That class's recall is
then undefined for the fold: it is reported as NaN (null in JSON) and left out of the fold's UA,
which averages over the classes present in the fold's truth, as balanced_accuracy_score does.
Macro-F1 averages over the classes present in the truth or the predictions (scikit-learn's
default label set), an undefined precision or recall counting as 0 (zero_division=0). Over
folds, per-class recall is averaged over the folds where the class was tested.

Continuous targets (arousal, valence, ...) are scored per target, each from population
moments (ddof=0) of the fold's truth x and predictions y:

    ccc       concordance correlation coefficient,
              2 cov(x, y) / (var x + var y + (mean x - mean y)^2): 1 only for y == x; a shift
              or a scale error lowers it where Pearson's r stays 1; 0 for constant predictions
    pearson   cov(x, y) / (std x std y)
    mae       mean |y - x|

A statistic whose denominator is zero (Pearson's r with constant truth or predictions; CCC
with truth and predictions the same constant) is undefined: NaN for the fold, left out of
the mean over folds like an untested class's recall.

`std` over folds is the population standard deviation (numpy's default, ddof=0).
"""
from __future__ import annotations

import numpy as np

SCALARS = ("ua", "wa", "macro_f1", "weighted_f1")
REGRESSION_SCALARS = ("ccc", "pearson", "mae")


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    assert y_true.shape == y_pred.shape, f"y_true {y_true.shape} vs y_pred {y_pred.shape}"
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def scores(cm: np.ndarray) -> dict:
    """Metrics of one confusion matrix: floats in [0, 1]; per_class_recall has NaN for classes
    absent from the truth."""
    cm = np.asarray(cm, dtype=np.float64)
    support, predicted, hits = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        r0 = np.nan_to_num(recall)
        f1 = np.where(precision + r0 > 0, 2 * precision * r0 / (precision + r0), 0.0)
    seen = (support > 0) | (predicted > 0)
    total = support.sum()
    return {
        "ua": float(np.nanmean(recall)),
        "wa": float(hits.sum() / total),
        "macro_f1": float(f1[seen].mean()),
        "weighted_f1": float((f1 * support).sum() / total),
        "per_class_recall": recall.tolist(),
    }


def fold_metrics(y_true, y_pred, n_classes: int) -> dict:
    """`scores` of one fold plus its confusion counts (a list of lists, JSON-ready)."""
    cm = confusion(y_true, y_pred, n_classes)
    return {**scores(cm), "confusion": cm.tolist()}


def summarize(folds: list[dict], labels: list[str]) -> dict:
    """Mean and std over folds of `fold_metrics` outputs.

    Returns {"ua": {"mean", "std", "folds"}, "wa": ..., "macro_f1": ..., "weighted_f1": ...,
    "per_class_recall": {label: {"mean", "std", "folds"}}, "confusion": {"labels", "counts",
    "normalized", "folds"}} where counts are summed over folds and normalized divides each row
    of the sum by its total (the pooled per-class recall on the diagonal).
    """
    out = {}
    for name in SCALARS:
        values = np.array([f[name] for f in folds])
        out[name] = {"mean": float(values.mean()), "std": float(values.std()), "folds": values.tolist()}
    recall = np.array([f["per_class_recall"] for f in folds], dtype=np.float64)  # (folds, classes)
    out["per_class_recall"] = {}
    for c, label in enumerate(labels):
        r = recall[:, c]
        tested = r[~np.isnan(r)]
        out["per_class_recall"][label] = {
            "mean": float(tested.mean()) if len(tested) else None,
            "std": float(tested.std()) if len(tested) else None,
            "folds": [None if np.isnan(v) else float(v) for v in r],
        }
    counts = np.sum([f["confusion"] for f in folds], axis=0)
    rows = counts.sum(axis=1, keepdims=True)
    out["confusion"] = {
        "labels": list(labels),
        "counts": counts.tolist(),
        "normalized": np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0).tolist(),
        "folds": [f["confusion"] for f in folds],
    }
    return out


def regression_scores(y_true, y_pred) -> dict:
    """{"ccc", "pearson", "mae"} of one target: y_true, y_pred (n,) floats; NaN where undefined."""
    x, y = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    assert x.shape == y.shape and x.ndim == 1 and len(x), f"y_true {x.shape} vs y_pred {y.shape}"
    mx, my = x.mean(), y.mean()
    vx, vy = ((x - mx) ** 2).mean(), ((y - my) ** 2).mean()
    cov = ((x - mx) * (y - my)).mean()
    ccc_den = vx + vy + (mx - my) ** 2
    return {
        "ccc": float(2 * cov / ccc_den) if ccc_den > 0 else float("nan"),
        "pearson": float(cov / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else float("nan"),
        "mae": float(np.abs(y - x).mean()),
    }


def regression_fold_metrics(y_true, y_pred, targets: list[str]) -> dict:
    """{target: regression_scores} of one fold: y_true, y_pred (n, n_targets), columns in the
    order of `targets` ((n,) is accepted for one target)."""
    x, y = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if x.ndim == 1:
        x, y = x[:, None], y.reshape(-1, 1)
    assert x.shape == y.shape == (len(x), len(targets)), (
        f"y_true {x.shape}, y_pred {y.shape} for targets {targets}")
    return {name: regression_scores(x[:, t], y[:, t]) for t, name in enumerate(targets)}


def summarize_regression(folds: list[dict], targets: list[str]) -> dict:
    """Mean and std over folds of `regression_fold_metrics` outputs.

    Returns {target: {"ccc": {"mean", "std", "folds"}, "pearson": ..., "mae": ...}}; a fold
    where a statistic is undefined is None in "folds" and left out of mean and std (None
    when no fold defines it).
    """
    out = {}
    for name in targets:
        out[name] = {}
        for stat in REGRESSION_SCALARS:
            values = np.array([f[name][stat] for f in folds], dtype=np.float64)
            defined = values[~np.isnan(values)]
            out[name][stat] = {
                "mean": float(defined.mean()) if len(defined) else None,
                "std": float(defined.std()) if len(defined) else None,
                "folds": [None if np.isnan(v) else float(v) for v in values],
            }
    return out


def json_safe(value):
    """Replace NaN floats (nested in dicts and lists) with None, so json.dump writes null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value

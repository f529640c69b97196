"""Metrics agree with scikit-learn, including folds that miss a class."""
import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
)

from ser_cache.metrics import confusion, fold_metrics, json_safe, summarize


def sklearn_metrics(y_true, y_pred, n_classes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes missing from y_true
        return {
            "ua": balanced_accuracy_score(y_true, y_pred),
            "wa": accuracy_score(y_true, y_pred),
            "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
            "weighted_f1": f1_score(y_true, y_pred, average="weighted", zero_division=0),
            "confusion": confusion_matrix(y_true, y_pred, labels=range(n_classes)).tolist(),
        }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("missing", [None, "truth", "both"])
def test_agrees_with_sklearn(seed, missing):
    rng = np.random.default_rng(seed)
    n_classes = 5
    y_true = rng.integers(n_classes, size=60)
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(n_classes, size=60))
    if missing in ("truth", "both"):  # class 2 absent from the fold's truth (still predicted, or not)
        keep = y_true != 2
        y_true, y_pred = y_true[keep], y_pred[keep]
    if missing == "both":
        y_pred = np.where(y_pred == 2, 3, y_pred)
    ours, ref = fold_metrics(y_true, y_pred, n_classes), sklearn_metrics(y_true, y_pred, n_classes)
    for key in ("ua", "wa", "macro_f1", "weighted_f1"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["confusion"] == ref["confusion"]
    present = np.unique(y_true)
    recall = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    np.testing.assert_allclose(np.array(ours["per_class_recall"])[present], recall)
    if missing:
        assert np.isnan(ours["per_class_recall"][2])


def test_confusion_rows_are_truth():
    cm = confusion([0, 0, 1], [1, 1, 1], 3)
    assert cm.tolist() == [[0, 2, 0], [0, 1, 0], [0, 0, 0]]


def test_summary_over_folds():
    labels = ["a", "b", "c"]
    folds = [fold_metrics([0, 1, 2, 2], [0, 1, 2, 1], 3), fold_metrics([0, 0, 1], [0, 1, 1], 3)]  # no "c"
    s = summarize(folds, labels)
    uas = [f["ua"] for f in folds]
    assert s["ua"] == {"mean": pytest.approx(np.mean(uas)), "std": pytest.approx(np.std(uas)), "folds": uas}
    assert s["per_class_recall"]["c"]["folds"] == [0.5, None]
    assert s["per_class_recall"]["c"]["mean"] == 0.5  # averaged over folds that tested "c"
    assert s["confusion"]["counts"] == (np.array(folds[0]["confusion"]) + folds[1]["confusion"]).tolist()
    np.testing.assert_allclose(np.array(s["confusion"]["normalized"]).sum(1), 1)
    for key in ("ua", "wa", "macro_f1", "weighted_f1"):
        assert all(0 <= v <= 1 for v in s[key]["folds"])
    json.loads(json.dumps(json_safe(s), allow_nan=False))  # NaN written as null

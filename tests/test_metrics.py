"""Metrics agree with scikit-learn, including folds that miss a class; regression metrics
agree with their definitions."""
import json
import math
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

from ser_cache.metrics import (
    confusion,
    fold_metrics,
    json_safe,
    regression_fold_metrics,
    regression_scores,
    summarize,
    summarize_regression,
)


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


# --- continuous targets --------------------------------------------------------------------------

def reference_ccc(x, y):
    """CCC from its definition with population moments, in plain Python."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


def reference_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


@pytest.mark.parametrize("seed", range(5))
def test_regression_scores_agree_with_definitions(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(1, 7, size=40)
    y = 0.6 * x + rng.normal(0, 1, size=40) + 0.8
    ours = regression_scores(x, y)
    assert ours["ccc"] == pytest.approx(reference_ccc(list(x), list(y)), abs=1e-12)
    assert ours["pearson"] == pytest.approx(reference_pearson(list(x), list(y)), abs=1e-12)
    assert ours["mae"] == pytest.approx(sum(abs(b - a) for a, b in zip(x, y)) / 40, abs=1e-12)
    assert -1 <= ours["ccc"] <= ours["pearson"] <= 1  # |CCC| never exceeds |r|


def test_ccc_edge_cases():
    x = np.array([1.0, 2.0, 4.0, 5.5, 3.0])
    same = regression_scores(x, x)
    assert same["ccc"] == pytest.approx(1.0) and same["pearson"] == pytest.approx(1.0)
    assert same["mae"] == 0.0
    constant = regression_scores(x, np.full(5, x.mean()))
    assert constant["ccc"] == 0.0 and math.isnan(constant["pearson"])  # r is undefined
    shifted = regression_scores(x, x + 1.0)
    assert shifted["ccc"] < 1 and shifted["pearson"] == pytest.approx(1.0)
    assert shifted["ccc"] == pytest.approx(reference_ccc(list(x), list(x + 1.0)))
    assert shifted["mae"] == pytest.approx(1.0)
    scaled = regression_scores(x, 2 * x - x.mean())  # same mean, twice the spread
    assert scaled["ccc"] < 1 and scaled["pearson"] == pytest.approx(1.0)
    assert regression_scores(x, -x)["ccc"] < 0
    both_constant = regression_scores(np.full(3, 2.0), np.full(3, 2.0))
    assert math.isnan(both_constant["ccc"]) and both_constant["mae"] == 0.0


def test_regression_fold_metrics_per_target_columns():
    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 5, size=(30, 2))
    pred = truth + rng.normal(0, 0.5, size=(30, 2))
    fold = regression_fold_metrics(truth, pred, ["arousal", "valence"])
    assert list(fold) == ["arousal", "valence"]
    assert fold["valence"] == regression_scores(truth[:, 1], pred[:, 1])
    assert regression_fold_metrics(truth[:, 0], pred[:, 0], ["arousal"]) == {
        "arousal": fold["arousal"]}
    with pytest.raises(AssertionError, match="for targets"):
        regression_fold_metrics(truth, pred, ["arousal"])


def test_regression_summary_over_folds():
    x = np.array([1.0, 2.0, 4.0, 5.5, 3.0])
    folds = [regression_fold_metrics(x, x + 0.5, ["arousal"]),
             regression_fold_metrics(x, 0.8 * x + 0.3, ["arousal"]),
             regression_fold_metrics(x, np.full(5, 3.0), ["arousal"])]  # a collapsed head
    s = summarize_regression(folds, ["arousal"])["arousal"]
    cccs = [f["arousal"]["ccc"] for f in folds]
    assert s["ccc"] == {"mean": pytest.approx(np.mean(cccs)), "std": pytest.approx(np.std(cccs)),
                        "folds": cccs}
    assert s["pearson"]["folds"][2] is None  # undefined in that fold, left out of the mean
    assert s["pearson"]["mean"] == pytest.approx(1.0) and s["pearson"]["std"] == pytest.approx(0)
    assert s["mae"]["mean"] == pytest.approx(np.mean([f["arousal"]["mae"] for f in folds]))
    json.loads(json.dumps(json_safe(folds), allow_nan=False))  # NaN of a fold written as null
    json.loads(json.dumps(s, allow_nan=False))

"""The linear probe over a feature matrix read in blocks (bigprobe.py): scikit-learn's scaler and
logistic regression, whatever the block size, and budgets that refuse with their minimum."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ser_cache.bigprobe import (
    TILE,
    ArraySource,
    _working_set,
    fit_logistic_streamed,
    predict_proba_streamed,
    rows_for_budget,
    standardizer,
)
from ser_cache.streaming import HEADROOM, MemoryBudgetError, parse_size

N, F, K = 200, 30, 4
TOL = 1e-10  # both solvers, so that differences are about the objective, not about convergence


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these problems are tiny
    yield
    torch.set_num_threads(threads)


def problem(n_classes: int = K, seed: int = 0):
    """Features with offsets and scales of their own (one constant), labels of a noisy linear
    model, and a random 3/4 of the rows for training."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, F)) * rng.uniform(0.1, 10, F) + rng.uniform(-50, 50, F)
    x[:, 3] = 7.25
    standard = (x - x.mean(0)) / x.std(0).clip(1e-9)
    scores = standard @ rng.normal(size=(F, n_classes)) + 2 * rng.normal(size=(N, n_classes))
    y = scores.argmax(1)
    train = np.sort(rng.permutation(N)[: 3 * N // 4])
    return x, y, train


def fitted(x, y, train, c, class_weight=None, block_rows=17, n_classes=K):
    source = ArraySource(x)
    mean, scale = standardizer(source, train, block_rows)
    coef, intercept, classes = fit_logistic_streamed(source, y, train, c, mean, scale, n_classes=n_classes,
                                                     class_weight=class_weight, max_epochs=5000, tol=TOL,
                                                     block_rows=block_rows)
    probs = predict_proba_streamed(source, np.arange(N), mean, scale, coef, intercept, classes, n_classes, block_rows)
    return coef, intercept, classes, probs


def sklearn_probs(x, y, train, c, class_weight=None, n_classes=K):
    fitter = LogisticRegression(C=c, max_iter=5000, tol=TOL, class_weight=class_weight)
    pipeline = make_pipeline(StandardScaler(), fitter)
    pipeline.fit(x[train], y[train])
    probs = np.zeros((N, n_classes))
    probs[:, pipeline.classes_] = pipeline.predict_proba(x)
    return pipeline, probs


@pytest.mark.parametrize("block_rows", [TILE, 17, 1000])
def test_standardizer_is_standard_scalers(block_rows):
    x, _, train = problem()
    x[:, 5] += 1e6  # a large offset: a one-pass sum of squares would lose the variance here
    mean, scale = standardizer(ArraySource(x), train, block_rows)
    scaler = StandardScaler().fit(x[train])
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(scale, scaler.scale_, rtol=1e-12)
    assert scale[3] == 1.0


@pytest.mark.parametrize("class_weight", [None, "balanced"])
@pytest.mark.parametrize("c", [0.01, 1.0])
def test_probabilities_are_sklearns(c, class_weight):
    x, y, train = problem()
    coef, intercept, classes, probs = fitted(x, y, train, c, class_weight)
    pipeline, expected = sklearn_probs(x, y, train, c, class_weight)
    assert coef.shape == pipeline[-1].coef_.shape and intercept.shape == pipeline[-1].intercept_.shape
    np.testing.assert_array_equal(classes, pipeline.classes_)
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_two_classes_are_one_sigmoid_row_as_in_sklearn(c):
    x, y, train = problem(n_classes=2)
    coef, intercept, classes, probs = fitted(x, y, train, c, n_classes=2)
    pipeline, expected = sklearn_probs(x, y, train, c, n_classes=2)
    assert coef.shape == (1, F) and intercept.shape == (1,) and classes.tolist() == [0, 1]
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(coef, pipeline[-1].coef_, atol=1e-5)  # one row: no free constant


def test_a_class_absent_from_training_gets_no_row_and_probability_zero():
    x, y, train = problem()
    train = train[y[train] != 2]
    coef, _, classes, probs = fitted(x, y, train, 1.0, "balanced")
    _, expected = sklearn_probs(x, y, train, 1.0, "balanced")
    assert classes.tolist() == [0, 1, 3] and coef.shape == (3, F)
    assert np.all(probs[:, 2] == 0)
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)


def test_probabilities_come_in_the_order_asked():
    x, y, train = problem()
    source = ArraySource(x)
    mean, scale = standardizer(source, train, 32)
    fit = fit_logistic_streamed(source, y, train, 1.0, mean, scale, n_classes=K, block_rows=32)
    shuffled = np.random.default_rng(1).permutation(N)
    probs = predict_proba_streamed(source, shuffled, mean, scale, *fit, K, 32)
    in_order = predict_proba_streamed(source, np.arange(N), mean, scale, *fit, K, 32)
    np.testing.assert_array_equal(probs, in_order[shuffled])


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_the_block_size_does_not_change_the_result_by_a_bit(class_weight):
    x, y, train = problem(seed=3)  # a seed whose blocks once differed by 1e-7, summed block by block
    first, *others = [fitted(x, y, train, 1.0, class_weight, block_rows=b) for b in (17, 3 * TILE, N)]
    for other in others:
        for a, b in zip(first, other):
            np.testing.assert_array_equal(a, b)


def test_a_budget_below_one_row_is_refused_with_its_minimum():
    with pytest.raises(MemoryBudgetError, match="needs at least") as refused:
        rows_for_budget(84_480, parse_size("10M"), n_classes=4)
    minimum = parse_size(str(refused.value).split("needs at least ")[1].split()[0])
    assert rows_for_budget(84_480, minimum, n_classes=4) == TILE


@pytest.mark.parametrize("n_classes", [2, 4])
def test_blocks_fill_the_budget_less_headroom(n_classes):
    budget = parse_size("2G")
    rows = rows_for_budget(84_480, budget, n_classes)
    usable = budget * (1 - HEADROOM)
    assert rows % TILE == 0
    assert _working_set(84_480, n_classes, rows, 10) <= usable < _working_set(84_480, n_classes, rows + TILE, 10)

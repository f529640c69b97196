"""The linear probe when its feature matrix does not fit in memory: the same L2 logistic regression.

    source + train rows --standardizer--> mean, scale (StandardScaler's, one streamed pass)
    source + labels + C --fit_logistic_streamed--> coef, intercept, classes (LogisticRegression's)
    source + rows --predict_proba_streamed--> (n, n_outputs) probabilities

Why. A probe of every state of a large encoder reads 33 states x 1280 x 2 = 84,480 features per
utterance; 70,000 utterances of float64 is 47 GB. fitting.fit_logistic hands that matrix to
scikit-learn whole; here it is read in blocks of rows (`rows_for_budget` sizes them) and never
held at once.

Same objective, same answer. scikit-learn's lbfgs minimises, for each C,

    C * sum_i w_i * CE(softmax(W x_i + b), y_i) + 0.5 * ||W||^2      (b not penalised)

on standardised x, with w_i = 1, or n / (k * count(y_i)) for class_weight="balanced" (k: the
classes present). Two classes use one row, p(classes[1]) = sigmoid(w.x + b), as scikit-learn
does, which is a different problem from a two-row softmax under the same penalty. We minimise
the same function (divided by C * sum_i w_i, as scikit-learn does, so `tol` means what its tol
means: the largest gradient entry) with full-batch L-BFGS, each evaluation one pass over the
blocks that sums the loss and its exact gradient. No mini-batches: the optimum is scikit-learn's
to the tolerance, and the run is deterministic. The results plug into LinearProbe.from_fitted.

How close. Both solvers stop where float64 loss values no longer tell points apart (a gradient
near 1e-9 on these scales, whatever smaller tol is asked: scipy stops on ftol = 64 eps, we on a
change below eps); on tests/test_bigprobe.py's problems that leaves up to ~5e-7 between their
probabilities at C = 1, all of it convergence: scikit-learn's solution is a stationary point of
our objective to its ~5e-9 gradient. Every sum runs over the same tiles of TILE rows in the same
order, so the block size (the memory budget) changes no result, not by a bit.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .errors import UserError
from .streaming import HEADROOM, MemoryBudgetError, format_size

log = logging.getLogger(__name__)

HISTORY = 10  # L-BFGS (s, y) pairs kept: scipy's default, so scikit-learn's lbfgs keeps as many
# (k, F) float64 vectors alive besides the history: the coefficients, their gradient and its
# accumulator, torch's LBFGS search direction and gradients (about 8) and strong-Wolfe brackets (4)
SOLVER_COPIES = 16
FLOAT64 = 8  # bytes
TILE = 16  # rows: the unit of every sum, in a fixed order, so that no result depends on block_rows


class FeatureSource(Protocol):
    """Rows of an (n, n_features) feature matrix, read a block at a time."""

    n_features: int

    def __len__(self) -> int: ...

    def rows(self, index: np.ndarray) -> np.ndarray:
        """(len(index), n_features) float64: the rows `index` (sorted, when the fitter asks)."""


@dataclass
class ArraySource:
    """A FeatureSource over anything indexed like an (n, F) array: an ndarray, a numpy memmap, an
    h5py dataset (which needs increasing indices: the fitter reads sorted blocks)."""

    array: object

    @property
    def n_features(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def rows(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[index], dtype=np.float64)


def _tiles(source: FeatureSource, index: np.ndarray, block_rows: int, prepare=np.asarray):
    """(offset, prepare(rows)[tile]) for consecutive runs of TILE rows of `index` (the last may be
    shorter), read block_rows (rounded down to whole tiles) at a time.

    Why tiles. Summed block by block, a gradient's rounding depends on the block size, and
    L-BFGS, stopping where float64 can no longer tell points apart, lands elsewhere (1e-7 in
    probabilities); summed over the same tiles in the same order it is the same bit for bit."""
    if block_rows < TILE:
        raise UserError(f"block_rows {block_rows} is less than one tile of {TILE} rows: give block_rows >= {TILE} "
                        f"(rows_for_budget never gives less)")
    step = block_rows // TILE * TILE
    for begin in range(0, len(index), step):
        block = prepare(source.rows(index[begin:begin + step]))
        for start in range(0, len(block), TILE):
            # A copy, not a view: a view held by the caller would keep this whole block alive
            # while the next one is read (3 blocks at once, not the 2 rows_for_budget counts).
            tile = block[start:start + TILE]
            yield begin + start, tile.clone() if isinstance(tile, torch.Tensor) else tile.copy()
        del block, tile  # before the next block is read


def standardizer(source: FeatureSource, train_index: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean_ and scale_ ((F,) float64 each) of the rows train_index, in one pass.

    Sums of deviations from the first tile's mean, as accurate as two passes (a plain sum of
    squares loses a feature whose mean is large beside its std); scale is the population std,
    with 1 for features scikit-learn calls constant (variance within its rounding bound)."""
    index = np.sort(np.asarray(train_index))
    shift, total, squares = None, 0.0, 0.0
    for _, x in _tiles(source, index, block_rows):
        shift = x.mean(axis=0) if shift is None else shift  # near the mean: little cancels below
        total, squares = total + (x - shift).sum(axis=0), squares + np.square(x - shift).sum(axis=0)
    count = len(index)
    mean = shift + total / count
    var = np.maximum(squares / count - np.square(total / count), 0.0)
    eps = np.finfo(np.float64).eps  # sklearn.preprocessing._data._is_constant_feature
    constant = var <= count * eps * var + np.square(count * mean * eps)
    return mean, np.where(constant, 1.0, np.sqrt(var))


def _standardizing(mean: torch.Tensor, scale: torch.Tensor):
    """block (B, F) -> (B, F) float64 on mean's device, standardised as StandardScaler does."""
    def prepare(block: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(block, dtype=torch.float64, device=mean.device)
        return (x - mean).div_(scale)  # a new block: the source's may be a view of its storage
    return prepare


def _logits(x: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """(B, k) logits of standardised x (B, F); a single row (two classes) gives [0, w.x + b], whose
    softmax is scikit-learn's [1 - sigmoid, sigmoid]."""
    z = torch.addmm(intercept, x, coef.T)
    return torch.cat([torch.zeros_like(z), z], dim=1) if len(coef) == 1 else z


def _sample_weights(codes: np.ndarray, n_present: int, class_weight: str | None) -> np.ndarray:
    """(n,) w_i: 1, or n / (n_present * count(y_i)) (sklearn's compute_class_weight "balanced")."""
    if class_weight is None:
        return np.ones(len(codes))
    if class_weight != "balanced":
        raise UserError(f"class_weight {class_weight!r} is not known: give None or 'balanced'")
    counts = np.bincount(codes, minlength=n_present)
    return (len(codes) / (n_present * counts))[codes]


def fit_logistic_streamed(source: FeatureSource, y: np.ndarray, train_index: np.ndarray, C: float,
                          mean: np.ndarray, scale: np.ndarray, *, n_classes: int,
                          class_weight: str | None = None, max_epochs: int = 1000, tol: float = 1e-4,
                          block_rows: int, device: torch.device | str = "cpu"
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LogisticRegression(C=C, class_weight=class_weight, tol=tol) fitted on the rows train_index
    of `source`, standardised with (mean, scale) from `standardizer`, reading block_rows (>= TILE)
    at a time.

    y: (len(source),) class numbers in [0, n_classes). max_epochs: passes over the training rows
    (one per L-BFGS evaluation); tol: the largest gradient entry of the objective divided by
    C * sum w_i (scikit-learn's tol). Returns coef_ (k, F), intercept_ (k,) and classes_ (k,), as
    scikit-learn does: k = the classes present in training, and one row (k = 1, classes (2,)) for
    two classes; LinearProbe.from_fitted(mean, scale, coef, intercept, classes) takes them."""
    y = np.asarray(y)
    train_index = np.sort(np.asarray(train_index))  # in storage order: sequential reads
    if y.min(initial=0) < 0 or y.max(initial=0) >= n_classes:
        raise UserError(f"labels must be class numbers in [0, {n_classes}): got {y.min()}..{y.max()}")
    classes = np.unique(y[train_index])
    if len(classes) < 2:
        raise UserError(f"the training split has only class {classes.tolist()}: logistic regression needs "
                        f"at least two; use folds whose training utterances hold two classes or more")
    codes = np.searchsorted(classes, y[train_index])
    weights = _sample_weights(codes, len(classes), class_weight)
    l2 = 1.0 / (C * weights.sum())  # sklearn's l2_reg_strength on its mean loss

    f64 = dict(dtype=torch.float64, device=torch.device(device))
    rows = 1 if len(classes) == 2 else len(classes)
    coef = torch.zeros(rows, source.n_features, **f64, requires_grad=True)  # zeros: sklearn's start
    intercept = torch.zeros(rows, **f64, requires_grad=True)
    standardize = _standardizing(torch.as_tensor(mean, **f64), torch.as_tensor(scale, **f64))
    codes_t, weights_t = torch.as_tensor(codes, device=f64["device"]), torch.as_tensor(weights / weights.sum(), **f64)

    def closure() -> torch.Tensor:
        """The objective at (coef, intercept), with its exact gradient, in one pass over the blocks."""
        with torch.no_grad():
            loss = torch.zeros((), **f64)
            grad_coef, grad_intercept = torch.zeros_like(coef), torch.zeros_like(intercept)
            for start, x in _tiles(source, train_index, block_rows, standardize):
                part = slice(start, start + len(x))
                logp = torch.log_softmax(_logits(x, coef, intercept), dim=1)
                w, target = weights_t[part], codes_t[part]
                loss -= (w * logp.gather(1, target[:, None])[:, 0]).sum()
                residual = logp.exp_()  # d CE / d logits = p - onehot(y)
                residual[torch.arange(len(target)), target] -= 1
                residual = (residual * w[:, None])[:, -rows:]  # one row: only the sigmoid's logit is free
                grad_coef.addmm_(residual.T, x)
                grad_intercept += residual.sum(dim=0)
            coef.grad, intercept.grad = grad_coef.add_(coef, alpha=l2), grad_intercept
            return loss + 0.5 * l2 * coef.square().sum()

    optimizer = torch.optim.LBFGS([coef, intercept], lr=1, max_iter=max_epochs, max_eval=max_epochs,
                                  tolerance_grad=tol, tolerance_change=np.finfo(float).eps,  # loss no longer moves
                                  history_size=HISTORY, line_search_fn="strong_wolfe")
    optimizer.step(closure)
    if optimizer.state[coef]["func_evals"] >= max_epochs:  # sklearn warns too, and keeps the last iterate
        log.warning("logistic regression (C=%g) used all %d passes (max_epochs) before its gradient fell to tol %g: "
                    "raise max_epochs (linear_max_iter) for the optimum", C, max_epochs, tol)
    return coef.detach().cpu().numpy(), intercept.detach().cpu().numpy(), classes


def predict_proba_streamed(source: FeatureSource, index: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                           coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, n_outputs: int,
                           block_rows: int, device: torch.device | str = "cpu") -> np.ndarray:
    """(len(index), n_outputs) class probabilities of the rows index (in that order), as the
    fitted pipeline's predict_proba put in the columns `classes`; 0 for classes absent in training."""
    f64 = dict(dtype=torch.float64, device=torch.device(device))
    standardize = _standardizing(torch.as_tensor(mean, **f64), torch.as_tensor(scale, **f64))
    coef_t, intercept_t = torch.as_tensor(np.atleast_2d(coef), **f64), torch.as_tensor(np.atleast_1d(intercept), **f64)
    probs = np.zeros((len(index), n_outputs))
    index = np.asarray(index)
    order = np.argsort(index, kind="stable")  # read in storage order, answer in the caller's
    for start, x in _tiles(source, index[order], block_rows, standardize):
        part = order[start:start + len(x)]
        probs[np.ix_(part, classes)] = torch.softmax(_logits(x, coef_t, intercept_t), dim=1).cpu().numpy()
    return probs


def _working_set(n_features: int, n_classes: int, rows: int, history: int) -> int:
    """Bytes the fitter holds at once: a block as read and standardised (rows, F), per-row logits
    and residuals, and the (k, F) solver state (k = 1 for two classes) with `history` L-BFGS pairs."""
    k = 1 if n_classes == 2 else n_classes
    solver = (2 * history + SOLVER_COPIES) * k * n_features + 2 * n_features  # + mean and scale
    return FLOAT64 * (solver + rows * (2 * n_features + 3 * n_classes))


def rows_for_budget(n_features: int, budget_bytes: int, n_classes: int, history: int = HISTORY) -> int:
    """The most rows (a multiple of TILE) a block may have for the fitter to stay within
    budget_bytes less HEADROOM (streaming.py's 1/8: Python objects, the allocator, and the labels and
    indices, tens of bytes per utterance). Raises MemoryBudgetError naming the minimum budget when
    not even one tile fits."""
    usable = budget_bytes - int(budget_bytes * HEADROOM)
    fixed, per_row = _working_set(n_features, n_classes, 0, history), _working_set(n_features, n_classes, 1, history)
    per_row -= fixed
    if usable < fixed + TILE * per_row:
        need = math.ceil((fixed + TILE * per_row) / (1 - HEADROOM))
        raise MemoryBudgetError(
            f"--memory-budget {format_size(budget_bytes)} is too small to fit the linear probe on {n_features} "
            f"features: it needs at least {format_size(need)} (the solver's {format_size(fixed)} and a block of "
            f"{TILE} rows, plus 1/8 headroom); raise --memory-budget, or probe fewer states")
    return (usable - fixed) // per_row // TILE * TILE

"""What a head learns: class labels (`Classification`) or continuous targets (`Regression`).

The one training loop (fitting.py) asks its task, never which task it holds. `make_task`
gives a task and its y: (n,) int64 class numbers, or (n, n_targets) float64 target values.

    names                 the outputs' names: class names, or target names ("arousal", ...)
    n_outputs             the head's output width
    fit_y(y, model)       what the loss compares the trained part's outputs with (batches)
    prepare(model, y, i)  fix what the head learns from training utterances i about the outputs
    loss(config, y_train) the loss function of (trained part's outputs, fit_y batch)
    score_name, score     the validation score that chooses the epoch, C or grid setting
                          (higher is better): "ua", or "ccc", the mean CCC over targets
    fold_metrics, summarize, primary
                          test metrics of one fold, their mean and std over folds, and the
                          summary's headline {"mean", "std"} (UA, or mean CCC)

Predictions are what `batches.predict` returns: class probabilities (n, n_classes), or target
values (n, n_targets) on the targets' own scale.

Regression. Targets are standardised with the training split's mean and std: the head holds
them as buffers (heads.Head.standardize_outputs), learns standardised values, and its forward
puts them back on the targets' scale, so an exported head predicts real values. The default
loss is 1 - CCC, averaged over targets (computed over each batch, as in the dimensional
emotion literature: CCC is a corpus-level statistic, a batch is its sample); `loss="mse"` is
the mean squared error of the standardised values instead. CCC is invariant to one affine
map applied to truth and prediction alike, so standardising changes no score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .errors import OptionError
from .metrics import fold_metrics, regression_fold_metrics, summarize, summarize_regression

TASKS = ("classification", "regression")
LOSSES = ("ccc", "mse")  # regression only; classification always uses cross-entropy


class TaskError(OptionError):
    """A task that cannot be set up on this data; the message names the fix."""


@dataclass
class Classification:
    """Class labels: cross-entropy (optionally class-weighted), UA on validation."""

    labels: list[str]
    kind = "classification"
    score_name = "ua"

    @property
    def names(self) -> list[str]:
        return self.labels

    @property
    def n_outputs(self) -> int:
        return len(self.labels)

    def fit_y(self, y: np.ndarray, model) -> np.ndarray:
        return y

    def prepare(self, model, y: np.ndarray, train: np.ndarray) -> None:
        """Nothing to fix about class outputs."""

    def loss(self, config, y_train: np.ndarray, device: torch.device) -> nn.Module:
        weight = class_weights(y_train, self.n_outputs).to(device) if config.class_weights else None
        return nn.CrossEntropyLoss(weight=weight)

    def score(self, y_true: np.ndarray, preds: np.ndarray) -> float:
        return self.fold_metrics(y_true, preds)["ua"]

    def fold_metrics(self, y_true: np.ndarray, preds: np.ndarray) -> dict:
        return fold_metrics(y_true, preds.argmax(axis=1), self.n_outputs)

    def summarize(self, folds: list[dict]) -> dict:
        return summarize(folds, self.labels)

    @staticmethod
    def primary(summary: dict) -> dict:
        return summary["ua"]


@dataclass
class Regression:
    """Continuous targets: 1 - mean CCC (or MSE) on standardised values, mean CCC on validation."""

    targets: list[str]
    loss_name: str = "ccc"
    kind = "regression"
    score_name = "ccc"

    def __post_init__(self):
        if self.loss_name not in LOSSES:
            raise TaskError(f"loss {self.loss_name!r} not found; regression losses = {list(LOSSES)}")

    @property
    def names(self) -> list[str]:
        return self.targets

    @property
    def n_outputs(self) -> int:
        return len(self.targets)

    def fit_y(self, y: np.ndarray, model) -> np.ndarray:
        """(n, n_targets) float32 targets standardised with the head's training statistics."""
        mean, scale = (b.detach().cpu().double().numpy() for b in (model.output_mean, model.output_scale))
        return ((y - mean) / scale).astype(np.float32)

    def prepare(self, model, y: np.ndarray, train: np.ndarray) -> None:
        model.standardize_outputs(y[train].mean(axis=0), y[train].std(axis=0))

    def loss(self, config, y_train: np.ndarray, device: torch.device):
        return mse_loss if self.loss_name == "mse" else ccc_loss

    def score(self, y_true: np.ndarray, preds: np.ndarray) -> float:
        """Mean CCC over targets (an undefined CCC, constant predictions and truth, counts 0)."""
        per_target = regression_fold_metrics(y_true, preds, self.targets)
        return float(np.mean([np.nan_to_num(m["ccc"]) for m in per_target.values()]))

    def fold_metrics(self, y_true: np.ndarray, preds: np.ndarray) -> dict:
        """{"ccc": mean CCC over targets, "targets": {target: {"ccc", "pearson", "mae"}}}."""
        return {"ccc": self.score(y_true, preds), "targets": regression_fold_metrics(y_true, preds, self.targets)}

    def summarize(self, folds: list[dict]) -> dict:
        """{"ccc": {"mean", "std", "folds"} of the mean CCC over targets, "targets":
        summarize_regression (per target CCC, Pearson r, MAE)}."""
        ccc = np.array([f["ccc"] for f in folds])
        return {"ccc": {"mean": float(ccc.mean()), "std": float(ccc.std()), "folds": ccc.tolist()},
                "targets": summarize_regression([f["targets"] for f in folds], self.targets)}

    @staticmethod
    def primary(summary: dict) -> dict:
        return summary["ccc"]


def ccc_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - CCC averaged over targets, from the batch's population moments: pred, y (B, k)."""
    mp, my = pred.mean(dim=0), y.mean(dim=0)
    vp, vy = pred.var(dim=0, unbiased=False), y.var(dim=0, unbiased=False)
    cov = ((pred - mp) * (y - my)).mean(dim=0)
    ccc = 2 * cov / (vp + vy + (mp - my) ** 2).clamp(min=1e-8)
    return 1 - ccc.mean()


def mse_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


def class_weights(y_train: np.ndarray, n_classes: int) -> torch.Tensor:
    """(n_classes,) float32 n / (n_classes * count); 0 for a class absent from training."""
    counts = np.bincount(y_train, minlength=n_classes).astype(np.float64)
    w = np.divide(len(y_train), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


Task = Classification | Regression


def as_task(task: Task | int) -> Task:
    """A task, or an int n: the classification of n unnamed classes (how callers that count
    classes pass it)."""
    return Classification([str(c) for c in range(task)]) if isinstance(task, int) else task


def make_task(data, config) -> tuple[Task, np.ndarray]:
    """The task of a TrainConfig on a LayerData: its classes, or the targets config.targets
    (every target of the data when empty) with their values. Refuses a regression on data
    without targets, an unknown target, and utterances lacking a value (counted)."""
    if config.task == "classification":
        labels, y = data.classes()
        return Classification(labels), y
    available = list(data.target_names)
    if not available:
        raise TaskError("this cache's utterances carry no numeric targets: extract a corpus with targets (a csv "
                        "with numeric columns, iemocap, msp-podcast) or train without --task regression")
    targets = list(config.targets) or available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise TaskError(f"target {unknown[0]!r} not found; this cache's targets = {available}")
    y = data.target_values[:, [available.index(t) for t in targets]].astype(np.float64)
    lacking = ~np.isfinite(y)
    if lacking.any():
        # Refused, not dropped: extraction validates that every record has every target, so a
        # hole means the cache's records are not what extraction wrote, and dropping rows would
        # also change the folds against a classification run on the same cache.
        rows = lacking.any(axis=1)
        raise TaskError(f"{rows.sum()} of {len(y)} utterances lack a value of {[t for t, c in zip(targets, lacking.any(axis=0)) if c]}"
                        f" (e.g. {data.ids[rows][:3].tolist()}): re-extract the cache from records with every target filled in")
    return Regression(targets, config.loss), y

"""Fitting one head on one split: the one training loop, and the linear probe.

    fit_head(name, data, y, train, select | fixed choice)    one head on one split  ->  Fit

A head is fitted by what it `selects` on validation speakers (heads.Head): the pooling heads
by gradient descent with the epoch chosen on validation (`fit_by_epochs`, the one training
loop, used for folds, sweeps and exports), the linear probe by scikit-learn with C chosen on
validation (`fit_logistic`). With a `fixed` choice instead of validation utterances (an export
on all speakers), the choice is applied as given.

What is learned is the run's task (tasks.py, config.task): class labels, scored by UA, or
continuous targets (`task="regression"`, `targets`), scored by the mean CCC over targets. The
loop asks the task for its loss, its validation score and its metrics, so every head, fitter,
ensemble and refit below works for both; "UA" below reads "mean CCC" for a regression.

Schedule (the paper's, Shendabadi et al. 2026): AdamW, lr 1e-3, batch 16, dropout 0.3, cross-entropy, cosine decay after a
linear warm-up over the first tenth of the epochs, the lr set once per epoch (`get_lr`).
The paper trains attentive pooling 10 epochs and QKV 30; we default to 30 for every head, so
the heads get the same budget, and because the epoch is chosen on validation a longer run only
adds candidates (`--epochs 10` gives the paper's attentive schedule).

Time masking (`time_mask`, off by default; a sweep grid key, so it can be chosen on validation):
each training batch loses about that fraction of every utterance's real frames, in spans of
MASK_SPAN frames at random places, and the remaining frames close up (`drop_spans`). Spans,
not single frames: neighbouring 20 ms states have seen each other through self-attention, so
one dropped frame is all but restored by its neighbours, while a 200 ms gap removes a
syllable's worth. Removed, not zeroed: after standardisation a zero frame is the average
frame, which pooling would still count; a removed frame is simply not there, for every head
(the LSTM of `cta` included). Padding is never counted or kept, every utterance keeps at least
one frame, and validation, test and export never mask.

Efficiency: the cost is the front Linear over every frame, so batches are padded once per fold
(lengths bucketed to limit padding, kept in the cache's dtype, moved to the device once) and
only their order is shuffled each epoch; compute is float32. A layer larger than the memory
budget is streamed instead (streaming.py): the loop is the same, its batches are read a
block of shards at a time (batches.batch_source).

"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .batches import EVAL_BATCH_SIZE, batch_source, drop_spans, in_order, predict, statistics_batches
from .config import ConfigError, TrainConfig
from .errors import UserError
from .features import LayerData
from .heads import Head, head_class, options_for, state_columns
from .metrics import fold_metrics
from .streaming import default_budget
from .tasks import Regression, Task, as_task

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the fold cannot continue."""


def get_lr(epoch: int, config: TrainConfig) -> float:
    """lr of a 0-based epoch: linear warm-up over ceil(warmup_fraction * epochs) epochs, then
    cosine decay towards 0. Warm-up epoch e uses lr * (e + 1) / (warmup + 1), so that no epoch
    trains at lr 0."""
    warmup = math.ceil(config.warmup_fraction * config.epochs)
    if epoch < warmup:
        return config.lr * (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, config.epochs - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """torch dtype of the training arithmetic for a --compute-dtype value on `device`."""
    if name == "auto":
        return faster_dtype(device.type)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@functools.lru_cache(maxsize=None)
def faster_dtype(device_type: str) -> torch.dtype:
    """bfloat16 if a matrix product of the front layer's shape runs at least 1.3x faster in it
    than in float32 on this device, else float32: measured (a few tenths of a second, once per
    process), because CPUs of one kind differ (bf16 units, AMX) and assuming gets it wrong."""
    device = torch.device(device_type)
    if device.type not in ("cpu", "cuda"):
        return torch.float32

    def seconds(dtype: torch.dtype, budget: float) -> float:
        """Best time of 8 products (B 1024, 512 -> 256); inf once one product is over budget."""
        # Constant operands: timing needs no random numbers, and the caller's RNG stays as it was.
        x = torch.full((1024, 512), 0.5, device=device, dtype=dtype)
        w = torch.full((512, 256), 0.25, device=device, dtype=dtype)
        best = math.inf
        for repeat in range(4):  # the first round is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(8 if repeat else 1):
                x @ w
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if not repeat and elapsed > budget:  # emulated in software: not worth measuring
                return math.inf
            best = min(best, elapsed) if repeat else best
        return best

    fp32 = seconds(torch.float32, math.inf)
    return torch.bfloat16 if seconds(torch.bfloat16, fp32) * 1.3 <= fp32 else torch.float32


def fork_rng(device: torch.device):
    """Context that saves torch's global RNG state (CPU and `device`) and restores it on exit,
    so that seeding inside it leaves the caller's random state untouched."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def fold_seed(seed: int, fold: int) -> int:
    """Independent, reproducible seed for one fold of a run."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def member_seed(seed: int, member: int) -> int:
    """Seed of ensemble member `member` of a fit seeded `seed` (a fold's: fold_seed(seed, fold)).
    Member 0 keeps `seed`, so an ensemble of one is the plain head."""
    return seed if member == 0 else int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


def ua_of(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    return fold_metrics(y_true, probs.argmax(axis=1), n_classes)["ua"]


# --- fitting one head ------------------------------------------------------------------------


@dataclass
class Fit:
    """A fitted head. selected: the choice ({"epoch": e} or {"C": c}) with its validation
    score under the task's score_name ("ua", or "ccc": the mean CCC over targets; None when
    the choice was fixed); history: one entry per epoch or C tried (fewer epochs than
    configured when patience stopped the run)."""

    model: Head
    options: dict  # the head's constructor arguments
    selected: dict
    history: list
    seconds: float
    compute_dtype: str = "float32"  # the arithmetic of the training steps
    select_probs: np.ndarray | None = None  # (len(select), n_outputs) predictions of the choice, in select's order


def fit_by_epochs(cls: type[Head], data: LayerData, y: np.ndarray, train: np.ndarray, select,
                  config: TrainConfig, task: Task, seed: int, device: torch.device,
                  fixed: dict | None = None) -> Fit:
    """The training loop: AdamW over config.epochs epochs of the schedule, keeping the state
    of the epoch with the best validation score on `select` (the task's: UA, or mean CCC),
    and the task's loss (tasks.py); with fixed={"epoch": e} (and select None),
    train epochs 0..e of the same schedule and keep the last. Raises NonFiniteLossError if
    the loss stops being finite. config.patience > 0 stops once that many epochs in a row
    brought no better validation score (the schedule stays config.epochs long).
    config.compute_dtype: the training steps' arithmetic (bfloat16 under autocast, float32
    master weights and loss; "auto" measures which is faster here, `faster_dtype`)."""
    t0 = time.perf_counter()
    options = options_for(cls, config, data.dim, task.n_outputs, data.n_states)
    last = config.epochs - 1 if fixed is None else int(fixed["epoch"])
    assert 0 <= last < config.epochs, f"epoch {last} of a {config.epochs}-epoch schedule"
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    with fork_rng(device):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = cls(**options)
        model.prepare(data, train, config)
        task.prepare(model, y, train)
        model = model.to(device)
        # The fixed input transform (standardisation) is applied to the batches as they are
        # built, not at every step (it holds no parameters): the same numbers, fewer passes.
        # The batch order is the first draw from rng, as in earlier versions (initialisation
        # draws from torch's RNG), so that a seed keeps giving the same heads. A streamed
        # layer draws its order within blocks of shards (streaming.py).
        # A head that reads statistics only trains on each utterance's raw mean and std.
        statistics = model.reads == "statistics"
        source = statistics_batches if statistics else functools.partial(batch_source, transform=model.inputs)
        train_batches = source(data, task.fit_y(y, model), train, config.batch_size, device, rng)
        if fixed is None:
            select_batches = source(data, None, select, EVAL_BATCH_SIZE, device)
            select_order = select_batches.order
        optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), config), lr=config.lr,
                                      weight_decay=config.weight_decay,
                                      fused=device.type in ("cpu", "cuda"))  # one kernel per step, not one per tensor
        loss_fn = task.loss(config, y[train], device)

        augment = functools.partial(drop_spans, fraction=config.time_mask) if config.time_mask else None

        def step(z, mask):  # logits of a transformed batch; bfloat16 products under autocast
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return (model.statistics_logits(z) if statistics else model.logits(z, mask)).float()

        def evaluate(z, mask):  # predictions on the targets' scale (regression; logits stay logits)
            return model.outputs(step(z, mask))

        best_score, best_epoch, best_state, best_probs, history = None, last, None, None, []
        score_key = f"select_{task.score_name}"
        for epoch in range(last + 1):
            lr = get_lr(epoch, config)
            train_loss = train_epoch(step, model, optimizer, loss_fn, train_batches, rng, lr, augment)
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(
                    f"epoch {epoch}: the training loss is {train_loss}; lower the learning rate (lr "
                    f"{lr:g} at this epoch, --lr {config.lr:g}) or check the cache for NaN/inf frames")
            entry = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
            if fixed is None:
                probs = predict(model, select_batches, config.compat_eval_dropout, evaluate)
                entry[score_key] = score = task.score(y[select_order], probs)
                if best_score is None or score > best_score:  # ties keep the earlier epoch
                    best_score, best_epoch, best_probs = score, epoch, probs
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append(entry)
            log.debug("epoch %d lr %.2e loss %.4f %s", epoch, lr, train_loss, entry.get(score_key, ""))
            if fixed is None and config.patience and epoch - best_epoch >= config.patience:
                log.debug("no better validation score for %d epochs: stopped after epoch %d", config.patience, epoch)
                break
        if best_state is not None:
            model.load_state_dict(best_state)
    return Fit(model.eval(), options, {"epoch": best_epoch, task.score_name: best_score}, history,
               time.perf_counter() - t0,
               str(dtype).removeprefix("torch."),
               None if best_probs is None else in_order(best_probs, select_order, select))


MIX_LOGITS = "mix.logits"  # the softmax logits of a multi-state head's heads.StateMix
LR_SCALE = "lr_scale"  # a parameter group's lr relative to the schedule's (param_groups)


def param_groups(named_parameters, config: TrainConfig) -> list:
    """AdamW's parameters of a head, from its (or a stack's) named_parameters(): all of them,
    one group at config.lr, as always, unless config sets the state mix apart. With mix_lr,
    the mix's logits (named ...mix.logits) form a group of their own without weight decay,
    whose lr is the schedule's times mix_lr / lr (`LR_SCALE`, read by set_lr); with mix
    "equal" they are left out, so they stay 0: equal weights. A head without a mix: one group."""
    named = list(named_parameters)
    mix = [p for name, p in named if name.endswith(MIX_LOGITS)]
    if not mix or (config.mix == "learned" and config.mix_lr is None):
        return [p for _, p in named]
    groups = [{"params": [p for name, p in named if not name.endswith(MIX_LOGITS)]}]
    if config.mix == "learned":
        groups.append({"params": mix, "weight_decay": 0.0, LR_SCALE: config.mix_lr / config.lr})
    return groups


def set_lr(optimizer, lr: float) -> None:
    """The schedule's lr for this epoch on every parameter group (times its LR_SCALE, if any)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_SCALE, 1.0)


def train_epoch(step, model: nn.Module, optimizer, loss_fn, batches, rng: np.random.Generator, lr: float,
                augment=None) -> float:
    """One pass over `batches` (a batch source, batches.batch_source: its `epoch(rng)` order) at
    learning rate lr; step(x, mask)
    gives the logits of a batch (model.logits on transformed batches); augment(x, mask), if
    given, changes each batch first (time masking: training batches only).

    Returns the mean training loss per utterance (may be NaN or inf: the caller decides).
    """
    set_lr(optimizer, lr)
    model.train()
    total, count = None, 0
    for x, mask, yb in batches.epoch(rng):
        x = x.float()
        if augment is not None:
            x, mask = augment(x, mask)
        loss = loss_fn(step(x, mask), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = loss.detach() * len(yb) + (0 if total is None else total)
        count += len(yb)
    return total.item() / count


def fit_logistic(cls: type[Head], data: LayerData, y: np.ndarray, train: np.ndarray, select,
                 config: TrainConfig, task: Task, seed: int, device: torch.device,
                 fixed: dict | None = None) -> Fit:
    """Logistic regression on the standardised frame statistics (LayerData.statistics) for
    each C of config.linear_c, keeping the best validation score on `select`; with
    fixed={"C": c}, that C. The result is the head `cls` (heads.LinearProbe) holding the
    fitted numbers. Regression: ridge regression of the targets, standardised with the
    training split's mean and std as every head's (tasks.py), with alpha = 1 / (2 C), the
    penalty-to-loss ratio of LogisticRegression's C (which minimises C * loss + |w|^2 / 2),
    so that the same grid means the same: larger C, weaker penalty; chosen on mean CCC.

    At scale: when scikit-learn's copies of the training rows would pass the memory budget (the
    StatsLayer's, else streaming.default_budget()), or the statistics are read from the cache
    as needed (cache.StatisticsRows), a classification probe is fitted by bigprobe.py: the same
    L2 objective and C grid, read a block of rows at a time. Each C's history entry names the
    solver that fitted it."""

    t0 = time.perf_counter()
    options = options_for(cls, config, data.dim, task.n_outputs, data.n_states)
    model = cls(**options)
    task.prepare(model, y, train)
    fit_c, solver = probe_fitter(data.statistics, task.fit_y(y, model), train, task, config, seed,
                                 getattr(data, "memory_budget", None))
    best_score, best_c, best, best_probs, history = None, None, None, None, []
    for c in config.linear_c if fixed is None else (float(fixed["C"]),):
        fitted, predict = fit_c(c)
        score = probs = None
        if fixed is None:
            probs = probe_outputs(model, predict(select), task)
            score = task.score(y[select], probs)
            history.append({"C": c, f"select_{task.score_name}": score, "solver": solver})
        if best is None or score > best_score:  # ties keep the smaller C, the first of the grid
            best_score, best_c, best, best_probs = score, c, fitted, probs
    model.from_fitted(*best)
    return Fit(model.to(device).eval(), options, {"C": best_c, task.score_name: best_score}, history,
               time.perf_counter() - t0, select_probs=best_probs)


def fit_fusion(cls: type[Head], data: LayerData, y: np.ndarray, train: np.ndarray, select,
               config: TrainConfig, task: Task, seed: int, device: torch.device,
               fixed: dict | None = None) -> Fit:
    """One linear probe per state of `data` (as fit_logistic fits one, on that state's mean
    and std), combined by heads.FusionProbe. For each C of config.linear_c, shared by the
    probes, the states' weights are 1/L each (config.fusion_weights "equal"), or those that
    fit the probes' outputs on `select` best ("validation": `fusion_weights`), and the C of the
    best fused score on `select` is kept with its weights; with fixed={"C": c, "weights":
    [...]}, those. The choice is made on validation speakers only: `select` is never trained on."""
    t0 = time.perf_counter()
    features = data.statistics
    if not isinstance(features, np.ndarray):
        raise ConfigError("the fusion head reads each state's statistics in memory, and this layer's are read "
                          "block by block: train --head linear on these states, or fewer states")
    options = options_for(cls, config, data.dim, task.n_outputs, data.n_states)
    model = cls(**options)
    width, d = features.shape[1] // 2, data.dim
    fitters = []
    for s, probe in enumerate(model.probes):
        task.prepare(probe, y, train)
        columns = state_columns(width, d, s)
        fitters.append(probe_fitter(features[:, columns], task.fit_y(y, probe), train, task, config, seed,
                                    getattr(data, "memory_budget", None))[0])
    best, history = None, []
    for c in config.linear_c if fixed is None else (float(fixed["C"]),):
        fits = [fit_c(c) for fit_c in fitters]
        if fixed is not None:
            best = (None, c, [fitted for fitted, _ in fits], np.asarray(fixed["weights"], dtype=np.float64), None)
            break
        outputs = np.stack([probe_outputs(probe, predict(select), task)
                            for probe, (_, predict) in zip(model.probes, fits)])  # (L, n_select, n_outputs)
        weights = fusion_weights(outputs, y[select], task) if config.fusion_weights == "validation" else \
            np.full(len(fits), 1.0 / len(fits))
        fused = fused_outputs(outputs, weights)
        score = task.score(y[select], fused)
        history.append({"C": c, f"select_{task.score_name}": score, "weights": weights.tolist()})
        if best is None or score > best[0]:  # ties keep the smaller C, the first of the grid
            best = (score, c, [fitted for fitted, _ in fits], weights, fused)
    score, c, fitted, weights, fused = best
    for probe, numbers in zip(model.probes, fitted):
        probe.from_fitted(*numbers)
    model.set_weights(weights)
    return Fit(model.to(device).eval(), options, {"C": c, "weights": weights.tolist(), task.score_name: score},
               history, time.perf_counter() - t0, select_probs=fused)


def fused_outputs(outputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The states' outputs (L, n, n_outputs) weighted by `weights` (L,): class probabilities
    (or target values) (n, n_outputs), as heads.FusionProbe gives them."""
    return np.tensordot(weights, outputs, axes=1)


def fusion_weights(outputs: np.ndarray, y: np.ndarray, task: Task) -> np.ndarray:
    """Weights (L,) on the simplex for the states' validation outputs (L, n, n_outputs) with
    labels y: those of the highest mean log-likelihood of the true class under the fused
    probabilities, or for a regression of the lowest squared error per target variance
    (a smooth stand-in for the CCC). Started from equal weights (found again when the states
    are alike) and solved by SLSQP, which keeps them non-negative and summing to 1."""
    from scipy.optimize import minimize

    n_states = len(outputs)
    if n_states == 1:
        return np.ones(1)
    if isinstance(task, Regression):
        y = np.asarray(y, dtype=np.float64).reshape(outputs.shape[1], -1)
        scale = 1.0 / np.maximum(y.var(axis=0), 1e-12)

        def loss(w):
            return float((((fused_outputs(outputs, w) - y) ** 2).mean(axis=0) * scale).sum())
    else:
        p_true = outputs[:, np.arange(outputs.shape[1]), np.asarray(y)]  # (L, n)

        def loss(w):
            return float(-np.log(np.maximum(w @ p_true, 1e-12)).mean())
    start = np.full(n_states, 1.0 / n_states)
    found = minimize(loss, start, method="SLSQP", bounds=[(0.0, 1.0)] * n_states,
                     constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},), options={"ftol": 1e-10})
    weights = np.clip(found.x, 0.0, None)
    return weights / weights.sum() if found.success and loss(weights / weights.sum()) <= loss(start) else start


def probe_fitter(features, y_fit: np.ndarray, train, task: Task, config: TrainConfig, seed: int,
                 budget: int | None = None):
    """(C -> (from_fitted's arguments, predict(rows) -> outputs (rows, n_outputs)), the solver's
    name) for the probe's `features` (n, F): scikit-learn when its copies of the training rows
    fit `budget` bytes (None: streaming.default_budget()), else bigprobe's streamed solver
    (classification only; a regression over the budget is refused)."""
    budget = budget or default_budget()
    # scikit-learn holds the training rows twice more (a standardised copy, its own), in float64
    if isinstance(features, np.ndarray) and 2 * len(train) * features.shape[1] * 8 <= budget:
        return _sklearn_fitter(features, y_fit, train, task, config, seed), "scikit-learn lbfgs"
    if isinstance(task, Regression):
        raise ConfigError(f"the ridge probe's {features.shape[1]} features of {len(train)} utterances do not fit "
                          f"the memory budget ({budget} bytes): raise --memory-budget, or probe fewer states")
    solver = "streamed lbfgs (bigprobe)"
    log.info("linear probe: %d features of %d utterances over the memory budget: fitted by %s",
             features.shape[1], len(train), solver)
    return _streamed_fitter(features, y_fit, train, task, config, budget), solver


def probe_outputs(model: Head, raw: np.ndarray, task: Task) -> np.ndarray:
    """A fitter's predictions (rows, n_outputs) as the head `model` gives them: class
    probabilities as they are, a regression's standardised values back on the targets' scale."""
    if isinstance(task, Regression):
        return model.outputs(torch.from_numpy(raw.astype(np.float64))).numpy()
    return raw


def _sklearn_fitter(features: np.ndarray, y_fit: np.ndarray, train, task: Task, config: TrainConfig, seed: int):
    """C -> (from_fitted's arguments, predict(rows) -> outputs (rows, n_outputs)): scikit-learn on
    the features in memory (StandardScaler, then LogisticRegression, or Ridge for a regression)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(c: float):
        if isinstance(task, Regression):
            fitter = Ridge(alpha=1 / (2 * c))
        else:
            fitter = LogisticRegression(C=c, max_iter=config.linear_max_iter, random_state=seed,
                                        class_weight="balanced" if config.class_weights else None)
        pipeline = make_pipeline(StandardScaler(), fitter).fit(features[train], y_fit[train])
        scaler, fitted = pipeline[0], pipeline[-1]
        classes = getattr(fitted, "classes_", None)

        def predict(rows):
            if isinstance(task, Regression):
                return pipeline.predict(features[rows]).reshape(len(rows), -1)
            probs = np.zeros((len(rows), task.n_outputs))
            probs[:, classes] = pipeline.predict_proba(features[rows])
            return probs
        return (scaler.mean_, scaler.scale_, fitted.coef_, fitted.intercept_, classes), predict
    return fit


def _streamed_fitter(features, y_fit: np.ndarray, train, task: Task, config: TrainConfig, budget: int):
    """As _sklearn_fitter, for features too large to hold (classification): the same objective,
    read a block of rows at a time within `budget` bytes (bigprobe.py)."""
    from . import bigprobe

    source = bigprobe.ArraySource(features)
    block = bigprobe.rows_for_budget(source.n_features, budget, task.n_outputs)
    mean, scale = bigprobe.standardizer(source, np.asarray(train), block)

    def fit(c: float):
        coef, intercept, classes = bigprobe.fit_logistic_streamed(
            source, y_fit, np.asarray(train), c, mean, scale, n_classes=task.n_outputs,
            class_weight="balanced" if config.class_weights else None, max_epochs=config.linear_max_iter,
            block_rows=block)

        def predict(rows):
            return bigprobe.predict_proba_streamed(source, np.asarray(rows), mean, scale, coef, intercept, classes,
                                                   task.n_outputs, block)
        return (mean, scale, coef, intercept, classes), predict
    return fit


@dataclass(frozen=True)
class Fitter:
    """How heads that select `key` are fitted, and which TrainConfig settings that reads
    (besides the head's own constructor options)."""

    fit: Callable[..., Fit]
    settings: tuple[str, ...]


FITTERS = {
    "epoch": Fitter(fit_by_epochs, ("epochs", "patience", "batch_size", "lr", "weight_decay", "warmup_fraction",
                                    "class_weights", "standardize", "compute_dtype", "time_mask", "loss",
                                    "stack_members", "frame_pool")),
    "C": Fitter(fit_logistic, ("linear_c", "linear_max_iter", "class_weights", "frame_pool")),
    "fusion": Fitter(fit_fusion, ("linear_c", "linear_max_iter", "class_weights", "frame_pool", "fusion_weights")),
}


def fitter_of(name: str) -> Fitter:
    cls = head_class(name)
    return FITTERS[cls.fitted_by or cls.selects]


def fit_head(name: str, data: LayerData, y: np.ndarray, train, select, config: TrainConfig,
             task: Task | int, seed: int, device: torch.device, fixed: dict | None = None) -> Fit:
    """Fit head `name` on the utterances `train`, choosing on `select` (validation), or with
    the choice `fixed` (then select is None). y: of all of `data`, (n,) class numbers, or
    (n, n_targets) target values; task: its tasks.Classification or Regression (an int n: n
    classes)."""
    assert (select is None) == (fixed is not None), "give validation utterances or a fixed choice"
    return fitter_of(name).fit(head_class(name), data, y, np.asarray(train), select, config,
                               as_task(task), seed, device, fixed)


def mix_settings(name: str, config: TrainConfig, n_states: int | None = None) -> dict:
    """The state-mix settings that decide head `name`'s result on n_states states (None: not
    known yet, as at a sweep's planning): none for a head that does not mix states or for one
    state (no mix: a no-op there), mix_lr only for a learned mix."""
    if not head_class(name).mixes_states or n_states == 1:
        return {}
    return {"mix": config.mix} if config.mix == "equal" else {"mix": config.mix, "mix_lr": config.mix_lr}


def settings_read(name: str, config: TrainConfig, dim: int = 1, n_classes: int = 2,
                  n_states: int | None = None) -> dict:
    """The TrainConfig settings that decide head `name`'s result (on n_states states, if
    known): its fitter's settings, its constructor options and its mix settings (what a grid
    key must change to matter for this head; the fusion head's weights, like a mix, on
    several states only)."""
    cls = head_class(name)
    fitter = [k for k in fitter_of(name).settings if not (k == "fusion_weights" and n_states == 1)]
    return {**{k: getattr(config, k) for k in fitter},
            **cls.options(config, dim, n_classes), **mix_settings(name, config, n_states)}

"""Fit heads on cached layers: one training loop, and runs across speaker-independent folds.

    fit_head(name, data, y, train, select | fixed choice)    one head on one split  ->  Fit
    run_folds(data, folds, name, TrainConfig[, run folder])  every fold, tested once ->  RunResult

A head is fitted by what it `selects` on validation speakers (heads.Head): the pooling heads
by gradient descent with the epoch chosen on validation (`fit_by_epochs`, the one training
loop, used for folds, sweeps and exports), the linear probe by scikit-learn with C chosen on
validation (`fit_logistic`). With a `fixed` choice instead of validation utterances (an export
on all speakers), the choice is applied as given.

What is learned is the run's task (tasks.py, config.task): class labels, scored by UA, or
continuous targets (`task="regression"`, `targets`), scored by the mean CCC over targets. The
loop asks the task for its loss, its validation score and its metrics, so every head, fitter,
ensemble and refit below works for both; "UA" below reads "mean CCC" for a regression.

For every fold, run_folds trains on the training speakers, picks the epoch (or C) with the best
UA on the validation speakers (carved from the training speakers, see folds.py), then evaluates
the test speakers once with that state and dropout off. One seed fixes everything: the folds'
carving, every fold's initialisation, batch order and dropout masks (torch's global RNG is
forked per fold and restored, numpy uses a local Generator), so the same command gives the
same metrics on the same machine (on a GPU, up to non-deterministic kernels).

Schedule (the paper's, Shendabadi et al. 2026): AdamW, lr 1e-3, batch 16, dropout 0.3, cross-entropy, cosine decay after a
linear warm-up over the first tenth of the epochs, the lr set once per epoch (`get_lr`).
The paper trains attentive pooling 10 epochs and QKV 30; we default to 30 for every head, so
the heads get the same budget, and because the epoch is chosen on validation a longer run only
adds candidates (`--epochs 10` gives the paper's attentive schedule).

Refit (`refit`, off by default): once the epoch (or C, or in a sweep the grid setting) is
chosen on the validation speakers, the head is trained again from scratch on training +
validation speakers with that choice and the same seed, and that head is tested, once. The
test speakers still choose nothing; the validation speakers only stop being held out after
they have chosen. With as many epochs as chosen, the refit head takes more steps per epoch
(more utterances): the usual convention, and the one the all-speaker export follows.

Time masking (`time_mask`, off by default; a sweep grid key, so it can be chosen on validation):
each training batch loses about that fraction of every utterance's real frames, in spans of
MASK_SPAN frames at random places, and the remaining frames close up (`drop_spans`). Spans,
not single frames: neighbouring 20 ms states have seen each other through self-attention, so
one dropped frame is all but restored by its neighbours, while a 200 ms gap removes a
syllable's worth. Removed, not zeroed: after standardisation a zero frame is the average
frame, which pooling would still count; a removed frame is simply not there, for every head
(the LSTM of `cta` included). Padding is never counted or kept, every utterance keeps at least
one frame, and validation, test and export never mask.

Compatibility switches reproduce flaws of published setups, for comparison only:
`compat_select_on_test` trains on all non-test speakers and picks the epoch (or the linear
head's C) on the test fold, which is optimistic; `compat_eval_dropout` leaves dropout on at
evaluation (a no-op for the mean and linear heads, which have no dropout) (both: the reference
code); `compat_speaker_overlap` runs fold files that test speakers they also train on
(EmoBox's folds of URDU, ShEMO, EmoDB: speaker-dependent, folds.py). Results made with any of
them are marked FLAWED, naming the flaws, in config.json (`flawed_compat`, `flawed`) and in the
printed table, and `ser-cache compare` never pairs them with honest ones.

A run folder (results.RunFolder) is written fold by fold, each file atomically: a run killed
at any point resumes from its finished folds when re-run with the same settings.

Efficiency: the cost is the front Linear over every frame, so batches are padded once per fold
(lengths bucketed to limit padding, kept in the cache's dtype, moved to the device once) and
only their order is shuffled each epoch; compute is float32. A layer larger than the memory
budget is streamed instead (streaming.py): the loop is the same, its batches are read a
block of shards at a time (batches.batch_source).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn

from .batches import (
    EVAL_BATCH_SIZE,
    batch_source,
    drop_spans,
    in_order,
    predict,
    predict_proba,
    statistics_batches,
)
from .device import pick_device
from .errors import OptionError, UserError
from .features import LayerData, StatsLayer
from .folds import Folds, make_folds
from .heads import Head, head_class, load_head, one_head, options_for, save_head
from .layers import Selection, label, parse_selection, states_of, to_json
from .metrics import fold_metrics
from .streaming import default_budget
from .results import FoldRecord, RunConfig, RunFolder, RunMetrics, remove_temporaries
from .tasks import LOSSES, TASKS, Classification, Regression, Task, as_task, make_task

if TYPE_CHECKING:
    from .crosscorpus import CrossCorpus, CrossResult

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
STACK_MODES = ("auto", "on", "off")  # stack_members (stacking.py)


class ConfigError(OptionError):
    """A setting that cannot be used; the message names the fix."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the fold cannot continue."""


@dataclass
class TrainConfig:
    """Every training setting, with its default. `TrainConfig.from_dict` refuses unknown keys."""

    epochs: int = 30  # the epoch kept is chosen on the validation speakers
    # Stop after this many epochs without a better validation UA (0: never). In 18 folds of a
    # 30-epoch RAVDESS sweep (Whisper base state 3; mean, attentive, qkv) the epoch chosen was
    # 0-15, median 8: stopping after 10 epochs without improvement would have chosen the same
    # epoch in every fold and run 64% of the epochs (docs/findings.md, "Training time, measured").
    patience: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's default
    warmup_fraction: float = 0.1  # of the epochs, linear warm-up before the cosine decay
    dropout: float = 0.3
    d_model: int = 256
    n_heads: int = 12  # attentive, qkv, cta and stats (stats also takes 0)
    head_dim: int = 4  # attentive (d_a) and qkv (d_k)
    attention_scale: bool = True  # attentive: divide scores by sqrt(head_dim)
    class_weights: bool = False  # inverse-frequency cross-entropy weights from the training split
    standardize: bool = True  # standardise input frames with the training split's mean and std (heads.PoolingHead)
    linear_c: tuple = (0.01, 0.1, 1.0, 10.0)  # linear head: C grid, chosen on validation
    linear_max_iter: int = 2000
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else mps, else cpu
    compute_dtype: str = "auto"  # training arithmetic: float32, bfloat16, or auto (the faster, measured)
    refit: bool = False  # retrain on training + validation speakers with the choice made on validation, then test
    ensemble: int = 1  # heads per fold, seeds member_seed(fold seed, m), probabilities averaged (heads.Ensemble)
    stack_members: str = "auto"  # train an ensemble's members as one stacked model (stacking.py); auto: on CUDA
    time_mask: float = 0.0  # training only: fraction of each utterance's frames dropped, in spans (drop_spans)
    # Encoder frames averaged into each frame a head reads (pooling.py), a multiple of what the
    # cache stores; 0: as the cache stores them. Applied when the layer is read, before the
    # input standardisation; a sweep grid key.
    frame_pool: int = 0
    task: str = "classification"  # or "regression": learn `targets` (tasks.py)
    targets: tuple = ()  # regression: target names; empty: every target the cache holds
    loss: str = "ccc"  # regression: "ccc" (1 - CCC, mean over targets) or "mse"; classes: cross-entropy
    compat_select_on_test: bool = False  # FLAWED (reference code): pick the epoch on the test fold
    compat_eval_dropout: bool = False  # FLAWED (reference code): dropout stays on at evaluation
    compat_speaker_overlap: bool = False  # FLAWED (speaker-dependent): fold files may test training speakers

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.time_mask < 1, "time_mask must be in [0, 1) (0: off)"),
            (self.frame_pool >= 0, "frame_pool must be >= 1 (encoder frames per frame read; 0: as the cache stores them)"),
            (min(self.d_model, self.head_dim) >= 1, "d_model and head_dim must be >= 1"),
            # 0 is the stats head without attention; the pooling heads refuse it (heads.attention_heads).
            (self.n_heads >= 0, "n_heads must be >= 0 (0: the stats head without attention)"),
            (len(self.linear_c) >= 1 and min(self.linear_c) > 0, "linear_c must be positive values"),
            (self.patience >= 0, "patience must be >= 0 (0: train every epoch)"),
            (self.ensemble >= 1, "ensemble must be >= 1 (1: one head per fold)"),
            (self.compute_dtype in COMPUTE_DTYPES, f"compute_dtype must be one of {COMPUTE_DTYPES}"),
            (self.task in TASKS, f"task must be one of {TASKS}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES} (regression; classification uses cross-entropy)"),
            (self.task == "regression" or not self.targets,
             "targets are learned by regression: add --task regression, or drop --targets"),
            (self.task == "classification" or not self.class_weights,
             "class weights weigh classes, and a regression has none: drop class_weights"),
            (self.stack_members in STACK_MODES, f"stack_members must be one of {STACK_MODES}"),
            (not (self.refit and self.compat_select_on_test),
             "refit trains on the speakers that chose, and with compat_select_on_test those are the test "
             "speakers: drop one of the two"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.linear_c = tuple(float(c) for c in self.linear_c)
        self.targets = tuple(str(t) for t in self.targets)

    @classmethod
    def from_dict(cls, overrides: dict) -> "TrainConfig":
        """Defaults updated with `overrides`; unknown keys and wrong types are refused."""
        defaults = cls()
        values = {}
        for key, value in overrides.items():
            if not hasattr(defaults, key):
                raise ConfigError(f"unknown setting {key!r}; settings = {[f.name for f in dataclasses.fields(cls)]}")
            values[key] = _coerce(key, value, getattr(defaults, key))
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def flawed(self) -> bool:
        return bool(self.flaws())

    def flaws(self) -> list[str]:
        """The compatibility switches on, each in words (FLAWS); empty for an honest config."""
        return [text for key, text in FLAWS.items() if getattr(self, key)]


# The compatibility switches, as results made with them are labelled.
FLAWS = {
    "compat_select_on_test": "selection on the test fold (compat_select_on_test)",
    "compat_eval_dropout": "dropout at evaluation (compat_eval_dropout)",
    "compat_speaker_overlap": "speaker-dependent: test speakers also trained on (compat_speaker_overlap)",
}


# Settings added after runs and sweeps were first saved, with the value that reproduces them: a
# stored config that lacks one was made with this value, whatever today's default is.
# (stack_members "auto": stacking was added with auto on CUDA only, where runs were never
# bit-reproducible; on a CPU, auto trains members one after another, as before.)
EARLIER_VALUES = {"frame_pool": 0, "patience": 0, "compute_dtype": "float32", "refit": False, "ensemble": 1, "time_mask": 0.0,
                  "task": "classification", "targets": [], "loss": "ccc", "stack_members": "auto",
                  "compat_speaker_overlap": False}


def as_made(stored: dict) -> dict:
    """A stored TrainConfig dict with the settings it predates filled in as they were then."""
    return {**TrainConfig().to_dict(), **EARLIER_VALUES, **stored}


def _coerce(key, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"setting {key!r} must be {type(default).__name__}, got {value!r}")
    return value


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
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
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


def train_epoch(step, model: nn.Module, optimizer, loss_fn, batches, rng: np.random.Generator, lr: float,
                augment=None) -> float:
    """One pass over `batches` (a batch source, batches.batch_source: its `epoch(rng)` order) at
    learning rate lr; step(x, mask)
    gives the logits of a batch (model.logits on transformed batches); augment(x, mask), if
    given, changes each batch first (time masking: training batches only).

    Returns the mean training loss per utterance (may be NaN or inf: the caller decides).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
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
    features = data.statistics
    options = options_for(cls, config, data.dim, task.n_outputs, data.n_states)
    model = cls(**options)
    task.prepare(model, y, train)
    y_fit = task.fit_y(y, model)
    budget = getattr(data, "memory_budget", None) or default_budget()
    # scikit-learn holds the training rows twice more (a standardised copy, its own), in float64
    if isinstance(features, np.ndarray) and 2 * len(train) * features.shape[1] * 8 <= budget:
        fit_c, solver = _sklearn_fitter(features, y_fit, train, task, config, seed), "scikit-learn lbfgs"
    elif isinstance(task, Regression):
        raise ConfigError(f"the ridge probe's {features.shape[1]} features of {len(train)} utterances do not fit "
                          f"the memory budget ({budget} bytes): raise --memory-budget, or probe fewer states")
    else:
        fit_c, solver = _streamed_fitter(features, y_fit, train, task, config, budget), "streamed lbfgs (bigprobe)"
        log.info("linear probe: %d features of %d utterances over the memory budget: fitted by %s",
                 features.shape[1], len(train), solver)
    best_score, best_c, best, best_probs, history = None, None, None, None, []
    for c in config.linear_c if fixed is None else (float(fixed["C"]),):
        fitted, predict = fit_c(c)
        score = probs = None
        if fixed is None:
            probs = predict(select)
            if isinstance(task, Regression):  # back on the targets' scale
                probs = model.outputs(torch.from_numpy(probs.astype(np.float64))).numpy()
            score = task.score(y[select], probs)
            history.append({"C": c, f"select_{task.score_name}": score, "solver": solver})
        if best is None or score > best_score:  # ties keep the smaller C, the first of the grid
            best_score, best_c, best, best_probs = score, c, fitted, probs
    model.from_fitted(*best)
    return Fit(model.to(device).eval(), options, {"C": best_c, task.score_name: best_score}, history,
               time.perf_counter() - t0, select_probs=best_probs)


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
}


def fitter_of(name: str) -> Fitter:
    return FITTERS[head_class(name).selects]


def fit_head(name: str, data: LayerData, y: np.ndarray, train, select, config: TrainConfig,
             task: Task | int, seed: int, device: torch.device, fixed: dict | None = None) -> Fit:
    """Fit head `name` on the utterances `train`, choosing on `select` (validation), or with
    the choice `fixed` (then select is None). y: of all of `data`, (n,) class numbers, or
    (n, n_targets) target values; task: its tasks.Classification or Regression (an int n: n
    classes)."""
    assert (select is None) == (fixed is not None), "give validation utterances or a fixed choice"
    return fitter_of(name).fit(head_class(name), data, y, np.asarray(train), select, config,
                               as_task(task), seed, device, fixed)


@dataclass
class Chosen:
    """What fitting on one split hands to its single test: the head (a heads.Ensemble for
    config.ensemble > 1), the choice made on validation with its validation score
    (`selected`: UA "ua", or mean CCC "ccc"), each ensemble member's own (`members`: seed,
    choice, score, history; empty for one head), and, after `refit_selected`, how the head
    was retrained (`refit`: n_train, val_ua or val_ccc, seconds; empty when not refit)."""

    model: Head
    selected: dict
    history: list
    seconds: float
    compute_dtype: str = "float32"
    refit: dict = field(default_factory=dict)
    members: list = field(default_factory=list)

    @property
    def tested(self) -> str:
        """Which head is tested: "selected" (as chosen on validation) or "refit"."""
        return "refit" if self.refit else "selected"


def fit_selected(name: str, data: LayerData, y: np.ndarray, train, select, config: TrainConfig,
                 task: Task | int, seed: int, device: torch.device) -> Chosen:
    """Head `name` fitted on `train` with its epoch (or C) chosen on `select`.

    config.ensemble = N > 1: N members seeded member_seed(seed, m), each choosing its own
    epoch (or C) on `select`, as one heads.Ensemble. Its selected["ua"] (or "ccc") is the
    validation score of the members' mean probabilities (or values), what a sweep compares
    settings by, and selected[key] the median (lower middle) of their choices, for tables;
    each member's is in `members`. (The linear probe's fit does not depend on the seed: its
    members are alike.)
    """
    task = as_task(task)
    fits = fit_members(name, data, y, train, select, config, task, seed, device)
    seconds = sum(f.seconds for f in fits)
    if len(fits) == 1:
        fit = fits[0]
        return Chosen(fit.model, fit.selected, fit.history, seconds, fit.compute_dtype)
    key = head_class(name).selects
    members = [{"seed": member_seed(seed, m), **f.selected, "history": f.history} for m, f in enumerate(fits)]
    score = task.score(y[select], np.mean([f.select_probs for f in fits], axis=0))
    selected = {key: statistics.median_low(f.selected[key] for f in fits), task.score_name: score}
    return Chosen(one_head([f.model for f in fits]), selected, [], seconds, fits[0].compute_dtype, members=members)


def fit_members(name: str, data: LayerData, y: np.ndarray, train, select, config: TrainConfig,
                task: Task, seed: int, device: torch.device, fixed: list[dict] | None = None) -> list[Fit]:
    """The fits of config.ensemble members seeded member_seed(seed, m) (or of one per choice
    in `fixed`, then select is None): one after another, or as one stacked model when
    stacking.stacks says so (the same heads, see stacking.py; classification only for now:
    a regression ensemble trains its members one after another)."""
    from .stacking import fit_stacked, stacks

    fixed = fixed or [None] * config.ensemble
    seeds = [member_seed(seed, m) for m in range(len(fixed))]
    # Stacked members hold their batches in memory (make_batches): not for a streamed layer.
    if (len(seeds) > 1 and isinstance(task, Classification) and isinstance(data, LayerData)
            and stacks(head_class(name), config, device)):
        return fit_stacked(head_class(name), data, y, np.asarray(train), select, config, task.n_outputs, seeds,
                           device, None if select is not None else fixed,
                           loss=task.loss(config, y[np.asarray(train)], device), score=task.score)
    return [fit_head(name, data, y, train, select, config, task, s, device, fixed=f)
            for s, f in zip(seeds, fixed)]


def refit_selected(chosen: Chosen, name: str, data: LayerData, y: np.ndarray, train, select,
                   config: TrainConfig, task: Task | int, seed: int, device: torch.device) -> Chosen:
    """`chosen` retrained from scratch on train + select with the choice made on select and
    the same seed (an ensemble: every member with its own choice and seed). Its score on
    `select` is recorded as refit["val_ua"] (or "val_ccc"): those utterances were trained on,
    so it measures fit, not generalisation (selected["ua"] stays the honest one)."""
    task = as_task(task)
    key = head_class(name).selects
    both = np.sort(np.concatenate([np.asarray(train), np.asarray(select)]))
    choices = [m[key] for m in chosen.members] or [chosen.selected[key]]
    fits = fit_members(name, data, y, both, None, config, task, seed, device, [{key: c} for c in choices])
    model = one_head([f.model for f in fits])
    seconds = sum(f.seconds for f in fits)
    refit = {"n_train": len(both),
             f"val_{task.score_name}": task.score(y[select], predict_proba(model, data, select, device)),
             "seconds": seconds}
    return dataclasses.replace(chosen, model=model, seconds=chosen.seconds + seconds, refit=refit)


def settings_read(name: str, config: TrainConfig, dim: int = 1, n_classes: int = 2) -> dict:
    """The TrainConfig settings that decide head `name`'s result: its fitter's settings and its
    constructor options (what a grid key must change to matter for this head)."""
    cls = head_class(name)
    return {**{k: getattr(config, k) for k in FITTERS[cls.selects].settings},
            **cls.options(config, dim, n_classes)}


# --- all folds -------------------------------------------------------------------------------


@dataclass
class RunResult:
    """A head trained on every fold of one layer (or several, a tuple). metrics: the task's
    summary (tasks.py: metrics.summarize, or mean CCC and per-target scores); labels: the
    outputs' names (classes, or targets); models: the fold heads (eval mode), in fold order."""

    head: str
    layer: Selection
    labels: list[str]
    config: TrainConfig
    folds: list[FoldRecord]
    metrics: dict
    models: list[Head] = field(default_factory=list)
    cross_corpus: "CrossResult | None" = None  # with a test cache: the heads' metrics on it

    def table(self) -> str:
        """Per-fold and mean ± std table (percent; CCC, r and MAE as numbers), for printing."""
        sel = head_class(self.head).selects
        lines = self.regression_rows() if self.config.task == "regression" else self.classification_rows()
        lines += self.weights_table()
        if self.config.ensemble > 1:
            averaged = "values" if self.config.task == "regression" else "probabilities"
            lines.append(f"  ensembles of {self.config.ensemble} heads per fold (seeds derived from the fold's), "
                         f"{averaged} averaged; {sel}: the median of the members' choices on validation")
        if self.config.refit:
            lines.append(f"  tested: heads retrained on training + validation speakers with the {sel} chosen on "
                         "validation (refit)")
        if self.config.flawed:
            lines.append(f"  FLAWED, not an honest estimate: {'; '.join(self.config.flaws())}")
        return "\n".join(lines)

    def regression_rows(self) -> list[str]:
        """Per fold: CCC of each target; then per target CCC, Pearson r, MAE, mean ± std over folds."""
        sel = head_class(self.head).selects
        width = max([8] + [len(t) for t in self.labels])
        lines = [f"{'fold':>6} {'n_test':>6} {sel:>6} " + " ".join(f"{'CCC ' + t:>{width + 4}}" for t in self.labels)
                 + f" {'train s':>8} {'eval s':>7}"]
        for f in self.folds:
            ccc = [f.metrics["targets"][t]["ccc"] for t in self.labels]
            lines.append(f"{f.fold:>6} {len(f.test_ids):>6} {f.selected[sel]:>6g} "
                         + " ".join(f"{c:>{width + 4}.3f}" for c in ccc)
                         + f" {f.train_seconds:8.1f} {f.eval_seconds:7.2f}")
        lines.append("  mean ± std over folds:")

        def cell(m):
            return "n/a" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}"

        for t in self.labels:
            m = self.metrics["targets"][t]
            lines.append(f"  {t:<{width}}  CCC {cell(m['ccc'])}, Pearson r {cell(m['pearson'])}, MAE {cell(m['mae'])}")
        lines.append(f"  {'mean CCC':<{width}}  {cell(self.metrics['ccc'])} (over targets, then folds)")
        return lines

    def classification_rows(self) -> list[str]:
        sel = head_class(self.head).selects
        lines = [f"{'fold':>6} {'n_test':>6} {sel:>6} {'UA':>6} {'WA':>6} {'mF1':>6} {'wF1':>6} "
                 f"{'train s':>8} {'eval s':>7}"]
        for f in self.folds:
            m = f.metrics
            lines.append(f"{f.fold:>6} {len(f.test_ids):>6} {f.selected[sel]:>6g} {100 * m['ua']:6.2f} "
                         f"{100 * m['wa']:6.2f} {100 * m['macro_f1']:6.2f} {100 * m['weighted_f1']:6.2f} "
                         f"{f.train_seconds:8.1f} {f.eval_seconds:7.2f}")
        s = self.metrics
        lines.append("  mean ± std: " + ", ".join(
            f"{name} {100 * s[key]['mean']:.2f} ± {100 * s[key]['std']:.2f}"
            for name, key in (("UA", "ua"), ("WA", "wa"), ("macro-F1", "macro_f1"), ("weighted-F1", "weighted_f1"))))
        return lines

    def weights_table(self) -> list[str]:
        """The learned softmax weight of each state per fold, and their mean ± std (a
        multi-layer head; none otherwise)."""
        rows = [(f.fold, f.layer_weights) for f in self.folds if f.layer_weights is not None]
        if not rows:
            return []
        states = states_of(self.layer)
        lines = ["  layer weights (softmax over states, per fold):",
                 f"{'fold':>6} " + " ".join(f"{'state ' + str(s):>9}" for s in states)]
        lines += [f"{fold:>6} " + " ".join(f"{w:9.3f}" for w in weights) for fold, weights in rows]
        w = np.array([weights for _, weights in rows])
        lines.append(f"{'mean':>6} " + " ".join(f"{m:9.3f}" for m in w.mean(axis=0)))
        lines.append(f"{'std':>6} " + " ".join(f"{d:9.3f}" for d in w.std(axis=0)))
        return lines


def fold_split(folds: Folds, k: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, select, test) of fold k. FLAWED compat_select_on_test: the reference code's
    split, no validation speakers, the test fold picks the epoch."""
    train, val, test = folds.split(k)
    if config.compat_select_on_test:
        return np.sort(np.concatenate([train, val])), test, test
    return train, val, test


def train_fold(data: LayerData, y: np.ndarray, folds: Folds, k: int, head: str, config: TrainConfig,
               task: Task | int, device: torch.device) -> tuple[FoldRecord, Head]:
    """Fit `head` on fold k's training speakers, choose on its validation speakers (then, with
    config.refit, retrain on both with that choice), test once."""
    task = as_task(task)
    train, select, test = fold_split(folds, k, config)
    seed = fold_seed(config.seed, k)
    try:
        chosen = fit_selected(head, data, y, train, select, config, task, seed, device)
        if config.refit:
            chosen = refit_selected(chosen, head, data, y, train, select, config, task, seed, device)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"fold {k}, {e}") from None
    t0 = time.perf_counter()
    with fork_rng(device):  # seeded: even the FLAWED dropout at evaluation is reproducible
        torch.manual_seed(seed)
        probs = predict_proba(chosen.model, data, test, device, config.compat_eval_dropout)
    regression = isinstance(task, Regression)
    record = FoldRecord(fold=k, selected=chosen.selected, n_train=len(train), n_val=len(select),
                        test_ids=data.ids[test].tolist(), probs=probs, metrics=task.fold_metrics(y[test], probs),
                        true_values=y[test].tolist() if regression else None,
                        train_seconds=chosen.seconds, eval_seconds=time.perf_counter() - t0,
                        history=chosen.history, compute_dtype=chosen.compute_dtype, tested=chosen.tested,
                        refit=chosen.refit, members=chosen.members, layer_weights=chosen.model.layer_weights())
    return record, chosen.model


def run_folds(data: LayerData, folds: Folds, head: str, config: TrainConfig | None = None,
              out_dir: Path | None = None, cache: dict | None = None,
              overwrite: bool = False, cross_corpus: "CrossCorpus | None" = None) -> RunResult:
    """Train and test `head` on every fold of `folds` over the utterances of `data`.

    config.task "regression": the head learns config.targets of `data` (all of them when
    empty; the resolved list is what config.json records), tasks.make_task.
    cache: a JSON-able fingerprint of where `data` came from, stored in config.json.
    out_dir: when given, the run folder to write (results.RunFolder), fold by fold. A folder
    holding a finished run is refused unless overwrite; one holding an unfinished run of the
    same settings is resumed from its finished folds; one of other settings is refused
    (naming what differs) unless overwrite.
    cross_corpus: a test cache (and label map) the fold heads are also scored on, after
    the folds (crosscorpus.py); `data` already holds the mapped classes.
    """
    config = config or TrainConfig()
    cls = head_class(head)
    data = at_frame_pool(data, config)
    check_reads(head, config, isinstance(data, StatsLayer))
    if cross_corpus is not None and cross_corpus.target is not None:  # read as the training frames are
        cross_corpus.target = cross_corpus.target.pooled(data.frame_pool, "the test cache")
    folds = folds.aligned_to(data.ids)
    if isinstance(data, LayerData) and (data.n_frames < 1).any():
        raise ConfigError(f"{(data.n_frames < 1).sum()} utterances have no frames, e.g. "
                          f"{data.ids[data.n_frames < 1][:3]}: rebuild the cache or drop them")
    task, y = make_task(data, config)
    if isinstance(task, Regression):
        config = dataclasses.replace(config, targets=tuple(task.targets))  # recorded as resolved
    classes, class_y = data.classes()
    labels, n_outputs = task.names, task.n_outputs
    device = pick_device(config.device)
    run = RunConfig(
        head=head, layer=to_json(data.layer), labels=labels, dim=int(data.dim),
        class_counts=dict(zip(classes, np.bincount(class_y, minlength=len(classes)).tolist())),
        n_utterances=len(data), device=str(device), config=config.to_dict(),
        head_kwargs=options_for(cls, config, data.dim, n_outputs, data.n_states),
        folds={"protocol": folds.protocol, "n_folds": folds.n_folds, "seed": folds.seed,
               "sha256": folds_digest(folds)},
        flawed_compat=config.flawed, flawed=config.flaws(), cache=cache or {},
        versions={"torch": torch.__version__, "numpy": np.__version__},
        cross_corpus=cross_corpus.config if cross_corpus else {})
    folder = open_run_folder(out_dir, run, folds, overwrite) if out_dir is not None else None
    log.info("%s head on layer %s: %d utterances, %s, %d folds (%s), device %s",
             head, label(data.layer), len(data), f"{n_outputs} classes" if isinstance(task, Classification)
             else f"targets {', '.join(labels)}", folds.n_folds, folds.protocol, device)

    records, models = [], []
    for k in range(folds.n_folds):
        record = folder.read_fold(k) if folder else None
        if record is not None:
            log.info("fold %d: finished in an earlier run, kept", k)
            model = load_head(folder.head_path(k))[0]
        else:
            record, model = train_fold(data, y, folds, k, head, config, task, device)
            if folder:
                save_head(folder.head_path(k), model, head, run.head_kwargs, labels, data.layer,
                          fold=k, selected=record.selected)
                folder.write_fold(record)
        records.append(record)
        models.append(model)
        log.info("fold %d: %s %.4f (selected %s) train %.1fs eval %.2fs", k, task.score_name.upper(),
                 record.metrics[task.score_name], record.selected, record.train_seconds, record.eval_seconds)
        if record.layer_weights is not None:
            log.info("fold %d: layer weights %s", k, ", ".join(
                f"{s}: {w:.3f}" for s, w in zip(data.layers, record.layer_weights)))

    result = RunResult(head, data.layer, labels, config, records, task.summarize([r.metrics for r in records]), models)
    if folder:
        if isinstance(task, Regression):
            folder.write_value_predictions(data.ids, data.labels, labels, y, records)
        else:
            folder.write_predictions(data.ids, labels, y, records)
    if cross_corpus is not None:  # before metrics.json: a run killed in between is unfinished
        result.cross_corpus = cross_corpus.evaluate(labels, models, result.metrics, device, folder)
    if folder:
        details = [{"fold": r.fold, "selected": r.selected, "n_train": r.n_train, "n_val": r.n_val,
                    "n_test": len(r.test_ids), "train_seconds": r.train_seconds,
                    "eval_seconds": r.eval_seconds, "history": r.history, "tested": r.tested,
                    "refit": r.refit, "members": r.members,
                    **({"layer_weights": r.layer_weights} if r.layer_weights is not None else {})} for r in records]
        folder.write_metrics(RunMetrics(head, to_json(data.layer), result.metrics, details))  # last: marks it finished
    return result


def at_frame_pool(data, config: TrainConfig, what: str = "this layer"):
    """`data` (a LayerData or StatsLayer) as config's heads read it: each frame the mean of
    config.frame_pool encoder frames (0: as it is), or OptionError naming what `what` holds."""
    return data if not config.frame_pool else data.pooled(config.frame_pool, what)


def check_reads(head: str, config: TrainConfig, statistics_only: bool, what: str = "this cache") -> None:
    """Refuse a head (built from `config`) that reads frames on a layer of statistics only, and
    time masking for a head that reads no frames; each naming the fix."""
    reads = head_class(head).reading(config)
    if statistics_only and reads == "frames":
        raise ConfigError(f"the {head} head{_with_heads(head, config)} reads frames, and {what} holds only statistics "
                          "(mean and std per utterance): train --head linear or --head stats --heads 0 on it, or "
                          "this head on a frames cache (`ser-cache derive CACHE --out NEW --frame-pool K` makes a "
                          "smaller one)")
    if reads == "statistics" and config.time_mask and head_class(head).selects == "epoch":
        raise ConfigError(f"--time-mask drops frames, and the {head} head{_with_heads(head, config)} reads only "
                          f"each utterance's mean and std: set --time-mask 0, or give it attention heads")


def _with_heads(head: str, config: TrainConfig) -> str:
    """' with --heads N' for the head whose reading depends on it, else ''."""
    return f" with --heads {config.n_heads}" if head == "stats" else ""


def folds_digest(folds: Folds) -> str:
    """SHA-256 of every fold's (train, validation, test) utterance ids: equal digests, same folds."""
    h = hashlib.sha256()
    for k in range(folds.n_folds):
        h.update(json.dumps([folds.ids[i].tolist() for i in folds.split(k)]).encode())
    return h.hexdigest()


def open_run_folder(out_dir: Path, run: RunConfig, folds: Folds, overwrite: bool) -> RunFolder:
    """The run folder, created, resumed or refused (see run_folds); writes folds and config."""
    folder = RunFolder(out_dir)
    if (folder.root / RunFolder.CONFIG).is_file() and not overwrite:
        if folder.finished:
            raise ConfigError(f"{folder.root} already holds a finished run: choose another output folder "
                              "or allow overwriting")
        stored = folder.read_config()
        stored.config = as_made(stored.config)
        differences = stored.same_work(run)
        if differences:
            raise ConfigError(f"{folder.root} holds an unfinished run with other settings:\n  "
                              + "\n  ".join(differences)
                              + "\nRepeat its options to resume it, choose another output folder, or allow overwriting")
    elif overwrite and folder.root.is_dir():
        for old in [*folder.root.glob("fold_*.*"), *(folder.root / name for name in (
                RunFolder.METRICS, RunFolder.PREDICTIONS, RunFolder.CROSS_CORPUS, RunFolder.TARGET_PREDICTIONS))]:
            old.unlink(missing_ok=True)
    folder.root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder.root)
    folds.save(folder.root / RunFolder.FOLDS)
    folder.write_config(run)
    return folder


def train_from_cache(cache_path: Path, layer: Selection | str, head: str, out_dir: Path | None,
                     config: TrainConfig | None = None, protocol: str | None = None,
                     n_folds: int | None = None, fold_file: Path | None = None,
                     folds_from: Path | None = None,
                     overwrite: bool = False, test_cache: Path | None = None,
                     label_map: str | None = None, memory_budget: int | None = None) -> RunResult:
    """Open a cache, read one layer (or several: a tuple, or a --layer spec such as '2-5',
    layers.py), build its folds (seeded by config.seed) and run them.

    test_cache: another corpus's cache on which every fold head is also scored; label_map:
    a corpora.LABEL_MAPS name applied to the classes of both caches (crosscorpus.py).

    folds_from: EmoBox's data/<dataset> folder, whose fold_K files are the folds (folds.py).
    protocol None: "file" with a fold file, "loso" when the corpus has groups, else "kfold"
    with n_folds (default per corpus, folds.DEFAULT_N_FOLDS). memory_budget: bytes the layer
    may take (default: streaming.default_budget()); a layer that does not fit is streamed from
    the shards (streaming.py), and its blocks are recorded with the cache in config.json.
    """
    from .cache import open_cache
    from .streaming import StreamedLayer, open_layer

    config = config or TrainConfig()
    head_class(head)
    cache = open_cache(cache_path)  # read_layer runs the cheap checks (Cache.check) itself
    check_reads(head, config, cache.settings.store == "stats", f"the cache {cache_path}")
    if isinstance(layer, str):
        layer = parse_selection(layer, cache.settings.dims["n_audio_layer"] + 1)
    missing = [s for s in states_of(layer) if s not in cache.layers]
    if missing:
        what = f"layer {missing[0]} is" if len(missing) == 1 else f"layers {missing} are"
        raise ConfigError(f"{what} not in the cache {cache_path}; cached layers = {cache.layers}")
    if test_cache is not None and config.task == "regression":
        raise ConfigError("--test-cache scores class labels on another corpus: train a regression task without "
                          "it, or cross-corpus with --task classification")
    cross = None
    if test_cache is not None or label_map is not None:
        from .crosscorpus import open_cross_corpus

        cross = open_cross_corpus(cache, layer, test_cache, label_map)  # checked before A's layer is read
        data = cross.map_source(cache.read_layer(layer, frame_pool=config.frame_pool or None),
                                str(cache_path))  # in memory: not streamed
    else:
        data = open_layer(cache, layer, memory_budget, config.batch_size, frame_pool=config.frame_pool or None)
    # A fold file may list the utterances a label map dropped: they are passed over.
    left_out = np.setdiff1d(cache.read_meta()["ids"], data.ids) if cross is not None else ()
    folds = make_folds(data.ids, data.labels, data.speakers, data.groups, protocol=protocol,
                       n_folds=n_folds, corpus=cache.corpus, fold_file=fold_file, folds_from=folds_from,
                       seed=config.seed, left_out=left_out, speaker_overlap=config.compat_speaker_overlap)
    # A streamed layer's batch order follows its blocks: part of what decides the results.
    where = {**cache.fingerprint, **data.describe()} if isinstance(data, StreamedLayer) else cache.fingerprint
    return run_folds(data, folds, head, config, out_dir, cache=where, overwrite=overwrite,
                     cross_corpus=cross)

"""Train one pooling head on one cached layer across speaker-independent folds.

For every fold: train on the training speakers, pick the epoch with the best UA on the
validation speakers (carved from the training speakers, see folds.py), then evaluate the test
speakers once with that state and dropout off. One seed fixes everything: the folds' carving,
every fold's initialisation, batch order and dropout masks (torch's global RNG is forked per
fold and restored, numpy uses a local Generator), so the same command gives the same metrics
on the same machine (on a GPU, up to non-deterministic kernels).

    data (LayerData) + folds (Folds) + head name + TrainConfig  --run_folds-->  RunResult
                                                                 (and a run folder, if asked)

Schedule (PAPER.md): AdamW, lr 1e-3, batch 16, dropout 0.3, cross-entropy, cosine decay after a
linear warm-up over the first tenth of the epochs, the lr set once per epoch (`get_lr`).
The paper trains attentive pooling 10 epochs and QKV 30; we default to 30 for every head, so
the heads get the same budget, and because the epoch is chosen on validation a longer run only
adds candidates (`--epochs 10` gives the paper's attentive schedule).

Compatibility switches reproduce two flaws of the reference code, for comparison only:
`compat_select_on_test` trains on all non-test speakers and picks the epoch (or the linear
head's C) on the test fold, which is optimistic; `compat_eval_dropout` leaves dropout on at
evaluation (a no-op for the mean and linear heads, which have no dropout). Results made with
either are marked in config.json and in the printed table.

Efficiency: the cost is the front Linear over every frame, so batches are padded once per fold
(lengths bucketed to limit padding, kept in the cache's dtype, moved to the device once) and
only their order is shuffled each epoch; compute is float32.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ser_cache.device import pick_device
from ser_cache.features import LayerData
from ser_cache.folds import Folds, make_folds
from ser_cache.heads import HEADS, LinearHead, build_head, frame_statistics, save_head
from ser_cache.metrics import fold_metrics, json_safe, summarize

log = logging.getLogger(__name__)

BUCKET_BATCHES = 32  # training batches per length bucket: shuffled, then sorted within a bucket
EVAL_BATCH_SIZE = 64  # evaluation has no gradients, so larger batches are cheap
FLOAT32_BATCH_BYTES = 3 * 2**30  # batches up to this size are held in float32 (see make_batches)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the fix."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the fold cannot continue."""


@dataclass
class TrainConfig:
    """Every training setting, with its default. `TrainConfig.from_dict` refuses unknown keys."""

    epochs: int = 30  # the epoch kept is chosen on the validation speakers
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's default
    warmup_fraction: float = 0.1  # of the epochs, linear warm-up before the cosine decay
    dropout: float = 0.3
    d_model: int = 256
    n_heads: int = 12  # attentive and qkv
    head_dim: int = 4  # attentive (d_a) and qkv (d_k)
    attention_scale: bool = True  # attentive: divide scores by sqrt(head_dim)
    class_weights: bool = False  # inverse-frequency cross-entropy weights from the training split
    standardize: bool = True  # standardise input frames with the training split's mean and std (heads.PoolingHead)
    linear_c: tuple = (0.01, 0.1, 1.0, 10.0)  # linear head: C grid, chosen on validation
    linear_max_iter: int = 2000
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else mps, else cpu
    compat_select_on_test: bool = False  # FLAWED (reference code): pick the epoch on the test fold
    compat_eval_dropout: bool = False  # FLAWED (reference code): dropout stays on at evaluation

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (min(self.d_model, self.n_heads, self.head_dim) >= 1, "d_model, n_heads, head_dim must be >= 1"),
            (len(self.linear_c) >= 1 and min(self.linear_c) > 0, "linear_c must be positive values"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.linear_c = tuple(float(c) for c in self.linear_c)

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
        return self.compat_select_on_test or self.compat_eval_dropout


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


def head_kwargs(head: str, config: TrainConfig, dim: int, n_classes: int) -> dict:
    """The constructor arguments of `head` taken from `config` (what save_head records)."""
    kw = {"dim": dim, "n_classes": n_classes}
    if head == "linear":
        return {**kw, "max_iter": config.linear_max_iter, "seed": config.seed,
                "class_weight": "balanced" if config.class_weights else None}
    kw["d_model"] = config.d_model
    if head in ("attentive", "qkv"):
        kw.update(n_heads=config.n_heads, head_dim=config.head_dim, dropout=config.dropout)
    if head == "attentive":
        kw["scale"] = config.attention_scale
    return kw


def get_lr(epoch: int, config: TrainConfig) -> float:
    """lr of a 0-based epoch: linear warm-up over ceil(warmup_fraction * epochs) epochs, then
    cosine decay towards 0. Warm-up epoch e uses lr * (e + 1) / (warmup + 1), so that no epoch
    trains at lr 0."""
    warmup = math.ceil(config.warmup_fraction * config.epochs)
    if epoch < warmup:
        return config.lr * (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, config.epochs - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    """torch.device for a --device value ("auto": cuda, else mps, else cpu)."""
    try:
        return pick_device(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def fork_rng(device: torch.device):
    """Context that saves torch's global RNG state (CPU and `device`) and restores it on exit,
    so that seeding inside it leaves the caller's random state untouched."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def fold_seed(seed: int, fold: int) -> int:
    """Independent, reproducible seed for one fold of a run."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


# --- batches ---------------------------------------------------------------------------------


def make_batches(data: LayerData, y: np.ndarray, index: np.ndarray, batch_size: int,
                 device: torch.device, rng: np.random.Generator | None = None):
    """Padded batches of the utterances `index`, built once.

    Returns (batches, order): batches is a list of (x (B, T, dim) float32, or the cache's
    dtype past FLOAT32_BATCH_BYTES,
    mask (B, T) bool, y (B,) int64) on `device`; order (len(index),) gives the utterance of
    each row, batch after batch. Without rng, utterances are sorted by length (evaluation);
    with rng, they are shuffled, then sorted by length within buckets of BUCKET_BATCHES
    batches, so that batches mix utterances but carry little padding.
    """
    index = np.asarray(index)
    lengths = data.n_frames[index]
    if rng is None:
        order = index[np.argsort(lengths, kind="stable")]
    else:
        perm = rng.permutation(len(index))
        bucket = batch_size * BUCKET_BATCHES
        order = np.concatenate([index[p[np.argsort(lengths[p], kind="stable")]]
                                for p in np.split(perm, range(bucket, len(perm), bucket))])
    starts = range(0, len(order), batch_size)
    padded_frames = sum(len(order[i : i + batch_size]) * int(data.n_frames[order[i : i + batch_size]].max()) for i in starts)
    # Converting float16 frames to float32 once per fold, not at every step, halves the time
    # of a training step on CPU; only a fold too large for the budget keeps the cache dtype.
    fits = padded_frames * data.dim * 4 <= FLOAT32_BATCH_BYTES
    dtype = torch.float32 if fits else torch.from_numpy(data.frames[:0]).dtype
    batches = []
    for start in starts:
        rows = order[start : start + batch_size]
        x, mask = data.batch(rows, dtype=dtype, device=device)
        batches.append((x, mask, torch.from_numpy(y[rows]).to(device)))
    return batches, order


@torch.no_grad()
def predict(model: nn.Module, batches, dropout: bool = False) -> np.ndarray:
    """(n, n_classes) class probabilities, rows in batch order. dropout=True is the flawed
    reference behaviour (model left in training mode)."""
    model.train(dropout)
    probs = [model(x.float(), mask).softmax(dim=-1).cpu() for x, mask, _ in batches]
    return torch.cat(probs).numpy().astype(np.float64)


def ua_of(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    return fold_metrics(y_true, probs.argmax(axis=1), n_classes)["ua"]


# --- one fold --------------------------------------------------------------------------------


@dataclass
class FoldResult:
    """What one fold produced. probs: (n_test, n_classes), rows in the order of test_idx."""

    fold: int
    test_idx: np.ndarray
    probs: np.ndarray
    metrics: dict
    selected: dict  # {"epoch": k} or {"C": c}, with the selection UA
    n_train: int
    n_val: int
    train_seconds: float
    eval_seconds: float
    history: list = field(default_factory=list)
    head: object = None  # the trained head (torch module with the selected state, or LinearHead)
    kwargs: dict = field(default_factory=dict)


def train_epoch(model: nn.Module, optimizer, loss_fn, batches, rng: np.random.Generator, lr: float) -> float:
    """One pass over `batches` (in an order drawn from rng) at learning rate lr.

    Returns the mean training loss per utterance (may be NaN or inf: the caller decides).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    total, count = None, 0
    for b in rng.permutation(len(batches)):
        x, mask, yb = batches[b]
        loss = loss_fn(model(x.float(), mask), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = loss.detach() * len(yb) + (0 if total is None else total)
        count += len(yb)
    return total.item() / count


def train_torch_fold(data: LayerData, y: np.ndarray, split, head: str, config: TrainConfig,
                     n_classes: int, fold: int, device: torch.device) -> FoldResult:
    """Train a torch head on split = (train, select, test) indices, choose the epoch on
    `select`, test once (test None: no test, for a grid search that tests only the setting it
    picks on `select`). Raises NonFiniteLossError if the loss stops being finite."""
    train, select, test = split
    seed = fold_seed(config.seed, fold)
    kwargs = head_kwargs(head, config, data.dim, n_classes)
    t0 = time.perf_counter()
    with fork_rng(device):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        train_batches, _ = make_batches(data, y, train, config.batch_size, device, rng)
        select_batches, select_order = make_batches(data, y, select, EVAL_BATCH_SIZE, device)
        model = build_head(head, **kwargs)
        if config.standardize:
            model.standardize_inputs(*data.moments(train))
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        weight = class_weights(y[train], n_classes).to(device) if config.class_weights else None
        loss_fn = nn.CrossEntropyLoss(weight=weight)

        best_ua, best_epoch, best_state, history = -1.0, -1, None, []
        for epoch in range(config.epochs):
            lr = get_lr(epoch, config)
            train_loss = train_epoch(model, optimizer, loss_fn, train_batches, rng, lr)
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(
                    f"fold {fold}, epoch {epoch}: the training loss is {train_loss}; lower the "
                    f"learning rate (lr {lr:g} at this epoch, --lr {config.lr:g}) or check the "
                    "cache for NaN/inf frames"
                )
            ua = ua_of(y[select_order], predict(model, select_batches, config.compat_eval_dropout), n_classes)
            history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "select_ua": ua})
            log.debug("fold %d epoch %d lr %.2e loss %.4f select UA %.4f", fold, epoch, lr, train_loss, ua)
            if ua > best_ua:  # ties keep the earlier epoch
                best_ua, best_epoch = ua, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        train_seconds = time.perf_counter() - t0
        if test is None:
            return FoldResult(fold, np.zeros(0, np.int64), np.zeros((0, n_classes)), {},
                              {"epoch": best_epoch, "ua": best_ua}, len(train), len(select),
                              train_seconds, 0.0, history, model.eval(), kwargs)

        t0 = time.perf_counter()
        test_batches, test_order = make_batches(data, y, test, EVAL_BATCH_SIZE, device)
        probs = predict(model, test_batches, config.compat_eval_dropout)
        eval_seconds = time.perf_counter() - t0
    model.eval()
    return FoldResult(fold, test_order, probs, fold_metrics(y[test_order], probs.argmax(1), n_classes),
                      {"epoch": best_epoch, "ua": best_ua}, len(train), len(select),
                      train_seconds, eval_seconds, history, model, kwargs)


def train_linear_fold(features: np.ndarray, y: np.ndarray, split, config: TrainConfig,
                      n_classes: int, fold: int) -> FoldResult:
    """Fit the linear head for each C of config.linear_c on train, keep the best UA on
    `select`, test once (test None: no test, as in train_torch_fold). features: (n, 2 * dim)
    from frame_statistics."""
    train, select, test = split
    kwargs = head_kwargs("linear", config, features.shape[1] // 2, n_classes)
    t0 = time.perf_counter()
    best_ua, best_c, best, history = -1.0, None, None, []
    for c in config.linear_c:
        model = LinearHead(**kwargs, C=c).fit(features[train], y[train])
        ua = ua_of(y[select], model.predict_proba(features[select]), n_classes)
        history.append({"C": c, "select_ua": ua})
        if ua > best_ua:
            best_ua, best_c, best = ua, c, model
    train_seconds = time.perf_counter() - t0
    if test is None:
        return FoldResult(fold, np.zeros(0, np.int64), np.zeros((0, n_classes)), {},
                          {"C": best_c, "ua": best_ua}, len(train), len(select),
                          train_seconds, 0.0, history, best, {**kwargs, "C": best_c})
    t0 = time.perf_counter()
    probs = best.predict_proba(features[test])
    eval_seconds = time.perf_counter() - t0
    return FoldResult(fold, np.asarray(test), probs, fold_metrics(y[test], probs.argmax(1), n_classes),
                      {"C": best_c, "ua": best_ua}, len(train), len(select),
                      train_seconds, eval_seconds, history, best, {**kwargs, "C": best_c})


def class_weights(y_train: np.ndarray, n_classes: int) -> torch.Tensor:
    """(n_classes,) float32 n / (n_classes * count); 0 for a class absent from training."""
    counts = np.bincount(y_train, minlength=n_classes).astype(np.float64)
    w = np.divide(len(y_train), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


# --- all folds -------------------------------------------------------------------------------


@dataclass
class RunResult:
    """A head trained on every fold of one layer. metrics: the `summarize` dict."""

    head: str
    layer: int
    labels: list[str]
    config: TrainConfig
    folds: list[FoldResult]
    metrics: dict

    def table(self) -> str:
        """Per-fold and mean ± std table (percent), for printing."""
        sel = "C" if self.head == "linear" else "epoch"
        lines = [f"{'fold':>6} {'n_test':>6} {sel:>6} {'UA':>6} {'WA':>6} {'mF1':>6} {'wF1':>6} "
                 f"{'train s':>8} {'eval s':>7}"]
        for f in self.folds:
            m = f.metrics
            lines.append(f"{f.fold:>6} {len(f.test_idx):>6} {f.selected[sel]:>6g} {100 * m['ua']:6.2f} "
                         f"{100 * m['wa']:6.2f} {100 * m['macro_f1']:6.2f} {100 * m['weighted_f1']:6.2f} "
                         f"{f.train_seconds:8.1f} {f.eval_seconds:7.2f}")
        s = self.metrics
        lines.append("  mean ± std: " + ", ".join(
            f"{name} {100 * s[key]['mean']:.2f} ± {100 * s[key]['std']:.2f}"
            for name, key in (("UA", "ua"), ("WA", "wa"), ("macro-F1", "macro_f1"), ("weighted-F1", "weighted_f1"))))
        if self.config.flawed:
            lines.append("  FLAWED compatibility switches on (select_on_test={}, eval_dropout={}): "
                         "not an honest estimate".format(self.config.compat_select_on_test,
                                                         self.config.compat_eval_dropout))
        return "\n".join(lines)


def run_folds(data: LayerData, folds: Folds, head: str, config: TrainConfig | None = None,
              out_dir: Path | None = None, cache: dict | None = None,
              overwrite: bool = False) -> RunResult:
    """Train and test `head` on every fold of `folds` over the utterances of `data`.

    cache: a JSON-able fingerprint of where `data` came from, stored in config.json.
    out_dir: when given, the run folder to write (config.json, metrics.json, predictions.csv,
    folds.csv/.json, fold_<k>.pt or fold_<k>.joblib); a folder already holding metrics.json is
    refused unless overwrite.
    """
    config = config or TrainConfig()
    if head not in HEADS:
        raise ConfigError(f"head {head!r} not found; available heads = {sorted(HEADS)}")
    folds = folds.aligned_to(data.ids)
    if (data.n_frames < 1).any():
        raise ConfigError(f"{(data.n_frames < 1).sum()} utterances have no frames, e.g. "
                          f"{data.ids[data.n_frames < 1][:3]}: rebuild the cache or drop them")
    labels = sorted(set(data.labels.tolist()))
    y = np.searchsorted(labels, data.labels).astype(np.int64)
    n_classes = len(labels)
    device = resolve_device(config.device)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if (out_dir / "metrics.json").exists() and not overwrite:
            raise ConfigError(f"{out_dir} already holds a finished run: choose another output "
                              "folder or allow overwriting")
        out_dir.mkdir(parents=True, exist_ok=True)
        folds.save(out_dir / "folds.csv")
        _write_json(out_dir / "config.json", {
            "head": head, "layer": int(data.layer), "labels": labels, "dim": int(data.dim),
            "class_counts": dict(zip(labels, np.bincount(y, minlength=n_classes).tolist())),
            "n_utterances": len(data), "device": str(device), "config": config.to_dict(),
            "head_kwargs": head_kwargs(head, config, data.dim, n_classes),
            "folds": {"protocol": folds.protocol, "n_folds": folds.n_folds, "seed": folds.seed},
            "flawed_compat": config.flawed, "cache": cache or {},
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
        })
    log.info("%s head on layer %d: %d utterances, %d classes, %d folds (%s), device %s",
             head, data.layer, len(data), n_classes, folds.n_folds, folds.protocol, device)

    features = frame_statistics(data) if head == "linear" else None
    results = []
    for k in range(folds.n_folds):
        train, val, test = folds.split(k)
        if config.compat_select_on_test:  # the reference: no validation split, test picks the epoch
            split = (np.sort(np.concatenate([train, val])), test, test)
        else:
            split = (train, val, test)
        if head == "linear":
            r = train_linear_fold(features, y, split, config, n_classes, k)
        else:
            r = train_torch_fold(data, y, split, head, config, n_classes, k, device)
        results.append(r)
        log.info("fold %d: UA %.4f WA %.4f (selected %s) train %.1fs eval %.2fs", k, r.metrics["ua"],
                 r.metrics["wa"], r.selected, r.train_seconds, r.eval_seconds)
        if out_dir is not None:
            suffix = ".joblib" if head == "linear" else ".pt"
            save_head(out_dir / f"fold_{k}{suffix}", r.head, head, r.kwargs, labels, data.layer,
                      fold=k, selected=r.selected)

    result = RunResult(head, int(data.layer), labels, config, results,
                       summarize([r.metrics for r in results], labels))
    if out_dir is not None:
        _write_predictions(out_dir / "predictions.csv", data, y, labels, results)
        details = [{"fold": r.fold, "selected": r.selected, "n_train": r.n_train, "n_val": r.n_val,
                    "n_test": len(r.test_idx), "train_seconds": r.train_seconds,
                    "eval_seconds": r.eval_seconds, "history": r.history} for r in results]
        _write_json(out_dir / "metrics.json", {"head": head, "layer": int(data.layer), **result.metrics,
                                               "fold_details": details})
    return result


def train_from_cache(cache_path: Path, layer: int, head: str, out_dir: Path | None,
                     config: TrainConfig | None = None, protocol: str | None = None,
                     n_folds: int | None = None, fold_file: Path | None = None,
                     overwrite: bool = False) -> RunResult:
    """Open a cache, read one layer, build its folds (seeded by config.seed) and run them.

    protocol None: "file" with a fold file, "loso" when the corpus has groups, else "kfold"
    with n_folds (default per corpus, folds.DEFAULT_N_FOLDS).
    """
    from ser_cache.cache import open_cache

    config = config or TrainConfig()
    cache = open_cache(cache_path)  # read_layer runs the cheap checks (Cache.check) itself
    if layer not in cache.layers:
        raise ConfigError(f"layer {layer} is not in the cache {cache_path}; cached layers = {cache.layers}")
    data = cache.read_layer(layer)
    folds = make_folds(data.ids, data.labels, data.speakers, data.groups, protocol=protocol,
                       n_folds=n_folds, corpus=cache.corpus, fold_file=fold_file, seed=config.seed)
    return run_folds(data, folds, head, config, out_dir, cache=cache.fingerprint, overwrite=overwrite)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=1) + "\n", encoding="utf-8")


def _write_predictions(path: Path, data: LayerData, y, labels, results: list[FoldResult]) -> None:
    """One row per utterance, in cache order: id, fold, label, prediction, prob_<class>..."""
    rows = []
    for r in results:
        for i, p in zip(r.test_idx, r.probs):
            rows.append((int(i), r.fold, p))
    rows.sort(key=lambda row: row[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "fold", "label", "prediction"] + [f"prob_{c}" for c in labels])
        for i, fold, p in rows:
            w.writerow([data.ids[i], fold, labels[y[i]], labels[int(p.argmax())]] + [f"{v:.6f}" for v in p])

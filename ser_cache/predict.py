"""Use a trained head on new audio: export it to one file, then predict emotions with it.

    run folder (ser-cache train) --export_run--> model.pt --load_predictor + Whisper--> predictions

An exported file is self-contained: the head's weights and what rebuilds it, the label names,
the layer, how the cache was made (input mode, storage dtype, encoder arithmetic) and which
Whisper checkpoint made it (name, SHA-256, dims), plus where the head came from. It is a
`torch.save` dict of tensors and plain values only, so it loads with `weights_only=True`: no
pickled code runs when you open a file someone sent you. The linear head is stored as the
fitted arrays of its scikit-learn pipeline (scaler mean and scale, logistic-regression
coefficients) and rebuilt into that pipeline on load.

Two ways to export a run:

    all speakers (default)  retrain on every utterance of the layer with the run's settings.
                            Torch heads: the run's lr schedule (config.epochs long) is followed
                            and stopped after epoch e, e = the median (the lower middle one for
                            an even number of folds, so an epoch some fold chose) of the epochs
                            picked on validation; with `epochs=N`, a fresh N-epoch schedule is
                            run to its end instead. Linear: C = the same median of the C values
                            picked per fold. No data is left to check this head on: the run's
                            cross-validated metrics are its estimate (kept in the provenance).
    fold K                  fold K's saved head as is (trained without fold K's test speakers).

Prediction follows extraction exactly: same input mode, same encoder arithmetic, states rounded
to the cache's storage dtype, so the head sees what it was trained on. The encoder runs only up
to the head's layer (`encode` stops there; later blocks are never computed). Recordings longer
than 30 s are cut into consecutive 30 s windows, each gets its own probabilities, and the
file's probabilities are the mean of the windows' weighted by their duration (a 2 s tail
window counts 2/30 of a full one, so a few seconds at the end cannot sway a long recording).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .audio import SAMPLE_RATE, WINDOW_SAMPLES, AudioError, load_utterance
from .encoder import LoadedEncoder, load_encoder, log_mel, speech_frames
from .extract import encode_batch, package_versions
from .features import LayerData
from .heads import LinearHead, build_head, frame_statistics, load_head
from .training import (NonFiniteLossError, TrainConfig, class_weights, get_lr, head_kwargs,
                       make_batches, resolve_device, train_epoch)

EXPORT_FORMAT = 1
EXPORT_KIND = "ser-cache exported head"
WINDOW_BATCH = 8  # 30 s windows per encoder forward when predicting a long recording
# Cache settings that decide the states a head was trained on: a cache used for an all-speaker
# export must agree on all of them with the one the run was trained on.
CACHE_KEYS = ("corpus", "model_sha256", "dims", "mode", "dtype", "compute_dtype", "records_hash", "shard_sha256")


class PredictError(Exception):
    """An export or prediction that cannot be done as asked; the message names the fix."""


# --- exporting a run -------------------------------------------------------------------------


def read_run(run_dir: Path) -> tuple[dict, dict | None]:
    """(config.json, metrics.json or None) of a `ser-cache train` run folder."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise PredictError(f"{run_dir} is not a training run (no config.json): pass a folder made by `ser-cache train`")
    config = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("head", "layer", "labels", "config", "cache") if k not in config]
    cache = config.get("cache", {})
    missing += [f"cache.{k}" for k in ("model", "model_sha256", "mode", "dims") if k not in cache]
    if missing:
        raise PredictError(f"{path} lacks {missing}: it was not written by this version of `ser-cache train`; re-run it")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    return config, metrics


def median_selected(values: list) -> float:
    """The median of per-fold choices, the lower middle one for an even count: always a value
    some fold actually chose (an epoch, or a C of the grid)."""
    return statistics.median_low(values)


def train_torch_all(data: LayerData, y: np.ndarray, head: str, config: TrainConfig, n_classes: int,
                    epochs: int, schedule_epochs: int, device: torch.device) -> nn.Module:
    """Train `head` on every utterance of `data` for `epochs` epochs of the lr schedule of a
    `schedule_epochs`-long run (training.get_lr) and return it as it is after the last one.

    The loop is train_torch_fold's without a validation split: same batches (built once, their
    order shuffled every epoch), optimiser, loss and seeding (config.seed).
    """
    assert 1 <= epochs <= schedule_epochs, f"{epochs} epochs of a {schedule_epochs}-epoch schedule"
    schedule = dataclasses.replace(config, epochs=schedule_epochs)
    kwargs = head_kwargs(head, config, data.dim, n_classes)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        batches, _ = make_batches(data, y, np.arange(len(data)), config.batch_size, device, rng)
        model = build_head(head, **kwargs)
        if config.standardize:
            model.standardize_inputs(*data.moments(np.arange(len(data))))
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        weight = class_weights(y, n_classes).to(device) if config.class_weights else None
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        for epoch in range(epochs):
            if not math.isfinite(train_epoch(model, optimizer, loss_fn, batches, rng, get_lr(epoch, schedule))):
                raise NonFiniteLossError(f"epoch {epoch}: the training loss is not finite; lower the learning rate")
    return model.eval().cpu()


def export_run(run_dir: Path, out: Path, fold: int | None = None, epochs: int | None = None,
               cache_path: Path | None = None, device: str | None = None, overwrite: bool = False) -> dict:
    """Write one file with the head of the run at `run_dir` (see the module docstring).

    fold: export fold `fold`'s saved head as is; None: train on all speakers.
    epochs: (all speakers, torch heads) train a fresh schedule of this many epochs instead of
      stopping the run's schedule at the median selected epoch.
    cache_path: the cache to train on (default: the one recorded in the run); it must hold
      the same states (CACHE_KEYS).
    device: where to train (default: the run's setting).
    Returns the saved dict without its weights.
    """
    run_dir, out = Path(run_dir), Path(out)
    if fold is not None and epochs is not None:
        raise PredictError("--fold exports a saved head as it is; --epochs applies only to training on all speakers")
    if out.exists() and not overwrite:
        raise PredictError(f"{out} exists: choose another output file or allow overwriting")
    run, metrics = read_run(run_dir)
    head, layer, labels = run["head"], int(run["layer"]), list(run["labels"])
    config = TrainConfig.from_dict(run["config"])
    cache = run["cache"]
    provenance = {
        "run": str(run_dir.resolve()),
        "corpus": cache.get("corpus"),
        "cache": {k: cache.get(k) for k in ("path", "records_hash", "shard_sha256", "n_records")},
        "config": config.to_dict(),
        "folds": run.get("folds"),
        "flawed_compat": bool(run.get("flawed_compat", False)),
        "run_metrics": _run_metrics(metrics),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }

    if fold is not None:
        path = next((p for p in (run_dir / f"fold_{fold}.pt", run_dir / f"fold_{fold}.joblib") if p.is_file()), None)
        if path is None:
            saved = sorted(p.name for p in run_dir.glob("fold_*.*"))
            raise PredictError(f"{run_dir} has no saved head for fold {fold}; it has {saved or 'none'}")
        model, info = load_head(path)
        if info["head"] != head or int(info["layer"]) != layer or list(info["labels"]) != labels:
            raise PredictError(f"{path} does not belong to this run (head, layer or labels differ from config.json)")
        kwargs = dict(info["kwargs"])
        provenance.update(trained_on=f"fold {fold}", selected=info.get("selected"),
                          fold_metrics=_fold_metrics(metrics, fold))
    else:
        if metrics is None or "fold_details" not in metrics:
            raise PredictError(f"{run_dir} has no metrics.json: the run did not finish. Re-run it, or "
                               "export one fold's saved head with --fold K")
        selected = [d["selected"] for d in metrics["fold_details"]]
        data, y = _training_data(cache, layer, labels, cache_path)
        n_classes = len(labels)
        provenance.update(trained_on="all speakers", n_utterances=len(data),
                          class_counts=dict(zip(labels, np.bincount(y, minlength=n_classes).tolist())),
                          selected_per_fold=selected)
        if head == "linear":
            if epochs is not None:
                raise PredictError("--epochs applies to the torch heads; the linear head is fitted with the "
                                   "median C chosen per fold")
            c = float(median_selected([s["C"] for s in selected]))
            kwargs = {**head_kwargs("linear", config, data.dim, n_classes), "C": c}
            model = LinearHead(**kwargs).fit(frame_statistics(data), y)
            provenance.update(C=c, rule="C: median (lower middle) of the C chosen per fold")
        else:
            if epochs is None:
                chosen = int(median_selected([s["epoch"] for s in selected]))
                n, schedule = chosen + 1, config.epochs
                rule = (f"the run's {schedule}-epoch schedule stopped after epoch {chosen} (0-based), the "
                        "median (lower middle) of the epochs chosen on validation per fold")
            else:
                n, schedule, rule = epochs, epochs, f"--epochs {epochs}: a full {epochs}-epoch schedule"
            dev = resolve_device(device or config.device)
            model = train_torch_all(data, y, head, config, n_classes, n, schedule, dev)
            kwargs = head_kwargs(head, config, data.dim, n_classes)
            provenance.update(epochs=n, schedule_epochs=schedule, rule=rule)

    saved = {
        "kind": EXPORT_KIND,
        "format": EXPORT_FORMAT,
        "head": head,
        "kwargs": kwargs,
        "labels": labels,
        "layer": layer,
        "mode": cache["mode"],
        "dtype": cache.get("dtype", "float16"),
        "compute_dtype": cache.get("compute_dtype", "float32"),
        "whisper": {"name": cache["model"], "sha256": cache["model_sha256"], "dims": dict(cache["dims"]),
                    "path": cache.get("model_path")},
        "provenance": _plain(provenance),
    }
    weights = {"linear": linear_arrays(model)} if head == "linear" else {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    _save_atomic({**saved, **weights}, out)
    return saved


def _training_data(cache_info: dict, layer: int, labels: list[str], cache_path: Path | None):
    """The layer the run was trained on, read from its cache, with labels as class indices."""
    from .cache import CacheError, open_cache

    path = Path(cache_path or cache_info.get("path", ""))
    try:
        cache = open_cache(path)
    except CacheError as e:
        raise PredictError(f"{e}\nThe run was trained on the cache {cache_info.get('path')}; pass --cache "
                           "with its new location, or export a fold's head with --fold K (no cache needed)") from None
    now = cache.fingerprint
    diffs = [f"{k}: run has {cache_info.get(k)!r}, cache has {now.get(k)!r}"
             for k in CACHE_KEYS if k in cache_info and cache_info[k] != now.get(k)]
    if diffs:
        raise PredictError(f"the cache {path} does not hold the states this run was trained on:\n  "
                           + "\n  ".join(diffs) + "\nFix: pass --cache with the run's cache, or train a new run")
    try:
        data = cache.read_layer(layer)
    except CacheError as e:
        raise PredictError(str(e)) from None
    found = sorted(set(data.labels.tolist()))
    if found != labels:
        raise PredictError(f"the cache has labels {found}, the run {labels}: pass --cache with the run's cache")
    return data, np.searchsorted(labels, data.labels).astype(np.int64)


def _run_metrics(metrics: dict | None) -> dict:
    if not metrics:
        return {}
    return {k: {"mean": metrics[k]["mean"], "std": metrics[k]["std"]}
            for k in ("ua", "wa", "macro_f1", "weighted_f1") if k in metrics}


def _fold_metrics(metrics: dict | None, fold: int) -> dict:
    if not metrics:
        return {}
    return {k: metrics[k]["folds"][fold] for k in ("ua", "wa", "macro_f1", "weighted_f1")
            if k in metrics and fold < len(metrics[k]["folds"])}


def _plain(value):
    """Only JSON types (what weights_only loading accepts); anything else becomes a string."""
    return json.loads(json.dumps(value, default=str))


def _save_atomic(obj: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # whole or absent, never half-written
    try:
        torch.save(obj, tmp)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the linear head as arrays ---------------------------------------------------------------


def linear_arrays(head: LinearHead) -> dict[str, torch.Tensor]:
    """The fitted numbers of a LinearHead's pipeline (StandardScaler, LogisticRegression)."""
    scaler, logreg = head.pipeline[0], head.pipeline[-1]
    return {
        "mean": torch.from_numpy(np.asarray(scaler.mean_, dtype=np.float64)),
        "scale": torch.from_numpy(np.asarray(scaler.scale_, dtype=np.float64)),
        "coef": torch.from_numpy(np.asarray(logreg.coef_, dtype=np.float64)),
        "intercept": torch.from_numpy(np.asarray(logreg.intercept_, dtype=np.float64)),
        "classes": torch.from_numpy(np.asarray(logreg.classes_, dtype=np.int64)),
    }


def linear_from_arrays(arrays: dict[str, torch.Tensor], kwargs: dict) -> LinearHead:
    """A LinearHead whose pipeline carries the fitted numbers again (predict_proba works)."""
    head = LinearHead(**kwargs)
    scaler, logreg = head.pipeline[0], head.pipeline[-1]
    scaler.mean_ = arrays["mean"].numpy()
    scaler.scale_ = arrays["scale"].numpy()
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = len(scaler.mean_)
    logreg.coef_ = arrays["coef"].numpy()
    logreg.intercept_ = arrays["intercept"].numpy()
    logreg.classes_ = arrays["classes"].numpy()
    logreg.n_features_in_ = logreg.coef_.shape[1]
    return head


# --- loading an exported file ----------------------------------------------------------------


@dataclass
class Exported:
    """An exported head, rebuilt. `model` is a torch module in eval mode, or a LinearHead."""

    model: object
    head: str
    labels: list[str]
    layer: int
    mode: str
    dtype: str
    compute_dtype: str
    whisper: dict  # {"name", "sha256", "dims"}
    provenance: dict
    kwargs: dict


def load_exported(path: Path) -> Exported:
    """Rebuild the head of a file written by `export_run` (weights_only: no code is unpickled)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PredictError(f"{path} is not a file written by `ser-cache export` ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("kind") != EXPORT_KIND:
        raise PredictError(f"{path} is not a file written by `ser-cache export` (a fold_K.pt of a run? "
                           "export it first: ser-cache export RUN --fold K --out model.pt)")
    if saved.get("format") != EXPORT_FORMAT:
        raise PredictError(f"{path}: export format {saved.get('format')}, this version reads {EXPORT_FORMAT}")
    kwargs = dict(saved["kwargs"])
    if saved["head"] == "linear":
        model = linear_from_arrays(saved["linear"], kwargs)
    else:
        model = build_head(saved["head"], **kwargs)
        model.load_state_dict(saved["state_dict"])
        model.eval()
    return Exported(model, saved["head"], list(saved["labels"]), int(saved["layer"]), saved["mode"], saved["dtype"],
                    saved["compute_dtype"], dict(saved["whisper"]), dict(saved["provenance"]), kwargs)


# --- predicting ------------------------------------------------------------------------------


@dataclass
class WindowPrediction:
    start: float  # seconds
    end: float
    probs: np.ndarray  # (n_classes,)


@dataclass
class FilePrediction:
    """One audio file's result: its windows and overall probabilities, or why it failed."""

    path: str
    windows: list[WindowPrediction] = field(default_factory=list)
    probs: np.ndarray | None = None  # (n_classes,), duration-weighted mean of the windows'
    notes: list[str] = field(default_factory=list)
    error: str = ""


class Predictor:
    """An exported head plus the Whisper encoder it was trained on, ready for audio files.

    early_stop=False runs every encoder block and then picks the head's layer: the same
    result, slower; it exists to check and measure the early stop.
    """

    def __init__(self, exported: Exported, enc: LoadedEncoder, device: str | torch.device = "cpu",
                 early_stop: bool = True):
        self.exported, self.enc, self.device, self.early_stop = exported, enc, torch.device(device), early_stop
        if isinstance(exported.model, nn.Module):
            exported.model.to(self.device)

    @property
    def labels(self) -> list[str]:
        return self.exported.labels

    def states(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """The head's layer for each 16 kHz window: [(frames, dim)] in the cache's dtype,
        computed as `ser-cache extract` computed the training states."""
        ex, n_mels = self.exported, self.enc.dims["n_mels"]
        keep = [ex.layer] if self.early_stop else list(range(self.enc.n_states))
        out = []
        for start in range(0, len(windows), WINDOW_BATCH):
            chunk = windows[start : start + WINDOW_BATCH]
            batch = [(0, i, log_mel(w, n_mels, ex.mode), speech_frames(len(w))) for i, w in enumerate(chunk)]
            out += [s[ex.layer] for s in encode_batch(self.enc, batch, ex.mode, keep, ex.dtype, self.device, ex.compute_dtype)]
        return out

    def head_probs(self, states: list[np.ndarray]) -> np.ndarray:
        """(n_windows, n_classes) class probabilities from per-window states [(frames, dim)]."""
        lengths = np.array([len(s) for s in states])
        data = LayerData(frames=np.concatenate(states), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         ids=np.array([str(i) for i in range(len(states))]), labels=np.array([""] * len(states)),
                         speakers=np.array([""] * len(states)), groups=np.array([""] * len(states)), layer=self.exported.layer)
        model = self.exported.model
        if isinstance(model, LinearHead):
            return model.predict_proba(frame_statistics(data))
        x, mask = data.batch(np.arange(len(states)), dtype=torch.from_numpy(data.frames[:0]).dtype, device=self.device)
        with torch.no_grad():
            return model(x.float(), mask).softmax(dim=-1).cpu().numpy().astype(np.float64)

    def predict_audio(self, windows: list[np.ndarray]) -> tuple[list[WindowPrediction], np.ndarray]:
        """Per-window predictions and the file's probabilities (duration-weighted mean)."""
        probs = self.head_probs(self.states(windows))
        seconds = np.array([len(w) for w in windows]) / SAMPLE_RATE
        starts = np.arange(len(windows)) * (WINDOW_SAMPLES / SAMPLE_RATE)
        preds = [WindowPrediction(float(s), float(s + d), p) for s, d, p in zip(starts, seconds, probs)]
        return preds, (probs * seconds[:, None]).sum(axis=0) / seconds.sum()

    def predict_file(self, path) -> FilePrediction:
        """Read, window and classify one file; a file that cannot be used gets `error` set."""
        try:
            windows, notes = load_utterance(str(path), long_policy="windows")
        except AudioError as e:
            return FilePrediction(str(path), error=e.reason)
        preds, probs = self.predict_audio(windows)
        return FilePrediction(str(path), preds, probs, notes)


def load_predictor(model_file: Path, whisper_model: str | None = None, allow_other_model: bool = False,
                   device: str | torch.device = "cpu", early_stop: bool = True) -> Predictor:
    """An exported head with its Whisper encoder: `whisper_model` (a name or a checkpoint path),
    else the checkpoint file recorded at extraction if it still holds the same bytes, else the
    model name recorded in the file. Refuses a checkpoint whose SHA-256 is not the one the head
    was trained on unless allow_other_model; a checkpoint of another shape is always refused."""
    from .cache import file_sha256
    from .encoder import CheckpointError

    ex = load_exported(model_file)
    want = ex.whisper
    recorded = want.get("path")  # None for a model name; absent from files exported before it was kept
    name = whisper_model
    if name is None:
        # Hashed before loading: another checkpoint at that path would only be refused below,
        # whereas the recorded name may still find the right one.
        same = bool(recorded) and Path(recorded).is_file() and file_sha256(recorded) == want["sha256"]
        name = recorded if same else want["name"]
    try:
        enc = load_encoder(name, device=device)
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    except ValueError as e:
        if whisper_model is None:
            where = f" (and the checkpoint recorded at {recorded} is missing or has other bytes)" if recorded else ""
            raise PredictError(f"the head was trained on states of Whisper {want['name']!r} (sha256 "
                               f"{want['sha256'][:12]}...), which is not a model name Whisper can download"
                               f"{where}: pass --model PATH to that checkpoint") from None
        raise PredictError(str(e)) from None
    except (OSError, RuntimeError) as e:
        raise PredictError(f"cannot load Whisper {name!r} ({e}); offline, pass --model PATH to the checkpoint "
                           f"(sha256 {want['sha256'][:12]}...)") from None
    if enc.sha256 != want["sha256"] and not allow_other_model:
        raise PredictError(
            f"Whisper checkpoint {name!r} has sha256 {enc.sha256[:12]}..., but the head was trained on states of "
            f"{want['name']!r} (sha256 {want['sha256'][:12]}...): its predictions would be meaningless. "
            "Pass --model with the right checkpoint, or --allow-other-model if you know the weights are equivalent"
        )
    for key in ("n_mels", "n_audio_state", "n_audio_layer"):
        if enc.dims[key] != want["dims"][key]:
            raise PredictError(f"Whisper {name!r} has {key} {enc.dims[key]}, the head needs {want['dims'][key]}: "
                               "the head cannot read its states; pass --model with the checkpoint it was trained on")
    return Predictor(ex, enc, device, early_stop)


# --- output ----------------------------------------------------------------------------------


def _span(w: WindowPrediction) -> str:
    return f"{w.start:.1f}-{w.end:.1f} s"


def format_table(results: list[FilePrediction], labels: list[str]) -> str:
    """One row per file (and per window of a file over 30 s, then its overall row), with the
    predicted emotion and every class probability; failed files say why."""
    rows = []
    for r in results:
        if r.error:
            rows.append((r.path, "", "ERROR", None, r.error))
            continue
        if len(r.windows) > 1:
            rows += [(r.path, _span(w), labels[int(w.probs.argmax())], w.probs, "") for w in r.windows]
            span = f"all {r.windows[-1].end:.1f} s"
        else:
            span = _span(r.windows[0])
        rows.append((r.path, span, labels[int(r.probs.argmax())], r.probs, "; ".join(r.notes)))
    wf = max([4] + [len(row[0]) for row in rows])
    ws = max([6] + [len(row[1]) for row in rows])
    we = max([7] + [len(lab) for lab in labels])
    wp = [max(5, len(lab)) for lab in labels]
    lines = [f"{'file':<{wf}}  {'window':<{ws}}  {'emotion':<{we}}  " + "  ".join(f"{lab:>{w}}" for lab, w in zip(labels, wp))]
    for path, span, emotion, probs, note in rows:
        if probs is None:
            lines.append(f"{path:<{wf}}  {span:<{ws}}  ERROR: {note}")
            continue
        line = f"{path:<{wf}}  {span:<{ws}}  {emotion:<{we}}  " + "  ".join(f"{p:>{w}.3f}" for p, w in zip(probs, wp))
        lines.append(line + (f"  ({note})" if note else ""))
    return "\n".join(lines)


def to_json(results: list[FilePrediction], labels: list[str]) -> str:
    """A JSON list, one object per file: prediction, probabilities, windows, notes or error."""
    def probs(p):
        return {lab: round(float(v), 6) for lab, v in zip(labels, p)}

    out = []
    for r in results:
        if r.error:
            out.append({"file": r.path, "error": r.error})
            continue
        out.append({
            "file": r.path,
            "prediction": labels[int(r.probs.argmax())],
            "probabilities": probs(r.probs),
            "windows": [{"start": w.start, "end": round(w.end, 3), "prediction": labels[int(w.probs.argmax())],
                         "probabilities": probs(w.probs)} for w in r.windows],
            "notes": r.notes,
        })
    return json.dumps(out, indent=1, ensure_ascii=False)

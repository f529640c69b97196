"""Use a trained head on new audio: export it to one file, then predict emotions with it.

    run folder (ser-cache train) --export_run--> model.pt --load_predictor + encoder--> predictions

An exported file is self-contained: the head's weights and what rebuilds it, the label names,
the layer (or the list of layers a multi-layer head mixes), how the cache was made (input mode, storage dtype, encoder arithmetic) and which
encoder made it (family, name, SHA-256, dims, path), plus where the head came from. It is a
`torch.save` dict of tensors and plain values only, so it loads with `weights_only=True`: no
pickled code runs when you open a file someone sent you. Every head is stored the same way
(registry name, constructor options, state dict; heads.py).

Two ways to export a run:

    all speakers (default)  retrain on every utterance of the layer with the run's settings and
                            the choice the folds made on validation: the median (the lower middle
                            one for an even number of folds, so a value some fold chose) of the
                            epoch (the run's lr schedule, config.epochs long, stopped after that
                            epoch) or of C (the linear probe). With `epochs=N` (heads trained by
                            epochs), a fresh N-epoch schedule is run to its end instead. No data
                            is left to check this head on: the run's cross-validated metrics are
                            its estimate (kept in the provenance).
    fold K                  fold K's saved head as is (trained without fold K's test speakers).

A regression run (`--task regression`) exports a head that predicts its targets' values on
their own scale (the training mean and std are buffers of the head): "task" is "regression"
and "labels" names the targets; `predict` prints the values instead of an emotion.

A run of ensembles (`--ensemble N`) exports an ensemble (heads.Ensemble) as one file: fold
K's saved members, or N members trained on all speakers, seeded member_seed(config.seed, m),
all with the median (lower middle) of every member's choice in every fold (a member's index
means nothing across folds: its seed differs, so all choices are pooled).

Prediction follows extraction exactly: same input mode, same encoder arithmetic, states rounded
to the cache's storage dtype and, for several layers, stacked in each row as the cache reader
stacks them, so the head sees what it was trained on. The encoder runs only up to the highest
layer the head needs (`encode` stops there; later blocks are never computed). Recordings longer
than 30 s are cut into consecutive 30 s windows, each gets its own probabilities, and the
file's probabilities are the mean of the windows' weighted by their duration (a 2 s tail
window counts 2/30 of a full one, so a few seconds at the end cannot sway a long recording).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import layers
from .audio import SAMPLE_RATE, WINDOW_SAMPLES, AudioError, load_utterance
from .batches import predict_proba
from .device import pick_device
from .encoder import LoadedEncoder, encoder_input, load_encoder
from .errors import UserError
from .encoder import FAMILY_LABELS, OPENAI_WHISPER, same_states_family
from .extract import encode_batch, package_versions
from .features import LayerData
from .files import save_torch_atomic
from .heads import Head, head_class, load_head, n_members, one_head, rebuild_head
from .layers import Selection, as_selection, is_multi, states_of
from .results import ResultsError, RunFolder, RunMetrics
from .tasks import make_task
from .config import TrainConfig, as_made
from .fitting import fit_head, member_seed

EXPORT_FORMAT = 2  # 1: the linear head as scikit-learn arrays (before heads were one interface)
# A head on several layers records them as a list; its files say so with their own number, so
# that a version that reads only one layer refuses them by name instead of failing inside.
MULTI_LAYER_FORMAT = 3
READ_FORMATS = (EXPORT_FORMAT, MULTI_LAYER_FORMAT)
EXPORT_KIND = "ser-cache exported head"
WINDOW_BATCH = 8  # 30 s windows per encoder forward when predicting a long recording
# Cache settings that decide the states a head was trained on: a cache used for an all-speaker
# export must agree on all of them with the one the run was trained on.
CACHE_KEYS = ("corpus", "model_sha256", "dims", "mode", "dtype", "compute_dtype", "records_hash", "shard_sha256",
              "store", "frame_pool")


class PredictError(UserError):
    """An export or prediction that cannot be done as asked; the message names the fix."""


# --- exporting a run -------------------------------------------------------------------------


def median_selected(values: list) -> float:
    """The median of per-fold choices, the lower middle one for an even count: always a value
    some fold actually chose (an epoch, or a C of the grid)."""
    return statistics.median_low(values)


def export_run(run_dir: Path, out: Path, fold: int | None = None, epochs: int | None = None,
               cache_path: Path | None = None, device: str | None = None, overwrite: bool = False) -> dict:
    """Write one file with the head of the run at `run_dir` (see the module docstring).

    fold: export fold `fold`'s saved head as is; None: train on all speakers.
    epochs: (all speakers, heads trained by epochs) train a fresh schedule of this many epochs
      instead of stopping the run's schedule at the median selected epoch.
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
    folder = RunFolder(run_dir)
    try:
        run, metrics = folder.read_config(), folder.read_metrics()
    except ResultsError as e:
        raise PredictError(str(e)) from None
    missing = [f"cache.{k}" for k in ("model", "model_sha256", "mode", "dims") if k not in run.cache]
    if missing:
        raise PredictError(f"{folder.root / RunFolder.CONFIG} lacks {missing}: the run was not trained from a "
                           "cache by `ser-cache train`; re-run it")
    config = TrainConfig.from_dict(as_made(run.config))
    provenance = {
        "run": str(run_dir.resolve()),
        "corpus": run.cache.get("corpus"),
        "cache": {k: run.cache.get(k) for k in ("path", "records_hash", "shard_sha256", "n_records")},
        "config": config.to_dict(),
        "folds": run.folds,
        "flawed_compat": run.flawed_compat,
        "run_metrics": _run_metrics(metrics),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
    }
    if fold is not None:
        model, info = _fold_head(folder, fold, run)
        options = dict(info["kwargs"])
        provenance.update(trained_on=f"fold {fold}", selected=info.get("selected"),
                          fold_metrics=_fold_metrics(metrics, fold))
    else:
        if metrics is None:
            raise PredictError(f"{run_dir} has no metrics.json: the run did not finish. Re-run it (it resumes), "
                               "or export one fold's saved head with --fold K")
        model, options, detail = _train_on_all(run, config, metrics, epochs, cache_path, device)
        provenance.update(trained_on="all speakers", **detail)

    saved = {
        "kind": EXPORT_KIND,
        "format": MULTI_LAYER_FORMAT if is_multi(run.layer) else EXPORT_FORMAT,
        "head": run.head,
        "kwargs": options,
        "task": config.task,
        "labels": run.labels,  # the classes, or a regression head's targets, in output order
        "layer": layers.to_json(run.layer),
        "mode": run.cache["mode"],
        "dtype": run.cache.get("dtype", "float16"),
        "compute_dtype": run.cache.get("compute_dtype", "float32"),
        # Encoder frames averaged into each frame the head read (the run's, else the cache's own);
        # a head of a statistics cache reads the statistics of frames pooled so, as predict does.
        "frame_pool": config.frame_pool or run.cache.get("frame_pool", 1),
        "encoder": {"family": run.cache.get("family", OPENAI_WHISPER), "name": run.cache["model"],
                    "sha256": run.cache["model_sha256"], "dims": dict(run.cache["dims"]), "path": run.cache.get("model_path")},
        "provenance": _plain(provenance),
    }
    if n_members(model) is not None:
        saved["members"] = n_members(model)  # an Ensemble of that many heads `head` with `kwargs`
    out.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(out, {**saved, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
    return saved


def _fold_head(folder: RunFolder, fold: int, run) -> tuple[Head, dict]:
    """Fold `fold`'s saved head and what save_head recorded with it, checked against the run."""
    path = folder.head_path(fold)
    if not path.is_file():
        saved = sorted(p.name for p in folder.root.glob("fold_*.pt"))
        raise PredictError(f"{folder.root} has no saved head for fold {fold}; it has {saved or 'none'}")
    model, info = load_head(path)
    if info["head"] != run.head or as_selection(info["layer"]) != as_selection(run.layer) or list(info["labels"]) != run.labels:
        raise PredictError(f"{path} does not belong to this run (head, layer or labels differ from config.json)")
    return model, info


def _train_on_all(run, config: TrainConfig, metrics: RunMetrics, epochs: int | None,
                  cache_path: Path | None, device: str | None) -> tuple[Head, dict, dict]:
    """The run's head retrained on every utterance with the median choice of its folds (or a
    fresh `epochs`-long schedule); returns (head, options, provenance details)."""
    key = head_class(run.head).selects
    selected = [d["selected"] for d in metrics.fold_details]
    # An ensemble's members each chose: all their choices are pooled (module docstring).
    choices = [m[key] for d in metrics.fold_details for m in d.get("members") or [d["selected"]]]
    choice = {key: median_selected(choices)}
    rule = f"{key}: the median (lower middle) of the {key} chosen on validation per fold"
    if key == "epoch":
        rule = (f"the run's {config.epochs}-epoch schedule stopped after epoch {choice['epoch']} (0-based), the "
                "median (lower middle) of the epochs chosen on validation per fold")
    if epochs is not None:
        if key != "epoch":
            raise PredictError(f"--epochs applies to heads trained by epochs; the {run.head} head is fitted with "
                               f"the median {key} chosen per fold")
        config, choice = dataclasses.replace(config, epochs=epochs), {"epoch": epochs - 1}
        rule = f"--epochs {epochs}: a full {epochs}-epoch schedule"
    data, task, y = _training_data(run.cache, run.layer, run.labels, cache_path, config,
                                   run.cross_corpus.get("label_map"))
    dev = pick_device(device or config.device)
    seeds = [member_seed(config.seed, m) for m in range(config.ensemble)]
    fits = [fit_head(run.head, data, y, np.arange(len(data)), None, config, task, s, dev, fixed=choice)
            for s in seeds]
    model = one_head([f.model for f in fits])
    classes, class_y = data.classes()
    detail = {"n_utterances": len(data), "selected_per_fold": selected, "choice": choice, "rule": rule,
              "class_counts": dict(zip(classes, np.bincount(class_y, minlength=len(classes)).tolist()))}
    if len(fits) > 1:
        detail.update(members=len(fits), member_seeds=seeds,
                      rule=rule + f"; over every member of every fold's ensemble of {len(fits)}")
    if key == "epoch":
        detail.update(epochs=choice["epoch"] + 1, schedule_epochs=config.epochs)
    return model.cpu().eval(), fits[0].options, detail


def _training_data(cache_info: dict, layer, labels: list[str], cache_path: Path | None, config: TrainConfig,
                   label_map: str | None = None):
    """(data, task, y): the layer (or layers) the run was trained on, read from its cache
    (after the run's label map, crosscorpus.map_classes), with the run's task
    (tasks.make_task) and its y: class indices, or target values."""
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
        data = cache.read_layer(as_selection(layer), frame_pool=config.frame_pool or None)
    except CacheError as e:
        raise PredictError(str(e)) from None
    if label_map is not None:
        from .crosscorpus import map_classes

        data, _ = map_classes(data, label_map, str(path))
    task, y = make_task(data, config)
    if task.names != labels:
        raise PredictError(f"the cache has {task.kind} outputs {task.names}, the run {labels}: pass --cache with "
                           "the run's cache")
    return data, task, y


SUMMARY_KEYS = ("ua", "wa", "macro_f1", "weighted_f1", "ccc")  # ccc: a regression run's mean over targets


def _run_metrics(metrics: RunMetrics | None) -> dict:
    if not metrics:
        return {}
    s = metrics.summary
    out = {k: {"mean": s[k]["mean"], "std": s[k]["std"]} for k in SUMMARY_KEYS if k in s}
    for target, stats in s.get("targets", {}).items():  # regression: CCC, Pearson r, MAE per target
        out[target] = {stat: {"mean": v["mean"], "std": v["std"]} for stat, v in stats.items()}
    return out


def _fold_metrics(metrics: RunMetrics | None, fold: int) -> dict:
    if not metrics:
        return {}
    s = metrics.summary
    return {k: s[k]["folds"][fold] for k in SUMMARY_KEYS if k in s and fold < len(s[k]["folds"])}


def _plain(value):
    """Only JSON types (what weights_only loading accepts); anything else becomes a string."""
    return json.loads(json.dumps(value, default=str))


# --- loading an exported file ----------------------------------------------------------------


@dataclass
class Exported:
    """An exported head, rebuilt. `model` is a head (heads.Head) in eval mode."""

    model: Head
    head: str
    labels: list[str]  # the classes, or a regression head's targets
    layer: Selection  # a state, or a tuple of the states a multi-layer head mixes
    mode: str
    dtype: str
    compute_dtype: str
    encoder: dict  # {"family", "name", "sha256", "dims", "path"}
    provenance: dict
    kwargs: dict
    task: str = "classification"  # or "regression": the head predicts target values
    frame_pool: int = 1  # encoder frames averaged into each frame the head reads (pooling.py)

    @property
    def regression(self) -> bool:
        return self.task == "regression"


def load_exported(path: Path) -> Exported:
    """Rebuild the head of a file written by `export_run` (weights_only: no code is unpickled)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PredictError(f"{path} is not a file written by `ser-cache export` ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("kind") != EXPORT_KIND:
        raise PredictError(f"{path} is not a file written by `ser-cache export` (a fold_K.pt of a run? "
                           "export it first: ser-cache export RUN --fold K --out model.pt)")
    if saved.get("format") not in READ_FORMATS:
        raise PredictError(f"{path}: export format {saved.get('format')}, this version reads {READ_FORMATS}: "
                           "export the run again with this version (`ser-cache export RUN --out FILE`)")
    kwargs = dict(saved["kwargs"])
    try:
        model = rebuild_head(saved["head"], kwargs, saved.get("members"))
        model.load_state_dict(saved["state_dict"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise PredictError(f"{path}: the head in it cannot be rebuilt ({str(e).splitlines()[0]}); export the run "
                           "again with this version") from None
    model.eval()
    return Exported(model, saved["head"], list(saved["labels"]), as_selection(saved["layer"]), saved["mode"], saved["dtype"],
                    saved["compute_dtype"], _encoder_record(saved), dict(saved["provenance"]), kwargs,
                    saved.get("task", "classification"),  # files exported before tasks: classes
                    int(saved.get("frame_pool", 1)))  # files exported before pooling: every frame


def _encoder_record(saved: dict) -> dict:
    """The exported encoder's {"family", "name", "sha256", "dims", "path"}; files exported
    before other encoders were supported call it "whisper" and are openai-whisper's."""
    if "encoder" in saved:
        return dict(saved["encoder"])
    return {"family": OPENAI_WHISPER, **saved["whisper"]}


# --- predicting ------------------------------------------------------------------------------


@dataclass
class WindowPrediction:
    start: float  # seconds
    end: float
    probs: np.ndarray  # (n_classes,) probabilities, or (n_targets,) values of a regression head


@dataclass
class FilePrediction:
    """One audio file's result: its windows and overall probabilities, or why it failed."""

    path: str
    windows: list[WindowPrediction] = field(default_factory=list)
    probs: np.ndarray | None = None  # (n_classes,) or (n_targets,), duration-weighted mean of the windows'
    notes: list[str] = field(default_factory=list)
    error: str = ""


class Predictor:
    """An exported head plus the encoder it was trained on, ready for audio files.

    early_stop=False runs every encoder block and then picks the head's layers: the same
    result, slower; it exists to check and measure the early stop.
    """

    def __init__(self, exported: Exported, enc: LoadedEncoder, device: str | torch.device = "cpu",
                 early_stop: bool = True):
        self.exported, self.enc, self.device, self.early_stop = exported, enc, torch.device(device), early_stop
        exported.model.to(self.device)

    @property
    def labels(self) -> list[str]:
        return self.exported.labels

    def states(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """The head's layer for each 16 kHz window: [(frames, dim)] in the cache's dtype,
        computed as `ser-cache extract` computed the training states; for a head on several
        layers, [(frames, n_states * dim)], the states side by side as Cache.read_layer
        stacks them. The encoder stops after the highest of them."""
        ex = self.exported
        wanted = states_of(ex.layer)
        keep = wanted if self.early_stop else list(range(self.enc.n_states))
        out = []
        for start in range(0, len(windows), WINDOW_BATCH):
            chunk = windows[start : start + WINDOW_BATCH]
            batch = [(0, i, *encoder_input(self.enc, w, ex.mode)) for i, w in enumerate(chunk)]
            for s in encode_batch(self.enc, batch, ex.mode, keep, ex.dtype, self.device, ex.compute_dtype):
                out.append(s[wanted[0]] if len(wanted) == 1 else np.concatenate([s[k] for k in wanted], axis=1))
        return out

    def head_probs(self, states: list[np.ndarray]) -> np.ndarray:
        """(n_windows, n_classes) class probabilities (a regression head: (n_windows, n_targets)
        values) from per-window states [(frames, width)]."""
        lengths = np.array([len(s) for s in states])
        blank = np.array([""] * len(states))
        data = LayerData(frames=np.concatenate(states), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                         ids=np.array([str(i) for i in range(len(states))]), labels=blank, speakers=blank,
                         groups=blank, layer=self.exported.layer).pooled(self.exported.frame_pool)
        return predict_proba(self.exported.model, data, np.arange(len(states)), self.device)

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
    """An exported head with its encoder: `whisper_model` (a Whisper name or checkpoint path,
    a transformers model folder or hub id), else the checkpoint file or model folder recorded at
    extraction if it still holds the same bytes, else the model name recorded in the file.
    Refuses a model whose SHA-256 is not the one the head was trained on unless
    allow_other_model; a model of another family or shape is always refused."""
    from .encoder import CheckpointError, model_sha256
    from .hf_encoders import EncoderError

    ex = load_exported(model_file)
    want = ex.encoder
    recorded = want.get("path")  # None for a model name; absent from files exported before it was kept
    name = whisper_model
    if name is None:
        # Hashed before loading: another model at that path would only be refused below,
        # whereas the recorded name may still find the right one.
        same = bool(recorded) and model_sha256(recorded) == want["sha256"]
        name = recorded if same else want["name"]
    try:
        enc = load_encoder(name, device=device)
    except (CheckpointError, EncoderError) as e:
        raise PredictError(str(e)) from None
    except ValueError as e:
        if whisper_model is None:
            openai = want["family"] == OPENAI_WHISPER
            what, kind = ("a model name Whisper can download", "checkpoint") if openai else ("a hub id", "model")
            where = f" (and the {kind} recorded at {recorded} is missing or has other bytes)" if recorded else ""
            raise PredictError(f"the head was trained on states of {FAMILY_LABELS[want['family']]} {want['name']!r} "
                               f"(sha256 {want['sha256'][:12]}...), which is not {what}{where}: pass --model PATH "
                               f"to that {kind}") from None
        raise PredictError(str(e)) from None
    except (OSError, RuntimeError) as e:
        raise PredictError(f"cannot load Whisper {name!r} ({e}); offline, pass --model PATH to the checkpoint "
                           f"(sha256 {want['sha256'][:12]}...)") from None
    if enc.sha256 != want["sha256"] and not allow_other_model:
        raise PredictError(
            f"model {name!r} has sha256 {enc.sha256[:12]}..., but the head was trained on states of "
            f"{want['name']!r} (sha256 {want['sha256'][:12]}...): its predictions would be meaningless. "
            "Pass --model with the right checkpoint, or --allow-other-model if you know the weights are equivalent"
        )
    if same_states_family(enc.family) != same_states_family(want["family"]):
        raise PredictError(f"model {name!r} is a {enc.family} encoder, the head read states of a {want['family']} "
                           "encoder: pass --model with the model it was trained on")
    for key in ("n_mels", "n_audio_state", "n_audio_layer", "hop_samples", "do_normalize"):
        if enc.dims.get(key) != want["dims"].get(key):
            raise PredictError(f"model {name!r} has {key} {enc.dims.get(key)}, the head needs {want['dims'].get(key)}: "
                               "the head cannot read its states; pass --model with the model it was trained on")
    return Predictor(ex, enc, device, early_stop)


# --- output ----------------------------------------------------------------------------------


def _span(w: WindowPrediction) -> str:
    return f"{w.start:.1f}-{w.end:.1f} s"


def format_table(results: list[FilePrediction], labels: list[str], regression: bool = False) -> str:
    """One row per file (and per window of a file over 30 s, then its overall row), with the
    predicted emotion and every class probability (regression: every target's value); failed
    files say why."""
    def emotion(p):
        return "" if regression else labels[int(p.argmax())]

    rows = []
    for r in results:
        if r.error:
            rows.append((r.path, "", "ERROR", None, r.error))
            continue
        if len(r.windows) > 1:
            rows += [(r.path, _span(w), emotion(w.probs), w.probs, "") for w in r.windows]
            span = f"all {r.windows[-1].end:.1f} s"
        else:
            span = _span(r.windows[0])
        rows.append((r.path, span, emotion(r.probs), r.probs, "; ".join(r.notes)))
    wf = max([4] + [len(row[0]) for row in rows])
    ws = max([6] + [len(row[1]) for row in rows])
    we = 0 if regression else max([7] + [len(lab) for lab in labels])
    wp = [max(5, len(lab)) for lab in labels]
    gap = "" if regression else "  "
    head = "" if regression else f"{'emotion':<{we}}"
    lines = [f"{'file':<{wf}}  {'window':<{ws}}  {head}{gap}" + "  ".join(f"{lab:>{w}}" for lab, w in zip(labels, wp))]
    for path, span, predicted, probs, note in rows:
        if probs is None:
            lines.append(f"{path:<{wf}}  {span:<{ws}}  ERROR: {note}")
            continue
        line = (f"{path:<{wf}}  {span:<{ws}}  {predicted:<{we}}{gap}"
                + "  ".join(f"{p:>{w}.3f}" for p, w in zip(probs, wp)))
        lines.append(line + (f"  ({note})" if note else ""))
    return "\n".join(lines)


def to_json(results: list[FilePrediction], labels: list[str], regression: bool = False) -> str:
    """A JSON list, one object per file: prediction, probabilities, windows, notes or error;
    a regression head's: "values" ({target: value}) in place of prediction and probabilities."""
    def probs(p):
        return {lab: round(float(v), 6) for lab, v in zip(labels, p)}

    def outputs(p):
        if regression:
            return {"values": probs(p)}
        return {"prediction": labels[int(p.argmax())], "probabilities": probs(p)}

    out = []
    for r in results:
        if r.error:
            out.append({"file": r.path, "error": r.error})
            continue
        out.append({
            "file": r.path,
            **outputs(r.probs),
            "windows": [{"start": w.start, "end": round(w.end, 3), **outputs(w.probs)} for w in r.windows],
            "notes": r.notes,
        })
    return json.dumps(out, indent=1, ensure_ascii=False)

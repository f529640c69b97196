"""Export a trained head to one file that `predict` uses on new audio.

    run folder (ser-cache train) --export_run--> model.pt  (predict.py reads it)

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
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
from pathlib import Path

import numpy as np

from . import layers
from .config import TrainConfig, as_made
from .device import pick_device
from .encoder import OPENAI_WHISPER
from .errors import UserError
from .extract import package_versions
from .files import save_torch_atomic
from .fitting import fit_head, member_seed
from .heads import Head, head_class, load_head, n_members, one_head
from .layers import as_selection, is_multi
from .results import ResultsError, RunFolder, RunMetrics
from .tasks import make_task

EXPORT_FORMAT = 2  # 1: the linear head as scikit-learn arrays (before heads were one interface)
# A head on several layers records them as a list; its files say so with their own number, so
# that a version that reads only one layer refuses them by name instead of failing inside.
MULTI_LAYER_FORMAT = 3
EXPORT_KIND = "ser-cache exported head"
# Cache settings that decide the states a head was trained on: a cache used for an all-speaker
# export must agree on all of them with the one the run was trained on.
CACHE_KEYS = ("corpus", "model_sha256", "dims", "mode", "dtype", "compute_dtype", "records_hash", "shard_sha256",
              "store", "frame_pool")


class ExportError(UserError):
    """An export that cannot be done as asked; the message names the fix."""


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
        raise ExportError("--fold exports a saved head as it is; --epochs applies only to training on all speakers")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists: choose another output file or allow overwriting")
    folder = RunFolder(run_dir)
    try:
        run, metrics = folder.read_config(), folder.read_metrics()
    except ResultsError as e:
        raise ExportError(str(e)) from None
    missing = [f"cache.{k}" for k in ("model", "model_sha256", "mode", "dims") if k not in run.cache]
    if missing:
        raise ExportError(f"{folder.root / RunFolder.CONFIG} lacks {missing}: the run was not trained from a "
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
            raise ExportError(f"{run_dir} has no metrics.json: the run did not finish. Re-run it (it resumes), "
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
        raise ExportError(f"{folder.root} has no saved head for fold {fold}; it has {saved or 'none'}")
    model, info = load_head(path)
    if info["head"] != run.head or as_selection(info["layer"]) != as_selection(run.layer) or list(info["labels"]) != run.labels:
        raise ExportError(f"{path} does not belong to this run (head, layer or labels differ from config.json)")
    return model, info


def _train_on_all(run, config: TrainConfig, metrics: RunMetrics, epochs: int | None,
                  cache_path: Path | None, device: str | None) -> tuple[Head, dict, dict]:
    """The run's head retrained on every utterance with the median choice of its folds (or a
    fresh `epochs`-long schedule); returns (head, options, provenance details)."""
    key = head_class(run.head).selects
    selected = [d["selected"] for d in metrics.fold_details]
    # An ensemble's members each chose: all their choices are pooled (module docstring).
    chosen = [m for d in metrics.fold_details for m in d.get("members") or [d["selected"]]]
    choice = {key: median_selected([m[key] for m in chosen])}
    rule = f"{key}: the median (lower middle) of the {key} chosen on validation per fold"
    if "weights" in chosen[0]:  # the fusion head's state weights: the mean of the folds' (each sums to 1)
        choice["weights"] = np.mean([m["weights"] for m in chosen], axis=0).tolist()
        rule += "; the states' weights: the mean of those chosen on validation per fold"
    if key == "epoch":
        rule = (f"the run's {config.epochs}-epoch schedule stopped after epoch {choice['epoch']} (0-based), the "
                "median (lower middle) of the epochs chosen on validation per fold")
    if epochs is not None:
        if key != "epoch":
            raise ExportError(f"--epochs applies to heads trained by epochs; the {run.head} head is fitted with "
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
        raise ExportError(f"{e}\nThe run was trained on the cache {cache_info.get('path')}; pass --cache "
                           "with its new location, or export a fold's head with --fold K (no cache needed)") from None
    now = cache.fingerprint
    diffs = [f"{k}: run has {cache_info.get(k)!r}, cache has {now.get(k)!r}"
             for k in CACHE_KEYS if k in cache_info and cache_info[k] != now.get(k)]
    if diffs:
        raise ExportError(f"the cache {path} does not hold the states this run was trained on:\n  "
                           + "\n  ".join(diffs) + "\nFix: pass --cache with the run's cache, or train a new run")
    try:
        data = cache.read_layer(as_selection(layer), frame_pool=config.frame_pool or None)
    except CacheError as e:
        raise ExportError(str(e)) from None
    if config.views != "on":  # the augmented views (extract --augment) train only when the run trained on them
        from .crosscorpus import originals_of

        data = originals_of(cache, data)
    if label_map is not None:
        from .crosscorpus import map_classes

        data, _ = map_classes(data, label_map, str(path))
    task, y = make_task(data, config)
    if task.names != labels:
        raise ExportError(f"the cache has {task.kind} outputs {task.names}, the run {labels}: pass --cache with "
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

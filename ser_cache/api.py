"""The Python interface: what `ser-cache train`, `sweep`, `export` and `predict` do, as calls.

    open_cache(path)                                  -> Cache (inspect it, read_layer(...))
    train(cache, layer=3, head="qkv", **settings)     -> RunResult (metrics, fold records, heads)
    sweep([cache, ...], out=folder, **settings)       -> SweepOutcome (the folder holds the table)
    make_folds(layer_data, protocol=..., ...)         -> Folds (speaker-independent)
    export(run_folder, out=file)                      -> what the exported file records
    load_predictor(file).predict_file(audio_path)     -> FilePrediction (probabilities over .labels)

Each call runs the code its command runs, with the same defaults; `settings` are TrainConfig's
fields by name (epochs=30, lr=1e-3, n_heads=12, frame_pool=4, ...), and a name it does not have
is refused with the list of those it has. Nothing is written unless an output folder or file is
given: `train` without `out` keeps its fold heads in the returned RunResult only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import OptionError


def _config(settings: dict):
    """A TrainConfig from keyword settings, or OptionError naming the unknown ones."""
    from .config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise OptionError(f"unknown setting(s) {', '.join(unknown)}: the settings are TrainConfig's fields, "
                          f"{', '.join(sorted(known))}")
    return TrainConfig(**settings)


def open_cache(path):
    """The cache folder at `path`, opened for reading (cache.Cache: settings, layers,
    `read_layer(layer, frame_pool=None)` -> features.LayerData or StatsLayer)."""
    from .cache import open_cache as _open

    return _open(path)


def train(cache, *, layer, head: str = "qkv", out=None, protocol: str | None = None, n_folds: int | None = None,
          fold_file=None, folds_from=None, test_cache=None, label_map: str | None = None,
          memory_budget: int | None = None, overwrite: bool = False, **settings):
    """Train `head` on `layer` of `cache` across speaker-independent folds, as `ser-cache train`.

    layer: a state (3), several (a tuple, or a spec such as "2-5", "all"); settings:
    TrainConfig's fields (epochs, lr, n_heads, frame_pool, ensemble, refit, task, targets...).
    out: a run folder to write (resumed when it holds the same run); None writes nothing.
    Returns training.RunResult: `metrics` (UA or CCC: mean, std, per fold), `folds` (one
    FoldRecord each: choice made on validation, test probabilities) and `models` (the fold
    heads).
    """
    from .training import train_from_cache

    return train_from_cache(Path(cache), layer, head, None if out is None else Path(out), _config(settings),
                            protocol=protocol, n_folds=n_folds,
                            fold_file=None if fold_file is None else Path(fold_file),
                            folds_from=None if folds_from is None else Path(folds_from), overwrite=overwrite,
                            test_cache=None if test_cache is None else Path(test_cache), label_map=label_map,
                            memory_budget=memory_budget)


def sweep(caches, *, out, layers: str = "all", heads=None, seeds=(0,), grid: dict | None = None,
          protocol: str | None = None, n_folds: int | None = None, fold_file=None, folds_from=None,
          test_cache=None, label_map: str | None = None, jobs: int | None = None, device: str = "auto",
          memory_budget: int | None = None, report: bool = True, **settings):
    """Compare heads on layers of one or more caches over the same folds, as `ser-cache sweep`.

    caches: a cache folder or a list of them; layers: "all", "3", "2-5", "2+3+4"...; heads:
    names (default: linear, mean, attentive, qkv); grid: {setting: [values]} chosen on
    validation speakers (e.g. {"n_heads": [4, 8]}); settings: TrainConfig's fields. `out` is the
    sweep folder (results.csv, summary.md, plots), resumed when it holds the same sweep.
    Returns sweep.SweepOutcome; results.SweepFolder(out).cells() reads the cells.
    """
    from .sweeping import DEFAULT_HEADS, SweepSpec, run_sweep

    caches = [caches] if isinstance(caches, (str, Path)) else list(caches)
    spec = SweepSpec(caches=[Path(c) for c in caches], layers=layers, heads=list(heads or DEFAULT_HEADS),
                     seeds=list(seeds), grid=dict(grid or {}), train=_config(settings), protocol=protocol,
                     n_folds=n_folds, fold_file=None if fold_file is None else Path(fold_file),
                     folds_from=None if folds_from is None else Path(folds_from),
                     test_cache=None if test_cache is None else Path(test_cache), label_map=label_map)
    return run_sweep(spec, Path(out), jobs=jobs, device=device, progress=False, write_report=report,
                     memory_budget=memory_budget)


def make_folds(data, *, protocol: str | None = None, n_folds: int | None = None, seed: int = 0, fold_file=None,
               corpus: str = "", views: dict | None = None):
    """The speaker-independent folds of a layer's utterances (features.LayerData or StatsLayer,
    from `open_cache(path).read_layer(...)`), as train builds them: protocol None is "loso"
    when the corpus has groups, else "kfold" with n_folds (per corpus by default). Returns
    folds.Folds (`split(k)` -> train, validation, test indices into its `ids`).

    views: a cache's augmented views ({view id: source id}, `open_cache(path).view_sources()`):
    the folds are then made on the original utterances only, as train makes them, so that no
    view is validated or tested (without it, every row of `data` is an utterance)."""
    from .folds import ViewRows, make_folds as _make

    o = ViewRows.of(data.ids, views).originals if views else slice(None)
    return _make(data.ids[o], data.labels[o], data.speakers[o], data.groups[o], protocol=protocol, n_folds=n_folds,
                 corpus=corpus, fold_file=None if fold_file is None else Path(fold_file), seed=seed)


def export(run, *, out, fold: int | None = None, epochs: int | None = None, cache=None, device: str | None = None,
           overwrite: bool = False) -> dict:
    """Write one file holding a head of the run folder `run` (trained again on every speaker, or
    fold `fold`'s as is), as `ser-cache export`; returns what the file records besides weights."""
    from .exporting import export_run

    return export_run(Path(run), Path(out), fold=fold, epochs=epochs,
                      cache_path=None if cache is None else Path(cache), device=device, overwrite=overwrite)


def load_predictor(path, *, model: str | None = None, device: str = "cpu"):
    """An exported head with the encoder it was trained on (predict.Predictor): its
    `predict_file(path)` gives an audio file's predict.FilePrediction. model: the encoder to load
    instead of the one recorded in the file (it must hold the same weights)."""
    from .predict import load_predictor as _load

    return _load(Path(path), model, device=device)

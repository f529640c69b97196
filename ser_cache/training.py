"""Runs across speaker-independent folds: every fold fitted (ensembles.py) and tested once.

    run_fold(head, data, y, task, folds, k, config, device[, settings])  one fold ->  FoldOutcome
    run_folds(data, folds, name, TrainConfig[, run folder])  every fold, tested once ->  RunResult
    train_from_cache(cache, layer, head, out, TrainConfig)    the same, from a cache folder

`run_fold` is the one way a head is run on a fold, by `train` (one setting, `train_fold`) and
by `sweep` (a grid of settings, sweeping.run_cell_fold): it trains every setting on the
training speakers, picks each one's epoch (or C), and then the setting, by the best score on
the validation speakers (carved from the training speakers, see folds.py), then evaluates the
test speakers once with that state and dropout off. One seed fixes everything: the folds'
carving, every fold's initialisation, batch order and dropout masks (torch's global RNG is
forked per fold and restored, numpy uses a local Generator), so the same command gives the
same metrics on the same machine (on a GPU, up to non-deterministic kernels).

A run folder (results.RunFolder) is written fold by fold, each file atomically: a run killed
at any point resumes from its finished folds when re-run with the same settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from .batches import predict_proba
from .config import ConfigError, TrainConfig, as_made, weighting
from .crosscorpus import score_test_corpus
from .device import pick_device
from .ensembles import fit_selected, refit_selected
from .features import LayerData, StatsLayer
from .fitting import NonFiniteLossError, fold_seed, fork_rng, settings_read
from .folds import Folds, ViewRows, make_folds
from .heads import Head, head_class, load_head, options_for, save_head
from .layers import Selection, label, parse_selection, states_of, to_json
from .report import mix_verdict, uniformity
from .results import FoldRecord, RunConfig, RunFolder, RunMetrics, remove_tmp_files_under
from .tasks import Classification, Regression, Task, as_task, make_task

if TYPE_CHECKING:
    from .crosscorpus import CrossCorpus, CrossResult

log = logging.getLogger(__name__)


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
        views = [f.n_train_views for f in self.folds]
        if any(views):
            counts = f"{min(views)}" if min(views) == max(views) else f"{min(views)}-{max(views)}"
            lines.append(f"  trained on {counts} augmented views per fold besides the training "
                         "utterances (--views on); validation and test: originals only")
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
            lines.append(f"{f.fold:>6} {f.n_test:>6} {f.selected[sel]:>6g} "
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
            lines.append(f"{f.fold:>6} {f.n_test:>6} {f.selected[sel]:>6g} {100 * m['ua']:6.2f} "
                         f"{100 * m['wa']:6.2f} {100 * m['macro_f1']:6.2f} {100 * m['weighted_f1']:6.2f} "
                         f"{f.train_seconds:8.1f} {f.eval_seconds:7.2f}")
        s = self.metrics
        lines.append("  mean ± std: " + ", ".join(
            f"{name} {100 * s[key]['mean']:.2f} ± {100 * s[key]['std']:.2f}"
            for name, key in (("UA", "ua"), ("WA", "wa"), ("macro-F1", "macro_f1"), ("weighted-F1", "weighted_f1"))))
        return lines

    def weights_table(self) -> list[str]:
        """The softmax weight of each state per fold, and their mean ± std, with how far each
        fold's weights are from equal (report.uniformity: the largest |w - 1/L| and entropy /
        log L), and a line saying whether the mix learned anything (a multi-layer head that
        mixes states; none otherwise)."""
        rows = [(f.fold, f.layer_weights) for f in self.folds if f.layer_weights is not None]
        if not rows:
            return []
        states = states_of(self.layer)
        u = [uniformity(weights) for _, weights in rows]
        lines = ["  layer weights (softmax over states, per fold):",
                 f"{'fold':>6} " + " ".join(f"{'state ' + str(s):>9}" for s in states)
                 + f" {'|w-1/L|':>8} {'H/log L':>8}"]
        lines += [f"{fold:>6} " + " ".join(f"{w:9.3f}" for w in weights) + f" {d['max_dev']:8.4f} {d['entropy']:8.4f}"
                  for (fold, weights), d in zip(rows, u)]
        w = np.array([weights for _, weights in rows])
        lines.append(f"{'mean':>6} " + " ".join(f"{m:9.3f}" for m in w.mean(axis=0))
                     + f" {np.mean([d['max_dev'] for d in u]):8.4f} {np.mean([d['entropy'] for d in u]):8.4f}")
        lines.append(f"{'std':>6} " + " ".join(f"{d:9.3f}" for d in w.std(axis=0)))
        lines.append(f"  |w-1/L|: the largest distance of a weight from equal weights (1/{len(states)}); H/log L: "
                     "the weights' entropy over its largest value (1: equal)")
        mode, key = weighting(self.head, self.config.to_dict())
        lines.append("  " + mix_verdict([mode] * len(u), [d["uniform"] for d in u], len(states), key))
        return lines


def fold_split(folds: Folds, k: int, config: TrainConfig,
               rows: ViewRows | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, select, test) of fold k as `config` trains on it. FLAWED compat_select_on_test:
    the reference code's split, no validation speakers, the test fold picks the epoch.

    rows: where the augmented views lie among the layer's rows (folds made on the originals):
    the indices are then rows of the layer, select and test originals only, and train holds
    the views of its utterances too when config.views is "on"."""
    train, val, test = folds.split(k) if rows is None else rows.split(folds, k)
    if config.compat_select_on_test:
        train, val = np.sort(np.concatenate([train, val])), test
    if rows is not None and config.views == "on":
        train = rows.with_views(train)
    return train, val, test


@dataclass
class FoldOutcome:
    """One fold as `run_fold` leaves it: its record (with its test predictions), the head it
    tested (eval mode), the grid values of the setting chosen ({} for a run's one setting), and
    (values, selected: the choice and validation score) of every setting tried, in order."""

    record: FoldRecord
    model: Head
    values: dict
    trials: list[tuple[dict, dict]]


def run_fold(head: str, data, y: np.ndarray, task: Task, folds: Folds, k: int, config: TrainConfig,
             device: torch.device, settings: Sequence[dict] = ({},), rows: ViewRows | None = None,
             test_corpus: LayerData | None = None, what: str = "this layer") -> FoldOutcome:
    """Fold k of `folds` (aligned to the layer's utterances, or to rows.original_ids) for
    `head` on `data`, a LayerData, StatsLayer or StreamedLayer: each setting, `config` with one
    grid point of `settings` applied (in order), fitted on the training speakers with its epoch
    (or C) chosen on the validation speakers; the setting with the best validation score
    (task.score_name; ties keep the earlier) is, with config.refit, retrained on both with
    that choice; then its head scores the test speakers once, seeded, dropout off unless the
    FLAWED config.compat_eval_dropout.

    y: (n,) class numbers, or (n, n_targets) values (tasks.make_task). Settings that decide the
    same result on this layer (fitting.settings_read, and views) run once; each reads the layer
    pooled by its frame_pool (`what` names the layer in errors). rows: the layer's augmented
    views (fold_split: a setting with views "on" trains on them). test_corpus: another corpus's
    same layer, classes mapped (crosscorpus.py), on which the chosen head is also scored.
    """
    seed = fold_seed(config.seed, k)
    score = task.score_name  # "ua", or "ccc" (mean over targets): what settings are compared by
    read, trials, train_seconds, best = {}, [], 0.0, None  # read: frame_pool -> the layer so pooled
    for values, setting in distinct_settings(head, config, settings, len(states_of(data.layer))):
        if setting.frame_pool not in read:
            read[setting.frame_pool] = at_frame_pool(data, setting, what)
        train, select, _ = fold_split(folds, k, setting, rows)
        fit = fit_selected(head, read[setting.frame_pool], y, train, select, setting, task, seed, device)
        train_seconds += fit.seconds
        trials.append((values, fit.selected))
        if best is None or fit.selected[score] > best[0].selected[score]:
            best = (fit, values, setting)
    chosen, values, setting = best
    data = read[setting.frame_pool]  # what the chosen setting read, refit and test included
    train, select, test = fold_split(folds, k, setting, rows)
    n_views = 0 if rows is None else rows.count_views(train)
    if config.refit:  # with views on, those of the validation speakers join their originals
        views_on = rows is not None and setting.views == "on"
        refit_train = np.union1d(train, rows.views_of(select)) if views_on else train
        chosen = refit_selected(chosen, head, data, y, refit_train, select, setting, task, seed, device)
        train_seconds += chosen.refit["seconds"]
    t0 = time.perf_counter()
    with fork_rng(device):  # seeded: even the FLAWED dropout at evaluation is reproducible
        torch.manual_seed(seed)
        probs = predict_proba(chosen.model, data, test, device, setting.compat_eval_dropout)
    scored = {}
    if test_corpus is not None:  # read as the chosen setting's frames are
        test_corpus = test_corpus.pooled(data.frame_pool, "the test cache")
        scored = {**score_test_corpus(chosen.model, test_corpus, task.names, device)[1], "n": len(test_corpus)}
    record = FoldRecord(
        fold=k, selected=chosen.selected, n_train=len(train) - n_views, n_val=len(select), n_test=len(test),
        metrics=task.fold_metrics(y[test], probs), train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - t0, history=chosen.history, compute_dtype=chosen.compute_dtype,
        layer_weights=chosen.model.layer_weights(), tested=chosen.tested, refit=chosen.refit,
        members=chosen.members, n_train_views=n_views, frame_pool=data.frame_pool, test_corpus=scored,
        test_ids=data.ids[test].tolist(), probs=probs,
        true_values=y[test].tolist() if isinstance(task, Regression) else None)
    return FoldOutcome(record, chosen.model, values, trials)


def distinct_settings(head: str, config: TrainConfig, settings: Sequence[dict],
                      n_states: int) -> list[tuple[dict, TrainConfig]]:
    """(grid values, `config` with them) of each of `settings` in order, less those that decide
    the same result for `head` on n_states states as an earlier one (`deciding_settings`): a
    grid of mix settings on one state is one setting."""
    out, decided = [], set()
    for values in settings:
        setting = replace(config, **values)
        key = deciding_settings(head, setting, n_states)
        if key not in decided:
            decided.add(key)
            out.append((values, setting))
    return out


def deciding_settings(head: str, config: TrainConfig, n_states: int | None = None) -> str:
    """What decides `head`'s result under `config` (on n_states states, if known), as text that
    compares equal when the results would: the settings its fitting and constructor read
    (fitting.settings_read) and whether it trains on augmented views."""
    return json.dumps({**settings_read(head, config, n_states=n_states), "views": config.views}, sort_keys=True)


def train_fold(data: LayerData, y: np.ndarray, folds: Folds, k: int, head: str, config: TrainConfig,
               task: Task | int, device: torch.device, rows: ViewRows | None = None) -> tuple[FoldRecord, Head]:
    """`run_fold` with config's one setting: (fold k's record, its tested head). A diverged
    training's NonFiniteLossError names the fold."""
    try:
        outcome = run_fold(head, data, y, as_task(task), folds, k, config, device, rows=rows)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"fold {k}, {e}") from None
    return outcome.record, outcome.model


def run_folds(data: LayerData, folds: Folds, head: str, config: TrainConfig | None = None,
              out_dir: Path | None = None, cache: dict | None = None,
              overwrite: bool = False, cross_corpus: "CrossCorpus | None" = None,
              views: Mapping[str, str] | None = None) -> RunResult:
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
    views: {view id: source id} of the augmented views among `data`'s utterances
    (cache.Cache.view_sources): `folds` are then made on the originals, which alone are
    validated, tested and counted; config.views says whether training adds the views.
    """
    config = config or TrainConfig()
    cls = head_class(head)
    data = at_frame_pool(data, config)
    check_reads(head, config, isinstance(data, StatsLayer))
    if cross_corpus is not None and cross_corpus.test_corpus is not None:  # read as the training frames are
        cross_corpus.test_corpus = cross_corpus.test_corpus.pooled(data.frame_pool, "the test cache")
    rows = ViewRows.of(data.ids, views) if views else None  # None: no views, every row an utterance
    folds = folds.aligned_to(data.ids if rows is None else rows.original_ids)
    if isinstance(data, LayerData) and (data.n_frames < 1).any():
        raise ConfigError(f"{(data.n_frames < 1).sum()} utterances have no frames, e.g. "
                          f"{data.ids[data.n_frames < 1][:3]}: rebuild the cache or drop them")
    task, y = make_task(data, config)
    if isinstance(task, Regression):
        config = replace(config, targets=tuple(task.targets))  # recorded as resolved
    classes, class_y = data.classes()
    labels, n_outputs = task.names, task.n_outputs
    device = pick_device(config.device)
    run = RunConfig(
        head=head, layer=to_json(data.layer), labels=labels, dim=int(data.dim),
        class_counts=dict(zip(classes, np.bincount(class_y if rows is None else class_y[rows.originals],
                                                   minlength=len(classes)).tolist())),
        n_utterances=len(folds), device=str(device), config=config.to_dict(),
        head_kwargs=options_for(cls, config, data.dim, n_outputs, data.n_states),
        folds={"protocol": folds.protocol, "n_folds": folds.n_folds, "seed": folds.seed,
               "sha256": folds_digest(folds)},
        flawed_compat=config.flawed, flawed=config.flaws(), cache=cache or {},
        versions={"torch": torch.__version__, "numpy": np.__version__},
        cross_corpus=cross_corpus.config if cross_corpus else {})
    folder = open_run_folder(out_dir, run, folds, overwrite) if out_dir is not None else None
    log.info("%s head on layer %s: %d utterances%s, %s, %d folds (%s), device %s",
             head, label(data.layer), len(folds),
             "" if rows is None else f" and {len(rows.views)} augmented views ({'trained on' if config.views == 'on' else 'not used'})",
             f"{n_outputs} classes" if isinstance(task, Classification)
             else f"targets {', '.join(labels)}", folds.n_folds, folds.protocol, device)

    records, models = [], []
    for k in range(folds.n_folds):
        record = folder.read_fold(k) if folder else None
        if record is not None:
            log.info("fold %d: finished in an earlier run, kept", k)
            model = load_head(folder.head_path(k))[0]
        else:
            record, model = train_fold(data, y, folds, k, head, config, task, device, rows)
            if folder:
                save_head(folder.head_path(k), model, head, run.head_kwargs, labels, data.layer,
                          fold=k, selected=record.selected)
                folder.write_fold(record)
        records.append(record)
        models.append(model)
        choice = {key: v for key, v in record.selected.items() if key != "weights"}  # a fusion's: the line below
        log.info("fold %d: %s %.4f (selected %s) train %.1fs eval %.2fs", k, task.score_name.upper(),
                 record.metrics[task.score_name], choice, record.train_seconds, record.eval_seconds)
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
                    "n_test": r.n_test, "train_seconds": r.train_seconds,
                    "eval_seconds": r.eval_seconds, "history": r.history, "tested": r.tested,
                    "refit": r.refit, "members": r.members,
                    **({"n_train_views": r.n_train_views} if r.n_train_views else {}),
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
                          "(mean and std per utterance): train --head linear or --head stats --attn-heads 0 on it, or "
                          "this head on a frames cache (`ser-cache derive CACHE --out NEW --frame-pool K` makes a "
                          "smaller one)")
    if reads == "statistics" and config.time_mask and head_class(head).selects == "epoch":
        raise ConfigError(f"--time-mask drops frames, and the {head} head{_with_heads(head, config)} reads only "
                          f"each utterance's mean and std: set --time-mask 0, or give it attention heads")


def _with_heads(head: str, config: TrainConfig) -> str:
    """' with --attn-heads N' for the head whose reading depends on it, else ''."""
    return f" with --attn-heads {config.n_heads}" if head == "stats" else ""


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
                RunFolder.METRICS, RunFolder.PREDICTIONS, RunFolder.CROSS_CORPUS, RunFolder.TEST_CORPUS_PREDICTIONS,
                RunFolder.OLD_TEST_CORPUS_PREDICTIONS))]:
            old.unlink(missing_ok=True)
    folder.root.mkdir(parents=True, exist_ok=True)
    remove_tmp_files_under(folder.root)
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
    views = cache.view_sources()  # folds are made on the originals; views follow their sources
    refuse_views(config, views, cache_path)
    o = ViewRows.of(data.ids, views).originals
    folds = make_folds(data.ids[o], data.labels[o], data.speakers[o], data.groups[o], protocol=protocol,
                       n_folds=n_folds, corpus=cache.corpus, fold_file=fold_file, folds_from=folds_from,
                       seed=config.seed, left_out=left_out, speaker_overlap=config.compat_speaker_overlap)
    # A streamed layer's batch order follows its blocks: part of what decides the results.
    where = {**cache.fingerprint, **data.describe()} if isinstance(data, StreamedLayer) else cache.fingerprint
    return run_folds(data, folds, head, config, out_dir, cache=where, overwrite=overwrite,
                     cross_corpus=cross, views=views)


def refuse_views(config: TrainConfig, views: Mapping[str, str], where) -> None:
    """ConfigError for views "on" with a cache that holds no augmented views."""
    if config.views == "on" and not views:
        raise ConfigError(f"--views on: the cache {where} holds no augmented views; extract it with --augment "
                          "(e.g. --augment speed=0.9,1.1), or train with --views off")

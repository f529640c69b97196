"""What stage 2 writes to disk: typed records, the folders that hold them, atomic writes.

    training.py --RunFolder-->   RUN/config.json      RunConfig: what was trained, on what
                                 RUN/fold_K.pt        the head of fold K (heads.save_head)
                                 RUN/fold_K.json      FoldRecord: its choice, scores, test probabilities
                                 RUN/metrics.json     RunMetrics: mean and std over folds
                                 RUN/predictions.csv  one row per utterance
                                 RUN/folds.csv        the folds (folds.Folds.save)
                                 RUN/cross_corpus.json            with --test-cache: metrics on
                                 RUN/predictions_test_corpus.csv  the test corpus (crosscorpus.py)
    sweeping.py --SweepFolder-->    SWEEP/sweep.json     the sweep's settings (must match on resume)
                                 SWEEP/cells/CACHE/layer_LL/HEAD-seedS-foldF.json   CellFoldRecord
                                 (layers_LL+MM+.../ for a multi-layer cell)
                                 SWEEP/folds/CACHE-seedS.csv                         the folds
                                 SWEEP/timing.json    one SweepTiming per run of the sweep
    report.py <--SweepFolder--   (reads only)

Every file is written whole or not at all (files.py), so a kill leaves either the old state or
the new one, and a temporary file that a re-run removes.
A fold is recorded alike wherever it ran (FoldRecord): a sweep's cell fold is that record with
the cell's identity (CellFoldRecord). A record read back is checked against its fields: files
of earlier versions are migrated as they are read (`Record.upgrade`), and a file that cannot
be is an error that names the file and the fix, not a KeyError deep in a report.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import write_json_atomic, write_text_atomic
from .layers import dir_name
from .metrics import json_safe


class ResultsError(UserError, ValueError):
    """A run or sweep folder that cannot be used as asked; the message names the fix."""


class SweepError(ResultsError):
    """A sweep that cannot run or be reported as asked; the message names the fix."""


# --- reading ----------------------------------------------------------------------------------


def read_json(path: Path, what: str):
    """A JSON file, or ResultsError naming it and `what` it should be."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResultsError(f"cannot read {path} ({what}): {e}") from None


def remove_tmp_files_under(folder: Path) -> None:
    """Delete every temporary file (*.tmp) under `folder`, at any depth: what killed writers
    left (call only while no other process writes there)."""
    for tmp in Path(folder).rglob("*.tmp"):
        tmp.unlink(missing_ok=True)


# --- typed records ----------------------------------------------------------------------------


class Record:
    """A dataclass written as one JSON object; `from_dict` migrates what earlier versions wrote
    (`upgrade`) and refuses missing fields."""

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """`d`, a file's object, in this version's field names and layout (a class whose files
        changed migrates them here); unchanged by default."""
        return d

    @classmethod
    def from_dict(cls, d: dict, source: Path | str = "?"):
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        d = cls.upgrade(d) if isinstance(d, dict) else d
        missing = [n for n in required if n not in d] if isinstance(d, dict) else required
        if not isinstance(d, dict) or missing:
            raise ResultsError(f"{source} lacks {missing or 'its fields'}: it was written by another "
                               "version of ser-cache; delete it and re-run to recompute it")
        return cls(**{n: d[n] for n in names if n in d})

    def to_dict(self) -> dict:
        return asdict(self)


def flat(prefix: str, d: dict) -> dict:
    """Nested dicts as one dict with dotted keys: flat("a", {"b": {"c": 1}}) == {"a.b.c": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flat(f"{prefix}.{k}", v) if isinstance(v, dict) and v else {f"{prefix}.{k}": v})
    return out


@dataclass
class RunConfig(Record):
    """RUN/config.json: what a `ser-cache train` run trained, on which data, with which settings.

    train: TrainConfig.to_dict(); head_kwargs: the head's constructor options; cache: the cache's
    fingerprint (cache.Cache.fingerprint); folds: protocol, n_folds, seed. labels: the head's
    outputs in order, the classes, or a regression run's targets (config["task"]); class_counts
    counts the classes either way.
    """

    head: str
    layer: int | list  # the state, or the list of states a multi-layer head mixes (layers.to_json)
    labels: list[str]
    dim: int  # width of one state
    class_counts: dict
    n_utterances: int
    device: str
    config: dict
    head_kwargs: dict
    folds: dict
    flawed_compat: bool  # made with a compatibility switch: not an honest estimate
    cache: dict
    versions: dict = field(default_factory=dict)
    # label map and test cache of a cross-corpus run (crosscorpus.CrossCorpus.config); {} otherwise
    cross_corpus: dict = field(default_factory=dict)
    # the flaws in words when flawed_compat (config.FLAWS), e.g. "speaker-dependent: ..."
    flawed: list = field(default_factory=list)

    def same_work(self, other: "RunConfig") -> list[str]:
        """What differs between two configs in what decides the results (not device or versions)."""
        mine, theirs = self.to_dict(), other.to_dict()
        for run in (mine, theirs):  # where files lie decides nothing
            for where in (run["cache"], run["cross_corpus"].get("test_cache") or {}):
                where.pop("path", None), where.pop("model_path", None)
        mine["config"].pop("device", None), theirs["config"].pop("device", None)
        # cross_corpus is compared key by key: its test cache's fingerprint is long
        mine.update(flat("cross_corpus", mine.pop("cross_corpus")))
        theirs.update(flat("cross_corpus", theirs.pop("cross_corpus")))
        return [f"{k}: run has {json_safe(mine.get(k))!r}, asked for {json_safe(theirs.get(k))!r}"
                for k in {**mine, **theirs}
                if k not in ("device", "versions", "flawed") and json_safe(mine.get(k)) != json_safe(theirs.get(k))]


CLASS_METRICS = ("ua", "wa", "macro_f1", "weighted_f1", "per_class_recall", "confusion")  # metrics.fold_metrics
REGRESSION_METRICS = ("ccc", "targets")  # tasks.Regression.fold_metrics


@dataclass
class FoldRecord(Record):
    """One fold of one head: the choice made on its validation speakers and its scores on its
    test speakers. A run writes it as RUN/fold_K.json; a sweep as part of a CellFoldRecord.

    selected: the choice ({"epoch": e} or {"C": c}) with its validation score, UA "ua" (a
    regression fold: mean CCC "ccc"); metrics: the task's fold metrics on the test speakers
    (metrics.fold_metrics, in [0, 1]; a regression fold's {"ccc", "targets": {target: {"ccc",
    "pearson", "mae"}}}). n_train counts training utterances (originals); n_train_views the
    augmented views trained on besides them (TrainConfig.views).

    tested: "selected" (the head as chosen on validation; n_train utterances) or "refit"
    (retrained with that choice on training + validation, refit["n_train"] utterances; its
    refit["val_ua"] is measured on utterances it trained on, selected["ua"] is the honest one).
    members: an ensemble's members, each {"seed", its choice, "ua", "history"} (then history
    is empty, selected["ua"] is the validation UA of their mean probabilities and selected's
    choice the median of theirs); empty for one head.

    A run's fold keeps its test predictions, which its predictions.csv and resume are made
    of: test_ids, and probs (n_test, n_classes) in their order, or a regression fold's
    predicted values (n_test, n_targets) with the true ones in true_values. A sweep's keeps
    its scores only (None). test_corpus: a cross-corpus sweep's, the chosen head's
    metrics.fold_metrics on every utterance of the test corpus and their number "n" ({}
    otherwise: a run scores its fold heads on the test corpus after the folds, crosscorpus.py).
    """

    fold: int
    selected: dict
    n_train: int
    n_val: int
    n_test: int
    metrics: dict
    train_seconds: float  # fitting every setting tried, and the refit
    eval_seconds: float  # the test, and the test corpus
    history: list = field(default_factory=list)  # the chosen setting's epochs (or C values) with validation scores
    compute_dtype: str = "float32"  # the arithmetic of the training steps
    layer_weights: list | None = None  # a multi-layer head's learned softmax weight per state
    tested: str = "selected"  # or "refit"
    refit: dict = field(default_factory=dict)  # n_train, val_ua (or val_ccc), seconds (refit only)
    members: list = field(default_factory=list)  # ensembles only
    n_train_views: int = 0
    # Encoder frames averaged into each frame the head read (pooling.py); None in run folds
    # written before it was recorded (their config.json says).
    frame_pool: int | None = None
    test_corpus: dict = field(default_factory=dict)
    test_ids: list[str] | None = None
    probs: np.ndarray | None = None
    true_values: list | None = None  # regression: (n_test, n_targets) true target values

    def __post_init__(self):
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float64)
            assert len(self.probs) == len(self.test_ids) == self.n_test, (
                f"{len(self.probs)} rows for {len(self.test_ids)} ids, n_test {self.n_test}")

    @property
    def ua(self) -> float | None:
        """The test UA; None for a regression fold (its score is metrics["ccc"])."""
        return self.metrics.get("ua")

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """Run folds written before n_test was recorded count their test ids."""
        return {"n_test": len(d["test_ids"]), **d} if "n_test" not in d and "test_ids" in d else d

    def to_dict(self) -> dict:
        return {**asdict(self), "probs": None if self.probs is None else self.probs.tolist()}


@dataclass
class RunMetrics(Record):
    """RUN/metrics.json: metrics.summarize over folds (regression: tasks.Regression.summarize,
    mean CCC "ccc" and per-target "targets"), plus each fold's choice and timing."""

    head: str
    layer: int | list
    summary: dict
    fold_details: list

    def to_dict(self) -> dict:  # the summary's keys at the top level, as `summarize` gives them
        return {"head": self.head, "layer": self.layer, **self.summary, "fold_details": self.fold_details}

    @classmethod
    def from_dict(cls, d: dict, source: Path | str = "?") -> "RunMetrics":
        if not isinstance(d, dict) or not {"head", "layer", "fold_details"} <= set(d) or not {"ua", "ccc"} & set(d):
            raise ResultsError(f"{source} is not a metrics.json of this version of ser-cache: re-run the run")
        summary = {k: v for k, v in d.items() if k not in ("head", "layer", "fold_details")}
        return cls(d["head"], d["layer"], summary, d["fold_details"])


@dataclass(kw_only=True)
class CellFoldRecord(FoldRecord):
    """SWEEP/cells/CACHE/layer_LL/HEAD-seedS-foldF.json: the FoldRecord of one fold of one sweep
    cell (cache, layer, head, seed), with what identifies the cell and the settings its grid tried.

    setting: the chosen setting in words (its grid values, and a choice such as the linear
    probe's C), values: its grid values; grid: every setting tried, in order, with its values,
    validation score ("val_ua", or "val_ccc") and choice. labels: the classes, or a regression
    cell's targets (task "regression"). seconds: the whole cell fold, threads and device: where.
    """

    cache: str  # the cache's key in the sweep
    corpus: str
    model: str
    mode: str
    layer: int | list  # the state, or the list of states of a multi-layer cell (layers.to_json)
    head: str
    seed: int
    setting: str
    values: dict
    grid: list
    labels: list[str]
    task: str = "classification"
    seconds: float
    threads: int
    device: str
    # The encoder as its cache records it, so a report can compare models: its family
    # (cache.CacheSettings.family) and last state (its blocks, dims n_audio_layer), by which
    # states are placed on a relative depth. None in cells saved before they were recorded.
    family: str | None = None
    last_state: int | None = None

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """Cells written before sweeps saved fold records: test metrics as top-level fields
        (a regression cell's ccc and targets, its UA ... None), the validation score again
        as val_ua or val_ccc (selected holds it), the test corpus's metrics as "target",
        frame_pool 1 before frames were pooled, and no task before regression (classes)."""
        if "metrics" in d:
            return d
        d = {"frame_pool": 1, **d}
        kept = REGRESSION_METRICS if d.get("task") == "regression" else CLASS_METRICS
        metrics = {k: d[k] for k in kept if k in d}
        old = {*CLASS_METRICS, *REGRESSION_METRICS, "val_ua", "val_ccc", "target"}
        return {**{k: v for k, v in d.items() if k not in old}, "metrics": metrics, "test_corpus": d.get("target", {})}


@dataclass
class SweepTiming(Record):
    """One run of `ser-cache sweep` (an entry of SWEEP/timing.json). Seconds of training and
    evaluation are summed over worker processes. folds_*: counts of cell folds."""

    started: str
    jobs: int
    threads_per_job: int
    device: str
    folds_total: int
    folds_done_before: int
    read_seconds: float = 0.0
    layers_read: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    folds_run: int = 0
    folds_failed: int = 0

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """Entries written when the counts were named tasks_* (a sweep's unit was a "task")."""
        return {k.replace("tasks_", "folds_", 1) if k.startswith("tasks_") else k: v for k, v in d.items()}


# --- a run folder -----------------------------------------------------------------------------


class RunFolder:
    """The files of one `ser-cache train` run (see the module docstring)."""

    CONFIG, METRICS, PREDICTIONS, FOLDS = "config.json", "metrics.json", "predictions.csv", "folds.csv"
    CROSS_CORPUS, TEST_CORPUS_PREDICTIONS = "cross_corpus.json", "predictions_test_corpus.csv"
    # The test corpus's predictions as earlier versions named them, when "target" also meant the test corpus.
    OLD_TEST_CORPUS_PREDICTIONS = "predictions_target.csv"

    def __init__(self, root: Path):
        self.root = Path(root)

    def head_path(self, fold: int) -> Path:
        return self.root / f"fold_{fold}.pt"

    def record_path(self, fold: int) -> Path:
        return self.root / f"fold_{fold}.json"

    @property
    def finished(self) -> bool:
        return (self.root / self.METRICS).is_file()

    def read_config(self) -> RunConfig:
        path = self.root / self.CONFIG
        if not path.is_file():
            raise ResultsError(f"{self.root} is not a training run (no {self.CONFIG}): pass a folder made by "
                               "`ser-cache train`")
        return RunConfig.from_dict(read_json(path, "a run's config"), path)

    def write_config(self, config: RunConfig) -> None:
        write_json_atomic(self.root / self.CONFIG, config.to_dict())

    def read_metrics(self) -> RunMetrics | None:
        path = self.root / self.METRICS
        return RunMetrics.from_dict(read_json(path, "a run's metrics"), path) if path.is_file() else None

    def write_metrics(self, metrics: RunMetrics) -> None:
        write_json_atomic(self.root / self.METRICS, metrics.to_dict())

    def read_fold(self, fold: int) -> FoldRecord | None:
        """Fold `fold`'s record if both it and its head were saved, else None."""
        path = self.record_path(fold)
        if not (path.is_file() and self.head_path(fold).is_file()):
            return None
        return FoldRecord.from_dict(read_json(path, "a fold's record"), path)

    def write_fold(self, record: FoldRecord) -> None:
        """The record after the head (saved first by the caller): a record means a whole fold."""
        write_json_atomic(self.record_path(record.fold), record.to_dict())

    def test_corpus_predictions_path(self) -> Path | None:
        """The file of a cross-corpus run's predictions on the test corpus: TEST_CORPUS_PREDICTIONS,
        or OLD_TEST_CORPUS_PREDICTIONS in a folder an earlier version wrote; None without one."""
        return next((p for p in (self.root / self.TEST_CORPUS_PREDICTIONS, self.root / self.OLD_TEST_CORPUS_PREDICTIONS)
                     if p.is_file()), None)

    def write_test_corpus_predictions(self, text: str) -> None:
        """TEST_CORPUS_PREDICTIONS (CSV text, crosscorpus.predictions_on_test_corpus), then the
        file under its old name removed: a run an earlier version began keeps one of them."""
        write_text_atomic(self.root / self.TEST_CORPUS_PREDICTIONS, text)
        (self.root / self.OLD_TEST_CORPUS_PREDICTIONS).unlink(missing_ok=True)

    def write_value_predictions(self, ids: np.ndarray, classes: np.ndarray, targets: list[str], y: np.ndarray,
                                records: list[FoldRecord]) -> None:
        """A regression run's: one row per utterance, in cache order: id, fold, label (its
        class), then true_<target> and pred_<target> for each target. y: (n, n_targets)."""
        row_of = {u: i for i, u in enumerate(ids)}
        rows = sorted((row_of[u], r.fold, np.asarray(p)) for r in records for u, p in zip(r.test_ids, r.probs))
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["id", "fold", "label"] + [f"{kind}_{t}" for t in targets for kind in ("true", "pred")])
        for i, fold, p in rows:
            w.writerow([ids[i], fold, classes[i]] + [f"{v:.6g}" for pair in zip(y[i], p) for v in pair])
        write_text_atomic(self.root / self.PREDICTIONS, out.getvalue())

    def write_predictions(self, ids: np.ndarray, labels: list[str], y: np.ndarray,
                          records: list[FoldRecord]) -> None:
        """One row per utterance, in cache order: id, fold, label, prediction, prob_<class>..."""
        row_of = {u: i for i, u in enumerate(ids)}
        rows = sorted((row_of[u], r.fold, np.asarray(p)) for r in records for u, p in zip(r.test_ids, r.probs))
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["id", "fold", "label", "prediction"] + [f"prob_{c}" for c in labels])
        for i, fold, p in rows:
            w.writerow([ids[i], fold, labels[y[i]], labels[int(p.argmax())]] + [f"{v:.6f}" for v in p])
        write_text_atomic(self.root / self.PREDICTIONS, out.getvalue())


# --- a sweep folder ---------------------------------------------------------------------------


class SweepFolder:
    """The files of one `ser-cache sweep` (see the module docstring)."""

    CONFIG, TIMING, CELLS, FOLDS = "sweep.json", "timing.json", "cells", "folds"

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def is_sweep(self) -> bool:
        return (self.root / self.CONFIG).is_file()

    def cell_path(self, cache: str, layer, head: str, seed: int, fold: int) -> Path:
        return self.root / self.CELLS / cache / dir_name(layer) / f"{head}-seed{seed}-fold{fold}.json"

    def folds_path(self, cache: str, seed: int) -> Path:
        return self.root / self.FOLDS / f"{cache}-seed{seed}.csv"

    def read_config(self) -> dict:
        """The settings stored in sweep.json (the `config` a re-run must match)."""
        path = self.root / self.CONFIG
        if not path.is_file():
            raise SweepError(f"{self.root} is not a sweep folder (no {self.CONFIG}): run `ser-cache sweep` first")
        return read_json(path, "a sweep's settings")["config"]

    def write_config(self, config: dict, cache_paths: dict) -> None:
        write_json_atomic(self.root / self.CONFIG, {"config": config, "cache_paths": cache_paths})

    def save_cell(self, record: CellFoldRecord) -> Path:
        path = self.cell_path(record.cache, record.layer, record.head, record.seed, record.fold)
        write_json_atomic(path, record.to_dict())
        return path

    def cells(self) -> list[CellFoldRecord]:
        """The record of every finished cell fold, in no particular order."""
        return [CellFoldRecord.from_dict(read_json(p, "a sweep cell"), p)
                for p in sorted((self.root / self.CELLS).glob("*/*/*.json"))]

    def fold_meta(self, cache: str, seed: int) -> dict:
        """The folds' protocol and count as saved beside them ({} if not saved yet)."""
        path = self.folds_path(cache, seed).with_suffix(".json")
        return read_json(path, "a folds description") if path.is_file() else {}

    def timing(self) -> list[SweepTiming]:
        path = self.root / self.TIMING
        if not path.is_file():
            return []
        return [SweepTiming.from_dict(run, path) for run in read_json(path, "a sweep's timing")["runs"]]

    def append_timing(self, run: SweepTiming) -> None:
        write_json_atomic(self.root / self.TIMING, {"runs": [t.to_dict() for t in self.timing()] + [run.to_dict()]})

    def lock(self):
        """Context: hold SWEEP/create.lock for a short step that several sweep processes on this
        folder may reach at once (creating sweep.json and the folds, appending to timing.json,
        writing the report). Cell folds themselves are claimed one by one (`claim_path`)."""
        from .locks import folder_lock  # one locking scheme for caches and sweeps

        return folder_lock(self.root)

    def claim_path(self, cache: str, layer, head: str, seed: int, fold: int) -> Path:
        """The lock file whose flock is the claim on one cell fold (locks.Claims)."""
        return self.cell_path(cache, layer, head, seed, fold).with_suffix(".lock")

    def remove_cell_temporaries(self, cache: str, layer, head: str, seed: int, fold: int) -> None:
        """Delete what killed writers of one cell fold's record left. Only the holder of its
        claim may call this: no live process is then writing that record."""
        path = self.cell_path(cache, layer, head, seed, fold)
        for tmp in path.parent.glob(f"{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)

    def remove_shared_temporaries(self) -> None:
        """Delete temporaries of the files written under `lock()` (sweep.json, timing.json,
        folds). Call only while holding `lock()`: nobody else writes those files then."""
        for tmp in [*self.root.glob("*.json.*.tmp"), *(self.root / self.FOLDS).glob("*.tmp")]:
            tmp.unlink(missing_ok=True)

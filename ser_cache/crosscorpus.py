"""Cross-corpus evaluation: train and choose on one cache's speakers, test on all of another.

    ser-cache train CACHE_A --layer L --head H --test-cache CACHE_B [--label-map NAME]

The run on A is the usual one (training.run_folds): speaker-independent folds of A, the epoch
(or C) chosen on validation speakers carved from A's training speakers, each fold's head tested
once on A's test speakers. Then each fold's head is also scored once on every utterance of B,
which chooses nothing. Beside B's metrics (mean ± std over A's fold heads, confusion summed and
per fold) stands the in-corpus figure on the same classes (A's own test folds), so the drop
from one corpus to the other is read off one table:

    RUN/cross_corpus.json            both corpora (classes, counts, drops), in-corpus and test
                                     corpus metrics, their difference (`CrossResult`)
    RUN/predictions_test_corpus.csv  one row per utterance of B and fold head

Both are written atomically after the fold records and before metrics.json, which marks a run
finished: a run killed in between resumes and writes them again, from the same saved heads.
`read_cross_result` reads the first back. Folders written by earlier versions, which called
the test corpus "target" (keys n_target, target_class_counts, target, target_minus_in_corpus;
predictions_target.csv), are read under these names.

Which caches can meet (`incompatibilities`): the states of two caches mean the same only if
the same checkpoint (model SHA-256) made them, with the same dims, input mode and encoder
arithmetic, and both hold the states the head reads; otherwise the run is refused, naming
each difference. The corpora, storage dtype and records may of course differ.

Classes (`map_classes`): a cache's labels are already class names (after the label map of its
extraction). A label map named here (corpora.LABEL_MAPS, keyed by class names such as
`ravdess-emodb6`) renames the classes of both caches at training time; utterances whose class
the map does not list are dropped, counted per corpus and class, logged and recorded in
config.json and cross_corpus.json. Without a map, A's and B's classes must be the same set;
with one, the classes it leaves must be too. `--label-map` without `--test-cache` trains on a
class subset of one cache.

B's states are standardised with the statistics each head learned on A's training speakers
(no adaptation to B), and B's utterances are scored with dropout off.

Sweeps (`ser-cache sweep CACHE... --test-cache B [--label-map NAME]`): the same checks for
every cache and cell (`check_sweep_test_cache`, from metadata before any layer is read), folds
made on the mapped classes, and each cell fold's chosen head also scored on B's same layer
(`score_test_corpus`, results.FoldRecord.test_corpus); report.py shows B's UA beside the
in-corpus UA. A run scores its fold heads on B the same way, after the folds (`evaluate`).
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .batches import predict_proba
from .cache import Cache, CacheSettings, open_cache
from .corpora import LABEL_MAPS, resolve_label_map
from .errors import OptionError
from .features import LayerData
from .files import write_json_atomic
from .layers import Selection, states_of
from .metrics import SCALARS, fold_metrics, summarize
from .records import RecordsError
from .results import Record, RunFolder, read_json

log = logging.getLogger(__name__)

# The settings that decide what a cached state means: two caches meet only if these are equal.
SAME_STATES = ("model_sha256", "dims", "mode", "compute_dtype")
ROLES = {"train": "training", "test": "test"}  # keys of CrossCorpus.dropped, as printed
SHOWN = (("UA", "ua"), ("WA", "wa"), ("macro-F1", "macro_f1"))  # the printed table's columns


class CrossCorpusError(OptionError):
    """Two caches, or a label map, that cannot be used together; the message names the fix."""


def incompatibilities(train: Cache, test: Cache, states: list[int]) -> list[str]:
    """Why `test`'s states cannot be scored by heads trained on `train`'s: the SAME_STATES
    settings that differ, and the `states` that `test` lacks; [] when they fit."""
    assert set(SAME_STATES) <= {f.name for f in fields(CacheSettings)}, SAME_STATES
    sides = ("training cache has", "test cache has")
    problems = train.settings.differences(test.settings, keys=[k for k in SAME_STATES if k != "dims"], sides=sides)
    if train.settings.model_sha256 != test.settings.model_sha256:
        problems[0] += f" (models {train.settings.model!r} and {test.settings.model!r})"
    a, b = train.settings.dims, test.settings.dims  # named key by key: the whole dicts are long
    problems += [f"dims.{k}: {sides[0]} {a.get(k)!r}, {sides[1]} {b.get(k)!r}"
                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    missing = [s for s in states if s not in test.layers]
    if missing:
        problems.append(f"layers {missing}: not in the test cache, which holds layers {test.layers}")
    return problems


def map_class_names(labels: np.ndarray, label_map: str | None, where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(kept: (n,) bool, the kept utterances' new class names, dropped count per class) of
    class names `labels` under the label map; no map keeps all. `where` names the cache."""
    name, table = resolve_map(label_map)
    labels = np.asarray(labels).astype(str)
    if table is None:
        return np.ones(len(labels), dtype=bool), labels, {}
    keep = np.array([c in table for c in labels.tolist()], dtype=bool)
    if not keep.any():
        raise CrossCorpusError(f"label map {name!r} keeps none of the {len(labels)} utterances of {where}: it maps "
                               f"{sorted(table)}, the cache has classes {sorted(set(labels.tolist()))}; "
                               f"pick another map ({', '.join(sorted(LABEL_MAPS))})")
    classes, counts = np.unique(labels[~keep], return_counts=True)
    return keep, np.array([table[c] for c in labels[keep].tolist()]), dict(zip(classes.tolist(), counts.tolist()))


def map_classes(data: LayerData, label_map: str | None, where: str) -> tuple[LayerData, dict[str, int]]:
    """(data with its classes renamed by the label map, utterances of unlisted classes
    dropped; dropped count per class). No map: (data, {}). `where` names the cache in errors."""
    if resolve_map(label_map)[1] is None:
        return data, {}
    keep, labels, dropped = map_class_names(data.labels, label_map, where)
    kept = data.subset(np.flatnonzero(keep))
    kept.labels = labels
    return kept, dropped


def resolve_map(label_map: str | None) -> tuple[str | None, dict[str, str] | None]:
    """(name, table) of a label map named on the command line; (None, None) for none."""
    if label_map is None:
        return None, None
    try:
        return resolve_label_map("", label_map)  # "none": no map
    except RecordsError as e:  # an unknown name: the known ones are listed
        raise CrossCorpusError(f"--label-map: {e}") from None


def classes_differ(train: list[str], test: list[str], label_map: str | None) -> str:
    """Why two class sets cannot be compared, with the fix; "" when they are the same set."""
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    if not (only_train or only_test):
        return ""
    what = (f"the classes differ: only in the training cache {only_train}, only in the test cache "
            f"{only_test}")
    if label_map is None:
        return what + (f"; pass --label-map NAME that maps both to the classes they share "
                       f"({', '.join(sorted(LABEL_MAPS))})")
    return what + f" after the label map {label_map!r}; pick a map whose classes both caches have"


@dataclass
class CrossCorpus:
    """The other corpus of a run and the label map of both: made by `open_cross_corpus`
    before the run, `map_source` on the training layer, `evaluate` after the folds.

    test_corpus: B's layer after the map (None without --test-cache); dropped: per corpus
    ("train", "test"), utterances dropped by the map per class."""

    label_map: str | None
    test_corpus: LayerData | None = None
    test_cache: dict = field(default_factory=dict)  # B's fingerprint
    dropped: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        """What a resumed run must match (RunConfig.cross_corpus); {} for a plain run."""
        if self.label_map is None and self.test_corpus is None:
            return {}
        return {"label_map": self.label_map, "test_cache": self.test_cache or None, "dropped": self.dropped}

    def map_source(self, data: LayerData, where: str) -> LayerData:
        """The training layer after the map; refuses classes that the test corpus does not share."""
        data, self.dropped["train"] = map_classes(data, self.label_map, where)
        log_drops("training", where, self.dropped["train"], len(data), self.label_map)
        if self.test_corpus is not None:
            why = classes_differ(sorted(set(data.labels.tolist())), sorted(set(self.test_corpus.labels.tolist())),
                                 self.label_map)
            if why:
                raise CrossCorpusError(why)
        return data

    def evaluate(self, labels: list[str], models: list, in_corpus: dict, device: torch.device,
                 folder: RunFolder | None) -> CrossResult | None:
        """Each fold head (`models`, in fold order) scored once on every utterance of B
        (`score_test_corpus`); the result beside the in-corpus `summarize` dict, written into
        `folder` if given."""
        if self.test_corpus is None:
            return None
        data, y = self.test_corpus, class_numbers(self.test_corpus, labels)
        probs, per_fold = zip(*(score_test_corpus(model.to(device).eval(), data, labels, device) for model in models))
        counts = np.bincount(y, minlength=len(labels)).tolist()
        result = CrossResult(labels=labels, label_map=self.label_map, test_cache=self.test_cache,
                             n_test_corpus=len(data), dropped=self.dropped, in_corpus=in_corpus,
                             test_corpus=summarize(list(per_fold), labels),
                             test_corpus_class_counts=dict(zip(labels, counts)))
        if folder is not None:
            folder.write_test_corpus_predictions(predictions_on_test_corpus(data, labels, y, list(probs)))
            write_json_atomic(folder.root / RunFolder.CROSS_CORPUS, result.to_dict())
        return result


def open_cross_corpus(train: Cache, layer: Selection, test_cache: Path | None,
                      label_map: str | None) -> CrossCorpus:
    """Check the test cache against the training cache (refused naming each difference),
    read its layer and apply the label map to it; resolve the map even without a test cache,
    so that a bad name fails before any layer is read."""
    cross = CrossCorpus(label_map=resolve_map(label_map)[0])
    if test_cache is None:
        return cross
    test = open_cache(test_cache)
    problems = incompatibilities(train, test, states_of(layer))
    if problems:
        raise CrossCorpusError(f"the test cache {test_cache} cannot be scored by heads trained on {train.root}: "
                               + "; ".join(problems)
                               + ". Extract both corpora with the same checkpoint, --mode, --compute-dtype and layers")
    test_corpus, cross.dropped["test"] = map_classes(originals_of(test, test.read_layer(layer)), cross.label_map,
                                                     f"the test cache {test_cache}")
    log_drops("test", test_cache, cross.dropped["test"], len(test_corpus), cross.label_map)
    cross.test_corpus, cross.test_cache = test_corpus, test.fingerprint
    return cross


def originals_of(cache, data):
    """`data`, a layer of `cache`, without the cache's augmented views (augment.py): a test
    set holds the corpus's own utterances only."""
    sources = cache.view_sources()
    if not sources:
        return data
    from .folds import ViewRows

    return data.subset(ViewRows.of(data.ids, sources).originals)


def log_drops(role: str, where, dropped: dict, kept: int, label_map: str | None) -> None:
    """Say what the label map dropped from one cache (never silently)."""
    if label_map is None:
        return
    if dropped:
        log.warning("label map %s: %d utterances of the %s cache %s dropped (%s), %d kept", label_map,
                    sum(dropped.values()), role, where, ", ".join(f"{c} {n}" for c, n in dropped.items()), kept)
    else:
        log.info("label map %s: every utterance of the %s cache %s kept (%d)", label_map, role, where, kept)


def class_numbers(data: LayerData, labels: list[str]) -> np.ndarray:
    """(n,) int64: the class number of each utterance of a test corpus among `labels` (the
    heads' classes, sorted), whose classes are already mapped and shared with them."""
    y = np.searchsorted(labels, data.labels).astype(np.int64)
    assert (np.asarray(labels)[y] == data.labels).all(), f"a test class the heads do not know, among {labels}"
    return y


def score_test_corpus(model, data: LayerData, labels: list[str], device: torch.device) -> tuple[np.ndarray, dict]:
    """(probs (n, n_classes), metrics.fold_metrics) of one head (eval mode, on `device`) on
    every utterance of a test corpus `data` (classes as in `class_numbers`), dropout off."""
    probs = predict_proba(model, data, np.arange(len(data)), device)
    return probs, fold_metrics(class_numbers(data, labels), probs.argmax(axis=1), len(labels))


def predictions_on_test_corpus(data: LayerData, labels: list[str], y: np.ndarray, probs: list[np.ndarray]) -> str:
    """CSV text (RUN/predictions_test_corpus.csv): one row per utterance of the test corpus and fold
    head (fold by fold, in cache order): id, speaker, fold, label, prediction, prob_<class>..."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["id", "speaker", "fold", "label", "prediction"] + [f"prob_{c}" for c in labels])
    for k, p in enumerate(probs):
        for i in range(len(data)):
            w.writerow([data.ids[i], data.speakers[i], k, labels[y[i]], labels[int(p[i].argmax())]]
                       + [f"{v:.6f}" for v in p[i]])
    return out.getvalue()


# cross_corpus.json's keys as earlier versions wrote them, when "target" also meant the test corpus
OLD_KEYS = {"n_target": "n_test_corpus", "target_class_counts": "test_corpus_class_counts", "target": "test_corpus",
            "target_minus_in_corpus": "test_corpus_minus_in_corpus"}
FINGERPRINT = ("path", "corpus", "records_hash", "shard_sha256")  # what cross_corpus.json keeps of B's


@dataclass
class CrossResult(Record):
    """RUN/cross_corpus.json: the metrics of A's fold heads on every utterance of B
    (`test_corpus`, metrics.summarize over the heads) beside A's own cross-validated ones on the
    same classes (`in_corpus`, mean and std of each metrics.SCALARS), in [0, 1].

    test_cache: B's fingerprint (FINGERPRINT of it is written); n_test_corpus: B's utterances
    after the label map, test_corpus_class_counts: per class; dropped: per corpus ("train",
    "test"), utterances the map dropped per class. The file also holds the difference
    test_corpus - in_corpus of each mean (`differences`)."""

    labels: list[str]
    label_map: str | None
    test_cache: dict
    n_test_corpus: int
    dropped: dict
    in_corpus: dict
    test_corpus: dict
    test_corpus_class_counts: dict

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """A file of an earlier version, its keys named as OLD_KEYS maps them."""
        return {OLD_KEYS.get(k, k): v for k, v in d.items()}

    def differences(self) -> dict[str, float]:
        """{metric: mean on the test corpus - mean in-corpus} of each metrics.SCALARS."""
        return {k: self.test_corpus[k]["mean"] - self.in_corpus[k]["mean"] for k in SCALARS}

    def to_dict(self) -> dict:
        brief = {k: {"mean": self.in_corpus[k]["mean"], "std": self.in_corpus[k]["std"]} for k in SCALARS}
        return {"labels": self.labels, "label_map": self.label_map, "dropped": self.dropped,
                "test_cache": {k: self.test_cache.get(k) for k in FINGERPRINT},
                "n_test_corpus": self.n_test_corpus, "test_corpus_class_counts": self.test_corpus_class_counts,
                "in_corpus": brief, "test_corpus": self.test_corpus, "test_corpus_minus_in_corpus": self.differences()}

    def table(self) -> str:
        """In-corpus and test corpus metrics side by side (percent), the drops, and B's confusion
        matrix summed over the fold heads."""
        n_heads = len(self.test_corpus["ua"]["folds"])
        lines = [f"cross-corpus: each of the {n_heads} fold heads (trained and chosen on the training cache) tested "
                 f"once on all {self.n_test_corpus} utterances of {self.test_cache.get('path')}"
                 + (f", label map {self.label_map}" if self.label_map else ""),
                 f"{'':>22}" + "".join(f"{name:>16}" for name, _ in SHOWN)]
        for what, s in (("in-corpus (test folds)", self.in_corpus), ("test corpus", self.test_corpus)):
            lines.append(f"{what:>22}" + "".join(f"{100 * s[k]['mean']:9.2f} ± {100 * s[k]['std']:4.2f}"
                                                 for _, k in SHOWN))
        differences = self.differences()
        lines.append(f"{'difference':>22}" + "".join(f"{100 * differences[k]:+16.2f}" for _, k in SHOWN))
        for role, name in ROLES.items():
            if self.dropped.get(role):
                lines.append(f"  dropped by the label map from the {name} cache: "
                             + ", ".join(f"{c} {n}" for c, n in self.dropped[role].items()))
        counts = np.array(self.test_corpus["confusion"]["counts"])
        width = max(8, *(len(c) + 1 for c in self.labels))
        lines.append(f"  test corpus confusion (rows: true, columns: predicted; summed over the {n_heads} fold heads):")
        lines.append(" " * (width + 2) + "".join(f"{c:>{width}}" for c in self.labels))
        lines += [f"  {c:>{width}}" + "".join(f"{v:>{width}d}" for v in row) for c, row in zip(self.labels, counts)]
        return "\n".join(lines)


def read_cross_result(folder: RunFolder) -> CrossResult | None:
    """A cross-corpus run's RUN/cross_corpus.json (an earlier version's too, `CrossResult.upgrade`);
    None when the run has none (no test cache, or not finished)."""
    path = folder.root / RunFolder.CROSS_CORPUS
    return CrossResult.from_dict(read_json(path, "a cross-corpus result"), path) if path.is_file() else None


# --- sweeps ------------------------------------------------------------------------------------


def check_sweep_test_cache(caches: dict[str, Cache], states: dict[str, list[int]], test_cache: Path | None,
                           label_map: str | None) -> Cache | None:
    """For a sweep: the test cache (None without one), checked against every training cache
    on the `states` its cells read, and the classes every cache keeps after the map against
    the test cache's (from the metadata: no layer is read). Raises CrossCorpusError."""
    resolve_map(label_map)
    if test_cache is None:
        return None
    test = open_cache(test_cache)
    test.check()
    shared = set(map_class_names(test.read_meta()["labels"], label_map, f"the test cache {test_cache}")[1].tolist())
    for key, cache in caches.items():
        problems = incompatibilities(cache, test, states[key])
        if problems:
            raise CrossCorpusError(f"the test cache {test_cache} cannot be scored by heads trained on {cache.root}: "
                                   + "; ".join(problems) + ". Extract both corpora with the same checkpoint, --mode, "
                                   "--compute-dtype and layers")
        source = map_class_names(cache.read_meta()["labels"], label_map, str(cache.root))[1]
        why = classes_differ(sorted(set(source.tolist())), sorted(shared), resolve_map(label_map)[0])
        if why:
            raise CrossCorpusError(f"{cache.root}: {why}")
    return test

"""Layer-wise comparison sweeps: every (cache, layer, head, seed) cell over the same folds.

    caches --read each layer once--> cell folds --workers (training.run_fold)--> cells/*.json
                                                                     --report.py--> table, plots

A *cell* is one head with one seed on one layer of one cache, evaluated on every fold; a *cell
fold* (CellFold) is one fold of a cell, the unit that runs, is saved and is resumed. A cell's
layer may also be several states (`--layers all,2+3+4`, layers.py): the head mixes them with
learned weights, which the cell records, so single-layer and multi-layer cells share one
table. All cells of a cache use the same folds: they are built once per cache and seed from
the cache's utterance metadata and saved in SWEEP/folds/, so the cells of a table differ only
in layer and head.

Continuous targets (`--task regression --targets arousal,valence`, tasks.py): every choice
below is made on the validation mean CCC over targets instead of UA, and each cell fold records
CCC, Pearson r and MAE per target (report.py draws one curve per target against the layer).

Comparing models. Caches of different encoders (`sweep CACHE_A CACHE_B`, e.g. a 13-state
WavLM base and a 33-state Whisper large-v3) are swept together: `--layers` resolves per cache
(`all`: states 0 to that cache's highest), the folds are made per cache from its utterances
(the same folds for caches of the same utterances), and every cell records its encoder's
family and last state (results.CellFoldRecord), by which report.py adds a model column and
plots UA against relative depth (state / last state).

Augmented views (extract --augment, augment.py). Folds are made on a cache's originals; a
cell fold validates and tests on originals only, and a setting with `views` "on" (`--views on`, or
the grid key `--grid views=off,on`, chosen on validation like any other) also trains on the views
of its training utterances (folds.ViewRows). A cell's n_train counts originals; n_train_views the
views its chosen setting trained on.

Honest grid search. With `--grid n_heads=4,8 head_dim=4,16`, each cell fold trains every grid
setting on the fold's training speakers, picks the epoch and the setting by UA on the fold's
validation speakers (carved from the training speakers, see folds.py), and only then scores
the chosen setting on the test speakers, once. The test speakers never influence a choice.
With `--ensemble N`, every setting is N heads of different seeds, each choosing its epoch on
validation, and settings are compared by the validation UA of their mean probabilities
(ensembles.fit_selected). With `--refit`, the chosen setting is first retrained on training +
validation speakers with the epoch (or C) it chose (ensembles.refit_selected); only that head
is tested.
Train and sweep run a fold alike (training.run_fold). Each cell fold records the validation
UA of every setting it tried and which one it chose. A grid key applies to the heads it changes (n_heads: attentive, qkv and stats; head_dim: attentive
and qkv; lr, epochs, time_mask: every torch head; mix, mix_lr: the heads that mix states, on
multi-state cells only, mix_lr with mix learned only; fusion_weights: the fusion head on
multi-state cells); other heads run once with the defaults. The linear head also picks its C on
validation (fitting.py).

FLAWED sweeps, on request only. The reference code's switches (selection on the test fold,
dropout at evaluation) are refused: a sweep compares honestly. `--compat-speaker-overlap` is
allowed, because its flaw lies in the folds, not in how a cell is chosen, and comparing layers
on EmoBox's speaker-dependent folds is what it is for: the sweep's config records it, and its
report labels every table, plot and results.csv row FLAWED (speaker-dependent) and is never
joined with an honest sweep's (report.py); `compare` never pairs its cells with honest ones.

Reading and running. A layer is read once (`Cache.read_layer`), put in shared memory, and
all its cell folds go to a pool of `jobs` worker processes with cores // jobs torch threads each;
the next layer is read while the workers train on the current one (at most two layers held).
With jobs == 1 everything runs in this process (the default on a GPU). A layer that does not
fit `--memory-budget` (streaming.open_layer) is not shared: each worker streams it from the
shards itself, with budget / jobs (StreamedRef).

Crash safety and resume. A worker writes each finished cell fold as one JSON file (temporary
name, fsync, rename), so a file exists only when it is complete. A re-run with the same
settings skips those cell folds; a re-run with other settings is refused, naming what differs
(SWEEP/sweep.json holds the settings).

Several processes, one sweep. Any number of `sweep` processes may work on one --out at once
(SLURM array tasks, a job submitted twice, a resume while the first run still goes): each
cell fold runs only in the process holding its claim, an exclusive flock on
cells/.../HEAD-seedS-foldF.lock (locks.Claims, the same scheme as the shards of a cache),
which the kernel lets go of however its holder ends. sweep.json and the folds are made once,
under SWEEP/create.lock; timing.json and the report are written under it too. `--part I/N`
(or a SLURM array's task id) gives a process the I-th of N contiguous runs of the cell folds
(`part_of`); without it, a process takes every cell fold no live process holds. A process claims
the cell folds of a layer when that layer's turn comes, so that two processes started together
read different layers rather than the same one twice.

The folder's layout and record types belong to results.py (SweepFolder, CellFoldRecord,
SweepTiming), which report.py reads through.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

from .cache import Cache, open_cache
from .config import TrainConfig, as_made
from .crosscorpus import check_sweep_test_cache, map_class_names, map_classes, originals_of
from .device import pick_device
from .errors import OptionError
from .features import LayerData, StatsLayer
from .fitting import NonFiniteLossError
from .folds import Folds, ViewRows, make_folds
from .heads import HEADS
from .layers import Selection, label, parse_cells, states_of, to_json
from .locks import CREATE_LOCK, Claims
from .records import target_names
from .results import CellFoldRecord, SweepError, SweepFolder, SweepTiming
from .streaming import StreamedLayer, open_layer, open_streamed
from .tasks import make_task
from .training import check_reads, deciding_settings, run_fold

log = logging.getLogger(__name__)

SWEEP_FORMAT = 1
DEFAULT_HEADS = ("linear", "mean", "attentive", "qkv")
# On a CPU, one worker process per core with one torch thread each. Measured on the shared
# 2-core development machine (RAVDESS, Whisper base layer 6, 960 utterances, same work either
# way): 2 processes x 1 thread trained qkv 5.7-7.3x and mean 4-8x faster than 1 process x 2
# threads. Batches of 16 make each op small, so a second thread mostly waits at barriers, and
# far longer when the cores are shared. Each worker holds about one layer of padded batches.
MAX_DEFAULT_JOBS = 8
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
LAYERS_IN_FLIGHT = 2  # layers held in memory at once: the one being trained, the next one read
GRID_ALIASES = {"attn_heads": "n_heads", "heads": "n_heads", "d_a": "head_dim", "d_k": "head_dim"}
GRID_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "dropout",
             "d_model", "n_heads", "head_dim", "attention_scale", "class_weights", "time_mask", "frame_pool",
             "mix", "mix_lr", "fusion_weights", "views")
# Not part of what a sweep computes (where it runs, not what): a re-run may change these.
FREE_TRAIN_KEYS = ("seed", "device")


# --- parsing the command line's lists ---------------------------------------------------------


def parse_heads(spec: str) -> list[str]:
    heads = [h.strip() for h in spec.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEADS]
    if not heads or unknown:
        raise SweepError(f"heads {unknown or spec!r} not found; available heads = {sorted(HEADS)}")
    if len(set(heads)) != len(heads):
        raise SweepError(f"heads {spec!r} lists a head twice")
    return heads


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"seeds {spec!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SweepError(f"seeds {spec!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


def parse_grid(specs) -> dict[str, list]:
    """['n_heads=4,8 head_dim=4,16', 'lr=1e-3,3e-4'] -> {'n_heads': [4, 8], 'head_dim': [4, 16],
    'lr': [0.001, 0.0003]}, values typed like TrainConfig's defaults; `heads` means n_heads."""
    defaults = TrainConfig()
    grid: dict[str, list] = {}
    for spec in specs:
        for item in spec.replace(";", " ").split():
            key, eq, values = item.partition("=")
            key = GRID_ALIASES.get(key.strip(), key.strip())
            if not eq or not values:
                raise SweepError(f"grid item {item!r}: write key=v1,v2,... e.g. attn_heads=4,8,12")
            if key not in GRID_KEYS:
                raise SweepError(f"grid key {key!r} unknown; grid keys = {list(GRID_KEYS)} "
                                 f"(aliases {GRID_ALIASES})")
            if key in grid:
                raise SweepError(f"grid key {key!r} given twice")
            parsed = [_parse_value(key, v, getattr(defaults, key)) for v in values.split(",")]
            if len(set(parsed)) != len(parsed):
                raise SweepError(f"grid key {key!r} repeats a value: {values}")
            grid[key] = parsed
    return grid


def _parse_value(key: str, text: str, default):
    text = text.strip()
    try:
        if default is None:  # an optional number (mix_lr): "none" is the default
            return None if text.lower() == "none" else float(text)
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return type(default)(text) if not isinstance(default, int) else int(text)
    except ValueError:
        kind = "a number or none" if default is None else type(default).__name__
        raise SweepError(f"grid {key}={text!r}: must be {kind}") from None


def head_settings(head: str, grid: dict[str, list], base: TrainConfig) -> list[dict]:
    """The grid points that matter for `head`, in grid order ([{}] when none does).

    A key matters if a value of it changes a setting the head's fitting reads or its
    constructor options (training.deciding_settings), from another value or from the defaults: a
    single value (heads=0) is then a fixed setting, never silently left at the default."""
    relevant = {}
    for key, values in grid.items():
        if {deciding_settings(head, replace(base, **{key: v})) for v in values} != {deciding_settings(head, base)}:
            relevant[key] = values
    return [dict(zip(relevant, point)) for point in itertools.product(*relevant.values())]


def setting_label(values: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


# --- what a sweep is --------------------------------------------------------------------------


@dataclass(frozen=True)
class CellFold:
    """One fold of one cell: the unit that runs, is saved and is resumed."""

    cache: str  # the cache's key in this sweep (its folder name, made unique)
    layer: Selection  # a state, or a tuple of states for a multi-layer cell
    head: str
    seed: int
    fold: int

    def path(self, root: Path) -> Path:
        return SweepFolder(root).cell_path(self.cache, self.layer, self.head, self.seed, self.fold)


@dataclass
class SweepSpec:
    """What to compare. Resolved against the caches by `plan_sweep`."""

    caches: list[Path]
    layers: str = "all"
    heads: list[str] = field(default_factory=lambda: list(DEFAULT_HEADS))
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, list] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: str | None = None
    n_folds: int | None = None
    fold_file: Path | None = None
    folds_from: Path | None = None  # EmoBox's data/<dataset> folder: its fold_K files are the folds
    test_cache: Path | None = None  # cross-corpus: every cell's fold heads also tested on all of it
    label_map: str | None = None  # corpora.LABEL_MAPS name applied to every cache's classes (crosscorpus.py)


@dataclass
class SweepPlan:
    """A spec resolved against opened caches: keys, layers, settings per head, and the config
    that is stored in sweep.json and must match on a re-run."""

    spec: SweepSpec
    caches: dict[str, Cache]
    layers: dict[str, list[Selection]]
    settings: dict[str, list[dict]]
    config: dict
    test_cache: Cache | None = None  # spec.test_cache, checked against every cache

    def cell_folds(self, n_folds: dict[tuple[str, int], int]) -> list[CellFold]:
        """Every cell fold, layer by layer (n_folds: (cache key, seed) -> number of folds)."""
        return [CellFold(key, layer, head, seed, fold)
                for key in self.caches for layer in self.layers[key]
                for head in self.spec.heads for seed in self.spec.seeds
                for fold in range(n_folds[key, seed])]


def cache_keys(paths: list[Path]) -> list[str]:
    """Folder names, made filesystem-safe and unique (a -2, -3 suffix on repeats)."""
    keys, seen = [], {}
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._+-]+", "_", Path(p).resolve().name) or "cache"
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return keys


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Open and check the caches, resolve layers and grid settings, build the config."""
    if not spec.caches:
        raise SweepError("no cache given: pass one or more cache folders made by `ser-cache extract`")
    heads = parse_heads(",".join(spec.heads))
    caches, layers = {}, {}
    for key, path in zip(cache_keys(spec.caches), spec.caches):
        cache = open_cache(path)
        cache.check()
        try:
            wanted = parse_cells(spec.layers, max(cache.layers) + 1)
        except OptionError as e:
            raise SweepError(str(e)) from None
        missing = sorted({s for cell in wanted for s in states_of(cell)} - set(cache.layers))
        if missing:
            raise SweepError(f"layers {missing} are not in the cache {path}; it holds {cache.layers}")
        if "on" in {spec.train.views, *spec.grid.get("views", ())} and not cache.settings.augment:
            raise SweepError(f"views on: the cache {path} holds no augmented views; extract it with --augment "
                             "(e.g. --augment speed=0.9,1.1), or sweep with --views off")
        caches[key], layers[key] = cache, wanted
    test_cache = check_sweep_test_cache(caches, {key: sorted({s for cell in cells for s in states_of(cell)})
                                                 for key, cells in layers.items()}, spec.test_cache, spec.label_map)
    if spec.train.task == "regression":
        if test_cache is not None:
            raise SweepError("--test-cache scores class labels on another corpus: sweep a regression task "
                             "without it, or cross-corpus with --task classification")
        spec = replace(spec, train=replace(spec.train, targets=sweep_targets(spec, caches)))
    settings = {h: head_settings(h, spec.grid, spec.train) for h in heads}
    for key, cache in caches.items():
        for head in heads:
            for setting in settings[head]:
                check_reads(head, replace(spec.train, **setting), cache.settings.store == "stats",
                            f"the cache {cache.root}")
    train = {k: v for k, v in spec.train.to_dict().items() if k not in FREE_TRAIN_KEYS}
    if spec.train.compat_select_on_test or spec.train.compat_eval_dropout:
        raise SweepError("the compatibility switches (selection on the test fold, dropout at "
                         "evaluation) are not offered in sweeps: a sweep compares honestly")
    config = {
        "format": SWEEP_FORMAT,
        "caches": {key: _cache_identity(c) for key, c in caches.items()},
        "layers": {key: [to_json(cell) for cell in cells] for key, cells in layers.items()},
        "heads": heads,
        "seeds": list(spec.seeds),
        "grid": spec.grid,
        "train": train,
        "folds": {"protocol": spec.protocol, "n_folds": spec.n_folds,
                  "fold_file_sha256": _sha256(spec.fold_file) if spec.fold_file else None},
    }
    if spec.folds_from is not None:  # absent otherwise: older sweeps resume
        config["folds"]["folds_from_sha256"] = _folder_sha256(spec.folds_from)
    if spec.test_cache is not None or spec.label_map is not None:  # absent otherwise: older sweeps resume
        config["cross_corpus"] = {"label_map": spec.label_map,
                                  "test_cache": _cache_identity(test_cache) if test_cache else None}
    return SweepPlan(spec, caches, layers, settings, json.loads(json.dumps(config)), test_cache)


def sweep_targets(spec: SweepSpec, caches: dict[str, Cache]) -> tuple[str, ...]:
    """The targets a regression sweep learns: spec.train.targets, or every target of the first
    cache; every cache must carry them all (refused otherwise, naming the cache)."""
    targets = tuple(spec.train.targets)
    for cache in caches.values():
        names = target_names(cache.records())
        if not names:
            raise SweepError(f"the cache {cache.root} carries no numeric targets: extract a corpus with targets "
                             "(a csv with numeric columns, iemocap, msp-podcast) or sweep without --task regression")
        targets = targets or tuple(names)
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise SweepError(f"target {unknown[0]!r} not found in the cache {cache.root}; its targets = {names}")
    return targets


def _cache_identity(cache: Cache) -> dict:
    """What decides a cache's content (not where it lies, so a moved cache still resumes)."""
    fp = cache.fingerprint
    identity = {k: fp[k] for k in ("corpus", "model", "model_sha256", "mode", "dtype", "records_hash",
                                   "n_records", "shard_sha256")}
    if (fp["store"], fp["frame_pool"]) != ("frames", 1):  # absent for frames caches: older sweeps resume
        identity.update(store=fp["store"], frame_pool=fp["frame_pool"])
    return identity


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _folder_sha256(folder: Path) -> str:
    """SHA-256 over the fold_K files of an EmoBox folder (names and contents, sorted)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("fold_*/*.jsonl")):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def config_differences(stored: dict, asked: dict, prefix: str = "") -> list[str]:
    """'key: sweep has X, asked for Y' for every leaf in which two configs differ."""
    out = []
    for k in sorted(set(stored) | set(asked)):
        a, b = stored.get(k), asked.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: sweep has {a!r}, asked for {b!r}")
    return out


def claim_folder(out: Path, plan: SweepPlan) -> SweepFolder:
    """Create SWEEP with the plan's config, or check that it holds the same config. Call
    under `SweepFolder(out).lock()`: several processes may start on one folder at once."""
    folder = SweepFolder(out)
    if folder.is_sweep():
        stored = folder.read_config()
        # A setting added since the sweep was made counts as the value it had then.
        stored["train"] = {k: v for k, v in as_made(stored.get("train", {})).items() if k not in FREE_TRAIN_KEYS}
        diff = config_differences(stored, plan.config)
        if diff:
            raise SweepError(
                f"{out} holds a sweep with other settings:\n  " + "\n  ".join(diff)
                + "\nRepeat the original options to resume it, or choose another --out folder")
        return folder
    if folder.root.exists() and any(p.name != CREATE_LOCK for p in folder.root.iterdir()):  # our lock aside
        raise SweepError(f"{out} exists and is not a sweep folder (no {SweepFolder.CONFIG}): choose "
                         "another --out folder")
    folder.write_config(plan.config, {key: str(c.root.resolve()) for key, c in plan.caches.items()})
    return folder


def sweep_folds(folder: SweepFolder, key: str, cache: Cache, seed: int, spec: SweepSpec) -> Folds:
    """The folds of one cache and seed: loaded from SWEEP/folds/ if saved, else built from the
    cache's utterance metadata (no layer read) and saved, so every cell uses the same ones."""
    path = folder.folds_path(key, seed)
    meta = cache.read_meta()
    originals = ViewRows.of(meta["ids"], cache.view_sources()).originals  # views follow their sources
    meta = {k: v[originals] for k, v in meta.items()}
    # A label map's dropped classes have no place in the folds (the layers read lack them too).
    keep, labels, _ = map_class_names(meta["labels"], spec.label_map, str(cache.root))
    left_out = meta["ids"][~keep]  # a fold file may list them
    meta = {**{k: v[keep] for k, v in meta.items()}, "labels": labels}
    if path.exists() and path.with_suffix(".json").exists():
        return Folds.load(path).aligned_to(meta["ids"])
    folds = make_folds(meta["ids"], meta["labels"], meta["speakers"], meta["groups"],
                       protocol=spec.protocol, n_folds=spec.n_folds, corpus=cache.corpus,
                       fold_file=spec.fold_file, folds_from=spec.folds_from, seed=seed, left_out=left_out,
                       speaker_overlap=spec.train.compat_speaker_overlap)
    path.parent.mkdir(parents=True, exist_ok=True)
    folds.save(path)
    return folds


# --- one cell fold ----------------------------------------------------------------------------


@dataclass
class CellFoldJob:
    """Everything a worker needs for one cell fold besides the layer (pickled to the worker)."""

    cell_fold: CellFold
    folds: Folds
    settings: list[dict]
    train: TrainConfig
    cache_info: dict  # corpus, model, mode, family, last_state (CellFoldRecord's fields)
    out: Path
    views: dict = field(default_factory=dict)  # {view id: source id} of the cache's augmented views


def run_cell_fold(data: LayerData, job: CellFoldJob, test_corpus: LayerData | None = None) -> CellFoldRecord:
    """Grid-search one fold on its validation speakers, test the chosen setting once (and on
    every utterance of `test_corpus`, another corpus's same layer, if given): training.run_fold
    over the head's grid settings. Returns the cell fold's record (not yet saved)."""
    t_start = time.perf_counter()
    cell = job.cell_fold
    task, y = make_task(data, job.train)  # classes, or the targets of a regression sweep
    device = pick_device(job.train.device)
    # Folds are made on the originals; validation and test hold originals only, and a setting
    # with views "on" trains on the views of its training utterances too (folds.ViewRows).
    rows = ViewRows.of(data.ids, job.views) if job.views else None
    folds = job.folds.aligned_to(data.ids if rows is None else rows.original_ids)
    outcome = run_fold(cell.head, data, y, task, folds, cell.fold, replace(job.train, seed=cell.seed), device,
                       job.settings, rows, test_corpus, f"the cache {cell.cache}")
    # A cell keeps its scores, not its test predictions (a sweep holds thousands of cells).
    record = replace(outcome.record, test_ids=None, probs=None, true_values=None)
    score = task.score_name
    # e.g. the linear probe's C; a fusion's weights are its layer_weights, not part of the label
    choice = {k: v for k, v in record.selected.items() if k not in (score, "epoch", "weights")}
    chosen = " ".join(filter(None, [setting_label(outcome.values), setting_label(choice)]))
    grid = [{"setting": setting_label(values), "values": values, f"val_{score}": selected[score],
             "selected": selected} for values, selected in outcome.trials]
    return CellFoldRecord(
        **asdict(record), cache=cell.cache, **job.cache_info, layer=to_json(cell.layer), head=cell.head,
        seed=cell.seed, setting=chosen or "default", values=outcome.values, grid=grid, labels=task.names,
        task=task.kind, seconds=time.perf_counter() - t_start, threads=torch.get_num_threads(), device=str(device))


# --- sharing a layer with worker processes ----------------------------------------------------


@dataclass
class LayerRef:
    """A LayerData whose frames live in shared memory `name` (everything else is small)."""

    name: str
    shape: tuple
    dtype: str
    offsets: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    groups: np.ndarray
    layer: Selection
    test_corpus: "LayerRef | None" = None  # the test cache's same layer (cross-corpus sweeps)
    target_names: tuple = ()
    target_values: np.ndarray | None = None
    frame_pool: int = 1
    encoder_frames: np.ndarray | None = None
    statistics: bool = False  # the shared array is a StatsLayer's statistics (offsets unused)


class SharedLayer:
    """Copies a layer's frames into shared memory once; `close()` frees it."""

    def __init__(self, data: LayerData | StatsLayer, test_corpus: LayerData | StatsLayer | None = None):
        stats = isinstance(data, StatsLayer)
        array = data.statistics if stats else data.frames
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
        np.ndarray(array.shape, array.dtype, buffer=self.shm.buf)[...] = array
        self.test_corpus = SharedLayer(test_corpus) if test_corpus is not None else None
        self.ref = LayerRef(self.shm.name, array.shape, str(array.dtype), None if stats else data.offsets,
                            data.ids, data.labels, data.speakers, data.groups, data.layer,
                            test_corpus=self.test_corpus.ref if self.test_corpus else None,
                            target_names=data.target_names, target_values=data.target_values,
                            frame_pool=data.frame_pool, encoder_frames=data.encoder_frames, statistics=stats)

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()
        if self.test_corpus is not None:
            self.test_corpus.close()


@dataclass
class StreamedRef:
    """A streamed layer for worker processes: each worker opens the shards itself
    (streaming.open_streamed with this budget), so nothing is shared but this."""

    root: str
    layer: Selection
    budget: int
    batch_size: int
    frame_pool: int = 1  # encoder frames per frame read (StreamedLayer.pooled)

    @property
    def name(self) -> str:
        return f"{self.root}:{label(self.layer)}"


class StreamedShare:
    """The SharedLayer of a streamed layer: only its StreamedRef; nothing to free."""

    def __init__(self, data: StreamedLayer):
        self.ref = StreamedRef(*data.opened_as, frame_pool=data.frame_pool)

    def close(self) -> None:
        pass


class LoadedLayer:
    """One layer in memory, in this process."""

    def __init__(self, data: LayerData, test_corpus: LayerData | None = None):
        self.data, self.test_corpus = data, test_corpus

    def run(self, job: CellFoldJob) -> CellFoldRecord:
        """Run one cell fold on this layer, save its record, return it."""
        record = run_cell_fold(self.data, job, self.test_corpus)
        SweepFolder(job.out).save_cell(record)
        return record


_WORKER: dict = {}  # in a worker process: {"name", "shm", "layer"} of the attached layer


def _worker_init(threads: int, parent: int) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it and stops the workers
    # (a worker would otherwise return the KeyboardInterrupt as a result and take the next cell fold).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    torch.set_num_threads(threads)


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the sweep that started it dies (Linux). A parent
    killed outright (SIGKILL, or a scheduler's time limit) cannot stop its workers; without
    this they would go on training orphaned for the rest of their cell folds. Their cells are
    written atomically, so a worker killed mid-fold leaves only a temporary file."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM still stop the workers
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_run(ref: LayerRef | StreamedRef, job: CellFoldJob) -> CellFoldRecord:
    """In a worker process: attach the shared layer, or open the streamed one (once per
    layer), run and save one cell fold."""
    if _WORKER.get("name") != ref.name:
        _WORKER.pop("layer", None)
        if "shm" in _WORKER:
            for shm in _WORKER.pop("shm"):
                try:
                    shm.close()
                except BufferError:  # a view still alive somewhere: the mapping goes at exit
                    pass
        if isinstance(ref, StreamedRef):
            data = open_streamed(open_cache(ref.root), ref.layer, ref.budget, ref.batch_size).pooled(ref.frame_pool)
            _WORKER.update(name=ref.name, layer=LoadedLayer(data))
            return _WORKER["layer"].run(job)
        # Spawned workers share the parent's resource tracker, so attaching here registers the
        # same name again (a set) and the parent's unlink() unregisters it for both.
        attached = [_attach(r) for r in (ref, ref.test_corpus) if r is not None]
        data, test_corpus = (attached[0][1], attached[1][1] if len(attached) > 1 else None)
        _WORKER.update(name=ref.name, shm=[shm for shm, _ in attached], layer=LoadedLayer(data, test_corpus))
    return _WORKER["layer"].run(job)


def _attach(ref: LayerRef) -> tuple[shared_memory.SharedMemory, LayerData]:
    """The shared memory of `ref` and a LayerData over it (no copy)."""
    shm = shared_memory.SharedMemory(name=ref.name)
    array = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=shm.buf)
    meta = (ref.ids, ref.labels, ref.speakers, ref.groups, ref.layer, ref.target_names, ref.target_values,
            ref.frame_pool, ref.encoder_frames)
    return shm, StatsLayer(array, *meta) if ref.statistics else LayerData(array, ref.offsets, *meta)


# --- running a sweep --------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What one `run_sweep` call did. timing: this run's entry of timing.json; state: the
    sweep as this process left it (other processes may go on)."""

    out: Path
    folds_total: int
    folds_done_before: int
    folds_run: int
    failures: list[tuple[CellFold, str]]
    timing: SweepTiming
    state: "SweepState" = None
    report: dict | None = None  # the report's files (report.write_report), when written


@dataclass
class SweepState:
    """Every cell fold of a sweep at one moment: done (record saved), running (another live
    process holds its claim) or missing; `missing_mine` are the missing ones of this process's part."""

    total: int
    done: int
    running: int
    missing_mine: int
    missing_others: int

    @property
    def complete(self) -> bool:
        return self.done == self.total

    @property
    def own_part_done(self) -> bool:
        """This part needs nothing more from this process: done, or in a live process's hands."""
        return self.missing_mine == 0

    def text(self) -> str:
        if self.complete:
            return f"complete ({self.total} folds)"
        words = [f"{self.done} of {self.total} folds done"]
        if self.running:
            words.append(f"{self.running} claimed by other running jobs")
        if self.missing_mine:
            words.append(f"{self.missing_mine} missing (re-run to finish)")
        if self.missing_others:
            words.append(f"{self.missing_others} left for other --part parts (run those jobs, or this "
                         "command without --part, to finish)")
        return "; ".join(words)


def part_of(cell_folds: list[CellFold], part: tuple[int, int]) -> list[CellFold]:
    """Part I of N: the I-th of N contiguous, nearly equal runs of the plan's cell folds (which
    come layer by layer). Contiguous rather than every N-th cell fold, so a part reads only the one or
    two layers its run covers, not every layer: reading a layer is the costly step on a large
    corpus. The plan's order is fixed by the sweep's settings, so every job computes the same
    parts, disjoint and together complete."""
    i, n = part
    return cell_folds[i * len(cell_folds) // n:(i + 1) * len(cell_folds) // n]


def cell_fold_claims(folder: SweepFolder) -> Claims:
    """Claims on cell folds (locks.Claims): a cell fold runs only in the process holding its claim."""
    def lock_path(cell: CellFold) -> Path:
        path = folder.claim_path(cell.cache, cell.layer, cell.head, cell.seed, cell.fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    return Claims(lock_path)


def sweep_state(out: Path, cell_folds: list[CellFold], mine: list[CellFold], claims: Claims) -> SweepState:
    """Where every cell fold stands now, claims of other live processes included."""
    own = set(mine)
    done = running = missing_mine = 0
    for t in cell_folds:
        if t.path(out).exists():
            done += 1
        elif claims.held_elsewhere(t):
            running += 1
        elif t.path(out).exists():  # finished while we looked
            done += 1
        elif t in own:
            missing_mine += 1
    return SweepState(len(cell_folds), done, running, missing_mine,
                      len(cell_folds) - done - running - missing_mine)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(device: str = "auto") -> int:
    """Worker processes by default: 1 on a GPU, else one per core (at most MAX_DEFAULT_JOBS)."""
    if pick_device(device).type != "cpu":
        return 1
    return max(1, min(MAX_DEFAULT_JOBS, available_cores()))


def run_sweep(spec: SweepSpec, out: Path, jobs: int | None = None, device: str = "auto",
              progress: bool = True, write_report: bool = True, part: tuple[int, int] = (0, 1),
              memory_budget: int | None = None) -> SweepOutcome:
    """Run every cell fold of `spec` (of `part` I/N only, see `part_of`) not yet saved in `out`,
    then write the report there.

    Any number of processes may run this on one `out` at once: the folder and folds are made
    once under its lock, and each cell fold runs only in the process that claims it (a flock
    that a killed process lets go of). Cell folds another live process holds are left to it;
    those whose holder dies meanwhile are taken in a further pass.

    memory_budget: bytes for the layers and batches of all workers (default:
    streaming.default_budget()); a layer that does not fit is streamed from the shards, each
    worker opening them itself with an equal share (streaming.open_layer).

    Raises SweepError (bad request, or a folder holding another sweep), CacheError, FoldsError.
    A cell fold whose training diverges (NonFiniteLossError) is logged, listed in the outcome
    and left unsaved, so a re-run retries it; any other error stops the sweep (finished ones stay).
    """
    out = Path(out)
    spec = replace(spec, train=replace(spec.train, device=device))
    plan = plan_sweep(spec)
    with SweepFolder(out).lock():
        folder = claim_folder(out, plan)
        folder.remove_shared_temporaries()
        folds = {(key, seed): sweep_folds(folder, key, cache, seed, spec)
                 for key, cache in plan.caches.items() for seed in spec.seeds}
    cell_folds = plan.cell_folds({k: f.n_folds for k, f in folds.items()})
    mine = part_of(cell_folds, part)
    todo = [t for t in mine if not t.path(out).exists()]
    jobs = jobs or default_jobs(device)
    threads = max(1, available_cores() // jobs)
    info = {key: {"corpus": c.corpus, "model": c.settings.model, "mode": c.settings.mode,
                  "family": c.settings.family, "last_state": c.settings.dims.get("n_audio_layer")}
            for key, c in plan.caches.items()}
    claims = cell_fold_claims(folder)
    views = {key: c.view_sources() for key, c in plan.caches.items()}

    def job_for(cell: CellFold) -> CellFoldJob:
        return CellFoldJob(cell, folds[cell.cache, cell.seed], plan.settings[cell.head],
                           plan.spec.train, info[cell.cache], out, views[cell.cache])

    batch_size = max([spec.train.batch_size] + [v.get("batch_size", 0) for vs in plan.settings.values() for v in vs])

    def read(key: str, layer: int) -> tuple[LayerData | StreamedLayer, LayerData | None]:
        """The layer of cache `key` and, cross-corpus, of the test cache: classes mapped. A
        layer over the memory budget is streamed (streaming.open_layer), cross-corpus and
        label maps aside, which read it whole."""
        t0 = time.perf_counter()
        # Pooled as it is read, unless the grid chooses frame_pool: then as stored, pooled per setting.
        pool = None if "frame_pool" in spec.grid else spec.train.frame_pool or None
        test = plan.test_cache
        if test is None and spec.label_map is None:
            data, test_corpus = open_layer(plan.caches[key], layer, memory_budget, batch_size, workers=jobs,
                                           held=1 if jobs == 1 else LAYERS_IN_FLIGHT, frame_pool=pool), None
        else:
            data = map_classes(plan.caches[key].read_layer(layer, frame_pool=pool), spec.label_map, key)[0]
            test_corpus = (map_classes(originals_of(test, test.read_layer(layer, frame_pool=pool)), spec.label_map,
                                       str(spec.test_cache))[0] if test is not None else None)
        timing.read_seconds += time.perf_counter() - t0
        timing.layers_read += 1
        return data, test_corpus

    timing = SweepTiming(started=datetime.now(timezone.utc).isoformat(timespec="seconds"), jobs=jobs,
                         threads_per_job=threads, device=str(pick_device(device)),
                         folds_total=len(cell_folds), folds_done_before=sum(t.path(out).exists() for t in cell_folds))
    records, failures = [], []
    log.info("sweep %s: %d cell folds, %d already done, part %d/%d; %d job(s) x %d thread(s)",
             out, len(cell_folds), timing.folds_done_before, *part, jobs, threads)
    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="fold", desc="sweep",
               disable=not progress, dynamic_ncols=True)
    t_wall = time.perf_counter()
    try:
        run = _run_inline if jobs == 1 else _run_pool
        while todo:
            held: list[CellFold] = []
            run(claimed_layers(folder, claims, todo, held, bar), read, job_for, jobs, threads, bar, records,
                failures, claims)
            # A cell fold left to a process that has died since (its claim went with it): ours now.
            todo = [t for t in held if not t.path(out).exists() and not claims.held_elsewhere(t)]
    finally:
        claims.release_all()
        bar.close()
        timing.train_seconds = float(sum(r.train_seconds for r in records))
        timing.eval_seconds = float(sum(r.eval_seconds for r in records))
        timing.wall_seconds = time.perf_counter() - t_wall
        timing.folds_run, timing.folds_failed = len(records), len(failures)
        if records or failures:  # a process that ran nothing (all done, or all held) adds no line
            with folder.lock():
                folder.append_timing(timing)
    for cell, why in failures:
        log.warning("failed, will be retried by a re-run: %s: %s", cell, why)
    state, report = sweep_state(out, cell_folds, mine, claims), None
    if write_report and state.done:  # a partial table too: it shows the sweep's progress
        from .report import write_report as _write_report

        with folder.lock():
            report = _write_report([out], out)
    return SweepOutcome(out, len(cell_folds), timing.folds_done_before, len(records), failures, timing, state, report)


def claimed_layers(folder: SweepFolder, claims: Claims, todo: list[CellFold], held: list[CellFold], bar):
    """Yield ((cache key, layer), cell folds) for each layer of `todo` in turn, with the cell
    folds of it that this process could claim when the layer's turn came (layers with none are
    passed over unread). Those another live process holds go to `held`; those finished
    meanwhile count as done. The caller releases each claim once its cell fold is saved or has
    failed."""
    by_layer: dict[tuple[str, Selection], list[CellFold]] = {}
    for t in todo:
        by_layer.setdefault((t.cache, t.layer), []).append(t)
    for key_layer, group in by_layer.items():
        mine = []
        for t in group:
            if not claims.take(t):
                held.append(t)
            elif t.path(folder.root).exists():  # another process finished it since we listed it
                claims.release(t)
                bar.update(1)
            else:
                folder.remove_cell_temporaries(t.cache, t.layer, t.head, t.seed, t.fold)
                mine.append(t)
        if mine:
            yield key_layer, mine


def _run_inline(layers, read, job_for, jobs, threads, bar, records, failures, claims) -> None:
    """jobs == 1: every cell fold in this process, one layer at a time."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (key, layer), group in layers:
            loaded = LoadedLayer(*read(key, layer))
            for cell in group:
                bar.set_postfix_str(f"{key} layer {label(layer)} {cell.head}")
                _collect(lambda: loaded.run(job_for(cell)), cell, records, failures, claims)
                bar.update(1)
            del loaded
    finally:
        torch.set_num_threads(before)


def _run_pool(layers, read, job_for, jobs, threads, bar, records, failures, claims) -> None:
    """jobs > 1: worker processes; each layer read once into shared memory, the next layer
    read while the workers train on the current one. This process holds the cell folds' claims
    (the workers die with it, see _die_with)."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with torch's thread pools
    pool = cf.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                  initargs=(threads, os.getpid()))
    inflight: deque = deque()  # (SharedLayer, {future: cell fold}) in submission order

    def finish(shared, futures):
        try:
            for f in cf.as_completed(futures):
                _collect(f.result, futures[f], records, failures, claims)
        finally:
            shared.close()

    try:
        for (key, layer), group in layers:
            while len(inflight) >= LAYERS_IN_FLIGHT:
                finish(*inflight.popleft())
            data, test_corpus = read(key, layer)
            in_memory = isinstance(data, (LayerData, StatsLayer))
            shared = SharedLayer(data, test_corpus) if in_memory else StreamedShare(data)
            del data, test_corpus
            futures = {}
            try:
                for cell in group:
                    f = pool.submit(_worker_run, shared.ref, job_for(cell))
                    f.add_done_callback(lambda f: f.cancelled() or bar.update(1))
                    futures[f] = cell
            finally:
                inflight.append((shared, futures))
        while inflight:
            finish(*inflight.popleft())
    except BaseException:
        # Stop now: finished cell folds are saved, one cut short leaves only a temporary file.
        # Executors have no public way to stop running workers before Python 3.14.
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.terminate()
        raise
    finally:
        for shared, _ in inflight:
            shared.close()
        pool.shutdown(wait=True)


def _collect(result, cell: CellFold, records: list, failures: list, claims: Claims) -> None:
    """Call result(); a diverged training is the cell fold's failure, anything else stops the
    sweep. Its claim is let go either way once its record is saved or it has failed."""
    try:
        records.append(result())
    except NonFiniteLossError as e:
        failures.append((cell, str(e)))
    finally:
        claims.release(cell)

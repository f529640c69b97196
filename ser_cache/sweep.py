"""Layer-wise comparison sweeps: every (cache, layer, head, seed) cell over the same folds.

    caches --read each layer once--> tasks (one fold of one cell) --workers--> cells/*.json
                                                                     --report.py--> table, plots

A *cell* is one head with one seed on one layer of one cache, evaluated on every fold; a *task*
is one fold of a cell, the unit that runs, is saved and is resumed. A cell's layer may also be
several states (`--layers all,2+3+4`, layers.py): the head mixes them with learned weights,
which the cell records, so single-layer and multi-layer cells share one table. All cells of a cache use
the same folds: they are built once per cache and seed from the cache's utterance metadata
and saved in SWEEP/folds/, so the cells of a table differ only in layer and head.

Honest grid search. With `--grid n_heads=4,8 head_dim=4,16`, each task trains every grid
setting on the fold's training speakers, picks the epoch and the setting by UA on the fold's
validation speakers (carved from the training speakers, see folds.py), and only then scores
the chosen setting on the test speakers, once. The test speakers never influence a choice.
With `--ensemble N`, every setting is N heads of different seeds, each choosing its epoch on
validation, and settings are compared by the validation UA of their mean probabilities
(training.fit_selected). With `--refit`, the chosen setting is first retrained on training +
validation speakers with the epoch (or C) it chose (training.refit_selected); only that head
is tested.
Each task records the validation UA of every setting it tried and which one it chose. A grid
key applies to the heads it changes (n_heads, head_dim: attentive and qkv; lr, epochs,
time_mask: every torch head); other heads run once with the defaults. The linear head also picks its C on
validation (training.py).

Reading and running. A layer is read once (`Cache.read_layer`), put in shared memory, and
all its tasks go to a pool of `jobs` worker processes with cores // jobs torch threads each;
the next layer is read while the workers train on the current one (at most two layers held).
With jobs == 1 everything runs in this process (the default on a GPU).

Crash safety and resume. A worker writes each finished task as one JSON file (temporary
name, fsync, rename), so a file exists only when its task is complete. A re-run with the same
settings skips those tasks; a re-run with other settings is refused, naming what differs
(SWEEP/sweep.json holds the settings). The folder's layout and record types belong to
results.py (SweepFolder, CellResult, SweepTiming), which report.py reads through.
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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

from .batches import predict_proba
from .cache import Cache, open_cache
from .crosscorpus import check_sweep_target, map_classes, map_labels, target_metrics
from .device import pick_device
from .errors import OptionError
from .features import LayerData
from .folds import Folds, make_folds
from .heads import HEADS
from .layers import Selection, label, parse_cells, states_of, to_json
from .metrics import fold_metrics
from .results import CellResult, SweepError, SweepFolder, SweepTiming
from .training import (NonFiniteLossError, TrainConfig, as_made, fit_selected, fold_seed, refit_selected,
                       settings_read)

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
GRID_ALIASES = {"heads": "n_heads", "d_a": "head_dim", "d_k": "head_dim"}
GRID_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "dropout",
             "d_model", "n_heads", "head_dim", "attention_scale", "class_weights", "time_mask")
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
                raise SweepError(f"grid item {item!r}: write key=v1,v2,... e.g. heads=4,8,12")
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
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return type(default)(text) if not isinstance(default, int) else int(text)
    except ValueError:
        raise SweepError(f"grid {key}={text!r}: must be {type(default).__name__}") from None


def head_settings(head: str, grid: dict[str, list], base: TrainConfig) -> list[dict]:
    """The grid points that matter for `head`, in grid order ([{}] when none does).

    A key matters if it changes a setting the head's fitting reads or its constructor options
    (training.settings_read)."""
    relevant = {}
    for key, values in grid.items():
        variants = {json.dumps(settings_read(head, replace(base, **{key: v})), sort_keys=True) for v in values}
        if len(variants) > 1:
            relevant[key] = values
    return [dict(zip(relevant, point)) for point in itertools.product(*relevant.values())]


def setting_label(values: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


# --- what a sweep is --------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
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
    target: Cache | None = None  # spec.test_cache, checked against every cache

    def tasks(self, n_folds: dict[tuple[str, int], int]) -> list[Task]:
        """Every task, layer by layer (n_folds: (cache key, seed) -> number of folds)."""
        return [Task(key, layer, head, seed, fold)
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
        caches[key], layers[key] = cache, wanted
    target = check_sweep_target(caches, {key: sorted({s for cell in cells for s in states_of(cell)})
                                         for key, cells in layers.items()}, spec.test_cache, spec.label_map)
    settings = {h: head_settings(h, spec.grid, spec.train) for h in heads}
    train = {k: v for k, v in spec.train.to_dict().items() if k not in FREE_TRAIN_KEYS}
    if spec.train.flawed:
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
    if spec.test_cache is not None or spec.label_map is not None:  # absent otherwise: older sweeps resume
        config["cross_corpus"] = {"label_map": spec.label_map,
                                  "test_cache": _cache_identity(target) if target else None}
    return SweepPlan(spec, caches, layers, settings, json.loads(json.dumps(config)), target)


def _cache_identity(cache: Cache) -> dict:
    """What decides a cache's content (not where it lies, so a moved cache still resumes)."""
    fp = cache.fingerprint
    return {k: fp[k] for k in ("corpus", "model", "model_sha256", "mode", "dtype", "records_hash",
                               "n_records", "shard_sha256")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    """Create SWEEP with the plan's config, or check that it holds the same config."""
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
    if folder.root.exists() and any(folder.root.iterdir()):
        raise SweepError(f"{out} exists and is not a sweep folder (no {SweepFolder.CONFIG}): choose "
                         "another --out folder")
    folder.write_config(plan.config, {key: str(c.root.resolve()) for key, c in plan.caches.items()})
    return folder


def sweep_folds(folder: SweepFolder, key: str, cache: Cache, seed: int, spec: SweepSpec) -> Folds:
    """The folds of one cache and seed: loaded from SWEEP/folds/ if saved, else built from the
    cache's utterance metadata (no layer read) and saved, so every cell uses the same ones."""
    path = folder.folds_path(key, seed)
    meta = cache.read_meta()
    # A label map's dropped classes have no place in the folds (the layers read lack them too).
    keep, labels, _ = map_labels(meta["labels"], spec.label_map, str(cache.root))
    meta = {**{k: v[keep] for k, v in meta.items()}, "labels": labels}
    if path.exists() and path.with_suffix(".json").exists():
        return Folds.load(path).aligned_to(meta["ids"])
    folds = make_folds(meta["ids"], meta["labels"], meta["speakers"], meta["groups"],
                       protocol=spec.protocol, n_folds=spec.n_folds, corpus=cache.corpus,
                       fold_file=spec.fold_file, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    folds.save(path)
    return folds


# --- one task ---------------------------------------------------------------------------------


@dataclass
class TaskJob:
    """Everything a worker needs for one task besides the layer (pickled to the worker)."""

    task: Task
    folds: Folds
    settings: list[dict]
    train: TrainConfig
    cache_info: dict  # corpus, model, mode
    out: Path


def run_task(data: LayerData, job: TaskJob, target: LayerData | None = None) -> CellResult:
    """Grid-search one fold on its validation speakers, test the chosen setting once (and on
    every utterance of `target`, another corpus's same layer, if given), and return the task's
    result (not yet saved)."""
    t_start = time.perf_counter()
    task = job.task
    labels, y = data.classes()
    n_classes = len(labels)
    device = pick_device(job.train.device)
    train, val, test = job.folds.aligned_to(data.ids).split(task.fold)

    seed = fold_seed(task.seed, task.fold)
    trials, best, best_values, best_config, train_seconds = [], None, None, None, 0.0
    for values in job.settings:
        config = replace(job.train, seed=task.seed, **values)
        # No test set here: the choice is made on validation only.
        fit = fit_selected(task.head, data, y, train, val, config, n_classes, seed, device)
        train_seconds += fit.seconds
        trials.append({"setting": setting_label(values), "values": values, "val_ua": fit.selected["ua"],
                       "selected": fit.selected})
        if best is None or fit.selected["ua"] > best.selected["ua"]:  # ties keep the earlier setting
            best, best_values, best_config = fit, values, config
    if job.train.refit:  # the chosen setting only, retrained on training + validation speakers
        best = refit_selected(best, task.head, data, y, train, val, best_config, n_classes, seed, device)
        train_seconds += best.refit["seconds"]

    t0 = time.perf_counter()
    probs = predict_proba(best.model, data, test, device)
    metrics = fold_metrics(y[test], probs.argmax(axis=1), n_classes)
    target_result = target_metrics(best.model, target, labels, device) if target is not None else {}
    eval_seconds = time.perf_counter() - t0
    choice = {k: v for k, v in best.selected.items() if k not in ("ua", "epoch")}  # e.g. the linear probe's C
    chosen = " ".join(filter(None, [setting_label(best_values), setting_label(choice)]))
    return CellResult(
        cache=task.cache, **job.cache_info, layer=to_json(task.layer), head=task.head, seed=task.seed,
        fold=task.fold, setting=chosen or "default", values=best_values, selected=best.selected,
        val_ua=best.selected["ua"], grid=trials, labels=labels, **metrics,
        n_train=len(train), n_val=len(val), n_test=len(test), train_seconds=train_seconds,
        eval_seconds=eval_seconds, seconds=time.perf_counter() - t_start,
        threads=torch.get_num_threads(), device=str(device), compute_dtype=best.compute_dtype,
        history=best.history, layer_weights=best.model.layer_weights(), tested=best.tested, refit=best.refit,
        members=best.members, target=target_result)


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
    target: "LayerRef | None" = None  # the test cache's same layer (cross-corpus sweeps)


class SharedLayer:
    """Copies a layer's frames into shared memory once; `close()` frees it."""

    def __init__(self, data: LayerData, target: LayerData | None = None):
        self.shm = shared_memory.SharedMemory(create=True, size=max(1, data.frames.nbytes))
        np.ndarray(data.frames.shape, data.frames.dtype, buffer=self.shm.buf)[...] = data.frames
        self.target = SharedLayer(target) if target is not None else None
        self.ref = LayerRef(self.shm.name, data.frames.shape, str(data.frames.dtype), data.offsets,
                            data.ids, data.labels, data.speakers, data.groups, data.layer,
                            self.target.ref if self.target else None)

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()
        if self.target is not None:
            self.target.close()


class LoadedLayer:
    """One layer in memory, in this process."""

    def __init__(self, data: LayerData, target: LayerData | None = None):
        self.data, self.target = data, target

    def run(self, job: TaskJob) -> CellResult:
        """Run one task on this layer, save its result, return it."""
        result = run_task(self.data, job, self.target)
        SweepFolder(job.out).save_cell(result)
        return result


_WORKER: dict = {}  # in a worker process: {"name", "shm", "layer"} of the attached layer


def _worker_init(threads: int, parent: int) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it and stops the workers
    # (a worker would otherwise return the KeyboardInterrupt as a result and take the next task).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    torch.set_num_threads(threads)


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the sweep that started it dies (Linux). A parent
    killed outright (SIGKILL, or a scheduler's time limit) cannot stop its workers; without
    this they would go on training orphaned for the rest of their tasks. Their cells are
    written atomically, so a worker killed mid-task leaves only a temporary file."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM still stop the workers
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_run(ref: LayerRef, job: TaskJob) -> dict:
    """In a worker process: attach the shared layer (once per layer), run and save one task."""
    if _WORKER.get("name") != ref.name:
        if "shm" in _WORKER:
            _WORKER.pop("layer")
            for shm in _WORKER.pop("shm"):
                try:
                    shm.close()
                except BufferError:  # a view still alive somewhere: the mapping goes at exit
                    pass
        # Spawned workers share the parent's resource tracker, so attaching here registers the
        # same name again (a set) and the parent's unlink() unregisters it for both.
        attached = [_attach(r) for r in (ref, ref.target) if r is not None]
        data, target = (attached[0][1], attached[1][1] if len(attached) > 1 else None)
        _WORKER.update(name=ref.name, shm=[shm for shm, _ in attached], layer=LoadedLayer(data, target))
    return _WORKER["layer"].run(job)


def _attach(ref: LayerRef) -> tuple[shared_memory.SharedMemory, LayerData]:
    """The shared memory of `ref` and a LayerData over it (no copy)."""
    shm = shared_memory.SharedMemory(name=ref.name)
    frames = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=shm.buf)
    return shm, LayerData(frames, ref.offsets, ref.ids, ref.labels, ref.speakers, ref.groups, ref.layer)


# --- running a sweep --------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    """What one `run_sweep` call did. timing: this run's entry of timing.json."""

    out: Path
    tasks_total: int
    tasks_done_before: int
    tasks_run: int
    failures: list[tuple[Task, str]]
    timing: SweepTiming


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(device: str = "auto") -> int:
    """Worker processes by default: 1 on a GPU, else one per core (at most MAX_DEFAULT_JOBS)."""
    if pick_device(device).type != "cpu":
        return 1
    return max(1, min(MAX_DEFAULT_JOBS, available_cores()))


def run_sweep(spec: SweepSpec, out: Path, jobs: int | None = None, device: str = "auto",
              progress: bool = True, write_report: bool = True) -> SweepOutcome:
    """Run every task of `spec` not yet saved in `out`, then write the report there.

    Raises SweepError (bad request, or a folder holding another sweep), CacheError, FoldsError.
    A task whose training diverges (NonFiniteLossError) is logged, listed in the outcome and
    left unsaved, so a re-run retries it; any other error stops the sweep (finished tasks stay).
    """
    out = Path(out)
    spec = replace(spec, train=replace(spec.train, device=device))
    plan = plan_sweep(spec)
    folder = claim_folder(out, plan)
    with folder.exclusive():
        folds = {(key, seed): sweep_folds(folder, key, cache, seed, spec)
                 for key, cache in plan.caches.items() for seed in spec.seeds}
        tasks = plan.tasks({k: f.n_folds for k, f in folds.items()})
        todo = [t for t in tasks if not t.path(out).exists()]
        jobs = jobs or default_jobs(device)
        threads = max(1, available_cores() // jobs)
        by_layer: dict[tuple[str, int], list[Task]] = {}
        for t in todo:
            by_layer.setdefault((t.cache, t.layer), []).append(t)
        info = {key: {"corpus": c.corpus, "model": c.settings.model, "mode": c.settings.mode}
                for key, c in plan.caches.items()}

        def job_for(task: Task) -> TaskJob:
            return TaskJob(task, folds[task.cache, task.seed], plan.settings[task.head],
                           spec.train, info[task.cache], out)

        def read(key: str, layer: int) -> tuple[LayerData, LayerData | None]:
            """The layer of cache `key` and, cross-corpus, of the test cache: classes mapped."""
            t0 = time.perf_counter()
            data = map_classes(plan.caches[key].read_layer(layer), spec.label_map, key)[0]
            target = (map_classes(plan.target.read_layer(layer), spec.label_map, str(spec.test_cache))[0]
                      if plan.target is not None else None)
            timing.read_seconds += time.perf_counter() - t0
            timing.layers_read += 1
            return data, target

        timing = SweepTiming(started=datetime.now(timezone.utc).isoformat(timespec="seconds"), jobs=jobs,
                             threads_per_job=threads, device=str(pick_device(device)),
                             tasks_total=len(tasks), tasks_done_before=len(tasks) - len(todo))
        records, failures = [], []
        log.info("sweep %s: %d tasks, %d already done; %d job(s) x %d thread(s)",
                 out, len(tasks), len(tasks) - len(todo), jobs, threads)
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="fold", desc="sweep",
                   disable=not progress, dynamic_ncols=True)
        t_wall = time.perf_counter()
        try:
            run = _run_inline if jobs == 1 else _run_pool
            run(by_layer, read, job_for, jobs, threads, bar, records, failures)
        finally:
            bar.close()
            timing.train_seconds = float(sum(r.train_seconds for r in records))
            timing.eval_seconds = float(sum(r.eval_seconds for r in records))
            timing.wall_seconds = time.perf_counter() - t_wall
            timing.tasks_run, timing.tasks_failed = len(records), len(failures)
            if todo:  # a re-run of a finished sweep did nothing worth a line
                folder.append_timing(timing)
    for task, why in failures:
        log.warning("failed, will be retried by a re-run: %s: %s", task, why)
    if write_report:
        from .report import write_report as _write_report

        _write_report([out], out)
    return SweepOutcome(out, len(tasks), timing.tasks_done_before, len(records), failures, timing)


def _run_inline(by_layer, read, job_for, jobs, threads, bar, records, failures) -> None:
    """jobs == 1: every task in this process, one layer at a time."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (key, layer), group in by_layer.items():
            loaded = LoadedLayer(*read(key, layer))
            for task in group:
                bar.set_postfix_str(f"{key} layer {label(layer)} {task.head}")
                _collect(lambda: loaded.run(job_for(task)), task, records, failures)
                bar.update(1)
            del loaded
    finally:
        torch.set_num_threads(before)


def _run_pool(by_layer, read, job_for, jobs, threads, bar, records, failures) -> None:
    """jobs > 1: worker processes; each layer read once into shared memory, the next layer
    read while the workers train on the current one."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with torch's thread pools
    pool = cf.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                  initargs=(threads, os.getpid()))
    inflight: deque = deque()  # (SharedLayer, {future: task}) in submission order

    def finish(shared, futures):
        try:
            for f in cf.as_completed(futures):
                _collect(f.result, futures[f], records, failures)
        finally:
            shared.close()

    try:
        for (key, layer), group in by_layer.items():
            while len(inflight) >= LAYERS_IN_FLIGHT:
                finish(*inflight.popleft())
            data, target = read(key, layer)
            shared = SharedLayer(data, target)
            del data, target
            futures = {}
            try:
                for task in group:
                    f = pool.submit(_worker_run, shared.ref, job_for(task))
                    f.add_done_callback(lambda f: f.cancelled() or bar.update(1))
                    futures[f] = task
            finally:
                inflight.append((shared, futures))
        while inflight:
            finish(*inflight.popleft())
    except BaseException:
        # Stop now: finished tasks are saved, a task cut short leaves only a temporary file.
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


def _collect(result, task: Task, records: list, failures: list) -> None:
    """Call result(); a diverged training is a task failure, anything else stops the sweep."""
    try:
        records.append(result())
    except NonFiniteLossError as e:
        failures.append((task, str(e)))

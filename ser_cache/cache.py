"""The feature cache: every kept encoder state of a corpus, in HDF5 shards.

Layout of a cache folder:

    cache.json              settings that must match for reuse, plus provenance (versions)
    records.jsonl           the utterance records the cache was planned from
    plan.json               which utterance ids go to which shard (fixed before any work)
    shards/shard-00000.h5   one complete shard
    shards/shard-00000.json its SHA-256, size and counts, written before the shard appears

Inside a shard, utterances are stored back to back, one contiguous dataset per layer:

    ids, labels, speakers, groups   (n,) str
    n_frames                        (n,) int32    rows stored per utterance
    speech_frames                   (n,) int32    encoder frames that cover the speech
    encoder_frames                  (n,) int32    encoder frames the rows were made from
    offsets                         (n + 1,) int64
    layer_07                        (total_rows, dim) float16 (or float32)
    skipped_ids/_paths/_reasons     (k,) str      planned utterances that could not be used
    note_ids/note_texts             (m,) str      kept utterances with something to know

so one layer of the whole corpus is read with one large read per shard (`read_layer`), and
several layers with one read per shard and layer into their columns of one array.

What a row is (`store` and `frame_pool` of the settings):

    frames, frame_pool 1   one row per 20 ms encoder frame (every cache made before pooling)
    frames, frame_pool K   one row per K encoder frames, their mean (pooling.py): ceil(T / K)
    stats                  one row per utterance: the mean and std of every value over its
                           frames (pooled by frame_pool first), (n, 2 * dim) float32 per state;
                           `dtype` is then the precision of the frames they were taken from

Caches made before `encoder_frames` was stored are frames caches of frame_pool 1, whose
encoder frames are their rows.

Augmented views (`extract --augment`, augment.py) are utterances like any other in records,
plan and shards, each tied to its source by the `source` field of its record (`view_sources`)
and planned in its source's shard. The settings name the views and their seed (`augment`,
`augment_seed`); a cache without views has neither key in cache.json, as before views existed.

Crash safety: a shard is written to a temporary name, flushed to disk, described by its JSON
sidecar, then renamed; a shard without both files is not complete and is re-done by the next
`extract`. The plan is a pure function of the records and settings, so `--shard I/N` jobs
(shards k with k % N == I) can fill one folder from several machines.

Several writers: a process writes shard k only while it holds the claim on k, an exclusive
`flock` on shards/shard-0000k.lock (see `ShardClaims`), so any number of `extract` jobs on one
folder, with or without `--shard`, share the work and never write one shard at once. The
folder itself is created under the lock create.lock (`folder_lock`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .augment import views_per_transform
from .errors import UserError
from .features import LayerData, StatsLayer, check_statistics_pool, utterance_statistics
from .files import process_tag, write_json_atomic
from .layers import Selection, selection, states_of
from .locks import Claims
from .pooling import pool_rows, pooled_lengths, read_factor, row_weights
from .records import Utterance, class_counts, load_records, target_names

CACHE_FORMAT = 1
SETTINGS_FILE = "cache.json"
RECORDS_FILE = "records.jsonl"
PLAN_FILE = "plan.json"
SHARD_DIR = "shards"
DTYPES = ("float16", "float32")

STATS_DTYPE = "float32"  # a statistics cache's values, whatever the frames' dtype
COMPUTE_DTYPES = ("float32", "bfloat16")
META_FIELDS = ("ids", "labels", "speakers", "groups")
STR = h5py.string_dtype()


class CacheError(UserError):
    """A cache that cannot be used as asked; the message says what differs or is broken, and the fix."""


@dataclass
class CacheSettings:
    """Everything that decides the bytes of a cache. Two runs may share a cache only if equal."""

    corpus: str
    model: str
    model_sha256: str
    dims: dict
    mode: str
    dtype: str
    layers: list[int]
    long_audio: str
    records_hash: str
    n_records: int
    shard_bytes: int
    compute_dtype: str = "float32"  # precision of the encoder's arithmetic (bfloat16 changes states)
    sample_rate: int = 16000
    format: int = CACHE_FORMAT
    frame_pool: int = 1  # encoder frames averaged into each stored frame (pooling.py)
    store: str = "frames"  # "frames", or "stats": per utterance only the mean and std of every value
    # the encoder's code: openai-whisper (every cache made before others were supported), or a
    # transformers model_type (hf_encoders.FAMILIES)
    family: str = "openai-whisper"
    # augmented views stored beside each utterance (augment.py), by name ("speed0.9", "noise20"),
    # and the seed of their noise; records_hash and n_records stay those of the corpus itself
    augment: list[str] = field(default_factory=list)
    augment_seed: int = 0

    def to_dict(self) -> dict:
        """The settings as cache.json and a run's fingerprint hold them: without augment and
        augment_seed when there are no views, so caches without views are described as before."""
        d = asdict(self)
        if not self.augment:
            del d["augment"], d["augment_seed"]
        return d

    @property
    def stored_dtype(self) -> str:
        """The dtype of the layer datasets: dtype for frames, float32 for statistics."""
        return STATS_DTYPE if self.store == "stats" else self.dtype

    def row_width(self, dim: int) -> int:
        """Values per stored row of one state: dim for frames, 2 * dim (mean, std) for statistics."""
        return 2 * dim if self.store == "stats" else dim

    def differences(self, other: "CacheSettings", keys=None, sides=("cache has", "asked for")) -> list[str]:
        """Human-readable list of the settings in which `other` differs from self (only `keys`
        when given), each side named by `sides`."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {sides[0]} {mine[k]!r}, {sides[1]} {theirs[k]!r}"
                for k in (keys or mine) if mine[k] != theirs[k]]


def layer_name(state: int) -> str:
    return f"layer_{state:02d}"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


# --- planning -------------------------------------------------------------------------------


def plan_shards(records: list[Utterance], bytes_per_second: float, shard_bytes: int) -> list[list[str]]:
    """Split utterance ids into shards of about `shard_bytes` each, in id order; an augmented
    view goes right after its source, in the order `records` lists the views, never into
    another shard (a source and its views are written, resumed and repaired together).

    bytes_per_second: estimated cache bytes per second of audio (all kept layers), or per
    utterance for the padded mode (pass duration-free estimates through `records`' durations).
    Deterministic: the same records and settings always give the same plan.
    """
    views: dict[str, list[Utterance]] = {}
    for r in records:
        if r.source:
            views.setdefault(r.source, []).append(r)
    shards: list[list[str]] = [[]]
    size = 0.0
    for r in sorted((r for r in records if not r.source), key=lambda r: r.id):
        group = [r, *views.pop(r.id, [])]
        cost = sum(max(u.duration, 0.02) for u in group) * bytes_per_second
        if shards[-1] and size + cost > shard_bytes:
            shards.append([])
            size = 0.0
        shards[-1].extend(u.id for u in group)
        size += cost
    assert not views, f"views of utterances not in the records: {sorted(views)[:3]}"
    return shards


# --- writing a shard ------------------------------------------------------------------------
#
# A shard is laid out before its states exist: once its utterances are read, their frame counts
# (and what was skipped, and the notes) are known, so the HDF5 file is made with every dataset
# in place and each layer's contiguous data region allocated (HDF5 "early allocation"). Each
# utterance's rows then have a fixed byte offset in the file (H5Dget_offset), where its states
# are written with os.pwrite as it leaves the encoder, in whatever order it is encoded. When a
# shard's last utterance is encoded, only a little data, the fsync and the checksum are left:
# the shard is not written whole after its encoding, with nothing to overlap that write with,
# and the writer holds one batch of states, not a whole shard.

SYNC_BYTES = 16 * 2**20  # flushed to disk every 16 MiB written, so the final fsync waits for little


@dataclass
class ShardLayout:
    """What one shard holds besides its states, known once its utterances are read.

    records are the kept utterances in plan order; n_frames[i] is the number of rows record i
    stores per layer; skipped lists the planned utterances that could not be used.
    """

    records: list[Utterance] = field(default_factory=list)
    n_frames: list[int] = field(default_factory=list)
    speech_frames: list[int] = field(default_factory=list)
    encoder_frames: list[int] = field(default_factory=list)  # before pooling or statistics
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (id, text)

    def offsets(self) -> np.ndarray:
        """(n + 1,) int64: the first row of each record, and the total."""
        return np.concatenate([[0], np.cumsum(self.n_frames, dtype=np.int64)]).astype(np.int64)


class ShardFile:
    """Shard k being written: laid out when made, its states put in any order, then finished.

    Crash safety as for every file of the cache: the shard is written under a temporary name,
    flushed, described by its sidecar, and only then renamed into place (`finish`). The caller
    holds the claim on shard k (`ShardClaims.take`). Any OSError (a full disk) propagates after
    the temporary file is removed.
    """

    def __init__(self, folder: Path, k: int, layout: ShardLayout, layers: list[int], dim: int, dtype: str):
        self.folder, self.k, self.layout = Path(folder), k, layout
        self.tmp = self.folder / f"{shard_name(k)}.h5.{process_tag()}.tmp"
        self.dtype = np.dtype(dtype).newbyteorder("<")  # HDF5 stores these little-endian
        self.dim = dim
        self.offsets = layout.offsets()
        self.row = {r.id: i for i, r in enumerate(layout.records)}
        self.unwritten = set(self.row)
        self.unsynced = 0
        self.fd: int | None = None
        try:
            self.data_at = _create_layout(self.tmp, k, layout, self.offsets, layers, dim, self.dtype)
            self.fd = os.open(self.tmp, os.O_WRONLY)
        except BaseException:
            self.discard()
            raise

    def put(self, rid: str, states: dict[int, np.ndarray]) -> None:
        """Write utterance `rid`'s states: {state: (n_frames, dim)} for every layer of the shard."""
        i = self.row[rid]
        rows = int(self.offsets[i + 1] - self.offsets[i])
        try:
            for s, at in self.data_at.items():
                a = np.ascontiguousarray(states[s], dtype=self.dtype)
                assert a.shape == (rows, self.dim), f"{rid} state {s}: {a.shape}, laid out as {(rows, self.dim)}"
                _write_at(self.fd, memoryview(a).cast("B"), at + int(self.offsets[i]) * self.dim * self.dtype.itemsize)
                self.unsynced += a.nbytes
            self.unwritten.discard(rid)
            if self.unsynced >= SYNC_BYTES:
                os.fdatasync(self.fd)
                self.unsynced = 0
        except BaseException:
            self.discard()
            raise

    def finish(self) -> dict:
        """Flush, checksum, write the sidecar and rename the shard into place. Returns the sidecar."""
        final, sidecar = self.folder / f"{shard_name(self.k)}.h5", self.folder / f"{shard_name(self.k)}.json"
        try:
            assert not self.unwritten, f"{shard_name(self.k)}: no states written for {sorted(self.unwritten)[:5]}"
            os.close(self.fd)
            self.fd = None
            _fsync(self.tmp)
            info = {
                "shard": self.k,
                "sha256": file_sha256(self.tmp),
                "bytes": self.tmp.stat().st_size,
                "utterances": len(self.layout.records),
                "skipped": len(self.layout.skipped),
                "frames": int(self.offsets[-1]),
            }
            write_json_atomic(sidecar, info)
            os.replace(self.tmp, final)
            _fsync_dir(self.folder)
            return info
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Give up on this shard: its temporary file is removed."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def _create_layout(path: Path, k: int, layout: ShardLayout, offsets: np.ndarray, layers: list[int], dim: int,
                   dtype: np.dtype) -> dict[int, int]:
    """Make the HDF5 file of a shard with everything but its states; returns {state: byte offset
    of its layer's data in the file}. States of a layer with no rows need no offset."""
    total = int(offsets[-1])
    with h5py.File(path, "w") as f:
        f.attrs["shard"] = k
        f.attrs["format"] = CACHE_FORMAT
        for name, values in zip(META_FIELDS, _columns(layout.records)):
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)
        f.create_dataset("n_frames", data=np.array(layout.n_frames, dtype=np.int32))
        f.create_dataset("speech_frames", data=np.array(layout.speech_frames, dtype=np.int32))
        f.create_dataset("encoder_frames", data=np.array(layout.encoder_frames or layout.n_frames, dtype=np.int32))
        f.create_dataset("offsets", data=offsets)
        data_at = {}
        for s in layers:
            # Contiguous, allocated now, never filled: every byte of it is written by put().
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            ds = f.create_dataset(layer_name(s), shape=(total, dim), dtype=dtype, dcpl=dcpl, fill_time="never")
            if total:
                data_at[s] = ds.id.get_offset()
        for name, column in zip(("skipped_ids", "skipped_paths", "skipped_reasons"), _transpose(layout.skipped, 3)):
            f.create_dataset(name, data=np.array(column, dtype=object), dtype=STR)
        for name, column in zip(("note_ids", "note_texts"), _transpose(layout.notes, 2)):
            f.create_dataset(name, data=np.array(column, dtype=object), dtype=STR)
    return data_at


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` at byte `offset` of the file (pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def stored_rows(frames: np.ndarray, settings: CacheSettings) -> np.ndarray:
    """What a cache of `settings` stores for one utterance's state: its encoder frames (T, dim),
    already in the cache's dtype, pooled by frame_pool (ceil(T / K), dim), or for a statistics
    cache their mean and std, (1, 2 * dim) float32 (module docstring)."""
    rows, _ = pool_rows(frames, np.array([0, len(frames)]), settings.frame_pool)
    if settings.store == "stats":
        return utterance_statistics(rows).astype(STATS_DTYPE)[None, :]
    return rows


def stored_count(encoder_frames: int, settings: CacheSettings) -> int:
    """Rows a cache of `settings` stores for an utterance of `encoder_frames` frames."""
    return 1 if settings.store == "stats" else int(pooled_lengths(encoder_frames, settings.frame_pool))


def write_shard(folder: Path, k: int, layout: ShardLayout, states: list[dict[int, np.ndarray]], layers: list[int],
                dim: int, dtype: str) -> dict:
    """Write a shard whose states are all at hand (tests, synthetic caches): states[i] maps
    state -> (layout.n_frames[i], dim) for layout.records[i]. Returns the sidecar."""
    shard = ShardFile(folder, k, layout, layers, dim, dtype)
    for r, s in zip(layout.records, states, strict=True):
        shard.put(r.id, s)
    return shard.finish()


def _columns(records: list[Utterance]):
    return [r.id for r in records], [r.label for r in records], [r.speaker for r in records], [r.group for r in records]


def _transpose(rows: list[tuple], width: int) -> list[list[str]]:
    return [[row[j] for row in rows] for j in range(width)]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardClaims(Claims):
    """Claims on the shards of one cache folder: shard k is written only by its holder."""

    def __init__(self, shard_dir: Path):
        self.shard_dir = Path(shard_dir)
        super().__init__(lambda k: self.shard_dir / f"{shard_name(k)}.lock")


def remove_temporaries(shard_dir: Path, k: int) -> None:
    """Delete what interrupted writers of shard k left behind. Only a holder of the claim on
    k may call this: no live process is then writing those files."""
    for stale in Path(shard_dir).glob(f"{shard_name(k)}.*.tmp"):  # .h5.tmp, .h5.TAG.tmp, .json.TAG.tmp
        stale.unlink(missing_ok=True)


_LEFTOVER = re.compile(r"shard-(\d+)\..*(\.tmp|\.lock)$")


def shards_with_leftovers(shard_dir: Path) -> set[int]:
    """Shards with temporary or lock files in `shard_dir` (of a dead or of a live writer)."""
    return {int(m.group(1)) for p in Path(shard_dir).iterdir() if (m := _LEFTOVER.fullmatch(p.name))}


# --- opening and reading --------------------------------------------------------------------


class Cache:
    """A cache folder, opened for reading. Cheap to open: shards are read on demand."""

    def __init__(self, root: Path):
        self.root = Path(root)
        settings_path = self.root / SETTINGS_FILE
        if not settings_path.is_file():
            raise CacheError(f"{self.root} is not a ser-cache cache (no {SETTINGS_FILE}): run `ser-cache extract` first")
        meta = self._read_json(SETTINGS_FILE)
        if meta.get("settings", {}).get("format") != CACHE_FORMAT:
            raise CacheError(f"{self.root}: cache format {meta.get('settings', {}).get('format')}, this version reads {CACHE_FORMAT}")
        self.settings = CacheSettings(**meta["settings"])
        self.provenance = meta.get("provenance", {})
        self.plan: list[list[str]] = self._read_json(PLAN_FILE)

    def _read_json(self, name: str):
        try:
            return json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # missing, unreadable, or cut short
            raise CacheError(
                f"{self.root}: {name} cannot be read ({e}); without it the cache can be neither checked "
                "nor extended: extract into a new --out folder"
            ) from e

    def open_shard(self, k: int) -> h5py.File:
        """Shard k opened for reading; CacheError naming it (and the fix) when HDF5 cannot open it."""
        try:
            return h5py.File(self.shard_path(k), "r")
        except OSError as e:
            raise CacheError(
                f"{shard_name(k)} of {self.root} cannot be read ({e}): `ser-cache verify` checks every shard, "
                "and the same `ser-cache extract` command with --repair re-creates the damaged ones"
            ) from e

    # settings, as properties so callers need not know the file layout
    @property
    def layers(self) -> list[int]:
        return list(self.settings.layers)

    @property
    def dim(self) -> int:
        return int(self.settings.dims["n_audio_state"])

    @property
    def corpus(self) -> str:
        return self.settings.corpus

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def records(self) -> list[Utterance]:
        return load_records(self.root / RECORDS_FILE)

    def view_sources(self) -> dict[str, str]:
        """{view id: its source's id} of every augmented view planned (empty without views)."""
        if not self.settings.augment:
            return {}
        return {r.id: r.source for r in self.records() if r.source}

    @property
    def fingerprint(self) -> dict:
        """What identifies this cache's content, for a run's config.json; model_path (where the
        checkpoint was at extraction, None for a model name or an older cache) rides along."""
        s = self.settings.to_dict()
        s["path"] = str(self.root.resolve())
        s["model_path"] = self.provenance.get("model_path")
        s["shard_sha256"] = hashlib.sha256(
            "".join(self.sidecar(k).get("sha256", "") for k in range(len(self.plan))).encode()
        ).hexdigest()
        return s

    def sidecar(self, k: int) -> dict:
        path = self.shard_dir / f"{shard_name(k)}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def shard_path(self, k: int) -> Path:
        return self.shard_dir / f"{shard_name(k)}.h5"

    def shard_problem(self, k: int) -> str:
        """Why shard k is not usable, from cheap checks only (presence and size), or ""."""
        path, info = self.shard_path(k), self.sidecar(k)
        if not path.exists():
            return "missing"
        if not info:
            return "its checksum file is missing or unreadable"
        size = path.stat().st_size
        if size != info.get("bytes"):
            return f"size {size} bytes, {info.get('bytes')} recorded when written (truncated or altered)"
        return ""

    def complete_shards(self) -> list[int]:
        return [k for k in range(len(self.plan)) if not self.shard_problem(k)]

    @property
    def complete(self) -> bool:
        return len(self.complete_shards()) == len(self.plan)

    def check(self) -> None:
        """Cheap checks before training: every planned shard present, with its recorded size,
        and its counts matching the plan. Raises CacheError naming every problem and the fix."""
        problems = []
        for k in range(len(self.plan)):
            why = self.shard_problem(k)
            if why:
                problems.append(f"{shard_name(k)}: {why}")
                continue
            try:
                with h5py.File(self.shard_path(k), "r") as f:
                    n, skipped = len(f["ids"]), len(f["skipped_ids"])
                    missing = [layer_name(s) for s in self.layers if layer_name(s) not in f]
            except (OSError, KeyError) as e:
                problems.append(f"{shard_name(k)}: unreadable ({e})")
                continue
            if n + skipped != len(self.plan[k]):
                problems.append(f"{shard_name(k)}: {n} utterances + {skipped} skipped, plan has {len(self.plan[k])}")
            if missing:
                problems.append(f"{shard_name(k)}: datasets missing: {missing}")
        if problems:
            raise CacheError(
                f"cache {self.root} is incomplete or damaged:\n  " + "\n  ".join(problems[:20])
                + ("\n  ..." if len(problems) > 20 else "")
                + "\nFix: re-run the same `ser-cache extract` command to finish it "
                "(add --repair to re-create damaged shards); `ser-cache verify` checks every byte"
            )

    def read_meta(self) -> dict[str, np.ndarray]:
        """Per-utterance metadata of all complete shards: ids, labels, speakers, groups, n_frames
        (rows stored), speech_frames, encoder_frames, and shard (the shard each utterance is in)."""
        cols = {name: [] for name in (*META_FIELDS, "n_frames", "speech_frames", "encoder_frames")}
        shard = []
        for k in self.complete_shards():
            with self.open_shard(k) as f:
                for name in cols:
                    ds = f[name if name in f or name != "encoder_frames" else "n_frames"]  # older caches: rows
                    # asstr(): h5py hands strings back as UTF-8 bytes, which numpy decodes as ASCII
                    cols[name].append(ds.asstr()[()].astype(str) if h5py.check_string_dtype(ds.dtype) else ds[()])
                shard.append(np.full(len(f["ids"]), k, dtype=np.int32))
        cols["shard"] = shard
        return {n: (np.concatenate(v) if v else np.array([], dtype=str if n in META_FIELDS else np.int32)) for n, v in cols.items()}

    @property
    def row_width(self) -> int:
        """Values per stored row of one state (dim, or 2 * dim for a statistics cache)."""
        return self.settings.row_width(self.dim)

    def read_layer(self, layer: Selection, dtype=None, frame_pool: int | None = None,
                   lazy: bool = False) -> LayerData | StatsLayer:
        """Load one state of every utterance, or several (a tuple, layers.py) stacked side by
        side in each row: one large read per shard and state, straight into one array.

        Each state is read into its own columns of the final array, never into a copy that is
        stacked afterwards, so peak memory is about the size of the states read (frames x
        states x dim x itemsize) plus metadata. dtype: the in-memory dtype (default: as stored).
        frame_pool: encoder frames per row to read (pooling.py), a multiple of the cache's
        (default: as stored), pooled one shard at a time. A statistics cache gives a StatsLayer;
        with lazy, its statistics stay in the shards until indexed (StatisticsRows).
        """
        states = states_of(layer)
        self.require(states)
        self.check()
        meta = self.read_meta()
        names, values = self.targets_of(meta["ids"])
        stored = self.settings.frame_pool
        common = dict(ids=meta["ids"], labels=meta["labels"], speakers=meta["speakers"], groups=meta["groups"],
                      layer=selection(states), target_names=names, target_values=values)
        encoder = np.asarray(meta["encoder_frames"], dtype=np.int64)
        if self.settings.store == "stats":
            check_statistics_pool(stored, frame_pool or stored, f"the cache {self.root}")
            statistics = StatisticsRows(self, states) if lazy else self.read_statistics(states)
            return StatsLayer(statistics, frame_pool=stored, encoder_frames=encoder, **common)
        factor = read_factor(stored, frame_pool or stored, f"the cache {self.root}")
        rows = meta["n_frames"] if factor == 1 else pooled_lengths(meta["n_frames"], factor)
        offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]).astype(np.int64)
        frames = np.empty((int(offsets[-1]), len(states) * self.dim), dtype=dtype or self.settings.dtype)
        if factor == 1:
            self.read_slices(self.complete_shards(), states, frames)
        else:
            self.read_pooled(meta, states, factor, frames)
        pool = stored * factor
        return LayerData(frames=frames, offsets=offsets, frame_pool=pool,
                         encoder_frames=encoder if pool > 1 else None, **common)

    def read_pooled(self, meta: dict, states: list[int], factor: int, out: np.ndarray) -> None:
        """Fill `out` (rows: every utterance's stored rows pooled by `factor`, in cache order)
        one shard at a time: its slices read, then pooled (weighted by the encoder frames each
        stored row stands for), so only one shard's rows are held unpooled."""
        row, shard_of = 0, meta["shard"]
        for k in self.complete_shards():
            mine = np.flatnonzero(shard_of == k)
            local = np.concatenate([[0], np.cumsum(meta["n_frames"][mine], dtype=np.int64)]).astype(np.int64)
            raw = np.empty((int(local[-1]), out.shape[1]), dtype=out.dtype)
            self.read_slices([k], states, raw)
            weights = None
            if self.settings.frame_pool > 1:
                weights = row_weights(meta["n_frames"][mine], meta["encoder_frames"][mine], self.settings.frame_pool)
            pooled, _ = pool_rows(raw, local, factor, weights)
            out[row : row + len(pooled)] = pooled
            row += len(pooled)
        assert row == len(out), f"pooled {row} rows, expected {len(out)}"

    def read_statistics(self, states: list[int]) -> np.ndarray:
        """(n, 2 * len(states) * dim) float64 of a statistics cache: the means of every state
        side by side, then their stds (LayerData.statistics' layout), in cache order."""
        stored = np.empty((sum(self.sidecar(k)["frames"] for k in self.complete_shards()), len(states) * 2 * self.dim),
                          dtype=STATS_DTYPE)
        self.read_slices(self.complete_shards(), states, stored)
        return arrange_statistics(stored, len(states))

    def require(self, states: list[int]) -> None:
        """Raise CacheError naming the states not in this cache, if any."""
        missing = [s for s in states if s not in self.layers]
        if missing:
            what = f"layer {missing[0]} is" if len(missing) == 1 else f"layers {missing} are"
            raise CacheError(f"{what} not in this cache; it holds layers {self.layers}")

    def read_slices(self, shards: list[int], states: list[int], frames: np.ndarray) -> None:
        """Fill `frames` (rows: the stored rows of `shards`, in order; columns: len(states) *
        row_width) with those shards' slices of `states`: one contiguous read per shard and
        state, each straight into its rows and columns (`read_layer`, and streaming.py a few
        shards at a time)."""
        dim, row = self.row_width, 0
        for k in shards:
            with self.open_shard(k) as f:
                n = f[layer_name(states[0])].shape[0]
                for j, state in enumerate(states if n else ()):
                    ds = f[layer_name(state)]
                    # One state: whole rows, the plain contiguous read; several: its columns.
                    where = np.s_[row : row + n] if len(states) == 1 else np.s_[row : row + n, j * dim : (j + 1) * dim]
                    if ds.dtype == frames.dtype:
                        ds.read_direct(frames, dest_sel=where)
                    else:  # converted one shard's state at a time
                        frames[where] = ds[()]
                row += n
        assert row == len(frames), f"read {row} rows of shards {shards}, expected {len(frames)}"

    def targets_of(self, ids: np.ndarray) -> tuple[tuple[str, ...], np.ndarray | None]:
        """(target names, (len(ids), n_targets) float64 values, NaN where a record lacks one)
        of the utterances `ids`, from the records the cache was planned from; ((), None) when
        no record carries targets."""
        records = self.records()
        names = tuple(target_names(records))
        if not names:
            return (), None
        by_id = {r.id: dict(r.targets) for r in records}
        values = np.array([[by_id.get(i, {}).get(t, np.nan) for t in names] for i in ids.tolist()],
                          dtype=np.float64).reshape(len(ids), len(names))
        return names, values

    def skipped(self, shards: list[int] | None = None) -> list[dict]:
        """Every planned utterance that could not be used: [{id, path, reason}].

        shards: only those listed (default: every complete shard)."""
        out = []
        for k in self.complete_shards() if shards is None else shards:
            with self.open_shard(k) as f:
                for i, p, r in zip(*(f[n][()] for n in ("skipped_ids", "skipped_paths", "skipped_reasons"))):
                    out.append({"id": _s(i), "path": _s(p), "reason": _s(r)})
        return out

    def notes(self) -> list[dict]:
        out = []
        for k in self.complete_shards():
            with self.open_shard(k) as f:
                for i, t in zip(f["note_ids"][()], f["note_texts"][()]):
                    out.append({"id": _s(i), "note": _s(t)})
        return out

    def summary(self) -> dict:
        """What `ser-cache inspect --json` prints."""
        done = self.complete_shards()
        infos = [self.sidecar(k) for k in done]
        s = self.settings
        return {
            "path": str(self.root),
            "corpus": s.corpus,
            "model": s.model,
            "model_sha256": s.model_sha256,
            "family": s.family,
            "dims": s.dims,
            "dim": self.dim,
            "mode": s.mode,
            "dtype": s.dtype,
            "store": s.store,
            "frame_pool": s.frame_pool,
            "layers": self.layers,
            "long_audio": s.long_audio,
            "records": sum(map(len, self.plan)) if s.augment else s.n_records,  # views included
            "utterances": sum(i["utterances"] for i in infos),
            "frames": sum(i["frames"] for i in infos),
            "bytes": sum(i["bytes"] for i in infos),
            "shards": len(done),
            "shards_planned": len(self.plan),
            "missing_shards": [k for k in range(len(self.plan)) if k not in set(done)],
            "skipped": self.skipped(),
            "notes": self.notes(),
            "complete": len(done) == len(self.plan),
            "records_hash": s.records_hash,
            "class_counts": class_counts(r for r in self.records() if not r.source),  # of the corpus
            "targets": target_names(self.records()),
            "provenance": self.provenance,
            **({"augment": s.augment, "augment_seed": s.augment_seed, "views": self.stored_views()}
               if s.augment else {}),
        }

    def stored_views(self) -> dict[str, int]:
        """How many views of each transform the complete shards hold ({"speed0.9": n, ...})."""
        stored = set(self.read_meta()["ids"].tolist())
        return {**{name: 0 for name in self.settings.augment},
                **views_per_transform([r for r in self.records() if r.id in stored])}

    def verify(self) -> dict[int, str]:
        """Full check of every planned shard: bytes against the recorded SHA-256, structure and
        counts. Returns {shard: problem} for every damaged or missing shard (empty = all good)."""
        problems = {}
        for k in range(len(self.plan)):
            why = self.shard_damage(k)
            if why:
                problems[k] = why
        return problems

    def shard_damage(self, k: int) -> str:
        """Why shard k is missing or damaged, from a full check of its bytes and structure, or ""."""
        why = self.shard_problem(k)
        if not why and file_sha256(self.shard_path(k)) != self.sidecar(k).get("sha256"):
            why = "SHA-256 differs from the one recorded when written (bytes altered)"
        return why or self._structure_problem(k, self.plan[k])

    def _structure_problem(self, k: int, planned_ids: list[str]) -> str:
        try:
            with h5py.File(self.shard_path(k), "r") as f:
                ids = [_s(i) for i in f["ids"][()]]
                skipped = [_s(i) for i in f["skipped_ids"][()]]
                if sorted(ids + skipped) != sorted(planned_ids):
                    return "its utterance ids differ from the plan"
                offsets, n_frames = f["offsets"][()], f["n_frames"][()]
                if offsets[-1] != n_frames.sum() or np.any(np.diff(offsets) != n_frames):
                    return "offsets and frame counts disagree"
                for s in self.layers:
                    if f[layer_name(s)].shape != (offsets[-1], self.row_width):
                        return f"{layer_name(s)} has shape {f[layer_name(s)].shape}"
        except (OSError, KeyError, ValueError) as e:
            return f"unreadable ({e})"
        return ""


def arrange_statistics(stored: np.ndarray, n_states: int) -> np.ndarray:
    """Rows of a statistics cache, each state's [mean | std] side by side (m, n_states * 2 dim),
    -> (m, 2 * n_states * dim) float64 [every state's mean | every state's std]."""
    m, dim = len(stored), stored.shape[1] // (2 * n_states)
    per_state = stored.reshape(m, n_states, 2, dim)
    return np.concatenate([per_state[:, :, 0].reshape(m, -1), per_state[:, :, 1].reshape(m, -1)], axis=1,
                          dtype=np.float64)


class StatisticsRows:
    """The statistics of a statistics cache's states, read from its shards only when indexed:
    an (n, 2 * n_states * dim) float64 array to `rows[index]` (any order) that is never held
    whole (the linear probe of every state of a large encoder: bigprobe.py). Each index reads
    the shards it touches, one contiguous slab per shard and state."""

    def __init__(self, cache: "Cache", states: list[int]):
        self.cache, self.states = cache, list(states)
        self.shards = cache.complete_shards()
        counts = [cache.sidecar(k)["frames"] for k in self.shards]  # one row per utterance
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), 2 * len(self.states) * cache.dim)
        self.dtype = np.dtype(np.float64)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.shape[1]))
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        for j in np.unique(shard_of):
            where = np.flatnonzero(shard_of == j)
            local = index[where] - self.starts[j]
            lo, hi = int(local.min()), int(local.max()) + 1
            with self.cache.open_shard(self.shards[j]) as f:
                slab = np.concatenate([f[layer_name(s)][lo:hi] for s in self.states], axis=1)
            out[where] = arrange_statistics(slab[local - lo], len(self.states))
        return out


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def open_cache(path) -> Cache:
    """Open a cache folder for reading (see `Cache`)."""
    return Cache(Path(path))

"""The feature cache: every kept encoder state of a corpus, in HDF5 shards.

Layout of a cache folder:

    cache.json              settings that must match for reuse, plus provenance (versions)
    records.jsonl           the utterance records the cache was planned from
    plan.json               which utterance ids go to which shard (fixed before any work)
    shards/shard-00000.h5   one complete shard
    shards/shard-00000.json its SHA-256, size and counts, written before the shard appears

Inside a shard, utterances are stored back to back, one contiguous dataset per layer:

    ids, labels, speakers, groups   (n,) str
    n_frames                        (n,) int32    frames stored per utterance
    speech_frames                   (n,) int32    frames that cover the speech
    offsets                         (n + 1,) int64
    layer_07                        (total_frames, dim) float16 (or float32)
    skipped_ids/_paths/_reasons     (k,) str      planned utterances that could not be used
    note_ids/note_texts             (m,) str      kept utterances with something to know

so one layer of the whole corpus is read with one large read per shard (`read_layer`), and
several layers with one read per shard and layer into their columns of one array.

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

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .errors import UserError
from .features import LayerData
from .files import process_tag, write_json_atomic
from .layers import Selection, selection, states_of
from .records import Utterance, class_counts, load_records, target_names

CACHE_FORMAT = 1
SETTINGS_FILE = "cache.json"
RECORDS_FILE = "records.jsonl"
PLAN_FILE = "plan.json"
SHARD_DIR = "shards"
CREATE_LOCK = "create.lock"  # held while a process creates cache.json, records and plan
DTYPES = ("float16", "float32")
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
    """Split utterance ids into shards of about `shard_bytes` each, in id order.

    bytes_per_second: estimated cache bytes per second of audio (all kept layers), or per
    utterance for the padded mode (pass duration-free estimates through `records`' durations).
    Deterministic: the same records and settings always give the same plan.
    """
    shards: list[list[str]] = [[]]
    size = 0.0
    for r in sorted(records, key=lambda r: r.id):
        cost = max(r.duration, 0.02) * bytes_per_second
        if shards[-1] and size + cost > shard_bytes:
            shards.append([])
            size = 0.0
        shards[-1].append(r.id)
        size += cost
    return shards


# --- writing a shard ------------------------------------------------------------------------


@dataclass
class ShardContent:
    """What one shard holds, in plan order. states[i] maps state index -> (n_frames_i, dim)."""

    records: list[Utterance] = field(default_factory=list)
    states: list[dict[int, np.ndarray]] = field(default_factory=list)
    speech_frames: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (id, text)


def write_shard(folder: Path, k: int, content: ShardContent, layers: list[int], dim: int, dtype: str) -> dict:
    """Write shard k crash-safely (temporary file, fsync, sidecar, rename). Returns the sidecar.

    The caller holds the claim on shard k (`ShardClaims.take`). Raises OSError on write
    failure, after removing the temporary file.
    """
    folder = Path(folder)
    final, sidecar = folder / f"{shard_name(k)}.h5", folder / f"{shard_name(k)}.json"
    tmp = folder / f"{shard_name(k)}.h5.{process_tag()}.tmp"
    n_frames = np.array([len(s[layers[0]]) if s else 0 for s in content.states], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(n_frames, dtype=np.int64)]).astype(np.int64)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["shard"] = k
            f.attrs["format"] = CACHE_FORMAT
            for name, values in zip(META_FIELDS, _columns(content.records)):
                f.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)
            f.create_dataset("n_frames", data=n_frames)
            f.create_dataset("speech_frames", data=np.array(content.speech_frames, dtype=np.int32))
            f.create_dataset("offsets", data=offsets)
            for s in layers:
                ds = f.create_dataset(layer_name(s), shape=(int(offsets[-1]), dim), dtype=dtype)
                for i, states in enumerate(content.states):
                    if n_frames[i]:
                        ds[offsets[i] : offsets[i + 1]] = states[s]
            for name, column in zip(("skipped_ids", "skipped_paths", "skipped_reasons"), _transpose(content.skipped, 3)):
                f.create_dataset(name, data=np.array(column, dtype=object), dtype=STR)
            for name, column in zip(("note_ids", "note_texts"), _transpose(content.notes, 2)):
                f.create_dataset(name, data=np.array(column, dtype=object), dtype=STR)
        _fsync(tmp)
        info = {
            "shard": k,
            "sha256": file_sha256(tmp),
            "bytes": tmp.stat().st_size,
            "utterances": len(content.records),
            "skipped": len(content.skipped),
            "frames": int(offsets[-1]),
        }
        write_json_atomic(sidecar, info)
        os.replace(tmp, final)
        _fsync_dir(folder)
        return info
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


# --- claims: one writer per shard -----------------------------------------------------------
#
# Why flock on a lock file: the kernel drops the lock when its holder ends, however it ends
# (exit, exception, SIGKILL, OOM kill), so a dead job never blocks a shard and no heartbeat,
# pid check or stale-claim timeout is needed, as claim files made with O_CREAT|O_EXCL would
# be. On NFS, Linux emulates flock with byte-range locks, which hold across machines only
# where the server's locking works (NFSv4, or v3 with lockd) and not with `nolock` or
# `local_lock=flock` mounts; there, jobs on several machines must keep to disjoint
# `--shard I/N` parts (which never need a claim to stay apart).


def lock_file(path: Path, wait: bool) -> int | None:
    """Take the exclusive flock on `path` (created if absent): its descriptor, or None when
    `wait` is False and another open file (another process, or another claim) holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheError(
                    f"cannot lock {path} ({e.strerror}): this file system does not support the locks that keep "
                    "jobs sharing a cache apart; put --out on a local disk, or on NFS mounted with locking"
                ) from e
            raise
        except BaseException:
            os.close(fd)
            raise
        # A holder unlinks the file as it lets go (`unlock_file`), so that finished shards
        # leave no lock files; a lock on a file no longer at `path` guards nothing: try again.
        if _still_linked(path, fd):
            return fd
        os.close(fd)


def unlock_file(path: Path, fd: int) -> None:
    """Let go of a lock from `lock_file`: unlink while still holding it, then close."""
    try:
        os.unlink(path)
    except FileNotFoundError:  # removed by hand meanwhile: nothing left to tidy
        pass
    finally:
        os.close(fd)


def lock_held(path: Path) -> bool:
    """True when a live process holds the exclusive lock on `path`. Probes with a shared lock,
    so that two processes probing at once do not take each other for writers."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a holder keeps its file at `path` until it lets go
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            if _still_linked(path, fd):
                return True
        finally:
            os.close(fd)  # also drops the shared lock, if taken


def _still_linked(path: Path, fd: int) -> bool:
    try:
        st, mine = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def held_lock(path: Path):
    """Hold the exclusive lock on `path` for the block, waiting for its holder to let go (for
    short steps that several jobs may run at once: creating a folder, appending to a file)."""
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        unlock_file(path, fd)


@contextmanager
def folder_lock(root: Path):
    """Hold the creation lock of a cache folder (waiting for another creator to finish)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with held_lock(root / CREATE_LOCK):
        yield


class Claims:
    """This process's claims on units of work (shards of a cache, tasks of a sweep), each an
    exclusive flock on its own lock file (`lock_path(key)`): a unit is worked on only by the
    process holding its claim, and a killed holder's claims go with it.

    Claims may be taken by one thread and let go by another, hence the mutex.
    """

    def __init__(self, lock_path):
        self.lock_path = lock_path  # key -> Path of its lock file (its folder must exist)
        self._held: dict = {}  # key -> descriptor of its locked lock file
        self._mutex = threading.Lock()

    def take(self, key) -> bool:
        """Claim `key` without waiting; False when another live process holds it."""
        with self._mutex:
            assert key not in self._held, f"{key} claimed twice by one process"
        fd = lock_file(self.lock_path(key), wait=False)
        if fd is None:
            return False
        with self._mutex:
            self._held[key] = fd
        return True

    def release(self, key) -> None:
        with self._mutex:
            fd = self._held.pop(key, None)
        if fd is not None:
            unlock_file(self.lock_path(key), fd)

    def release_all(self) -> None:
        with self._mutex:
            held = list(self._held)
        for key in held:
            self.release(key)

    def held_elsewhere(self, key) -> bool:
        """True when another live process holds the claim on `key`."""
        with self._mutex:
            if key in self._held:
                return False
        return lock_held(self.lock_path(key))


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

    @property
    def fingerprint(self) -> dict:
        """What identifies this cache's content, for a run's config.json; model_path (where the
        checkpoint was at extraction, None for a model name or an older cache) rides along."""
        s = asdict(self.settings)
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
        """Per-utterance metadata of all complete shards: ids, labels, speakers, groups, n_frames,
        speech_frames, and shard (the shard each utterance is stored in)."""
        cols = {name: [] for name in (*META_FIELDS, "n_frames", "speech_frames")}
        shard = []
        for k in self.complete_shards():
            with self.open_shard(k) as f:
                for name in cols:
                    ds = f[name]
                    # asstr(): h5py hands strings back as UTF-8 bytes, which numpy decodes as ASCII
                    cols[name].append(ds.asstr()[()].astype(str) if h5py.check_string_dtype(ds.dtype) else ds[()])
                shard.append(np.full(len(f["ids"]), k, dtype=np.int32))
        cols["shard"] = shard
        return {n: (np.concatenate(v) if v else np.array([], dtype=str if n in META_FIELDS else np.int32)) for n, v in cols.items()}

    def read_layer(self, layer: Selection, dtype=None) -> LayerData:
        """Load one state of every utterance, or several (a tuple, layers.py) stacked side by
        side in each row: one large read per shard and state, straight into one array.

        Each state is read into its own columns of the final array, never into a copy that is
        stacked afterwards, so peak memory is about the size of the states read (frames x
        states x dim x itemsize) plus metadata. dtype: the in-memory dtype (default: as stored).
        """
        states = states_of(layer)
        self.require(states)
        self.check()
        meta = self.read_meta()
        offsets = np.concatenate([[0], np.cumsum(meta["n_frames"], dtype=np.int64)]).astype(np.int64)
        frames = np.empty((int(offsets[-1]), len(states) * self.dim), dtype=dtype or self.settings.dtype)
        self.read_slices(self.complete_shards(), states, frames)
        names, values = self.targets_of(meta["ids"])
        return LayerData(
            frames=frames, offsets=offsets, ids=meta["ids"], labels=meta["labels"],
            speakers=meta["speakers"], groups=meta["groups"], layer=selection(states),
            target_names=names, target_values=values,
        )

    def require(self, states: list[int]) -> None:
        """Raise CacheError naming the states not in this cache, if any."""
        missing = [s for s in states if s not in self.layers]
        if missing:
            what = f"layer {missing[0]} is" if len(missing) == 1 else f"layers {missing} are"
            raise CacheError(f"{what} not in this cache; it holds layers {self.layers}")

    def read_slices(self, shards: list[int], states: list[int], frames: np.ndarray) -> None:
        """Fill `frames` (rows: the frames of `shards`, in order; columns: len(states) * dim)
        with those shards' slices of `states`: one contiguous read per shard and state, each
        straight into its rows and columns (`read_layer`, and streaming.py a few shards at a time)."""
        dim, row = self.dim, 0
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
        assert row == len(frames), f"read {row} frames of shards {shards}, expected {len(frames)}"

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
            "dims": s.dims,
            "dim": self.dim,
            "mode": s.mode,
            "dtype": s.dtype,
            "layers": self.layers,
            "long_audio": s.long_audio,
            "records": s.n_records,
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
            "class_counts": class_counts(self.records()),
            "targets": target_names(self.records()),
            "provenance": self.provenance,
        }

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
                    if f[layer_name(s)].shape != (offsets[-1], self.dim):
                        return f"{layer_name(s)} has shape {f[layer_name(s)].shape}"
        except (OSError, KeyError, ValueError) as e:
            return f"unreadable ({e})"
        return ""


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def open_cache(path) -> Cache:
    """Open a cache folder for reading (see `Cache`)."""
    return Cache(Path(path))

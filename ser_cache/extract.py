"""Stage 1: run the encoder (Whisper, or any of hf_encoders.FAMILIES) once over a corpus and
fill a cache (see cache.py).

Three things happen at once so the encoder never waits:

    loader threads   read, resample and turn audio into the encoder's input (log-mel, or the
                     normalised waveform), a shard at a time, ahead
    main thread      batches log-mels through the encoder, keeps the asked-for states
    writer thread    lays each shard out once its utterances are read, writes each utterance's
                     states into place as they leave the encoder, and finishes the shard
                     (fsync, checksum, rename) after its last one (cache.ShardFile)

A file that cannot be used is skipped with its reason (recorded in its shard), never dropped
silently. Re-running the same command resumes: shards already complete are not redone.

Any number of jobs may fill one folder at once (a job submitted twice, a restart while the old
job still runs, `--shard I/N` parts): each shard is encoded only by the job holding its claim
(cache.ShardClaims), taken when the shard's turn comes; a shard another live job holds is left
to it, and taken over if that job dies before finishing it.
"""
from __future__ import annotations

import errno
import fnmatch
import importlib.metadata
import platform
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import cache as C
from .audio import AudioError, LONG_AUDIO_POLICIES, SAMPLE_RATE, load_utterance
from .augment import view_transform, with_views
from .encoder import MODES, N_WINDOW_FRAMES, LoadedEncoder, encoder_input, run_encoder
from .errors import OptionError
from .files import write_json_atomic
from .layers import parse_states
from .locks import CREATE_LOCK, folder_lock
from .pooling import check_frame_pool
from .records import Utterance, records_hash, refuse_changed_audio, save_records
from .slurm import resolve_part
from .storage import STORES

DEFAULT_SHARD_BYTES = 256 * 2**20  # 256 MiB: a few large reads per layer
PREFETCH = 16  # the next shard is read once fewer utterances than this are left to encode
WRITER_QUEUE = 2 * PREFETCH  # utterances' states (and shard starts and ends) waiting for the writer
ENDED_AHEAD = 2  # shards encoded whole that may wait for the writer
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class ExtractOptions:
    """Settings of one extraction run (those that change the cache go into CacheSettings)."""

    mode: str = "trim"
    layers: list[int] | None = None  # None = all states
    dtype: str = "float16"
    compute_dtype: str = "float32"  # bfloat16: faster where the CPU has it (AMX, AVX512-BF16), states change
    batch_size: int = 8
    shard: tuple[int, int] = (0, 1)  # (I, N): this job does shards k with k % N == I
    long_audio: str = "refuse"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    strict: bool = False
    repair: bool = False
    workers: int = 2
    progress: bool = True
    frame_pool: int = 1  # encoder frames averaged into each stored row (pooling.py)
    store: str = "frames"  # or "stats": per utterance and state, the mean and std of every value
    augment: list[str] = field(default_factory=list)  # views stored beside each utterance (augment.parse_augment)
    augment_seed: int = 0  # seeds the noise of every view (augment.view_seed)


@dataclass
class ExtractSummary:
    shards_done_before: int = 0
    shards_written: int = 0
    shards_other_jobs: int = 0  # of this job's part: written, or being written, by other jobs meanwhile
    shards_planned: int = 0
    shards_this_job: int = 0
    utterances: int = 0
    audio_seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    repaired: list[int] = field(default_factory=list)


def parse_layers(spec: str, n_states: int) -> list[int]:
    """'all', '6', '0,3,6' or '2-5' -> sorted state indices, each in 0..n_states-1 (the states
    to keep; layers.parse_states)."""
    return parse_states(spec, n_states)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None: the SLURM array task's part, else the whole."""
    return resolve_part(spec, "--shard")


def bytes_per_second(mode: str, dim: int, n_layers: int, dtype: str) -> float:
    """Estimated cache bytes per second of audio, for planning shard sizes."""
    itemsize = np.dtype(dtype).itemsize
    frames = 50.0 if mode != "padded" else N_WINDOW_FRAMES  # padded: 1500 frames whatever the length
    per = frames * dim * n_layers * itemsize
    # padded: cost per utterance, not per second; plan_shards multiplies by duration, so
    # divide by a typical duration instead (3 s) to keep shards near the target.
    return per if mode != "padded" else per / 3.0


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("ser-cache", "torch", "openai-whisper", "transformers", "numpy", "h5py", "soundfile", "soxr"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def prepare_cache(out: Path, records: list[Utterance], corpus: str, enc: LoadedEncoder, opts: ExtractOptions,
                  source: dict | None = None) -> C.Cache:
    """Create the cache folder, or check that the existing one was made with the same settings.
    source: where the corpus came from (corpora.corpus_source), kept as provenance. `records`
    are the corpus's; with opts.augment, their views are planned and recorded beside them."""
    layers = opts.layers if opts.layers is not None else list(range(enc.n_states))
    settings = C.CacheSettings(
        corpus=corpus, model=enc.name, model_sha256=enc.sha256, dims=dict(enc.dims), family=enc.family, mode=opts.mode,
        dtype=opts.dtype, layers=layers, long_audio=opts.long_audio, records_hash=records_hash(records),
        n_records=len(records), shard_bytes=opts.shard_bytes, compute_dtype=opts.compute_dtype,
        frame_pool=opts.frame_pool, store=opts.store,
        augment=list(opts.augment), augment_seed=opts.augment_seed if opts.augment else 0,
    )
    out = Path(out)
    if not (out / C.SETTINGS_FILE).exists():
        # Jobs started together on a new folder: one creates it, the others wait for the lock
        # and then find cache.json, so no job sees another's half-made folder as foreign and
        # no two jobs with different settings interleave their records, plan and settings.
        with folder_lock(out):
            if not (out / C.SETTINGS_FILE).exists():
                planned = with_views(records, settings.augment)
                plan = C.plan_shards(planned, bytes_per_second(opts.mode, enc.dim, len(layers), opts.dtype), opts.shard_bytes)
                create_cache(out, planned, plan, settings, enc.path, source)
    existing = C.open_cache(out)
    diffs = existing.settings.differences(settings)
    if diffs:
        raise C.CacheError(
            f"{out} holds a cache made with other settings, so it cannot be reused or extended:\n  "
            + "\n  ".join(diffs)
            + "\nFix: pass a new --out folder, or the settings the cache was made with"
        )
    refuse_changed_audio(existing.records(), records, out)  # a moved corpus resumes; other audio does not
    return existing


def create_cache(out: Path, records: list[Utterance], plan: list[list[str]], settings: C.CacheSettings,
                 model_path: str | None, source: dict | None = None) -> None:
    """Write a new cache's records, plan and settings (and, as provenance, the checkpoint's path
    and where the corpus came from) into `out`. The caller holds its folder lock."""
    if any(out.iterdir()) and not interrupted_creation(out):
        raise C.CacheError(f"{out} exists, is not empty and is not a cache: pass a new or empty --out folder")
    for p in out.iterdir():  # temporaries of a creator that died: with the lock held, no live one is left
        if p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
    (out / C.SHARD_DIR).mkdir(exist_ok=True)
    # records and plan first, settings last: a folder with cache.json is a whole cache
    save_records(records, out / C.RECORDS_FILE)
    write_json_atomic(out / C.PLAN_FILE, plan)
    # The checkpoint's path is provenance, not a setting: a moved checkpoint with the same bytes
    # must still resume the cache. `predict` tries it before asking for --model.
    provenance = {"versions": package_versions(), "model_path": model_path}
    if source:  # like the checkpoint's path, where the corpus was is no setting: a moved corpus resumes
        provenance["corpus_source"] = source
    write_json_atomic(out / C.SETTINGS_FILE, {"settings": settings.to_dict(), "provenance": provenance})


# What a run killed while creating a cache leaves behind (cache.json is written last).
CREATION_LEFTOVERS = (C.RECORDS_FILE, C.RECORDS_FILE + ".*.tmp", C.PLAN_FILE, C.PLAN_FILE + ".*.tmp", C.SETTINGS_FILE + ".*.tmp",
                      CREATE_LOCK)


def interrupted_creation(out: Path) -> bool:
    """True when `out` holds only the leftovers of a cache creation that never finished."""
    for p in out.iterdir():
        if p.name == C.SHARD_DIR and p.is_dir() and not any(p.iterdir()):
            continue
        if not any(fnmatch.fnmatch(p.name, pattern) for pattern in CREATION_LEFTOVERS):
            return False
    return True


# --- the pipeline ---------------------------------------------------------------------------


@dataclass
class Loaded:
    """One utterance ready for the encoder: its windows' inputs (encoder.encoder_input), or
    the reason it cannot be."""

    record: Utterance
    mels: list[torch.Tensor] = field(default_factory=list)  # each (n_mels, 2 * frames), or (samples,) of a waveform
    frames: list[int] = field(default_factory=list)  # speech frames per window
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    error: str = ""


def load_for_encoder(record: Utterance, enc: LoadedEncoder, mode: str, long_audio: str, augment_seed: int = 0) -> Loaded:
    try:
        windows, notes = load_utterance(record.path, long_audio, view_transform(record, augment_seed))
    except AudioError as e:
        return Loaded(record, error=e.reason)
    inputs = [encoder_input(enc, w, mode) for w in windows]
    # A waveform encoder makes no frame of less than its receptive field (25 ms): such a file
    # is skipped, such a last window of a long one left out, each with its reason.
    too_short = [i for i, (_, f) in enumerate(inputs) if f == 0]
    if too_short:
        need = enc.dims.get("receptive_samples")
        if len(too_short) == len(inputs):
            return Loaded(record, error=f"shorter than the encoder's receptive field ({need} samples)")
        assert too_short == [len(inputs) - 1], f"windows {too_short} of {len(inputs)} too short: only the last may be"
        notes = notes + [f"last {len(windows[-1])} samples not encoded: under the encoder's receptive field ({need} samples)"]
        inputs, windows = inputs[:-1], windows[:-1]
    return Loaded(
        record,
        mels=[x for x, _ in inputs],
        frames=[f for _, f in inputs],
        notes=notes,
        samples=sum(len(w) for w in windows),
    )


def encode_batch(enc: LoadedEncoder, batch: list[tuple[int, int, torch.Tensor, int]], mode: str, layers: list[int],
                 dtype: str, device, compute_dtype: str = "float32") -> list[dict[int, np.ndarray]]:
    """Encode windows [(utt, window, input, frames)] -> per window {state: (kept_frames, dim)}.

    input: what encoder.encoder_input made of the window. padded keeps all 1500 frames, trim
    and short (and every waveform encoder) the speech frames only.
    """
    inputs = [x for _, _, x, _ in batch]
    frames = [f for *_, f in batch]
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
        states = run_encoder(enc, inputs, frames, mode, layers)
    keep = [N_WINDOW_FRAMES if mode == "padded" else f for f in frames]
    stored_dtype = TORCH_DTYPES[dtype]
    limit = torch.finfo(stored_dtype).max
    out: list[dict[int, np.ndarray]] = [{} for _ in keep]
    for s in layers:
        for i, n in enumerate(keep):
            low, high = torch.aminmax(states[s][i, :n])
            if not (-limit <= low and high <= limit):  # NaN fails both
                raise OptionError(f"state {s} overflows {dtype}: pass --dtype float32")
        # One cast per state for the whole batch, in torch, straight to the storage dtype: per
        # utterance casts and numpy's float16 checks cost 5x more on the encoder's thread.
        stored = states[s].to(stored_dtype).cpu().numpy()
        for i, n in enumerate(keep):
            out[i][s] = stored[i, :n]
    return out


class ShardWriter:
    """Writes shards on a background thread while the encoder runs; re-raises its errors on
    the caller.

    begin(k, ...) hands it a claimed shard's plan and the futures of its utterances' reading;
    put(k, id, states) writes one utterance's states, into place once the shard is laid out
    (when all its utterances are read); end(k) finishes the shard. The claim on each shard
    handed to it is let go once the shard is written, has failed, or is given up (after an
    earlier failure, or when the writer closes before the shard's end).
    """

    def __init__(self, folder: Path, layers: list[int], dim: int, settings: C.CacheSettings, claims: C.ShardClaims):
        self.args = (folder, layers, settings.row_width(dim), settings.stored_dtype)
        self.settings = settings
        self.claims = claims
        # Bounded, so the encoder waits for a slow disk rather than memory filling up. States
        # wait here until their shard is laid out, i.e. until all its utterances are read,
        # which the loaders do well ahead of the encoder.
        self.jobs: queue.Queue = queue.Queue(maxsize=WRITER_QUEUE)
        # Waited on instead of Thread.join: a join interrupted by Ctrl-C can leave the thread
        # marked as stopped while it still runs (CPython 3.11), and the shard it writes is lost.
        self.finished = threading.Event()
        # At most ENDED_AHEAD shards encoded whole and not yet written: on Ctrl-C the writer
        # finishes those (no encoded work is lost) and no more, and a job holds few claims on
        # shards that it has encoded but not written.
        self.ended = threading.Semaphore(ENDED_AHEAD)
        self.reading: dict[int, tuple[list[Utterance], dict]] = {}  # begun, not yet laid out
        self.open: dict[int, C.ShardFile] = {}
        self.error: BaseException | None = None
        self.written: list[int] = []
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while (job := self.jobs.get()) is not None:
                kind, k, *args = job
                try:
                    if self.error is None:
                        self._do(kind, k, args)
                    else:  # after a failure, nothing more is written
                        self._give_up(k)
                except OSError as e:  # disk full, I/O error, permissions: say what to do
                    self._failed(k, self._write_error(k, e))
                except BaseException as e:  # handed to the main thread
                    self._failed(k, e)
                finally:
                    if kind == "end":
                        self.ended.release()
            for k in list(self.reading) + list(self.open):  # shards whose end never came: interrupted
                self._give_up(k)
        finally:
            self.finished.set()

    def _do(self, kind: str, k: int, args: list):
        if kind == "begin":
            self.reading[k] = tuple(args)
        elif kind == "put":
            rid, states = args
            # Pooling and statistics here, on the writer's thread, not the encoder's.
            self._shard(k).put(rid, {s: C.stored_rows(a, self.settings) for s, a in states.items()})
        else:
            self._shard(k).finish()
            del self.open[k]
            self.written.append(k)
            self.claims.release(k)

    def _shard(self, k: int) -> C.ShardFile:
        if k not in self.open:  # its first states: lay it out (k stays in self.reading until then)
            planned, reading = self.reading[k]
            folder, layers, dim, dtype = self.args
            layout = shard_layout(planned, {i: f.result() for i, f in reading.items()}, self.settings)
            self.open[k] = C.ShardFile(folder, k, layout, layers, dim, dtype)
            del self.reading[k]
        return self.open[k]

    def _failed(self, k: int, error: BaseException):
        self.error = error
        self._give_up(k)

    def _give_up(self, k: int):
        """Drop shard k (its temporary file, if any) and let go of its claim, once."""
        if k in self.reading or k in self.open:
            self.reading.pop(k, None)
            if k in self.open:
                self.open.pop(k).discard()
            self.claims.release(k)

    def _write_error(self, k: int, e: OSError) -> C.CacheError:
        folder = self.args[0]
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        error = C.CacheError(
            f"cannot write {C.shard_name(k)} in {folder}: {e.strerror or e}. That shard was not kept "
            "and every shard written before it is complete: "
            + ("free some space" if full else "fix what the error names")
            + " and re-run the same command to resume"
        )
        error.__cause__ = e
        return error

    def begin(self, k: int, planned: list[Utterance], reading: dict):
        """Shard k (claimed by this process) will come: its plan, and {id: future of Loaded}."""
        self._send(("begin", k, planned, reading))

    def put(self, k: int, rid: str, states: dict[int, np.ndarray]):
        self._send(("put", k, rid, states))

    def end(self, k: int):
        while not self.ended.acquire(timeout=0.1):
            self.raise_error()
        self._send(("end", k))

    def _send(self, job):
        self.raise_error()
        if not self._queue(job):
            raise RuntimeError("the shard writer stopped")  # only after close(), a bug

    def _queue(self, job) -> bool:
        """Queue `job`, waiting while the queue is full; False if the writer has stopped (its
        thread then never takes another job, and a blocking put would wait forever)."""
        while not self.finished.is_set():
            try:
                self.jobs.put(job, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def raise_error(self):
        if self.error is not None:
            raise self.error

    def close(self):
        """Wait for the shards already ended to be written (also on Ctrl-C: no half-written
        shard); a shard whose end never came is given up."""
        self._queue(None)
        self.finished.wait()
        self.raise_error()


def extract(records: list[Utterance], out: Path, corpus: str, enc: LoadedEncoder, opts: ExtractOptions,
            device: str | torch.device = "cpu", source: dict | None = None) -> ExtractSummary:
    """Fill the cache at `out` with the states of `records` (the part of them this job owns);
    source: where the corpus came from, recorded when the cache is created."""
    if opts.mode not in MODES:
        raise OptionError(f"mode {opts.mode!r}: choose one of {MODES}")
    if enc.waveform and opts.mode != "short":
        raise OptionError(f"{enc.name} ({enc.family}) encodes the speech itself, with no 30 s window: "
                          f"pass --mode short, not {opts.mode}")
    if opts.long_audio not in LONG_AUDIO_POLICIES:
        raise OptionError(f"long-audio policy {opts.long_audio!r}: choose one of {LONG_AUDIO_POLICIES}")
    if opts.dtype not in C.DTYPES:
        raise OptionError(f"dtype {opts.dtype!r}: choose one of {C.DTYPES}")
    if opts.compute_dtype not in C.COMPUTE_DTYPES:
        raise OptionError(f"compute dtype {opts.compute_dtype!r}: choose one of {C.COMPUTE_DTYPES}")
    if opts.store not in STORES:
        raise OptionError(f"--store {opts.store!r}: choose one of {STORES}")
    check_frame_pool(opts.frame_pool)
    start = time.perf_counter()
    cache = prepare_cache(out, records, corpus, enc, opts, source)
    summary = ExtractSummary(shards_planned=len(cache.plan))
    part, n_parts = opts.shard
    mine = [k for k in range(len(cache.plan)) if k % n_parts == part]
    summary.shards_this_job = len(mine)
    claims = C.ShardClaims(cache.shard_dir)
    by_id = {r.id: r for r in with_views(records, cache.settings.augment)}
    written, elsewhere = [], set()
    try:
        if opts.repair:
            summary.repaired = set_damaged_aside(cache, mine, claims)
        tidy_leftovers(cache, mine, claims)
        done = set(cache.complete_shards())
        todo = [k for k in mine if k not in done]
        summary.shards_done_before = len(mine) - len(todo)
        if opts.strict:
            refuse_recorded_skips(cache, [k for k in mine if k in done])
        while todo:
            now_written, held, finished = _extract_pass(cache, by_id, todo, claims, enc, opts, device, summary, start)
            written += now_written
            elsewhere |= held | finished
            # A shard left to a job that has died since (its claim is gone with it) and that
            # it did not finish is this job's again: one more pass over those.
            todo = [k for k in sorted(held) if cache.shard_problem(k) and not claims.held_elsewhere(k)]
    finally:
        claims.release_all()
    summary.shards_written = len(written)
    summary.shards_other_jobs = len(elsewhere - set(written))
    summary.seconds = time.perf_counter() - start
    return summary


def set_damaged_aside(cache: C.Cache, mine: list[int], claims: C.ShardClaims) -> list[int]:
    """--repair: rename this job's damaged shards to .h5.damaged so they are re-created.

    Each is checked and renamed under its claim: a shard another job holds is being
    re-created by it right now, and renaming it would throw that work away.
    """
    repaired = []
    for k in mine:
        if not cache.shard_path(k).exists() or not claims.take(k):
            continue
        try:
            if cache.shard_path(k).exists() and cache.shard_damage(k):
                cache.shard_path(k).rename(cache.shard_path(k).with_suffix(".h5.damaged"))
                repaired.append(k)
        finally:
            claims.release(k)
    return repaired


def tidy_leftovers(cache: C.Cache, mine: list[int], claims: C.ShardClaims) -> None:
    """Remove the temporary and lock files that interrupted runs left for this job's shards.

    Only under each shard's claim: a live job writing that shard holds it, and its
    temporary file is work in progress, not a leftover.
    """
    for k in sorted(C.shards_with_leftovers(cache.shard_dir) & set(mine)):
        if claims.take(k):
            C.remove_temporaries(cache.shard_dir, k)
            claims.release(k)  # which also removes the lock file


def claim_shard(cache: C.Cache, claims: C.ShardClaims, k: int) -> str:
    """Try to claim shard k for writing: "mine", "held" (by another live job) or "finished"
    (completed by another job since this pass began)."""
    if not claims.take(k):
        return "held"
    if not cache.shard_problem(k):
        claims.release(k)
        return "finished"
    C.remove_temporaries(cache.shard_dir, k)  # the claim is ours: no live writer of k is left
    return "mine"


def _extract_pass(cache: C.Cache, by_id: dict[str, Utterance], todo: list[int], claims: C.ShardClaims,
                  enc: LoadedEncoder, opts: ExtractOptions, device, summary: ExtractSummary, start: float):
    """Encode and write every shard of `todo` that this process can claim.

    Returns (written, held, finished): the shards written here, those another live job held
    when their turn came, and those another job completed meanwhile.
    """
    layers = cache.layers
    shard_utts = {k: [by_id[i] for i in cache.plan[k]] for k in todo}
    held, finished = set(), set()
    bar = tqdm(total=sum(map(len, shard_utts.values())), unit="utt", disable=not opts.progress,
               desc=f"extract {opts.mode}", dynamic_ncols=True)
    writer = ShardWriter(cache.shard_dir, layers, enc.dim, cache.settings, claims)

    def claimed_shards(pool):
        # Claimed when their turn comes, not all at the start: jobs started together then
        # spread over the plan, each taking the next free shard. read_ahead claims the next
        # shard, and starts reading all of it, once fewer than PREFETCH utterances of the
        # current one are left to encode: the writer can lay a shard out as soon as it is read.
        for k in todo:
            outcome = claim_shard(cache, claims, k)
            if outcome != "mine":
                (held if outcome == "held" else finished).add(k)
                bar.total -= len(shard_utts[k])
                continue
            # Within a shard, encode in order of length so batches of the short mode carry little padding.
            order = sorted(shard_utts[k], key=lambda r: (r.duration, r.id))
            reading = {r.id: pool.submit(load_for_encoder, r, enc, opts.mode, opts.long_audio,
                                         cache.settings.augment_seed) for r in order}
            writer.begin(k, shard_utts[k], reading)
            yield k, [reading[r.id] for r in order]

    pool = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="audio")
    try:
        try:
            _run_shards(read_ahead(claimed_shards(pool), PREFETCH), shard_utts, enc, opts, layers, device, writer,
                        summary, bar, start)
        finally:
            # On Ctrl-C or an error, up to two shards of reading are pending: dropped, not waited for.
            pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    except BaseException:
        # Ctrl-C or an error: let the writer finish the shards already ended (they are
        # complete), then stop. Its own error, if any, matters less than the one being raised.
        bar.close()
        try:
            writer.close()
        except Exception:
            pass
        raise
    bar.close()
    return writer.written, held, finished


def read_ahead(shards, ahead: int):
    """(k, Loaded) in encoding order, from (k, [future of Loaded, ...]) per claimed shard; the
    next shard is pulled once fewer than `ahead` utterances are left."""
    pending = deque()
    for k, futures in shards:
        pending.extend((k, f) for f in futures)
        while len(pending) >= ahead:
            k0, f = pending.popleft()
            yield k0, f.result()
    while pending:
        k0, f = pending.popleft()
        yield k0, f.result()


def refuse_recorded_skips(cache: C.Cache, shards: list[int]) -> None:
    """--strict on a cache whose complete shards already list skipped utterances (from a run
    without --strict): fail now, since those shards will not be encoded again."""
    skipped = cache.skipped(shards)
    if skipped:
        listed = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        raise C.CacheError(
            f"--strict: {len(skipped)} utterances were skipped by an earlier run into {cache.root} ({listed}). "
            "Fix those files and extract into a new --out folder, or run without --strict"
        )


def _run_shards(loaded_iter, shard_utts, enc, opts, layers, device, writer, summary, bar, start):
    """Main loop: gather read utterances into batches, encode, hand each utterance's states to
    the writer, and end each shard after its last utterance."""
    remaining = {k: len(utts) for k, utts in shard_utts.items()}  # utterances not yet encoded
    windows: dict[str, list] = {}  # per-window states of the utterances being encoded
    batch: list[tuple[int, int, torch.Tensor, int]] = []
    owners: list[tuple[int, Loaded]] = []

    def flush():
        if not batch:
            return
        outs = encode_batch(enc, batch, opts.mode, layers, opts.dtype, device, opts.compute_dtype)
        for (k, loaded), (_, w, _, _), states in zip(owners, batch, outs):
            parts = windows[loaded.record.id]
            parts[w] = states
            if all(p is not None for p in parts):
                del windows[loaded.record.id]
                writer.put(k, loaded.record.id, join_windows(parts))
                finish(k, loaded)
        batch.clear()
        owners.clear()

    def finish(k, loaded):
        loaded.mels = []  # encoded: the writer keeps the Loaded for the layout, not its log-mels
        remaining[k] -= 1
        summary.utterances += 0 if loaded.error else 1
        summary.audio_seconds += loaded.samples / SAMPLE_RATE
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(audio_s_per_s=f"{summary.audio_seconds / elapsed:.1f}", skipped=len(summary.skipped), refresh=False)
        if remaining[k] == 0:
            writer.end(k)

    for k, loaded in loaded_iter:
        if batch and batch[-1][0] != k:
            # Batches never straddle two shards: the short mode's padding depends on the batch,
            # so a shard re-done after a crash or by --repair must see the same batches.
            flush()
        rid = loaded.record.id
        if loaded.error:
            summary.skipped.append({"id": rid, "path": loaded.record.path, "reason": loaded.error})
            if opts.strict:
                raise AudioError(f"{loaded.record.path}: {loaded.error} (--strict stops at the first bad file)")
            finish(k, loaded)
            continue
        windows[rid] = [None] * len(loaded.mels)
        summary.notes.extend({"id": rid, "note": n} for n in loaded.notes)
        for w, (mel, f) in enumerate(zip(loaded.mels, loaded.frames)):
            batch.append((k, w, mel, f))
            owners.append((k, loaded))
            if len(batch) >= opts.batch_size:
                flush()
    flush()


def join_windows(parts: list[dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """One utterance's states from those of its windows, joined along time."""
    return {s: np.concatenate([p[s] for p in parts]) if len(parts) > 1 else parts[0][s] for s in parts[0]}


def shard_layout(planned: list[Utterance], loaded: dict[str, Loaded], settings: C.CacheSettings) -> C.ShardLayout:
    """A shard's layout in plan order, from its utterances as read (before they are encoded):
    the encoder frames of each, and the rows the cache stores of them (C.stored_count)."""
    mode = settings.mode
    layout = C.ShardLayout()
    for r in planned:
        one = loaded[r.id]
        if one.error:
            layout.skipped.append((r.id, r.path, one.error))
            continue
        layout.records.append(r)
        encoded = sum(N_WINDOW_FRAMES if mode == "padded" else f for f in one.frames)
        layout.encoder_frames.append(encoded)
        layout.n_frames.append(C.stored_count(encoded, settings))
        layout.speech_frames.append(sum(one.frames))
        layout.notes.extend((r.id, n) for n in one.notes)
    return layout


def summary_text(summary: ExtractSummary) -> str:
    others = f", {summary.shards_other_jobs} taken by other jobs meanwhile" if summary.shards_other_jobs else ""
    lines = [
        f"shards: {summary.shards_written} written now, {summary.shards_done_before} already complete{others}, "
        f"{summary.shards_this_job} for this job, {summary.shards_planned} planned in all",
        f"utterances encoded: {summary.utterances} ({summary.audio_seconds:.1f} s of audio) in {summary.seconds:.1f} s",
    ]
    if summary.repaired:
        lines.append(f"damaged shards re-created: {summary.repaired}")
    if summary.skipped:
        lines.append(f"skipped: {len(summary.skipped)} utterances (recorded in the cache; `ser-cache inspect` lists them)")
        lines += [f"  {s['id']}: {s['reason']}  [{s['path']}]" for s in summary.skipped[:20]]
        if len(summary.skipped) > 20:
            lines.append(f"  ... and {len(summary.skipped) - 20} more")
    if summary.notes:
        lines.append(f"notes: {len(summary.notes)}")
        lines += [f"  {n['id']}: {n['note']}" for n in summary.notes[:10]]
    return "\n".join(lines)


# --- the last word: what the cache holds as this job ends -------------------------------------


def final_state(cache: C.Cache, shard: tuple[int, int]) -> tuple[str, bool]:
    """The state of the whole cache as this job ends, in words, and whether this job's own
    part is done: each of its shards complete, or held by another live job (which reports on
    it in turn). A `--shard I/N` job's part is its own shards; the other parts' missing shards
    are named, but are theirs to write and do not fail this job."""
    part, n_parts = shard
    probe = C.ShardClaims(cache.shard_dir)
    states = {k: shard_state(cache, probe, k) for k in range(len(cache.plan))}
    complete = sum(v == "complete" for v in states.values())
    writing = sum(v == "writing" for v in states.values())
    missing_mine = sum(v == "missing" and k % n_parts == part for k, v in states.items())
    missing_others = sum(v == "missing" and k % n_parts != part for k, v in states.items())
    if complete == len(states):
        return "complete", True
    words = [f"{complete} of {len(states)} shards complete"]
    if writing:
        words.append(f"{_shards(writing)} still being written by other jobs")
    if missing_mine:
        words.append(f"{_shards(missing_mine)} missing (re-run to finish)")
    if missing_others:
        words.append(f"{_shards(missing_others)} of other --shard parts missing "
                     "(run those jobs, or this command without --shard, to finish)")
    return "; ".join(words), missing_mine == 0


def shard_state(cache: C.Cache, probe: C.ShardClaims, k: int) -> str:
    """"complete", "writing" (another live job holds its claim) or "missing"."""
    if not cache.shard_problem(k):
        return "complete"
    held = probe.held_elsewhere(k)
    if not cache.shard_problem(k):  # its writer finished while we looked
        return "complete"
    return "writing" if held else "missing"


def _shards(n: int) -> str:
    return f"{n} shard" + ("" if n == 1 else "s")

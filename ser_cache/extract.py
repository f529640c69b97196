"""Stage 1: run the Whisper encoder once over a corpus and fill a cache (see cache.py).

Three things happen at once so the encoder never waits:

    loader threads   read, resample and turn audio into log-mel, a few utterances ahead
    main thread      batches log-mels through the encoder, keeps the asked-for states
    writer thread    writes each finished shard to disk (temporary file, fsync, rename)

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
import json
import platform
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import cache as C
from .audio import AudioError, LONG_AUDIO_POLICIES, SAMPLE_RATE, load_utterance
from .encoder import MODES, N_WINDOW_FRAMES, LoadedEncoder, encode, log_mel, speech_frames
from .errors import OptionError
from .files import write_json_atomic
from .layers import parse_states
from .records import Utterance, records_hash, save_records
from .slurm import resolve_part

DEFAULT_SHARD_BYTES = 256 * 2**20  # 256 MiB: a few large reads per layer, bounded writer memory
PREFETCH = 16  # utterances decoded ahead of the encoder
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
    for pkg in ("ser-cache", "torch", "openai-whisper", "numpy", "h5py", "soundfile", "soxr"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def prepare_cache(out: Path, records: list[Utterance], corpus: str, enc: LoadedEncoder, opts: ExtractOptions) -> C.Cache:
    """Create the cache folder, or check that the existing one was made with the same settings."""
    layers = opts.layers if opts.layers is not None else list(range(enc.n_states))
    settings = C.CacheSettings(
        corpus=corpus, model=enc.name, model_sha256=enc.sha256, dims=dict(enc.dims), mode=opts.mode,
        dtype=opts.dtype, layers=layers, long_audio=opts.long_audio, records_hash=records_hash(records),
        n_records=len(records), shard_bytes=opts.shard_bytes, compute_dtype=opts.compute_dtype,
    )
    out = Path(out)
    if not (out / C.SETTINGS_FILE).exists():
        # Jobs started together on a new folder: one creates it, the others wait for the lock
        # and then find cache.json, so no job sees another's half-made folder as foreign and
        # no two jobs with different settings interleave their records, plan and settings.
        with C.folder_lock(out):
            if not (out / C.SETTINGS_FILE).exists():
                plan = C.plan_shards(records, bytes_per_second(opts.mode, enc.dim, len(layers), opts.dtype), opts.shard_bytes)
                create_cache(out, records, plan, settings, enc.path)
    existing = C.open_cache(out)
    diffs = existing.settings.differences(settings)
    if diffs:
        raise C.CacheError(
            f"{out} holds a cache made with other settings, so it cannot be reused or extended:\n  "
            + "\n  ".join(diffs)
            + "\nFix: pass a new --out folder, or the settings the cache was made with"
        )
    return existing


def create_cache(out: Path, records: list[Utterance], plan: list[list[str]], settings: C.CacheSettings,
                 model_path: str | None) -> None:
    """Write a new cache's records, plan and settings (and the checkpoint's path, as provenance)
    into `out`. The caller holds its folder lock."""
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
    write_json_atomic(out / C.SETTINGS_FILE, {"settings": asdict(settings), "provenance": provenance})


# What a run killed while creating a cache leaves behind (cache.json is written last).
CREATION_LEFTOVERS = (C.RECORDS_FILE, C.RECORDS_FILE + ".*.tmp", C.PLAN_FILE, C.PLAN_FILE + ".*.tmp", C.SETTINGS_FILE + ".*.tmp",
                      C.CREATE_LOCK)


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
    """One utterance ready for the encoder: its windows' log-mels, or the reason it cannot be."""

    record: Utterance
    mels: list[torch.Tensor] = field(default_factory=list)  # each (n_mels, 2 * frames)
    frames: list[int] = field(default_factory=list)  # speech frames per window
    notes: list[str] = field(default_factory=list)
    samples: int = 0
    error: str = ""


def load_for_encoder(record: Utterance, n_mels: int, mode: str, long_audio: str) -> Loaded:
    try:
        windows, notes = load_utterance(record.path, long_audio)
    except AudioError as e:
        return Loaded(record, error=e.reason)
    return Loaded(
        record,
        mels=[log_mel(w, n_mels, mode) for w in windows],
        frames=[speech_frames(len(w)) for w in windows],
        notes=notes,
        samples=sum(len(w) for w in windows),
    )


def prefetch(pool: ThreadPoolExecutor, fn, items, ahead: int):
    """Like pool.map(fn, items) in order, but with at most `ahead` items in flight."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def encode_batch(enc: LoadedEncoder, batch: list[tuple[int, int, torch.Tensor, int]], mode: str, layers: list[int],
                 dtype: str, device, compute_dtype: str = "float32") -> list[dict[int, np.ndarray]]:
    """Encode windows [(utt, window, mel, frames)] -> per window {state: (kept_frames, dim)}.

    padded keeps all 1500 frames, trim and short the speech frames only.
    """
    mels = [m for _, _, m, _ in batch]
    frames = torch.tensor([f for *_, f in batch])
    device = torch.device(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
        if mode == "short":
            width = max(m.shape[-1] for m in mels)
            x = torch.zeros(len(mels), mels[0].shape[0], width)
            for i, m in enumerate(mels):
                x[i, :, : m.shape[-1]] = m
            states = encode(enc.encoder, x.to(device), frames.to(device), layers)
        else:
            states = encode(enc.encoder, torch.stack(mels).to(device), None, layers)
    out = []
    for i, f in enumerate(frames.tolist()):
        keep = N_WINDOW_FRAMES if mode == "padded" else f
        win = {}
        for s in layers:
            # One cast, in torch, straight to the storage dtype (float32 -> numpy -> float16
            # was a second pass over every state on the encoder's thread).
            a = states[s][i, :keep].to(TORCH_DTYPES[dtype]).cpu().numpy()
            if not np.isfinite(a).all():
                raise OptionError(f"state {s} overflows {dtype}: pass --dtype float32")
            win[s] = a
        out.append(win)
    return out


class ShardWriter:
    """Writes shards on a background thread, one at a time; re-raises its errors on the caller.

    Each shard handed to it is claimed by this process; the claim is let go once the shard is
    written, has failed, or is dropped after an earlier failure.
    """

    def __init__(self, folder: Path, layers: list[int], dim: int, dtype: str, claims: C.ShardClaims):
        self.args = (folder, layers, dim, dtype)
        self.claims = claims
        self.jobs: queue.Queue = queue.Queue(maxsize=1)  # at most one shard waits: bounded memory
        self.error: BaseException | None = None
        self.written: list[int] = []
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            k, content = job
            try:
                if self.error is None:
                    self._write(k, content)
            finally:
                self.claims.release(k)

    def _write(self, k: int, content: C.ShardContent):
        folder, layers, dim, dtype = self.args
        try:
            C.write_shard(folder, k, content, layers, dim, dtype)
            self.written.append(k)
        except OSError as e:  # disk full, I/O error, permissions: say what to do
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            self.error = C.CacheError(
                f"cannot write {C.shard_name(k)} in {folder}: {e.strerror or e}. That shard was not kept "
                "and every shard written before it is complete: "
                + ("free some space" if full else "fix what the error names")
                + " and re-run the same command to resume"
            )
            self.error.__cause__ = e
        except BaseException as e:  # handed to the main thread
            self.error = e

    def submit(self, k: int, content: C.ShardContent):
        self.raise_error()
        self.jobs.put((k, content))

    def raise_error(self):
        if self.error is not None:
            raise self.error

    def close(self):
        """Wait for the queued shards to be written (also on Ctrl-C: no half-written shard)."""
        self.jobs.put(None)
        self.thread.join()
        self.raise_error()


def extract(records: list[Utterance], out: Path, corpus: str, enc: LoadedEncoder, opts: ExtractOptions,
            device: str | torch.device = "cpu") -> ExtractSummary:
    """Fill the cache at `out` with the states of `records` (the part of them this job owns)."""
    if opts.mode not in MODES:
        raise OptionError(f"mode {opts.mode!r}: choose one of {MODES}")
    if opts.long_audio not in LONG_AUDIO_POLICIES:
        raise OptionError(f"long-audio policy {opts.long_audio!r}: choose one of {LONG_AUDIO_POLICIES}")
    if opts.dtype not in C.DTYPES:
        raise OptionError(f"dtype {opts.dtype!r}: choose one of {C.DTYPES}")
    if opts.compute_dtype not in C.COMPUTE_DTYPES:
        raise OptionError(f"compute dtype {opts.compute_dtype!r}: choose one of {C.COMPUTE_DTYPES}")
    start = time.perf_counter()
    cache = prepare_cache(out, records, corpus, enc, opts)
    summary = ExtractSummary(shards_planned=len(cache.plan))
    part, n_parts = opts.shard
    mine = [k for k in range(len(cache.plan)) if k % n_parts == part]
    summary.shards_this_job = len(mine)
    claims = C.ShardClaims(cache.shard_dir)
    by_id = {r.id: r for r in records}
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
    n_mels = enc.dims["n_mels"]
    bar = tqdm(total=sum(map(len, shard_utts.values())), unit="utt", disable=not opts.progress,
               desc=f"extract {opts.mode}", dynamic_ncols=True)

    def claimed_utterances():
        # Claimed when their turn comes, not all at the start: jobs started together then
        # spread over the plan, each taking the next free shard. The prefetch pulls this up to
        # PREFETCH utterances ahead of the encoder, so a job holds about one shard beyond the
        # one it encodes, or up to PREFETCH claims when shards hold one utterance each.
        for k in todo:
            outcome = claim_shard(cache, claims, k)
            if outcome != "mine":
                (held if outcome == "held" else finished).add(k)
                bar.total -= len(shard_utts[k])
                continue
            # Within a shard, encode in order of length so batches of the short mode carry little padding.
            yield from ((k, r) for r in sorted(shard_utts[k], key=lambda r: (r.duration, r.id)))

    writer = ShardWriter(cache.shard_dir, layers, enc.dim, opts.dtype, claims)
    try:
        with ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="audio") as pool:
            loaded_iter = prefetch(pool, lambda kr: (kr[0], load_for_encoder(kr[1], n_mels, opts.mode, opts.long_audio)),
                                   claimed_utterances(), PREFETCH)
            _run_shards(loaded_iter, shard_utts, todo, enc, opts, layers, device, writer, summary, bar, start)
        writer.close()
    except BaseException:
        # Ctrl-C or an error: let the writer finish the shards already handed to it (they are
        # complete), then stop. Its own error, if any, matters less than the one being raised.
        bar.close()
        try:
            writer.close()
        except Exception:
            pass
        raise
    bar.close()
    return writer.written, held, finished


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


def _run_shards(loaded_iter, shard_utts, todo, enc, opts, layers, device, writer, summary, bar, start):
    """Main loop: gather loaded utterances into batches, encode, assemble and submit shards."""
    results: dict[int, dict[str, tuple[Loaded, list]]] = {k: {} for k in todo}
    remaining = {k: len(shard_utts[k]) for k in todo}
    batch: list[tuple[int, int, torch.Tensor, int]] = []
    owners: list[tuple[int, Loaded]] = []

    def flush():
        if not batch:
            return
        outs = encode_batch(enc, batch, opts.mode, layers, opts.dtype, device, opts.compute_dtype)
        for (k, loaded), (_, w, _, _), states in zip(owners, batch, outs):
            results[k][loaded.record.id][1][w] = states
            if all(s is not None for s in results[k][loaded.record.id][1]):
                finish(k, loaded)
        batch.clear()
        owners.clear()

    def finish(k, loaded):
        remaining[k] -= 1
        summary.utterances += 0 if loaded.error else 1
        summary.audio_seconds += loaded.samples / SAMPLE_RATE
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(audio_s_per_s=f"{summary.audio_seconds / elapsed:.1f}", skipped=len(summary.skipped), refresh=False)
        if remaining[k] == 0:
            writer.submit(k, assemble(shard_utts[k], results.pop(k), opts.mode))

    for k, loaded in loaded_iter:
        if batch and batch[-1][0] != k:
            # Batches never straddle two shards: the short mode's padding depends on the batch,
            # so a shard re-done after a crash or by --repair must see the same batches.
            flush()
        rid = loaded.record.id
        results[k][rid] = (loaded, [None] * len(loaded.mels))
        if loaded.error:
            summary.skipped.append({"id": rid, "path": loaded.record.path, "reason": loaded.error})
            if opts.strict:
                raise AudioError(f"{loaded.record.path}: {loaded.error} (--strict stops at the first bad file)")
            finish(k, loaded)
            continue
        summary.notes.extend({"id": rid, "note": n} for n in loaded.notes)
        for w, (mel, f) in enumerate(zip(loaded.mels, loaded.frames)):
            batch.append((k, w, mel, f))
            owners.append((k, loaded))
            if len(batch) >= opts.batch_size:
                flush()
    flush()


def assemble(planned: list[Utterance], results: dict[str, tuple[Loaded, list]], mode: str) -> C.ShardContent:
    """A shard's content in plan order; windows of one utterance joined along time."""
    content = C.ShardContent()
    for r in planned:
        loaded, windows = results[r.id]
        if loaded.error:
            content.skipped.append((r.id, r.path, loaded.error))
            continue
        states = {s: np.concatenate([w[s] for w in windows]) if len(windows) > 1 else windows[0][s] for s in windows[0]}
        content.records.append(r)
        content.states.append(states)
        content.speech_frames.append(sum(loaded.frames))
        content.notes.extend((r.id, n) for n in loaded.notes)
    return content


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


def to_json(summary: ExtractSummary) -> str:
    return json.dumps(asdict(summary), indent=1)


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

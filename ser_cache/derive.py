"""A smaller cache from a frames cache, without running the encoder again.

    frames cache (frame_pool K0)  --derive --frame-pool K-->  frames pooled by K (a multiple of K0)
                                  --derive --stats------->    per utterance mean and std of every
                                                              value (over frames pooled by K, if given)

The new cache keeps the source's records, plan (so shard k of one is shard k of the other),
skipped utterances and notes; its settings are the source's with `frame_pool` and `store`
changed, and its provenance names the source (`derived_from`: folder and fingerprint of its
shards). Rows are made by the same functions as `extract --frame-pool/--store` (cache.py,
pooling.py), so an extracted and a derived cache of the same settings hold the same numbers.

Crash safety and resume as for `extract`: each shard is written under its claim, to a
temporary name, then renamed; re-running the same command finishes what is missing.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import cache as C
from .errors import OptionError
from .features import utterance_statistics
from .files import write_json_atomic
from .locks import CREATE_LOCK, folder_lock
from .pooling import check_frame_pool, pool_rows, read_factor, row_weights
from .records import save_records

log = logging.getLogger(__name__)


def derived_settings(source: C.CacheSettings, frame_pool: int | None, stats: bool) -> C.CacheSettings:
    """The settings of a cache derived from `source`, or OptionError naming the fix."""
    if source.store == "stats":
        raise OptionError("the source is a statistics cache, which holds no frames to derive from: "
                          "derive from the frames cache it was made from")
    pool = source.frame_pool if frame_pool is None else check_frame_pool(frame_pool)
    factor = read_factor(source.frame_pool, pool, "the source cache")
    if factor == 1 and not stats:
        raise OptionError(f"nothing to derive: the source already holds frames pooled by {source.frame_pool}; "
                          f"give --frame-pool with a larger multiple of {source.frame_pool}, or --stats")
    return replace(source, frame_pool=pool, store="stats" if stats else "frames")


def derived_rows(rows: np.ndarray, encoder_frames: int, source: C.CacheSettings,
                 target: C.CacheSettings) -> np.ndarray:
    """One utterance's stored rows of one state in `source` -> its rows in `target`."""
    factor = target.frame_pool // source.frame_pool
    weights = None
    if source.frame_pool > 1:
        weights = row_weights(np.array([len(rows)]), np.array([encoder_frames]), source.frame_pool)
    pooled, _ = pool_rows(rows, np.array([0, len(rows)]), factor, weights)
    if target.store == "stats":
        return utterance_statistics(pooled).astype(C.STATS_DTYPE)[None, :]
    return pooled


def derive(source_path: Path, out: Path, frame_pool: int | None = None, stats: bool = False,
           progress: bool = True) -> tuple[C.Cache, int]:
    """Write (or finish) the cache at `out` derived from the complete cache at `source_path`.
    Returns (the new cache, shards written by this call)."""
    source = C.open_cache(source_path)
    settings = derived_settings(source.settings, frame_pool, stats)
    source.check()
    new = _prepare(source, Path(out), settings)
    claims = C.ShardClaims(new.shard_dir)
    records = {r.id: r for r in source.records()}
    written = 0
    try:
        for k in tqdm(range(len(source.plan)), unit="shard", desc="derive", disable=not progress):
            if not new.shard_problem(k) or not claims.take(k):
                continue  # complete, or another job writes it
            try:
                if new.shard_problem(k):
                    C.remove_temporaries(new.shard_dir, k)
                    _derive_shard(source, new, k, records)
                    written += 1
            finally:
                claims.release(k)
    finally:
        claims.release_all()
    return new, written


def _prepare(source: C.Cache, out: Path, settings: C.CacheSettings) -> C.Cache:
    """The new cache's folder: created with the source's records and plan, or reopened when it
    holds a cache derived with the same settings from the same source."""
    identity = {"path": str(source.root.resolve()), "shard_sha256": source.fingerprint["shard_sha256"]}
    with folder_lock(out):
        if not (out / C.SETTINGS_FILE).exists():
            if any(p.name != CREATE_LOCK for p in out.iterdir()):
                raise C.CacheError(f"{out} exists, is not empty and is not a cache: pass a new or empty --out folder")
            (out / C.SHARD_DIR).mkdir(exist_ok=True)
            save_records(source.records(), out / C.RECORDS_FILE)
            write_json_atomic(out / C.PLAN_FILE, source.plan)
            provenance = {**source.provenance, "derived_from": identity}
            write_json_atomic(out / C.SETTINGS_FILE, {"settings": settings.to_dict(), "provenance": provenance})
    new = C.open_cache(out)
    diffs = new.settings.differences(settings)
    theirs = new.provenance.get("derived_from", {}).get("shard_sha256")
    if theirs != identity["shard_sha256"]:
        diffs.append("derived from another source cache (or made by extract)")
    if diffs:
        raise C.CacheError(f"{out} holds a cache made otherwise, so it cannot be finished by this command:\n  "
                           + "\n  ".join(diffs) + "\nFix: pass a new --out folder")
    return new


def _derive_shard(source: C.Cache, new: C.Cache, k: int, records: dict) -> None:
    """Read shard k of the source and write it, transformed, as shard k of `new`."""
    with source.open_shard(k) as f:
        ids = [C._s(i) for i in f["ids"][()]]
        n_rows, speech = f["n_frames"][()], f["speech_frames"][()]
        encoder = f["encoder_frames"][()] if "encoder_frames" in f else n_rows
        offsets = f["offsets"][()]
        layers = {s: f[C.layer_name(s)][()] for s in source.layers}
        skipped = list(zip(*(map(C._s, f[n][()]) for n in ("skipped_ids", "skipped_paths", "skipped_reasons"))))
        notes = list(zip(*(map(C._s, f[n][()]) for n in ("note_ids", "note_texts"))))
    layout = C.ShardLayout(records=[records[i] for i in ids], speech_frames=[int(x) for x in speech],
                           encoder_frames=[int(x) for x in encoder], skipped=skipped, notes=notes,
                           # ceil(ceil(e / K0) / f) = ceil(e / (K0 f)): the rows extract would store
                           n_frames=[C.stored_count(int(e), new.settings) for e in encoder])
    shard = C.ShardFile(new.shard_dir, k, layout, new.layers, new.row_width, new.settings.stored_dtype)
    for i, rid in enumerate(ids):
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        shard.put(rid, {s: derived_rows(a[rows], int(encoder[i]), source.settings, new.settings)
                        for s, a in layers.items()})
    shard.finish()

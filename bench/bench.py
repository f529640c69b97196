#!/usr/bin/env python3
"""`make bench`: both stages against their limits, measured side by side in one run.

The machine is shared and noisy, so every target is a ratio of two things timed in this
same run, never an absolute time:

  1. extraction overhead   full `extract` pipeline / bare encoder forward    target <= 1.10
  2. input modes           padded time / short time, per utterance           target >= 7
  3. arithmetic limit      encoder FLOPs / measured matmul rate / encoder time, float32 and bfloat16
  4. cache footprint       reference layout bytes / our bytes (trim)          target >= 12
  5. layer read            our MB/s / numpy.fromfile MB/s                      target >= 0.5
                           peak memory / layer size                            target <= 1.5
  6. training              per epoch as a sweep worker trains (1 thread), front-layer FLOP/s as
                           a share of the measured matmul rate          target >= 0.5
                           the full 30-epoch layer sweep                 target <= 20 min
                           that sweep if every cell re-ran Whisper / the sweep   target >= 20
  7. stacked ensembles     3 and 6 qkv and attentive members, s per training epoch stacked
                           (ensembles.py) and one after another, 1 thread, min of repeats
  8. streaming             streamed / in-memory training time per epoch, a layer
                           4x its memory budget (synthetic cache)        target <= 2
  9-11. frames are the cost (bench/frames.py): statistics cache bytes and probe-sweep speed,
                           the full sweep at frame_pool K beside K = 1, and large-v3's shape
 12. encoders (bench/encoders.py): extract through transformers' Whisper / through openai-whisper,
                           the same base weights converted, per mode, side by side

    python bench/bench.py [--full] [--data DIR] [--weights-dir DIR] [--out bench/results]
    python bench/bench.py --stacking-only --cache CACHE     (7 alone, 16 steps per run: minutes)
    python bench/bench.py --only extraction    (1 alone: a few minutes)
    python bench/bench.py --only streaming     (8 alone: no Whisper, no corpus)
    python bench/bench.py --only statistics --cache CACHE      (9 alone: a minute or two)
    python bench/bench.py --only pooled-sweep --cache CACHE [--pools 1,8]   (10 alone: about an hour)
    python bench/bench.py --only large-v3 [--full]             (11 alone: no Whisper, no corpus)
    python bench/bench.py --only hf-whisper [--utterances N]   (12 alone: a few minutes)

Results go to bench/results/<date>-<machine>.json, and a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from ser_cache.audio import load_utterance
from ser_cache.cache import open_cache
from ser_cache.corpora import prepare
from ser_cache.encoder import N_WINDOW_FRAMES, encode, load_encoder, log_mel, speech_frames
from ser_cache.extract import ExtractOptions, encode_batch, extract
from ser_cache.records import Utterance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import encoders  # noqa: E402  section 12, beside this file
import frames  # noqa: E402  sections 9-11, beside this file

HERE = Path(__file__).resolve().parent
BATCH = 8


# --- helpers ------------------------------------------------------------------------------


def pick(records: list[Utterance], n: int) -> list[Utterance]:
    """A fixed spread of n utterances: every k-th in id order (all actors and emotions)."""
    records = sorted(records, key=lambda r: r.id)
    step = max(1, len(records) // n)
    return records[::step][:n]


def timed(fn, *args, **kw):
    gc.collect()
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def bare_encoder(enc, mels_frames, mode: str, compute_dtype: str = "float32") -> float:
    """Seconds to run only the encoder forward over prepared log-mels, in batches of BATCH."""
    batches = [mels_frames[i : i + BATCH] for i in range(0, len(mels_frames), BATCH)]
    keep = list(range(enc.n_states))
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
        for b in batches:
            mels = [m for m, _ in b]
            if mode == "short":
                x = torch.zeros(len(b), mels[0].shape[0], max(m.shape[-1] for m in mels))
                for i, m in enumerate(mels):
                    x[i, :, : m.shape[-1]] = m
                encode(enc.encoder, x, torch.tensor([f for _, f in b]), keep)
            else:
                encode(enc.encoder, torch.stack(mels), None, keep)
    return time.perf_counter() - t


def prepared_mels(records, n_mels: int, mode: str):
    """Log-mels in the order extract() encodes them (by duration): audio already in memory."""
    out = []
    for r in sorted(records, key=lambda r: (r.duration, r.id)):
        audio = load_utterance(r.path)[0][0]
        out.append((log_mel(audio, n_mels, mode), speech_frames(len(audio))))
    return out


def encoder_flops(dims: dict, frames: int) -> float:
    """Multiply-adds x 2 of one encoder forward over `frames` encoder frames.

    Convolutions: conv1 (n_mels -> d, k=3) over 2*frames mel columns, conv2 (d -> d, k=3).
    Each block: q,k,v,out projections 4*d*d, MLP 8*d*d per frame; attention scores and
    weighted sum 2*frames*d per frame.
    """
    d, n_mels, n_blocks = dims["n_audio_state"], dims["n_mels"], dims["n_audio_layer"]
    conv = 2 * frames * n_mels * d * 3 + frames * d * d * 3
    block = frames * (4 * d * d + 8 * d * d) + 2 * frames * frames * d
    return 2.0 * (conv + n_blocks * block)


def matmul_rate(dtype=torch.float32, n: int = 1024, seconds: float = 2.0) -> float:
    """This machine's dense matmul rate in FLOP/s, with all torch threads, at the encoder's scale."""
    a, b = torch.randn(n * 2, n, dtype=dtype), torch.randn(n, n * 2, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        reps += 1
    return reps * 2.0 * (2 * n) * n * (2 * n) / (time.perf_counter() - t)


# --- the measurements ---------------------------------------------------------------------


def bench_extraction(enc, records, mode: str, tmp: Path, repeats: int = 3) -> dict:
    """1. Full pipeline (decode, resample, mel, encoder, HDF5) against the bare encoder.

    The two alternate `repeats` times, with one more bare run at the end, and the ratio is of
    their medians: a shared machine drifts within seconds, and one pair is as likely to catch
    a neighbour's burst as not.
    """
    mels = prepared_mels(records, enc.dims["n_mels"], mode)
    bare_encoder(enc, mels[:BATCH], mode)  # warm-up
    bare, full, size = [], [], 0
    for i in range(repeats):
        bare.append(bare_encoder(enc, mels, mode))
        out = tmp / f"overhead-{enc.name}-{mode}-{i}"
        t, _ = timed(extract, records, out, "ravdess", enc, ExtractOptions(mode=mode, batch_size=BATCH, progress=False))
        full.append(t)
        size = sum(p.stat().st_size for p in (out / "shards").glob("*.h5"))
        shutil.rmtree(out)
    bare.append(bare_encoder(enc, mels, mode))
    return {"model": enc.name, "mode": mode, "utterances": len(records), "pipeline_s": full,
            "bare_encoder_s": bare, "ratio": float(np.median(full) / np.median(bare)), "cache_bytes": size}


def bench_extractions(encs: dict, records, full: bool, tmp: Path) -> list[dict]:
    """1. for each model: short mode on `records`, and trim (base, or all with --full) on a quarter."""
    out = []
    for m, enc in encs.items():
        for mode in ("short", "trim") if (full or m == "base") else ("short",):
            subset = records if mode == "short" else records[: max(16, len(records) // 4)]
            print(f"1. extraction overhead {m} {mode} ({len(subset)} utterances) ...", flush=True)
            out.append(bench_extraction(enc, subset, mode, tmp))
    return out


def extraction_rows(results: list[dict]) -> list[tuple]:
    """1. The extraction rows of the table."""
    return [(f"extract / bare encoder, {e['model']} {e['mode']} ({e['utterances']} utt)", f"{e['ratio']:.2f}x",
             "<= 1.10x", _ok(e["ratio"] <= 1.10)) for e in results]


def bench_modes(enc, records, rate32: float, rate16: float, bf16_ok: bool) -> dict:
    """2 + 3. Per-utterance encoder time per mode, FLOPs, how close to the matmul limit; bf16."""
    out = {"model": enc.name, "utterances": len(records), "modes": {}}
    for mode in ("padded", "short"):
        mels = prepared_mels(records, enc.dims["n_mels"], mode)
        bare_encoder(enc, mels[:2], mode)
        t32 = bare_encoder(enc, mels, mode) / len(records)
        frames = np.mean([f for _, f in mels]) if mode == "short" else N_WINDOW_FRAMES
        flops = encoder_flops(enc.dims, int(round(frames)))
        row = {"s_per_utt": t32, "frames": float(frames), "gflop_per_utt": flops / 1e9,
               "achieved_gflops": flops / t32 / 1e9, "fraction_of_matmul_rate": flops / t32 / rate32}
        if bf16_ok:
            bare_encoder(enc, mels[:2], mode, "bfloat16")
            t16 = bare_encoder(enc, mels, mode, "bfloat16") / len(records)
            row.update(bf16_s_per_utt=t16, bf16_speedup=t32 / t16, bf16_fraction_of_matmul_rate=flops / t16 / rate16)
        out["modes"][mode] = row
    # trim encodes exactly what padded encodes (30 s window); only storage differs.
    out["modes"]["trim"] = dict(out["modes"]["padded"], note="same encoder work as padded; keeps speech frames only")
    out["short_speedup_over_padded"] = out["modes"]["padded"]["s_per_utt"] / out["modes"]["short"]["s_per_utt"]
    return out


def bench_bf16_states(enc, records) -> dict:
    """How much bfloat16 arithmetic changes the states (relative to float32), per state."""
    mels = prepared_mels(records[:8], enc.dims["n_mels"], "short")
    batch = [(0, 0, m, f) for m, f in mels]
    a = encode_batch(enc, batch, "short", list(range(enc.n_states)), "float32", "cpu", "float32")
    b = encode_batch(enc, batch, "short", list(range(enc.n_states)), "float32", "cpu", "bfloat16")
    rel = {}
    for s in range(enc.n_states):
        x = np.concatenate([w[s] for w in a])
        y = np.concatenate([w[s] for w in b])
        rel[s] = float(np.linalg.norm(x - y) / np.linalg.norm(x))
    return {"relative_l2_change_per_state": rel}


def bench_footprint(enc, records, tmp: Path) -> dict:
    """4. Bytes per utterance per mode against the reference layout (float32, 1500 frames, per layer)."""
    reference = N_WINDOW_FRAMES * enc.dim * 4 * enc.n_states
    out = {"model": enc.name, "reference_bytes_per_utt": reference, "modes": {}}
    for mode in ("padded", "trim", "short"):
        path = tmp / f"footprint-{mode}"
        extract(records, path, "ravdess", enc, ExtractOptions(mode=mode, progress=False))
        size = sum(p.stat().st_size for p in (path / "shards").glob("*.h5")) / len(records)
        out["modes"][mode] = {"bytes_per_utt": size, "smaller_than_reference": reference / size}
        shutil.rmtree(path)
    return out


def bench_layer_read(cache_path: Path, state: int) -> dict:
    """5. One layer of a whole cache, from a warm page cache, against numpy.fromfile of as many bytes."""
    cache = open_cache(cache_path)
    layer = cache.read_layer(state)  # warms the page cache and gives the size
    nbytes = layer.frames.nbytes
    del layer
    # Memory with tracemalloc (numpy reports its buffers to it), time without: tracing slows
    # every Python allocation of the metadata reads. Best of 3 for both reads.
    tracemalloc.start()
    layer = cache.read_layer(state)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del layer
    t = min(timed(cache.read_layer, state)[0] for _ in range(3))
    # The plain read: the same number of bytes, from the same files, in one call per file.
    shards = [cache.shard_path(k) for k in cache.complete_shards()]
    share = nbytes // len(shards)

    def plain_read():
        for p in shards:
            np.fromfile(p, dtype=np.uint8, count=min(share, p.stat().st_size))

    plain_read()  # warm
    plain = min(timed(plain_read)[0] for _ in range(3))
    return {"cache": str(cache_path), "state": state, "layer_bytes": nbytes, "seconds": t,
            "mb_per_s": nbytes / t / 1e6, "plain_mb_per_s": nbytes / plain / 1e6,
            "ratio_to_plain": (nbytes / t) / (nbytes / plain), "peak_bytes": peak, "peak_over_layer": peak / nbytes}


def front_rate(threads: int, dtype=torch.float32, d: int = 512, d_model: int = 256, frames: int = 16 * 190,
               seconds: float = 1.5) -> float:
    """FLOP/s of the pooling heads' front layer on `threads` threads: the best of forward
    (frames, d) @ (d, d_model) and weight gradient (d_model, frames) @ (frames, d) products,
    at the size of one training batch (16 RAVDESS utterances of about 190 frames)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, g = torch.randn(frames, d, dtype=dtype), torch.randn(d, d_model, dtype=dtype), torch.randn(frames, d_model, dtype=dtype)
        best = 0.0
        for product in (lambda: x @ w, lambda: g.T @ x):
            product()
            reps, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds / 2:
                product()
                reps += 1
            best = max(best, reps * 2.0 * frames * d * d_model / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(before)


def bench_training(cache_path: Path, state: int, encode_s_per_utt: float, epochs: int, sweep_epochs: int = 30) -> dict:
    """6. Each head on one fold, as a sweep worker trains it (one process per core, one torch
    thread): seconds per epoch, and the front layer's FLOPs per second as a share of the
    measured matmul rate of that shape. From these, the full layer sweep (every state x head x
    fold, `sweep_epochs` epochs) as `ser-cache sweep` would run it with one worker per core,
    and what the same sweep would cost if every cell re-ran Whisper instead of reading the cache."""
    from ser_cache.folds import make_folds
    from ser_cache.heads import HEADS
    from ser_cache.sweeping import available_cores
    from ser_cache.config import TrainConfig
    from ser_cache.fitting import fit_head, fold_seed, resolve_compute_dtype

    cache = open_cache(cache_path)
    t_read, data = timed(cache.read_layer, state)
    folds = make_folds(data.ids, data.labels, data.speakers, data.groups, corpus=cache.corpus, seed=0)
    labels, y = data.classes()
    train, val, _ = folds.split(0)
    config = TrainConfig(epochs=epochs, seed=0, device="cpu")
    dtype = resolve_compute_dtype(config.compute_dtype, torch.device("cpu"))
    rate = front_rate(1, dtype)
    front_flop = 2.0 * data.dim * config.d_model * (2 * data.n_frames[train].sum() + data.n_frames[val].sum())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    heads = {}
    try:
        for head in sorted(HEADS):
            t, fit = timed(fit_head, head, data, y, train, val, config, len(labels), fold_seed(0, 0), torch.device("cpu"))
            row = {"fold_s": t, "epochs": len(fit.history) if fit.history and "epoch" in fit.history[0] else None}
            if row["epochs"]:
                row["per_epoch_s"] = t / row["epochs"]
                row["front_gflops"] = front_flop / row["per_epoch_s"] / 1e9
                row["share_of_matmul_rate"] = front_flop / row["per_epoch_s"] / rate
            heads[head] = row
    finally:
        torch.set_num_threads(before)
    jobs = available_cores()
    n_layers, n_folds = len(cache.layers), folds.n_folds
    per_layer = sum(h["per_epoch_s"] * sweep_epochs if "per_epoch_s" in h else h["fold_s"] for h in heads.values()) * n_folds
    sweep_s = n_layers * (t_read + per_layer / jobs)
    cells = n_layers * len(heads)
    whisper_per_cell = encode_s_per_utt * len(data)  # re-encoding the corpus once per cell
    return {"cache": str(cache_path), "utterances": len(data), "epochs_timed": epochs, "sweep_epochs": sweep_epochs,
            "compute_dtype": str(dtype), "front_matmul_gflops_1_thread": rate / 1e9, "read_s": t_read, "heads": heads,
            "jobs": jobs, "sweep_s": sweep_s, "sweep_cells": cells,
            "sweep_if_whisper_rerun_s": sweep_s + cells * whisper_per_cell,
            "cache_saves_ratio": (sweep_s + cells * whisper_per_cell) / sweep_s}


def bench_streaming(tmp: Path, epochs: int = 3, layer_mb: float = 240.0, budget_fraction: float = 0.25) -> dict:
    """8. A layer streamed from its shards in a budget of a quarter of its size, against the same
    layer in memory: seconds per epoch of the mean head on one split, one torch thread (as a
    sweep worker). Both times include what a fold does besides its epochs (input statistics,
    batches built once in memory, blocks read every epoch when streamed), not the one read of
    the whole layer that the in-memory path does per layer. The cache is synthetic (random
    states of Whisper base's width, written through the cache writer) and its shards sit in
    the page cache, so this is the cost of streaming's order and re-reads, not of a disk."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_cache import synthetic_cache  # the tests' writer of random caches (cache.write_shard)

    from ser_cache.streaming import open_streamed
    from ser_cache.config import TrainConfig
    from ser_cache.fitting import fit_head

    dim, frames = 512, (50, 250)  # Whisper base width; 1-5 s of speech
    n_utts = int(layer_mb * 2**20 / (dim * 2 * sum(frames) / 2))
    cache = synthetic_cache(tmp / "streaming", n_utts=n_utts, per_shard=32, dim=dim, states=(1,), frames=frames,
                            n_speakers=12)
    data = cache.read_layer(1)
    budget = int(data.frames.nbytes * budget_fraction)
    streamed = open_streamed(cache, 1, budget, 16)
    labels, y = data.classes()
    speaker = np.char.lstrip(data.speakers, "s").astype(int)
    train, val = np.flatnonzero(speaker < 9), np.flatnonzero(speaker >= 9)
    config = TrainConfig(epochs=epochs, patience=0, seed=0, device="cpu", compute_dtype="float32")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = {name: timed(fit_head, "mean", d, y, train, val, config, len(labels), 0, torch.device("cpu"))[0]
                   for name, d in (("in_memory", data), ("streamed", streamed))}
    finally:
        torch.set_num_threads(before)
    return {"layer_bytes": int(data.frames.nbytes), "utterances": len(data), "budget_bytes": budget,
            "blocks": len(streamed.blocks), "shards": len(cache.plan), "epochs": epochs,
            "in_memory_s_per_epoch": seconds["in_memory"] / epochs, "streamed_s_per_epoch": seconds["streamed"] / epochs,
            "ratio": seconds["streamed"] / seconds["in_memory"]}


def bench_stacking(cache_path: Path, state: int, sizes=(3, 6), heads=("qkv", "attentive"), repeats: int = 3,
                   steps: int | None = None) -> dict:
    """7. An ensemble's members trained as one stacked model (ensembles.train_stack_epoch) against
    one after another (fitting.train_epoch per member), on one fold's training split, 1 torch
    thread: seconds per training epoch (validation and the once-per-fold setup left out, the
    same in both), the minimum over `repeats` alternating runs (the machine is shared). With
    `steps`, each run trains on the first `steps` batches of every member and the time is
    scaled to a whole epoch (a quicker, noisier estimate)."""
    import torch.nn as nn

    from ser_cache.batches import HeldBatches
    from ser_cache.folds import make_folds
    from ser_cache.heads import head_class, options_for
    from ser_cache.config import TrainConfig
    from ser_cache.ensembles import Member, Stack, train_stack_epoch
    from ser_cache.fitting import fold_seed, member_seed, train_epoch

    cache = open_cache(cache_path)
    data = cache.read_layer(state)
    folds = make_folds(data.ids, data.labels, data.speakers, data.groups, corpus=cache.corpus, seed=0)
    labels, y = data.classes()
    train, _, _ = folds.split(0)
    cpu, loss = torch.device("cpu"), nn.CrossEntropyLoss()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = {}
    try:
        for head in heads:
            cls = head_class(head)
            for n in sizes:
                config = TrainConfig(seed=0, device="cpu", compute_dtype="float32", ensemble=n)
                options = options_for(cls, config, data.dim, len(labels))
                members = [Member(cls, options, data, y, train, config, member_seed(fold_seed(0, 0), m), 0, cpu)
                           for m in range(n)]
                n_batches = len(members[0].batches)
                for m in members:
                    m.batches = m.batches[:steps]
                scale = n_batches / len(members[0].batches)
                best = {"sequential": float("inf"), "stacked": float("inf")}
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for m in members:
                        optimizer = torch.optim.AdamW(m.model.parameters(), lr=config.lr, fused=True)
                        train_epoch(m.model.logits, m.model, optimizer, loss, HeldBatches(m.batches, None), m.rng,
                                    config.lr)
                    best["sequential"] = min(best["sequential"], (time.perf_counter() - t0) * scale)
                    stack = Stack([m.model for m in members], config, cpu, torch.float32)
                    t0 = time.perf_counter()
                    train_stack_epoch(stack, members, loss, config.lr, 0.0)
                    best["stacked"] = min(best["stacked"], (time.perf_counter() - t0) * scale)
                rows[f"{head} x{n}"] = {"sequential_s_per_epoch": best["sequential"], "stacked_s_per_epoch": best["stacked"],
                                        "stacked_over_sequential": best["stacked"] / best["sequential"]}
                print(f"   {head} x{n}: {rows[f'{head} x{n}']}", flush=True)
    finally:
        torch.set_num_threads(before)
    return {"cache": str(cache_path), "state": state, "train_utterances": len(train), "steps": steps,
            "repeats": repeats, "ensembles": rows}


# --- driver -------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all 1440 utterances and both models (about an hour)")
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "ravdess")
    ap.add_argument("--weights-dir", type=Path, default=Path(os.environ.get("WHISPER_OFFLINE_DIR", Path.home() / ".cache" / "whisper-offline")))
    ap.add_argument("--cache", type=Path, default=None, help="an existing full RAVDESS base cache for 5 and 6 (else one is built, short mode)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--utterances", type=int, default=None, help="override the number of utterances of 1 (smoke runs)")
    ap.add_argument("--stacking-only", action="store_true", help="only 7, on --cache, 16 training steps per run")
    ap.add_argument("--only", choices=["extraction", "streaming", "hf-whisper", *FRAMES_SECTIONS], default=None,
                    help="run only this section: 1 or hf-whisper (minutes), 8 or large-v3 (no Whisper, no corpus), "
                         "statistics or pooled-sweep (on --cache)")
    ap.add_argument("--pools", default="1,8", help="10: the frame_pool values whose full sweeps are timed side by side")
    args = ap.parse_args(argv)
    args.pools = tuple(int(k) for k in args.pools.split(","))
    if args.only in FRAMES_SECTIONS:
        return frames_sections(args)
    if args.stacking_only:
        if args.cache is None:
            ap.error("--stacking-only needs --cache (a RAVDESS base cache holding state 3)")
        print(json.dumps(bench_stacking(args.cache, 3, steps=16), indent=1))
        return 0
    if args.only == "streaming":
        with tempfile.TemporaryDirectory(prefix="ser-cache-bench-") as tmpdir:
            print("8. streaming ...", flush=True)
            r = bench_streaming(Path(tmpdir))
        print(json.dumps(r, indent=1))
        for row in streaming_rows(r):
            print("| " + " | ".join(row) + " |")
        return 0

    torch.manual_seed(0)
    records = prepare("ravdess", args.data).records
    n_small = args.utterances or (len(records) if args.full else 64)
    small = pick(records, n_small)
    models = ["tiny.en", "base"]
    if args.only == "extraction":
        encs = {m: load_encoder(str(args.weights_dir / f"{m}.pt")) for m in models}
        with tempfile.TemporaryDirectory(prefix="ser-cache-bench-") as tmpdir:
            r = bench_extractions(encs, small, args.full, Path(tmpdir))
        print(json.dumps(r, indent=1))
        for row in extraction_rows(r):
            print("| " + " | ".join(row) + " |")
        return 0
    if args.only == "hf-whisper":
        with tempfile.TemporaryDirectory(prefix="ser-cache-bench-") as tmpdir:
            print("12. transformers' Whisper beside openai-whisper ...", flush=True)
            r = encoders.bench_hf_whisper(args.weights_dir / "base.pt", small, Path(tmpdir))
        results = {"date": dt.date.today().isoformat(), "machine": socket.gethostname(), "cpu": _cpu_name(),
                   "threads": torch.get_num_threads(), "hf_whisper": r}
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{results['date']}-{results['machine']}-hf-whisper.json"
        path.write_text(json.dumps(results, indent=1))
        print(json.dumps(r, indent=1))
        for row in encoders.hf_whisper_rows(r):
            print("| " + " | ".join(row) + " |")
        print(f"\nresults: {path}")
        return 0
    modes_set = pick(records, 64 if args.full else 16)
    bf16_ok = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") or "amx" in _cpu_flags() or "avx512_bf16" in _cpu_flags()
    results = {"date": dt.date.today().isoformat(), "machine": socket.gethostname(), "cpu": _cpu_name(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "full": args.full, "bf16_capable_cpu": bf16_ok}
    with tempfile.TemporaryDirectory(prefix="ser-cache-bench-") as tmpdir:
        tmp = Path(tmpdir)
        print("matmul rate ...", flush=True)
        rate32 = matmul_rate(torch.float32)
        rate16 = matmul_rate(torch.bfloat16) if bf16_ok else float("nan")
        results["matmul_gflops"] = {"float32": rate32 / 1e9, "bfloat16": rate16 / 1e9}
        encs = {m: load_encoder(str(args.weights_dir / f"{m}.pt")) for m in models}
        results["extraction"] = bench_extractions(encs, small, args.full, tmp)
        results["modes"] = []
        for m in models:
            print(f"2-3. modes and arithmetic limit {m} ...", flush=True)
            results["modes"].append(bench_modes(encs[m], modes_set, rate32, rate16, bf16_ok))
        if bf16_ok:
            results["bf16_states"] = bench_bf16_states(encs["base"], modes_set)
        print("4. footprint ...", flush=True)
        results["footprint"] = bench_footprint(encs["base"], pick(records, 16), tmp)
        cache = args.cache
        if cache is None:
            cache = tmp / "ravdess-base-short"
            print("building the full RAVDESS base cache (short mode) for 5-6 ...", flush=True)
            t, _ = timed(extract, records, cache, "ravdess", encs["base"], ExtractOptions(mode="short", progress=False))
            results["full_cache_build_s"] = t
        print("5. layer read ...", flush=True)
        results["layer_read"] = bench_layer_read(cache, 6)
        enc_s = next(r for r in results["modes"] if r["model"] == "base")["modes"]["short"]["s_per_utt"]
        print("6. training ...", flush=True)
        results["training"] = bench_training(cache, 4, enc_s, epochs=30 if args.full else 5)
        print("7. stacked ensembles ...", flush=True)
        results["stacking"] = bench_stacking(cache, 3, steps=None if args.full else 16)
        if bf16_ok:
            results["bf16_accuracy"] = bench_bf16_accuracy(encs["base"], records, tmp, cache)
        print("8. streaming ...", flush=True)
        results["streaming"] = bench_streaming(tmp)
        print("9. statistics cache ...", flush=True)
        results["statistics"] = frames.bench_statistics(cache, tmp / "frames")
        if args.full:
            print("10. the full sweep at frame_pool 1 and 4 ...", flush=True)
            results["pooled_sweep"] = frames.bench_pooled_sweep(cache, tmp / "frames", args.pools)
        print("11. large-v3 scale ...", flush=True)
        results["large_v3"] = frames.bench_large_v3(tmp / "frames", n=73_000 if args.full else 20_000)
        print("12. transformers' Whisper beside openai-whisper ...", flush=True)
        results["hf_whisper"] = encoders.bench_hf_whisper(args.weights_dir / "base.pt", small, tmp)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{results['date']}-{results['machine']}.json"
    path.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nresults: {path}")
    return 0


def bench_bf16_accuracy(enc, records, tmp: Path, fp32_cache: Path) -> dict:
    """UA of the linear head on the last state, float32 against bfloat16 arithmetic, same folds."""
    from ser_cache.folds import make_folds
    from ser_cache.config import TrainConfig
    from ser_cache.training import run_folds

    path = tmp / "ravdess-base-short-bf16"
    t, _ = timed(extract, records, path, "ravdess", enc, ExtractOptions(mode="short", compute_dtype="bfloat16", progress=False))
    out = {"bf16_cache_build_s": t}
    for name, p in (("float32", fp32_cache), ("bfloat16", path)):
        data = open_cache(p).read_layer(enc.n_states - 1)
        folds = make_folds(data.ids, data.labels, data.speakers, data.groups, corpus="ravdess", seed=0)
        out[f"ua_{name}"] = run_folds(data, folds, "linear", TrainConfig(seed=0)).metrics["ua"]["mean"]
    return out


FRAMES_SECTIONS = {"statistics": "9", "pooled-sweep": "10", "large-v3": "11"}


def frames_sections(args) -> int:
    """One of sections 9-11 alone: printed, and saved as bench/results/<date>-<machine>-<section>.json."""
    if args.only != "large-v3" and args.cache is None:
        raise SystemExit(f"--only {args.only} needs --cache (a full RAVDESS base frames cache)")
    key = args.only.replace("-", "_")
    with tempfile.TemporaryDirectory(prefix="ser-cache-bench-") as tmpdir:
        print(f"{FRAMES_SECTIONS[args.only]}. {args.only} ...", flush=True)
        if args.only == "statistics":
            r = frames.bench_statistics(args.cache, Path(tmpdir))
        elif args.only == "pooled-sweep":
            r = frames.bench_pooled_sweep(args.cache, Path(tmpdir), args.pools)
        else:
            r = frames.bench_large_v3(Path(tmpdir), n=73_000 if args.full else 20_000)
    results = {"date": dt.date.today().isoformat(), "machine": socket.gethostname(), "cpu": _cpu_name(), key: r}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{results['date']}-{results['machine']}-{args.only}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    for row in frames.rows(results):
        print("| " + " | ".join(row) + " |")
    print(f"\nresults: {path}")
    return 0


def table(r: dict) -> str:
    """The Markdown table docs/benchmarks.md shows."""
    rows = [("measure", "value", "target", "met")]
    rows += extraction_rows(r["extraction"])
    for m in r["modes"]:
        for mode, row in m["modes"].items():
            if mode == "trim":
                continue
            rows.append((f"{m['model']} {mode}: s per utterance", f"{row['s_per_utt']:.3f}", "", ""))
            rows.append((f"{m['model']} {mode}: GFLOP/utt, share of matmul rate", f"{row['gflop_per_utt']:.1f}, {row['fraction_of_matmul_rate']:.0%}", "", ""))
            if "bf16_speedup" in row:
                rows.append((f"{m['model']} {mode}: bfloat16 speed-up", f"{row['bf16_speedup']:.2f}x", "", ""))
        rows.append((f"{m['model']} short speed-up over padded", f"{m['short_speedup_over_padded']:.1f}x", ">= 7x", _ok(m["short_speedup_over_padded"] >= 7)))
    rows.append(("matmul rate float32 / bfloat16", f"{r['matmul_gflops']['float32']:.0f} / {r['matmul_gflops']['bfloat16']:.0f} GFLOP/s", "", ""))
    if "bf16_states" in r:
        ch = r["bf16_states"]["relative_l2_change_per_state"]
        rows.append(("bfloat16: relative change of the states (first..last)", ", ".join(f"{v:.3f}" for v in ch.values()), "", ""))
    if "bf16_accuracy" in r:
        a = r["bf16_accuracy"]
        rows.append(("bfloat16: linear-head UA, last state (fp32 -> bf16)", f"{a['ua_float32']:.3f} -> {a['ua_bfloat16']:.3f}", "", ""))
    f = r["footprint"]
    for mode, row in f["modes"].items():
        target = ">= 12x" if mode == "trim" else ""
        rows.append((f"cache bytes/utt {mode} (reference {f['reference_bytes_per_utt'] / 1e6:.1f} MB)", f"{row['bytes_per_utt'] / 1e6:.2f} MB, {row['smaller_than_reference']:.1f}x smaller", target, _ok(row["smaller_than_reference"] >= 12) if target else ""))
    lr = r["layer_read"]
    rows.append((f"layer read ({lr['layer_bytes'] / 1e6:.0f} MB)", f"{lr['mb_per_s']:.0f} MB/s vs plain {lr['plain_mb_per_s']:.0f} MB/s = {lr['ratio_to_plain']:.2f}", ">= 0.5", _ok(lr["ratio_to_plain"] >= 0.5)))
    rows.append(("layer read peak memory / layer size", f"{lr['peak_over_layer']:.2f}", "<= 1.5", _ok(lr["peak_over_layer"] <= 1.5)))
    t = r["training"]
    rows.append((f"front layer matmul rate, 1 thread ({t['compute_dtype']})", f"{t['front_matmul_gflops_1_thread']:.0f} GFLOP/s", "", ""))
    for head, h in t["heads"].items():
        if "per_epoch_s" in h:
            rows.append((f"train {head}, one fold, 1 thread ({t['utterances']} utt)",
                         f"{h['per_epoch_s']:.2f} s/epoch, front {h['front_gflops']:.0f} GFLOP/s = {h['share_of_matmul_rate']:.0%} of matmul rate",
                         ">= 50%", _ok(h["share_of_matmul_rate"] >= 0.5)))
        else:
            rows.append((f"train {head}, one fold, 1 thread ({t['utterances']} utt)", f"{h['fold_s']:.1f} s/fold", "", ""))
    rows.append((f"full layer sweep, {t['sweep_cells']} cells x 6 folds, {t['sweep_epochs']} epochs, {t['jobs']} workers (estimated from the above)",
                 f"{t['sweep_s'] / 60:.0f} min", "<= 20 min", _ok(t["sweep_s"] <= 20 * 60)))
    rows.append(("same sweep re-running Whisper per cell", f"{t['sweep_if_whisper_rerun_s'] / 60:.0f} min ({t['cache_saves_ratio']:.1f}x)", ">= 20x", _ok(t["cache_saves_ratio"] >= 20)))
    if "stacking" in r:
        st = r["stacking"]
        for name, e in st["ensembles"].items():
            rows.append((f"ensemble {name}, state {st['state']}, 1 thread: s/epoch stacked vs one after another",
                         f"{e['stacked_s_per_epoch']:.2f} vs {e['sequential_s_per_epoch']:.2f} "
                         f"({e['stacked_over_sequential']:.2f}x the time)", "", ""))
    if "streaming" in r:
        rows += streaming_rows(r["streaming"])
    rows += frames.rows(r)
    if "hf_whisper" in r:
        rows += encoders.hf_whisper_rows(r["hf_whisper"])
    width = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, width)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    head = f"{r['date']}, {r['cpu']}, {r['threads']} threads, torch {r['torch']}" + (" (--full)" if r["full"] else "")
    return head + "\n\n" + "\n".join(lines)


def streaming_rows(st: dict) -> list[tuple]:
    """8. The streaming row of the table."""
    return [(f"streamed / in-memory training per epoch ({st['layer_bytes'] / 2**20:.0f} MiB layer, budget "
             f"{st['budget_bytes'] / 2**20:.0f} MiB, {st['blocks']} blocks of {st['shards']} shards)",
             f"{st['streamed_s_per_epoch']:.2f} / {st['in_memory_s_per_epoch']:.2f} s = {st['ratio']:.2f}x",
             "<= 2x", _ok(st["ratio"] <= 2))]


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_name() -> str:
    for line in _cpu_flags().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())

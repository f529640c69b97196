"""`make bench` sections 9-11: what pooled and statistics caches save, measured in one run.

  9. statistics cache   frames cache bytes / statistics cache bytes (RAVDESS base)   target >= 40
                        probe sweep of every state, frames / statistics wall time   target >= 10
 10. pooled training    the 30-epoch sweep (every state x linear, mean, attentive,
                        qkv x 6 folds, patience 10) at frame_pool K, wall time and
                        mean UA beside K = 1                            target <= 20 min at the chosen K
 11. large-v3 scale     a synthetic statistics cache of 33 states x 1280 (20,000
                        utterances; --full 73,000) written through the cache writer,
                        then the single-state and all-state probes on one speaker
                        fold: bytes, wall time, peak RSS                 target: inside the machine's memory

Each stage of 11 runs in a child process of its own, so its peak RSS is its own.
"""
from __future__ import annotations

import multiprocessing
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

STATS_TARGET, SPEED_TARGET, SWEEP_MINUTES = 40, 10, 20
LARGE_V3 = (33, 1280)  # states (32 blocks + the input embedding), width


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def _probe_sweep(cache: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, mean UA over every state's cell) of a linear-probe sweep of every state."""
    from ser_cache.sweeping import SweepSpec, run_sweep
    from ser_cache.config import TrainConfig

    spec = SweepSpec(caches=[cache], layers="all", heads=["linear"], train=TrainConfig(seed=0))
    seconds, outcome = _timed(run_sweep, spec, out, progress=False, write_report=False)
    from ser_cache.results import SweepFolder

    cells = SweepFolder(out).cells()
    return seconds, float(np.mean([c.ua for c in cells]))


def bench_statistics(cache_path: Path, tmp: Path) -> dict:
    """9. Derive the statistics cache of a frames cache (RAVDESS base), compare bytes, and time
    the probe sweep of every state from each (reading included; nothing in memory before)."""
    from ser_cache.cache import open_cache
    from ser_cache.derive import derive

    stats_path = tmp / "statistics"
    derive_s, _ = _timed(derive, cache_path, stats_path, stats=True, progress=False)
    pooled = {}
    for k in (2, 4, 8):
        derive(cache_path, tmp / f"pool{k}", frame_pool=k, progress=False)
        pooled[k] = open_cache(tmp / f"pool{k}").summary()["bytes"]
        shutil.rmtree(tmp / f"pool{k}")
    frames_bytes, stats_bytes = open_cache(cache_path).summary()["bytes"], open_cache(stats_path).summary()["bytes"]
    frames_s, frames_ua = _probe_sweep(cache_path, tmp / "sweep-frames")
    stats_s, stats_ua = _probe_sweep(stats_path, tmp / "sweep-stats")
    return {"frames_bytes": frames_bytes, "stats_bytes": stats_bytes, "pooled_bytes": pooled,
            "bytes_ratio": frames_bytes / stats_bytes, "derive_s": derive_s,
            "probe_sweep_frames_s": frames_s, "probe_sweep_stats_s": stats_s, "speedup": frames_s / stats_s,
            "mean_ua_frames": frames_ua, "mean_ua_stats": stats_ua}


def bench_pooled_sweep(cache_path: Path, tmp: Path, pools=(1, 8), epochs: int = 30) -> dict:
    """10. The full sweep of the issue's target at each frame_pool of `pools`, one after another."""
    from ser_cache.results import SweepFolder
    from ser_cache.sweeping import SweepSpec, run_sweep
    from ser_cache.config import TrainConfig

    rows = {}
    for k in pools:
        spec = SweepSpec(caches=[cache_path], layers="all", heads=["linear", "mean", "attentive", "qkv"],
                         train=TrainConfig(seed=0, epochs=epochs, patience=10, frame_pool=k))
        seconds, _ = _timed(run_sweep, spec, tmp / f"sweep-k{k}", progress=False, write_report=False)
        cells = SweepFolder(tmp / f"sweep-k{k}").cells()
        by_head = {}
        for c in cells:
            by_head.setdefault(c.head, []).append(c.ua)
        rows[k] = {"wall_s": seconds, "mean_ua": {h: float(np.mean(v)) for h, v in by_head.items()},
                   "folds": len(cells)}
    return {"epochs": epochs, "pools": rows}


# --- 11. large-v3's shape ------------------------------------------------------------------------


def _write_synthetic(root: Path, n: int, per_shard: int, n_speakers: int, seed: int) -> dict:
    """A statistics cache of n utterances of large-v3's shape, through ShardFile: each state's
    mean is a class centre plus noise (so the probe has something to find), its std positive."""
    import json

    from ser_cache import cache as C
    from ser_cache.records import Utterance, save_records

    states, dim = LARGE_V3
    rng = np.random.default_rng(seed)
    labels = ("angry", "happy", "neutral", "sad")
    centres = rng.standard_normal((len(labels), states, dim)).astype(np.float32) * 0.05
    records = [Utterance(id=f"u{i:06d}", path=f"/synthetic/u{i:06d}.wav", label=labels[i % 4],
                         speaker=f"s{i % n_speakers:04d}", duration=3.0) for i in range(n)]
    plan = [[r.id for r in records[k : k + per_shard]] for k in range(0, n, per_shard)]
    settings = C.CacheSettings(corpus="csv", model="synthetic-large-v3", model_sha256="0" * 64,
                               dims={"n_audio_state": dim, "n_audio_layer": states - 1}, mode="short",
                               dtype="float16", layers=list(range(states)), long_audio="refuse", records_hash="-",
                               n_records=n, shard_bytes=1, store="stats")
    (root / C.SHARD_DIR).mkdir(parents=True)
    save_records(records, root / C.RECORDS_FILE)
    (root / C.PLAN_FILE).write_text(json.dumps(plan))
    (root / C.SETTINGS_FILE).write_text(json.dumps({"settings": asdict(settings), "provenance": {}}))
    for k, ids in enumerate(plan):
        shard = records[k * per_shard : k * per_shard + len(ids)]
        layout = C.ShardLayout(records=shard, n_frames=[1] * len(shard), speech_frames=[150] * len(shard),
                               encoder_frames=[150] * len(shard))
        rows = []
        for r in shard:
            mean = centres[labels.index(r.label)] + rng.standard_normal((states, dim), dtype=np.float32)
            std = np.abs(rng.standard_normal((states, dim), dtype=np.float32)) + 0.5
            rows.append({s: np.concatenate([mean[s], std[s]])[None, :] for s in range(states)})
        C.write_shard(root / C.SHARD_DIR, k, layout, rows, list(range(states)), 2 * dim, C.STATS_DTYPE)
    return {"bytes": C.open_cache(root).summary()["bytes"], "utterances": n, "shards": len(plan)}


def _probe_one_fold(root: str, layer, linear_c: tuple, max_iter: int) -> dict:
    """The linear probe of `layer` on fold 0 of 5 speaker folds, read as open_layer reads it."""
    import torch

    from ser_cache.cache import open_cache
    from ser_cache.folds import make_folds
    from ser_cache.streaming import default_budget, open_layer
    from ser_cache.config import TrainConfig
    from ser_cache.training import train_fold

    torch.set_num_threads(1)
    cache = open_cache(root)
    budget = default_budget()
    read_s, data = _timed(open_layer, cache, layer, budget, 16)
    folds = make_folds(data.ids, data.labels, data.speakers, data.groups, protocol="kfold", n_folds=5, seed=0)
    config = TrainConfig(seed=0, device="cpu", linear_c=linear_c, linear_max_iter=max_iter)
    labels, y = data.classes()
    fit_s, (record, _) = _timed(train_fold, data, y, folds.aligned_to(data.ids), 0, "linear", config, len(labels),
                                torch.device("cpu"))
    return {"features": int(data.statistics.shape[1]), "budget_bytes": budget, "read_s": read_s, "fit_s": fit_s,
            "ua": record.metrics["ua"], "C": record.selected["C"],
            "solver": sorted({h.get("solver", "") for h in record.history}),
            "lazy": not isinstance(data.statistics, np.ndarray)}


def _child(queue, fn, args):
    out = fn(*args)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(out)


def _in_child(fn, *args) -> dict:
    """fn(*args) in a fresh process (spawn), with that process's peak RSS added."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    p = context.Process(target=_child, args=(queue, fn, args))
    p.start()
    out = queue.get()
    p.join()
    return out


def bench_large_v3(tmp: Path, n: int = 20_000, per_shard: int = 500, n_speakers: int = 200) -> dict:
    """11. Write, then probe state 32 alone (2,560 features, in memory) and every state (84,480
    features, streamed when over the budget), each in its own process: one C, 50 passes at most
    for the all-state probe (a capacity check: bytes, time and peak memory, not accuracy)."""
    root = tmp / "large-v3-stats"
    write_s, written = _timed(_in_child, _write_synthetic, root, n, per_shard, n_speakers, 0)
    single = _in_child(_probe_one_fold, str(root), LARGE_V3[0] - 1, (0.01,), 2000)
    every = _in_child(_probe_one_fold, str(root), tuple(range(LARGE_V3[0])), (0.01,), 50)
    return {"shape": LARGE_V3, "write_s": write_s, **written, "single_state": single, "all_states": every,
            "memory_bytes": _mem_total()}


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        return int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) * 1024


def rows(r: dict) -> list[tuple]:
    """The table rows of 9-11 (those present)."""
    ok = lambda flag: "yes" if flag else "NO"  # noqa: E731
    out = []
    if "statistics" in r:
        s = r["statistics"]
        out.append((f"statistics cache: frames / statistics bytes ({s['frames_bytes'] / 1e6:.0f} MB / "
                    f"{s['stats_bytes'] / 1e6:.1f} MB); pooled x2/x4/x8: "
                    + ", ".join(f"{b / 1e6:.0f} MB" for b in s["pooled_bytes"].values()),
                    f"{s['bytes_ratio']:.1f}x", f">= {STATS_TARGET}x", ok(s["bytes_ratio"] >= STATS_TARGET)))
        out.append((f"probe sweep of every state, frames / statistics (mean UA {s['mean_ua_frames']:.3f} / "
                    f"{s['mean_ua_stats']:.3f})", f"{s['probe_sweep_frames_s']:.0f} / {s['probe_sweep_stats_s']:.1f} s "
                    f"= {s['speedup']:.0f}x", f">= {SPEED_TARGET}x", ok(s["speedup"] >= SPEED_TARGET)))
    if "pooled_sweep" in r:
        for k, row in r["pooled_sweep"]["pools"].items():
            uas = ", ".join(f"{h} {v:.3f}" for h, v in sorted(row["mean_ua"].items()))
            out.append((f"full sweep, frame_pool {k} ({row['folds']} folds; mean UA {uas})",
                        f"{row['wall_s'] / 60:.1f} min", f"<= {SWEEP_MINUTES} min", ok(row["wall_s"] <= SWEEP_MINUTES * 60)))
    if "large_v3" in r:
        v = r["large_v3"]
        out.append((f"large-v3 statistics cache, {v['utterances']} utterances", f"{v['bytes'] / 1e9:.2f} GB written "
                    f"in {v['write_s']:.0f} s", "", ""))
        for name in ("single_state", "all_states"):
            p = v[name]
            out.append((f"large-v3 probe, {name.replace('_', ' ')} ({p['features']} features, {', '.join(p['solver'])})",
                        f"{p['read_s'] + p['fit_s']:.0f} s, peak RSS {p['peak_rss_bytes'] / 2**30:.1f} GiB",
                        f"< {v['memory_bytes'] / 2**30:.0f} GiB", ok(p["peak_rss_bytes"] < v["memory_bytes"])))
    return out

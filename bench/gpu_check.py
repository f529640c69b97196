#!/usr/bin/env python3
"""`make gpu-check`: the CUDA path end to end on one GPU, in a few minutes, with its figures.

    1. extract RAVDESS with Whisper base (short mode) on the GPU, timed
    2. re-encode a sample of utterances on the CPU and compare their states with the GPU's
       (relative L2 difference per state: float32 kernels differ, the states should not)
    3. sweep state 3 with qkv, 3 stacked members (ensembles.py), at frame_pool 1 and 4, timed,
       UA printed side by side

Writes bench/results/<date>-<machine>-gpu-check.json and prints a table. Nothing else in the
project depends on a GPU; this is how the GPU figures in the docs are made.

    python bench/gpu_check.py [--data DIR] [--model base.pt] [--limit N] [--device cuda]

`--device cpu --limit 48` runs the same script on a CPU (a smoke run of the script itself).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SAMPLE = 16  # utterances re-encoded on the CPU for the comparison


def compare_states(cache_path: Path, enc_cpu, records, n: int) -> dict:
    """Max over a sample of utterances of |gpu - cpu| / |cpu| (L2 over frames and width), per state."""
    from ser_cache.audio import load_utterance
    from ser_cache.cache import open_cache
    from ser_cache.encoder import log_mel, speech_frames
    from ser_cache.extract import encode_batch

    cache = open_cache(cache_path)
    by_id = {r.id: r for r in records}
    ids = sorted(by_id)[:: max(1, len(by_id) // n)][:n]
    out = {}
    for s in cache.layers:
        data = cache.read_layer(s)
        row = {u: i for i, u in enumerate(data.ids)}
        worst = 0.0
        for rid in ids:
            window = load_utterance(by_id[rid].path)[0][0]
            batch = [(0, 0, log_mel(window, enc_cpu.dims["n_mels"], "short"), speech_frames(len(window)))]
            cpu = encode_batch(enc_cpu, batch, "short", [s], cache.settings.dtype, "cpu")[0][s].astype(np.float64)
            gpu = data.utterance(row[rid]).astype(np.float64)
            worst = max(worst, float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)))
        out[s] = worst
    return out


def sweep_state(cache_path: Path, out: Path, frame_pool: int, device: str) -> dict:
    from ser_cache.results import SweepFolder
    from ser_cache.sweeping import SweepSpec, run_sweep
    from ser_cache.config import TrainConfig

    spec = SweepSpec(caches=[cache_path], layers="3", heads=["qkv"],
                     train=TrainConfig(seed=0, ensemble=3, stack_members="on", frame_pool=frame_pool))
    t = time.perf_counter()
    run_sweep(spec, out, device=device, progress=False, write_report=False)
    seconds = time.perf_counter() - t
    uas = [c.ua for c in SweepFolder(out).cells()]
    return {"seconds": seconds, "ua_mean": float(np.mean(uas)), "ua_std": float(np.std(uas)), "folds": len(uas)}


def main(argv=None) -> int:
    from ser_cache.corpora import prepare
    from ser_cache.device import pick_device
    from ser_cache.encoder import load_encoder
    from ser_cache.extract import ExtractOptions, extract

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "ravdess")
    weights = Path(os.environ.get("WHISPER_OFFLINE_DIR", Path.home() / ".cache" / "whisper-offline"))
    ap.add_argument("--model", default=str(weights / "base.pt"))
    ap.add_argument("--limit", type=int, default=None, help="only N utterances, spread over every actor")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    records = sorted(prepare("ravdess", args.data).records, key=lambda r: r.id)
    if args.limit:
        records = records[:: max(1, len(records) // args.limit)][: args.limit]
    result = {"date": dt.date.today().isoformat(), "machine": socket.gethostname(), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "utterances": len(records)}
    with tempfile.TemporaryDirectory(prefix="ser-cache-gpu-check-") as tmpdir:
        tmp = Path(tmpdir)
        enc = load_encoder(args.model, device=device)
        t = time.perf_counter()
        summary = extract(records, tmp / "cache", "ravdess", enc, ExtractOptions(mode="short", progress=False,
                                                                                 batch_size=32), device=device)
        result["extract_s"] = time.perf_counter() - t
        result["audio_s_per_s"] = summary.audio_seconds / result["extract_s"]
        result["state_difference_vs_cpu"] = compare_states(tmp / "cache", load_encoder(args.model), records, SAMPLE)
        result["sweeps"] = {k: sweep_state(tmp / "cache", tmp / f"sweep-k{k}", k, str(device)) for k in (1, 4)}
    result["pooled_speedup"] = result["sweeps"][1]["seconds"] / result["sweeps"][4]["seconds"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['date']}-{result['machine']}-gpu-check.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"| {result['device']} {result['gpu'] or ''}, {len(records)} utterances | value |\n|---|---|")
    print(f"| extract, base short | {result['extract_s']:.0f} s, {result['audio_s_per_s']:.0f} s of audio per s |")
    worst = max(result["state_difference_vs_cpu"].values())
    print(f"| states against the CPU's, worst relative L2 over {SAMPLE} utterances | {worst:.2e} |")
    for k, s in result["sweeps"].items():
        print(f"| qkv x3 stacked, state 3, frame_pool {k} | {s['seconds']:.0f} s, UA {100 * s['ua_mean']:.1f} "
              f"± {100 * s['ua_std']:.1f} ({s['folds']} folds) |")
    print(f"| frame_pool 4 speed-up | {result['pooled_speedup']:.2f}x |\n\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench` section 12: Whisper through transformers beside openai-whisper, the same weights.

The offline `base` checkpoint is converted to a transformers WhisperModel folder
(ser_cache.whisper_to_hf), and the full `extract` pipeline runs on the same utterances with
each, alternating `repeats` times; the ratio is of the medians (transformers / openai-whisper),
per input mode. The states are compared too (the largest relative difference over every state
of the first BATCH utterances), so the two times are of the same computation.

    python bench/bench.py --only hf-whisper [--utterances N]
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from ser_cache.audio import load_utterance
from ser_cache.encoder import encoder_input, load_encoder
from ser_cache.extract import ExtractOptions, encode_batch, extract
from ser_cache.whisper_to_hf import convert_whisper

BATCH = 8
PATHS = ("openai-whisper", "transformers")


def max_relative_difference(encs: dict, records, mode: str) -> float:
    """max |a - b| / max |a| over every state of the first BATCH utterances, a = openai-whisper."""
    batch = [(0, i, *encoder_input(encs["transformers"], load_utterance(r.path)[0][0], mode))
             for i, r in enumerate(records[:BATCH])]
    states = list(range(encs["transformers"].n_states))
    a, b = (encode_batch(encs[k], batch, mode, states, "float32", "cpu") for k in PATHS)
    return max(float(np.abs(x[s] - y[s]).max() / np.abs(x[s]).max()) for x, y in zip(a, b) for s in states)


def bench_hf_whisper(checkpoint: Path, records, tmp: Path, modes=("short", "trim"), repeats: int = 3) -> dict:
    """12. Seconds of `extract` with each path per mode (trim on a quarter of the utterances, at
    least 16: it encodes 30 s per clip), their ratio, and the states' largest difference."""
    folder = convert_whisper(checkpoint, tmp / "whisper-hf")
    encs = {"openai-whisper": load_encoder(str(checkpoint)), "transformers": load_encoder(str(folder))}
    out = {"model": encs["openai-whisper"].name, "modes": {}}
    for mode in modes:
        subset = records if mode == "short" else records[: max(16, len(records) // 4)]
        seconds = {k: [] for k in PATHS}
        for i in range(repeats):
            for k in PATHS:  # alternating: a shared machine drifts within seconds
                dest = tmp / f"hf-{k}-{mode}-{i}"
                t = time.perf_counter()
                extract(subset, dest, "ravdess", encs[k], ExtractOptions(mode=mode, batch_size=BATCH, progress=False))
                seconds[k].append(time.perf_counter() - t)
                shutil.rmtree(dest)
        medians = {k: float(np.median(v)) for k, v in seconds.items()}
        out["modes"][mode] = {"utterances": len(subset), "seconds": seconds, "median_s": medians,
                              "ratio": medians["transformers"] / medians["openai-whisper"],
                              "max_relative_difference": max_relative_difference(encs, subset, mode)}
    return out


def hf_whisper_rows(r: dict) -> list[tuple]:
    """12. One table row per mode: the ratio, both medians and the states' difference."""
    return [(f"extract, transformers / openai-whisper, {r['model']} {mode} ({m['utterances']} utt)",
             f"{m['ratio']:.2f}x ({m['median_s']['transformers']:.1f} s / {m['median_s']['openai-whisper']:.1f} s)",
             "side by side", f"states max rel diff {m['max_relative_difference']:.1e}")
            for mode, m in r["modes"].items()]

"""How many bytes a feature cache takes, for every layout, before a single frame is encoded.

The encoder gives one frame per 20 ms (50 per second). A cache keeps `n_states` states (Whisper:
n_audio_layer + 1, the input embedding plus every block's output), each `dim` wide:

    frames, pooled by K   rows * n_states * dim * itemsize       itemsize 2 (float16) or 4 (float32)
                          rows = utterances * ceil(frames_per_utterance / K)
                          frames_per_utterance = 1500 (padded) or seconds * 50 / utterances (trim, short)
    stats                 utterances * n_states * 2 * dim * 4    mean and std of every value, float32

Assumptions. `frames_per_utterance` is the mean utterance's, rounded up as the encoder rounds
up each utterance's frames and pooling each utterance's last partial group. That is exact when
every utterance has the same number of frames; otherwise both the estimate and the truth lie in
[frames / K, frames / K + utterances) rows, so the error is under one row per utterance and
state. Padded mode keeps 1500 frames per utterance, taking utterances to be at most 30 s (the
"windows" long-audio policy keeps 1500 per window). The bytes are those of the states alone,
uncompressed as the shards store them: ids, labels and offsets (about 100 bytes per utterance)
and HDF5's own headers are left out, under 1% of even the smallest layout (tiny's statistics,
5 * 2 * 384 * 4 = 15 kB per utterance).
"""
from __future__ import annotations

import math
import operator

from .audio import SAMPLE_RATE, SAMPLES_PER_FRAME, WINDOW_SAMPLES
from .errors import OptionError

FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME  # 50.0 encoder frames per second of speech
N_WINDOW_FRAMES = WINDOW_SAMPLES // SAMPLES_PER_FRAME  # 1500 frames kept per utterance, padded mode
SECONDS_PER_HOUR = 60 * 60  # 3600 s
RAVDESS_MEAN_SECONDS = 3.7  # s, RAVDESS's mean utterance duration
STATS_ITEMSIZE = 4  # bytes: statistics are always float32
ITEMSIZES = {"float16": 2, "float32": 4}  # bytes per stored value of a frame
STORES = ("frames", "stats")
MODES = ("padded", "trim", "short")  # as encoder.MODES (kept here so this module needs no torch)
TABLE_POOLS = (2, 4, 8)

# (states, dim) = (n_audio_layer + 1, n_audio_state) of each Whisper size.
WHISPER_SHAPES = {"tiny": (5, 384), "base": (7, 512), "small": (13, 768), "medium": (25, 1024),
                  "large-v3": (33, 1280)}


def _whole(name: str, value: int, least: int) -> int:
    """value as an int >= least, or an OptionError naming what to pass."""
    try:
        n = operator.index(value)
    except TypeError:
        raise OptionError(f"{name} {value!r}: pass a whole number >= {least}") from None
    if n < least:
        raise OptionError(f"{name} {n}: pass a whole number >= {least}")
    return n


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise OptionError(f"{name} {value!r}: choose one of {tuple(choices)}")


def cache_bytes(n_states: int, dim: int, *, store: str = "frames", frame_pool: int = 1,
                dtype: str = "float16", mode: str = "trim", seconds: float = SECONDS_PER_HOUR,
                utterances: int | None = None, mean_duration: float = RAVDESS_MEAN_SECONDS) -> int:
    """Estimated bytes of a cache holding `seconds` of audio in `utterances` utterances.

    n_states: encoder states kept (Whisper: n_audio_layer + 1); dim: width of each state.
    store: "frames" (every frame, or their means over groups of `frame_pool` consecutive
      frames) or "stats" (mean and std per utterance and state, float32; `dtype`, `mode` and
      `frame_pool` do not change its size).
    dtype: storage precision of frames ("float16", "float32"); mode: "padded" (1500 frames
      per utterance), "trim" or "short" (50 frames per second of audio).
    seconds: audio duration in s; utterances: their number, by default
      round(seconds / mean_duration), mean_duration in s.
    See the module docstring for the formula and how exact it is.
    """
    _check_choice("store", store, STORES)
    _check_choice("dtype", dtype, ITEMSIZES)
    _check_choice("mode", mode, MODES)
    n_states, dim = _whole("n_states", n_states, 1), _whole("dim", dim, 1)
    frame_pool = _whole("frame_pool", frame_pool, 1)
    if not mean_duration > 0:
        raise OptionError(f"mean_duration {mean_duration!r}: pass a mean utterance duration in seconds, > 0")
    if not seconds >= 0:
        raise OptionError(f"seconds {seconds!r}: pass the audio duration in seconds, >= 0")
    if utterances is None:
        utterances = max(1, round(seconds / mean_duration)) if seconds > 0 else 0
    utterances = _whole("utterances", utterances, 1 if seconds > 0 else 0)
    if store == "stats":
        return utterances * n_states * 2 * dim * STATS_ITEMSIZE
    if utterances == 0:
        return 0
    per_utterance = N_WINDOW_FRAMES if mode == "padded" else seconds * FRAMES_PER_SECOND / utterances
    # The 1e-9 keeps float noise (180.00000000000003) from adding a row to every utterance.
    rows = utterances * math.ceil(per_utterance / frame_pool - 1e-9)
    return rows * n_states * dim * ITEMSIZES[dtype]


def format_bytes(n: float) -> str:
    """n bytes in decimal units, two or three significant digits: '950 B', '1.9 GB', '15 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            x = n / size
            return f"{x:.1f} {unit}" if x < 10 else f"{x:.0f} {unit}"
    return f"{n:.0f} B"


def layout_name(store: str, frame_pool: int = 1, dtype: str = "float16", mode: str = "trim") -> str:
    """A layout in words: 'trim frames, float16', 'padded frames pooled x4, float32', ..."""
    if store == "stats":
        return "statistics (mean, std), float32"
    pooled = f" pooled x{frame_pool}" if frame_pool != 1 else ""
    return f"{mode} frames{pooled}, {dtype}"


def describe_estimate(n_states: int, dim: int, *, seconds: float, utterances: int, store: str = "frames",
                      frame_pool: int = 1, dtype: str = "float16", mode: str = "trim") -> str:
    """One line for a dry run: 'about 1.9 GB (7 states x 512, trim frames, float16, 5310 s of
    audio in 1440 utterances)'. Arguments as `cache_bytes`, which validates them."""
    n = cache_bytes(n_states, dim, store=store, frame_pool=frame_pool, dtype=dtype, mode=mode,
                    seconds=seconds, utterances=utterances)
    return (f"about {format_bytes(n)} ({n_states} states x {dim}, {layout_name(store, frame_pool, dtype, mode)}, "
            f"{seconds:.0f} s of audio in {utterances} utterances)")


def storage_table(mean_duration: float = RAVDESS_MEAN_SECONDS, pools: tuple[int, ...] = TABLE_POOLS,
                  dtype: str = "float16", mode: str = "trim") -> str:
    """A Markdown table of GB (10^9 bytes) per hour of audio: one row per Whisper size in
    WHISPER_SHAPES, columns frames, frames pooled by each of `pools`, and statistics; a caption
    line above it states the settings."""
    utterances = max(1, round(SECONDS_PER_HOUR / mean_duration))
    header = ["model (states x dim)", "frames", *(f"pooled x{k}" for k in pools), "statistics"]
    kept = (f"padded mode, {N_WINDOW_FRAMES} per utterance" if mode == "padded"
            else f"trim and short modes, {FRAMES_PER_SECOND:.0f} per second")
    lines = [f"GB (10^9 bytes) per hour of audio. Frames: {dtype}, {kept}; pooled xK keeps their "
             f"means over K consecutive frames. "
             f"Statistics: mean and std per utterance and state, float32, at {mean_duration:g} s "
             f"per utterance ({utterances} utterances per hour).",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, (states, dim) in WHISPER_SHAPES.items():
        common = dict(dtype=dtype, mode=mode, seconds=SECONDS_PER_HOUR, utterances=utterances)
        cells = [cache_bytes(states, dim, frame_pool=k, **common) for k in (1, *pools)]
        cells.append(cache_bytes(states, dim, store="stats", **common))
        lines.append(f"| {name} ({states} x {dim}) | " + " | ".join(f"{c / 1e9:#.3g}" for c in cells) + " |")
    return "\n".join(lines)

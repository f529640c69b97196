"""Time pooling: each utterance's frames averaged in consecutive groups of K.

Whisper gives one state per 20 ms of audio; emotion cues live at the rate of syllables and
phrases. Averaging frames in groups of K = 2, 4, 8 (40, 80, 160 ms) makes a layer K times
smaller on disk and in memory, and a pooling head's per-frame front K times cheaper.

    frames (T, D), K  ->  ceil(T / K) rows: rows j = mean of frames jK .. min((j+1)K, T) - 1

The last group of an utterance may be partial: it is the mean of the frames it holds, never
padded. A *row's weight* is the number of encoder frames it stands for (K, or fewer for the
last row), so that pooling already pooled rows again (a cache pooled by K0, read by a multiple
K of it) is the weighted mean of their encoder frames, exactly as if pooled from the frames.

Numbers. Sums are taken in float64 and each pooled row is rounded to the dtype of its input
(the cache's: float16 by default), so that pooling at read time, a pooled cache written by
`extract --frame-pool` and one made by `derive --frame-pool` hold the same bytes.
"""
from __future__ import annotations

import numpy as np

from .errors import OptionError

BLOCK_VALUES = 1 << 24  # values pooled at once (128 MiB of float64): bounds the float64 copy


def check_frame_pool(k, option: str = "--frame-pool") -> int:
    """K as an int >= 1, or OptionError naming the fix."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise OptionError(f"{option} {k!r}: give a whole number of frames >= 1 to average "
                          "(1: every 20 ms frame, 4: 80 ms)")
    return int(k)


def read_factor(stored: int, asked: int, what: str) -> int:
    """How many stored rows make one row of `asked` (a multiple of `stored`), or OptionError
    naming what `what` holds and the fix."""
    asked = check_frame_pool(asked)
    if asked % stored:
        finer = "finer frames than" if asked < stored else "frames that are not a multiple of"
        raise OptionError(
            f"--frame-pool {asked} asks for {finer} {what} holds (frames pooled by {stored}): give a "
            f"multiple of {stored} (e.g. {stored} or {2 * stored}), or extract a cache with --frame-pool 1")
    return asked // stored


def pooled_lengths(n_frames: np.ndarray, k: int) -> np.ndarray:
    """(n,) rows per utterance after pooling by k: ceil(n_frames / k)."""
    return -(-np.asarray(n_frames, dtype=np.int64) // k)


def row_weights(n_rows: np.ndarray, encoder_frames: np.ndarray, k: int) -> np.ndarray:
    """(sum n_rows,) float64: the encoder frames each stored row stands for, in a layer pooled by
    k whose utterance i has n_rows[i] rows made from encoder_frames[i] frames (k, and what is
    left for each utterance's last row)."""
    n_rows = np.asarray(n_rows, dtype=np.int64)
    weights = np.full(int(n_rows.sum()), float(k))
    last = np.cumsum(n_rows)[n_rows > 0] - 1
    weights[last] = np.asarray(encoder_frames, dtype=np.int64)[n_rows > 0] - k * (n_rows[n_rows > 0] - 1)
    assert np.all(weights > 0), "a row standing for no encoder frame: encoder_frames and n_rows disagree"
    return weights


def pool_rows(frames: np.ndarray, offsets: np.ndarray, factor: int,
              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Average each utterance's rows in consecutive groups of `factor`.

    frames: (offsets[-1], D) rows of every utterance back to back (utterance i is rows
      offsets[i]:offsets[i + 1]); offsets: (n + 1,) int64.
    weights: (offsets[-1],) encoder frames per row (row_weights), None when every row is one frame.
    Returns (pooled (offsets'[-1], D) in frames.dtype, offsets' (n + 1,) int64).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    pooled_n = pooled_lengths(lengths, factor)
    new_offsets = np.concatenate([[0], np.cumsum(pooled_n)]).astype(np.int64)
    if factor == 1:
        return frames, offsets
    # First row of every group: utterance start + factor * (group number within the utterance).
    within = np.arange(int(new_offsets[-1])) - np.repeat(new_offsets[:-1], pooled_n)
    starts = np.repeat(offsets[:-1], pooled_n) + factor * within
    out = np.empty((len(starts), frames.shape[1]), dtype=frames.dtype)
    # Whole groups at a time, about BLOCK_VALUES values each: groups tile the rows, so group g
    # spans rows starts[g] .. starts[g + 1] - 1 (the last one, up to the end).
    rows_per_block = max(1, BLOCK_VALUES // max(1, frames.shape[1]))
    cuts = np.unique(np.append(np.searchsorted(starts, np.arange(0, len(frames), rows_per_block)), len(starts)))
    for g0, g1 in zip(cuts[:-1], cuts[1:]):
        r0, r1 = int(starts[g0]), int(starts[g1]) if g1 < len(starts) else len(frames)
        w = np.ones(r1 - r0) if weights is None else np.asarray(weights[r0:r1], dtype=np.float64)
        local = starts[g0:g1] - r0
        sums = np.add.reduceat(frames[r0:r1].astype(np.float64) * w[:, None], local, axis=0)
        out[g0:g1] = sums / np.add.reduceat(w, local)[:, None]
    return out, new_offsets

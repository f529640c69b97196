"""One encoder layer (or several) of a whole corpus, in memory: the input of every head.

Frames of all utterances are stored back to back in one array (ragged layout), so that a
layer loads with a few large reads and takes about its own size in memory:

    frames[offsets[i]:offsets[i + 1]]   # the (n_frames[i], width) states of utterance i

With several states (a multi-layer selection, layers.py), each row holds the frame's states
side by side, in the order of `layers`: row = [state layers[0] (dim) | state layers[1] (dim) |
...], width = n_states * dim; a head sees them as one (B, T, width) tensor and splits them
itself. One state is the plain case, width = dim.

`batch()` turns a list of utterance indices into a zero-padded tensor and a boolean mask,
which is what the heads take.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from .errors import OptionError
from .pooling import pool_rows, read_factor, row_weights


@dataclass
class LayerData:
    """States of one layer (or several, stacked in each row) for every utterance of a cache.

    frames: (total_frames, width) float16 or float32, utterances back to back;
      width = n_states * dim.
    offsets: (n + 1,) int64, utterance i spans frames[offsets[i]:offsets[i+1]].
    ids, labels, speakers, groups: (n,) str arrays, in cache order.
    layer: the state index (0 = input embedding, last = after ln_post), or a tuple of the
      states stacked in each row (layers.Selection).
    target_names: the numeric targets the utterances carry (records.target_names), sorted;
      empty when none.
    target_values: (n, len(target_names)) float64, NaN where an utterance lacks a value;
      None when there are no targets.
    frame_pool: encoder frames averaged into each row (pooling.py; 1: every 20 ms frame).
    encoder_frames: (n,) int64 encoder frames each utterance's rows were made from; None when
      frame_pool is 1 (then it is n_frames).
    """

    frames: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    groups: np.ndarray
    layer: int | tuple[int, ...]
    target_names: tuple[str, ...] = ()
    target_values: np.ndarray | None = None
    frame_pool: int = 1
    encoder_frames: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.ids)
        assert self.frame_pool == 1 or self.encoder_frames is not None, "pooled rows need their encoder_frames"
        assert self.frames.ndim == 2 and self.frames.shape[1] % self.n_states == 0, (
            f"frames {self.frames.shape} cannot hold {self.n_states} states per row"
        )
        assert self.offsets.shape == (n + 1,), f"offsets {self.offsets.shape} for {n} utterances"
        assert self.offsets[0] == 0 and self.offsets[-1] == len(self.frames), (
            f"offsets end at {self.offsets[-1]}, frames has {len(self.frames)} rows"
        )
        for name in ("labels", "speakers", "groups"):
            assert len(getattr(self, name)) == n, f"{name} has {len(getattr(self, name))} rows, ids {n}"
        if self.target_names:
            assert self.target_values is not None and self.target_values.shape == (n, len(self.target_names)), (
                f"target_values {getattr(self.target_values, 'shape', None)} for {n} utterances, {self.target_names}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def layers(self) -> list[int]:
        """The states in each row, in order."""
        return [self.layer] if isinstance(self.layer, (int, np.integer)) else list(self.layer)

    @property
    def n_states(self) -> int:
        return len(self.layers)

    @property
    def width(self) -> int:
        """Values per frame row: n_states * dim."""
        return self.frames.shape[1]

    @property
    def dim(self) -> int:
        """Width of one state."""
        return self.frames.shape[1] // self.n_states

    @property
    def n_frames(self) -> np.ndarray:
        """(n,) number of valid frames per utterance."""
        return np.diff(self.offsets)

    @property
    def encoder_counts(self) -> np.ndarray:
        """(n,) encoder frames behind each utterance's rows."""
        return self.n_frames if self.encoder_frames is None else np.asarray(self.encoder_frames)

    def pooled(self, frame_pool: int, what: str = "this layer") -> "LayerData":
        """This layer with each row the mean of `frame_pool` encoder frames (pooling.py): a
        multiple of self.frame_pool (OptionError naming `what` and the fix otherwise); self
        when equal. Rows already pooled are weighted by the encoder frames they stand for."""
        factor = read_factor(self.frame_pool, frame_pool, what)
        if factor == 1:
            return self
        weights = None if self.frame_pool == 1 else row_weights(self.n_frames, self.encoder_counts, self.frame_pool)
        frames, offsets = pool_rows(self.frames, self.offsets, factor, weights)
        return replace(self, frames=frames, offsets=offsets, frame_pool=int(frame_pool),
                       encoder_frames=np.asarray(self.encoder_counts, dtype=np.int64))

    def classes(self) -> tuple[list[str], np.ndarray]:
        """(class names, sorted; (n,) int64 class number of each utterance): the one label
        encoding of stage 2."""
        names = sorted(set(self.labels.tolist()))
        return names, np.searchsorted(names, self.labels).astype(np.int64)

    @cached_property
    def statistics(self) -> np.ndarray:
        """(n, 2 * width) float64: mean and std over each utterance's frames of every value of
        the row (the linear probe's input; with several states, every state's), computed once
        per LayerData."""
        out = np.empty((len(self), 2 * self.width))
        self.fill_statistics(out)
        return out

    def fill_statistics(self, out: np.ndarray) -> None:
        """Write `statistics` into out (len(self), 2 * width), row by row (streaming.py fills
        its rows block by block)."""
        for i in range(len(self)):
            out[i] = utterance_statistics(self.utterance(i))

    def utterance(self, i: int) -> np.ndarray:
        """(n_frames[i], width) states of utterance i (a view, no copy)."""
        return self.frames[self.offsets[i] : self.offsets[i + 1]]

    def batch(self, index, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded states and mask for the utterances `index`.

        Returns x: (B, T_max, width) and mask: (B, T_max) bool, True on real frames.
        """
        index = np.asarray(index)
        lengths = self.n_frames[index]
        t_max = int(lengths.max())
        x = np.zeros((len(index), t_max, self.width), dtype=self.frames.dtype)
        for row, i in enumerate(index):
            x[row, : lengths[row]] = self.utterance(int(i))
        mask = np.arange(t_max)[None, :] < lengths[:, None]
        return (
            torch.from_numpy(x).to(device=device, dtype=dtype),
            torch.from_numpy(mask).to(device),
        )

    def moments(self, index) -> tuple[np.ndarray, np.ndarray]:
        """Per-value mean and std, (width,) float64 each, over every frame of utterances `index`:
        with several states, each state's own statistics.

        Accumulated one utterance at a time in float64 (FrameSums), so no copy of the frames is made.
        """
        sums = FrameSums(self.width)
        sums.add(self, index)
        return sums.moments()

    def subset(self, index) -> "LayerData":
        """A new LayerData holding only the utterances `index` (frames copied)."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.n_frames[index]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        frames = np.concatenate([self.utterance(int(i)) for i in index]) if len(index) else self.frames[:0]
        return LayerData(
            frames=frames,
            offsets=offsets,
            ids=self.ids[index],
            labels=self.labels[index],
            speakers=self.speakers[index],
            groups=self.groups[index],
            layer=self.layer,
            target_names=self.target_names,
            target_values=None if self.target_values is None else self.target_values[index],
            frame_pool=self.frame_pool,
            encoder_frames=None if self.encoder_frames is None else np.asarray(self.encoder_frames)[index],
        )


def utterance_statistics(frames: np.ndarray) -> np.ndarray:
    """(2 W,) float64: the mean and (population) std over time of every value of one
    utterance's frames (T, W), computed in float64 from the frames as stored: the linear probe's
    features, and what a statistics cache stores (as float32)."""
    u = frames.astype(np.float64)
    return np.concatenate([u.mean(axis=0), u.std(axis=0)])


@dataclass
class StatsLayer:
    """One state (or several) of every utterance of a statistics cache: no frames, only each
    utterance's mean and std of every value, what the linear probe reads (LayerData.statistics).

    statistics: (n, 2 * width) float64 (float32 values as the cache stores them): the means of
      every value of the row (states side by side, as LayerData's), then their stds; an
      ndarray, or rows read from the cache only when indexed (cache.StatisticsRows).
    The rest as LayerData; frame_pool: the frames the statistics were taken over.
    memory_budget: bytes the linear probe may hold while fitting (streaming.open_layer's
      budget); None: streaming.default_budget().
    """

    statistics: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    groups: np.ndarray
    layer: int | tuple[int, ...]
    target_names: tuple[str, ...] = ()
    target_values: np.ndarray | None = None
    frame_pool: int = 1
    encoder_frames: np.ndarray | None = None
    memory_budget: int | None = None

    def __post_init__(self):
        n = len(self.ids)
        assert self.statistics.shape[0] == n and self.statistics.shape[1] % (2 * self.n_states) == 0, (
            f"statistics {self.statistics.shape} for {n} utterances of {self.n_states} states")

    __len__ = LayerData.__len__
    layers = LayerData.layers
    n_states = LayerData.n_states
    classes = LayerData.classes

    @property
    def width(self) -> int:
        """Values per frame row of the frames the statistics summarise: n_states * dim."""
        return self.statistics.shape[1] // 2

    @property
    def dim(self) -> int:
        return self.width // self.n_states

    def pooled(self, frame_pool: int, what: str = "this layer") -> "StatsLayer":
        """Self when frame_pool is the one its statistics were taken at (check_statistics_pool)."""
        check_statistics_pool(self.frame_pool, frame_pool, what)
        return self

    def subset(self, index) -> "StatsLayer":
        index = np.asarray(index, dtype=np.int64)
        return replace(self, statistics=self.statistics[index], ids=self.ids[index], labels=self.labels[index],
                       speakers=self.speakers[index], groups=self.groups[index],
                       target_values=None if self.target_values is None else self.target_values[index],
                       encoder_frames=None if self.encoder_frames is None else np.asarray(self.encoder_frames)[index])


def check_statistics_pool(stored: int, asked: int, what: str) -> None:
    """Statistics taken over frames pooled by `stored` cannot be pooled again: OptionError
    naming the fix when `asked` differs."""
    if asked != stored:
        raise OptionError(
            f"--frame-pool {asked}: {what} holds statistics over frames pooled by {stored}, not frames: "
            f"train with --frame-pool {stored}, or derive a statistics cache from a frames cache with "
            f"`ser-cache derive FRAMES_CACHE --out NEW --stats --frame-pool {asked}`")


class FrameSums:
    """Running float64 sums of frame values and their squares, one utterance at a time: the
    moments of frames that need not all be in memory at once (streaming.py adds them block by
    block, in the same order, so that the numbers are those of LayerData.moments)."""

    def __init__(self, width: int):
        self.total, self.squares, self.count = np.zeros(width), np.zeros(width), 0

    def add(self, data: LayerData, index) -> None:
        """Add every frame of the utterances `index` of `data`, in that order."""
        for i in np.asarray(index):
            u = data.utterance(int(i)).astype(np.float64)
            self.total += u.sum(axis=0)
            self.squares += np.square(u).sum(axis=0)
            self.count += len(u)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std), (width,) float64 each."""
        assert self.count > 0, "moments of no frames"
        mean = self.total / self.count
        return mean, np.sqrt(np.maximum(self.squares / self.count - mean**2, 0.0))

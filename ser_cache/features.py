"""One encoder layer of a whole corpus, in memory: the input of every pooling head.

Frames of all utterances are stored back to back in one array (ragged layout), so that a
layer loads with a few large reads and takes about its own size in memory:

    frames[offsets[i]:offsets[i + 1]]   # the (n_frames[i], dim) states of utterance i

`batch()` turns a list of utterance indices into a zero-padded tensor and a boolean mask,
which is what the heads take.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass
class LayerData:
    """States of one layer for every utterance of a cache.

    frames: (total_frames, dim) float16 or float32, utterances back to back.
    offsets: (n + 1,) int64, utterance i spans frames[offsets[i]:offsets[i+1]].
    ids, labels, speakers, groups: (n,) str arrays, in cache order.
    layer: the state index (0 = input embedding, last = after ln_post).
    """

    frames: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    groups: np.ndarray
    layer: int

    def __post_init__(self):
        n = len(self.ids)
        assert self.offsets.shape == (n + 1,), f"offsets {self.offsets.shape} for {n} utterances"
        assert self.offsets[0] == 0 and self.offsets[-1] == len(self.frames), (
            f"offsets end at {self.offsets[-1]}, frames has {len(self.frames)} rows"
        )
        for name in ("labels", "speakers", "groups"):
            assert len(getattr(self, name)) == n, f"{name} has {len(getattr(self, name))} rows, ids {n}"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.frames.shape[1]

    @property
    def n_frames(self) -> np.ndarray:
        """(n,) number of valid frames per utterance."""
        return np.diff(self.offsets)

    def classes(self) -> tuple[list[str], np.ndarray]:
        """(class names, sorted; (n,) int64 class number of each utterance): the one label
        encoding of stage 2, records.labels_of's order."""
        names = sorted(set(self.labels.tolist()))
        return names, np.searchsorted(names, self.labels).astype(np.int64)

    @cached_property
    def statistics(self) -> np.ndarray:
        """(n, 2 * dim) float64: mean and std over each utterance's frames (the linear probe's
        input), computed once per LayerData."""
        out = np.empty((len(self), 2 * self.dim))
        for i in range(len(self)):
            u = self.utterance(i).astype(np.float64)
            out[i, : self.dim], out[i, self.dim :] = u.mean(axis=0), u.std(axis=0)
        return out

    def utterance(self, i: int) -> np.ndarray:
        """(n_frames[i], dim) states of utterance i (a view, no copy)."""
        return self.frames[self.offsets[i] : self.offsets[i + 1]]

    def batch(self, index, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded states and mask for the utterances `index`.

        Returns x: (B, T_max, dim) and mask: (B, T_max) bool, True on real frames.
        """
        index = np.asarray(index)
        lengths = self.n_frames[index]
        t_max = int(lengths.max())
        x = np.zeros((len(index), t_max, self.dim), dtype=self.frames.dtype)
        for row, i in enumerate(index):
            x[row, : lengths[row]] = self.utterance(int(i))
        mask = np.arange(t_max)[None, :] < lengths[:, None]
        return (
            torch.from_numpy(x).to(device=device, dtype=dtype),
            torch.from_numpy(mask).to(device),
        )

    def moments(self, index) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std, (dim,) float64 each, over every frame of utterances `index`.

        Accumulated one utterance at a time in float64, so no copy of the frames is made.
        """
        total = np.zeros(self.dim)
        squares = np.zeros(self.dim)
        count = 0
        for i in np.asarray(index):
            u = self.utterance(int(i)).astype(np.float64)
            total += u.sum(axis=0)
            squares += np.square(u).sum(axis=0)
            count += len(u)
        assert count > 0, "moments of no frames"
        mean = total / count
        return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))

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
        )

"""Padded batches of a layer's utterances, built once per fold, and predictions over them.

    LayerData + utterance indices --make_batches--> [(x (B, T, dim), mask (B, T), y (B,))]
    any layer + utterance indices --batch_source--> HeldBatches, or for a layer streamed from
                                                    the shards streaming.BlockBatches
    a head + batches --predict--> (n, n_classes) probabilities, or (n, n_targets) values

Utterances are grouped by length so that batches carry little padding (`batch_order`); a
head's fixed input transform can be applied once when the batches are built (`transform`);
time masking (`drop_spans`) removes spans of a training batch's frames, never padding.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .features import LayerData, StatsLayer
from .heads import Head

MASK_SPAN = 10  # frames per time-masking span: 200 ms of 20 ms encoder frames, about a syllable
BUCKET_BATCHES = 32  # training batches per length bucket: shuffled, then sorted within a bucket
EVAL_BATCH_SIZE = 64  # evaluation has no gradients, so larger batches are cheap
FLOAT32_BATCH_BYTES = 3 * 2**30  # batches up to this size are held in float32 (see make_batches)


def make_batches(data: LayerData, y: np.ndarray | None, index: np.ndarray, batch_size: int,
                 device: torch.device, rng: np.random.Generator | None = None, transform=None,
                 ordered: bool = False):
    """Padded batches of the utterances `index`, built once.

    Returns (batches, order): batches is a list of (x (B, T, width) float32, or the cache's
    dtype past FLOAT32_BATCH_BYTES, mask (B, T) bool, y (B,) int64 or None without y) on
    `device`; order (len(index),) gives the utterance of each row, batch after batch. Without
    rng, utterances are sorted by length (evaluation); with rng, they are shuffled, then
    sorted by length within buckets of BUCKET_BATCHES batches, so that batches mix utterances
    but carry little padding (batch_order); ordered: `index` is that order already.
    transform: applied to each x once here (a head's `inputs`).
    """
    order = np.asarray(index) if ordered else batch_order(data, index, batch_size, rng)
    starts = range(0, len(order), batch_size)
    padded_frames = sum(len(order[i : i + batch_size]) * int(data.n_frames[order[i : i + batch_size]].max()) for i in starts)
    # Converting float16 frames to float32 once per fold, not at every step, halves the time
    # of a training step on CPU; only a fold too large for the budget keeps the cache dtype.
    fits = padded_frames * data.width * 4 <= FLOAT32_BATCH_BYTES
    dtype = torch.float32 if fits else torch.from_numpy(data.frames[:0]).dtype
    batches = []
    for start in starts:
        rows = order[start : start + batch_size]
        x, mask = data.batch(rows, dtype=dtype, device=device)
        if transform is not None:
            with torch.no_grad():
                x = transform(x.float()).to(dtype)
        batches.append((x, mask, None if y is None else torch.from_numpy(y[rows]).to(device)))
    return batches, order




class HeldBatches:
    """Batches built once and held in memory (make_batches): the batch source of a LayerData.

    A batch source is what the training loop and `predict` read batches from: iterated, it
    gives the batches in a fixed order (evaluation; `order` holds each row's utterance);
    `epoch(rng)` gives them in an epoch's random order. streaming.BlockBatches is the other
    one, for a layer read from the shards a block at a time."""

    def __init__(self, batches: list, order: np.ndarray):
        self.batches, self.order = batches, order

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def epoch(self, rng: np.random.Generator):
        """Every batch once, in an order drawn from rng."""
        for b in rng.permutation(len(self.batches)):
            yield self.batches[b]


def batch_source(data, y: np.ndarray | None, index, batch_size: int, device: torch.device,
                 rng: np.random.Generator | None = None, transform=None):
    """The batches of utterances `index` (see HeldBatches): built once and held for a LayerData
    (make_batches), read a block of shards at a time for a streaming.StreamedLayer (its
    `batches`, whose order is drawn within blocks). rng and transform as make_batches."""
    if isinstance(data, LayerData):
        return HeldBatches(*make_batches(data, y, index, batch_size, device, rng, transform))
    return data.batches(y, index, batch_size, device, rng, transform)


def statistics_batches(data, y: np.ndarray | None, index, batch_size: int, device: torch.device,
                       rng: np.random.Generator | None = None) -> HeldBatches:
    """The batches of a head that reads statistics only (Head.reading): (x, None, y) with x the
    raw statistics rows of utterances `index` (data.statistics, (B, 2 width)) as float32, so
    that a frames cache (float64 statistics) and a statistics cache (float32) give the same
    numbers; no mask, no padding. With rng, the utterances are shuffled once (the batches'
    order then changes every epoch, as HeldBatches does); without, in `index` order."""
    index = np.asarray(index)
    order = index if rng is None else index[rng.permutation(len(index))]
    rows = torch.from_numpy(np.asarray(data.statistics[order], dtype=np.float32))
    batches = []
    for start in range(0, len(order), batch_size):
        part = slice(start, start + batch_size)
        yb = None if y is None else torch.from_numpy(y[order[part]]).to(device)
        batches.append((rows[part].to(device), None, yb))
    return HeldBatches(batches, order)


def batch_order(data: LayerData, index, batch_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The utterances `index` in batch order: by length without rng (evaluation); with rng,
    shuffled, then sorted by length within buckets of BUCKET_BATCHES batches."""
    index = np.asarray(index)
    lengths = data.n_frames[index]
    if rng is None:
        return index[np.argsort(lengths, kind="stable")]
    perm = rng.permutation(len(index))
    bucket = batch_size * BUCKET_BATCHES
    return np.concatenate([index[p[np.argsort(lengths[p], kind="stable")]]
                           for p in np.split(perm, range(bucket, len(perm), bucket))])


def drop_spans(x: torch.Tensor, mask: torch.Tensor, fraction: float, span: int = MASK_SPAN) -> tuple[torch.Tensor, torch.Tensor]:
    """Time masking of a training batch: remove about `fraction` of each utterance's real
    frames, in spans of `span` frames, and close up the gaps.

    x: (B, T, dim), mask: (B, T) bool, True on each row's first n_b frames. Each row's real
    frames are cut into spans of `span` frames from a random phase (so the first and last
    may be shorter) and round(fraction * spans) of them, rounded at random so that the
    expected fraction is exact, are dropped, but never all: at least one span, so one frame,
    stays. Padded frames are never counted, dropped or kept. Returns (x', mask') with
    T' = the longest kept row: each row's kept frames in their order, then zero padding.
    Draws from torch's global RNG (seeded per fit).
    """
    B, T = mask.shape
    device = mask.device
    n = mask.sum(dim=1)  # (B,) real frames, >= 1
    phase = torch.randint(0, span, (B,), device=device)
    chunk = (torch.arange(T, device=device)[None, :] + phase[:, None]) // span  # (B, T) span of each frame
    n_spans = (n - 1 + phase) // span + 1  # spans holding real frames
    n_drop = torch.floor(fraction * n_spans + torch.rand(B, device=device)).long().clamp(max=n_spans - 1)
    most = (T - 1 + span - 1) // span + 1  # spans of the longest possible row
    scores = torch.rand(B, most, device=device).masked_fill(torch.arange(most, device=device)[None, :] >= n_spans[:, None],
                                                           float("inf"))  # spans of padding: never drawn
    rank = scores.argsort(dim=1).argsort(dim=1)  # a random order of each row's spans
    keep = mask & ~(rank < n_drop[:, None]).gather(1, chunk.clamp(max=most - 1))
    lengths = keep.sum(dim=1)  # >= 1 by construction (tested; no check here: it would wait for the GPU)
    t_kept = int(lengths.max())
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :t_kept]  # kept frames first, in order
    new_mask = torch.arange(t_kept, device=device)[None, :] < lengths[:, None]
    kept = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    return kept.masked_fill(~new_mask[..., None], 0.0), new_mask


@torch.no_grad()
def predict(model: Head, batches, dropout: bool = False, step=None) -> np.ndarray:
    """(n, n_classes) float64 class probabilities, or a regression head's (n, n_targets)
    target values, rows in batch order. step(x, mask): the forward output of a batch (default:
    the model's forward; a fitter passes its training step for batches that hold
    model.inputs(x) already). dropout=True is the flawed reference behaviour (model left in
    training mode)."""
    model.train(dropout)
    step = step or model
    rows = [step(x.float(), mask) for x, mask, _ in batches]
    rows = [r if model.regression else r.softmax(dim=-1) for r in rows]
    return torch.cat([r.cpu() for r in rows]).numpy().astype(np.float64)


def predict_proba(model: nn.Module, data, index, device: torch.device,
                  dropout: bool = False) -> np.ndarray:
    """(len(index), n_classes) class probabilities (a regression head's target values) of
    the utterances `index`, in that order. A head that reads statistics only reads them
    (data.statistics) through its from_statistics, on any layer; a StatsLayer has nothing else."""
    index = np.asarray(index)
    if isinstance(data, StatsLayer) or model.reads == "statistics":
        model.train(dropout)
        with torch.no_grad():
            out = model.from_statistics(torch.from_numpy(data.statistics[index]).to(device))
        out = out if model.regression else out.softmax(dim=-1)
        return out.cpu().numpy().astype(np.float64)
    batches = batch_source(data, None, index, EVAL_BATCH_SIZE, device)
    return in_order(predict(model, batches, dropout), batches.order, index)


def in_order(rows: np.ndarray, order: np.ndarray, index) -> np.ndarray:
    """`rows` (one per utterance of `order`) rearranged to follow `index`, the same utterances."""
    row = {int(u): i for i, u in enumerate(order)}
    return rows[[row[int(u)] for u in index]]

"""Layers larger than memory: training batches read from the cache's shards within a budget.

    Cache + selection + budget --open_layer--> LayerData (fits)  or  StreamedLayer (does not)
    StreamedLayer + utterances --BlockBatches--> padded batches, one block of shards at a time

When to stream. `train` and `sweep` take `--memory-budget` (`parse_size`; default: half of the
memory the kernel reports available, `default_budget`). `open_layer` estimates the peak of the
in-memory path (the layer in the cache's dtype, plus the float32 padded batches that
batches.make_batches builds of it once per fold, `in_memory_bytes`) and reads the layer whole
when that fits, as before; otherwise it opens the layer as a StreamedLayer: metadata in
memory, frames read from the shards when a batch needs them.

Blocks. A shard stores one contiguous dataset per layer, so a run of consecutive shards is
read with one sequential read per shard and state (Cache.read_slices). The shards are cut
into *blocks* (`plan_blocks`): runs of consecutive shards whose slices, plus the padded
batches alive at once (`batch_bytes`: one being built, the previous one), fit the budget less
HEADROOM (1/8, for the head's activations, Python objects, the allocator). One block is held
at a time, in one buffer reused for every block. Not counted: the metadata, and the linear
probe's per-utterance statistics ((n, 2 * width) float64, what scikit-learn fits on). A
budget below the largest shard's slice and the batches is refused, naming that minimum (a
smaller `extract --shard-mb`, or `--batch-size`, lowers it).

Batch order. The in-memory path shuffles a fold's training utterances globally, buckets them
by length into batches, and shuffles those batches each epoch (batches.batch_order); drawn
that way, a streamed epoch would read every shard once per batch. A streamed fold instead
draws its batches within each block (the block's training utterances shuffled, then bucketed
by length: batch_order on that block), and each epoch visits the blocks in a random order and
each block's batches in a random order, so an epoch reads every shard once (and a validation
or test pass once more; evaluation batches are sorted by length within each block, and no
larger than training batches). A batch never mixes blocks, so a block may end with one short
batch.

Same numbers. The two orders differ, so on the same seed the two paths train different (equally
valid) heads; we keep the in-memory order because changing it would change every result made
so far (tests/test_pinned_run.py pins one). What is the same is everything else: a
StreamedLayer over a layer already in memory (`from_memory`, same blocks) draws the same order
and trains exactly as one over the shards, which tests/test_streaming.py checks result for
result; the input standardisation (features.FrameSums, accumulated in utterance order) and the
linear probe's features equal the in-memory path's bit for bit.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .batches import batch_order
from .errors import OptionError
from .features import FrameSums, LayerData, StatsLayer
from .pooling import read_factor
from .layers import Selection, label, selection, states_of

log = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.5  # of MemAvailable: the rest for the OS page cache, other jobs, torch
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
SIZE_FORMAT = "a number of bytes with an optional K, M, G or T suffix (powers of 1024), e.g. 500M, 2G or 1.5G"


class MemoryBudgetError(OptionError):
    """A --memory-budget that cannot be used; the message names the fix."""


def parse_size(text: str) -> int:
    """Bytes of a size such as '2G', '500M', '1.5G', '64MiB' or '1048576' (powers of 1024)."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise MemoryBudgetError(f"--memory-budget {text!r} is not a size: give {SIZE_FORMAT}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """Bytes in the largest unit that keeps a number >= 1, rounded up to a tenth, e.g. '37.2M'
    (so that "needs at least" is true, and parse_size reads it back)."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{math.ceil(n / _UNITS[unit] * 10) / 10:.1f}{unit}"
    return f"{int(n)}"


def default_budget() -> int:
    """DEFAULT_BUDGET_FRACTION of the memory available now (MemAvailable of /proc/meminfo; the
    physical memory where that file is absent)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        available = kib * 1024
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(available * DEFAULT_BUDGET_FRACTION)


def batch_bytes(batch_size: int, t_max: int, width: int, itemsize: int) -> int:
    """Most bytes padded batches take at once: while a (B, T, width) batch is built (the array in
    the cache's dtype, its float32 tensor, and the standardisation's two float32 results), the
    loop still holds the previous batch (float32)."""
    return batch_size * t_max * width * (itemsize + 4 * 4)


def in_memory_bytes(frames: int, width: int, itemsize: int) -> int:
    """Estimated peak of training on a layer read whole: the layer in its dtype, plus a float32
    copy of its frames as the fold's padded batches (training and validation; padding aside)."""
    return frames * width * (itemsize + 4)


@dataclass(frozen=True)
class Block:
    """Consecutive shards read together: utterances u0..u1-1, frames f0..f1-1 of the layer."""

    shards: tuple[int, ...]
    u0: int
    u1: int
    f0: int
    f1: int


def plan_blocks(shard_of: np.ndarray, offsets: np.ndarray, width: int, itemsize: int, budget: int,
                reserve: int, what: str = "this layer") -> list[Block]:
    """Cut the utterances into blocks of whole consecutive shards: as many shards per block as fit
    `budget` less HEADROOM together with `reserve` bytes (batches, batch_bytes). shard_of: (n,) the shard of
    each utterance, non-decreasing (cache order); offsets: (n + 1,) frame offsets. Raises
    MemoryBudgetError naming the minimum budget when the largest shard does not fit."""
    shards, starts = np.unique(shard_of, return_index=True)
    bounds = np.append(starts, len(shard_of))
    slices = [int(offsets[bounds[j + 1]] - offsets[bounds[j]]) * width * itemsize for j in range(len(shards))]
    usable = budget - int(budget * HEADROOM)
    need = math.ceil((max(slices, default=0) + reserve) / (1 - HEADROOM))
    if usable < max(slices, default=0) + reserve:
        raise MemoryBudgetError(
            f"--memory-budget {format_size(budget)} is too small to stream {what}: it needs at least "
            f"{format_size(need)} (the largest shard's slice, {format_size(max(slices))}, and padded batches, "
            f"{format_size(reserve)}, plus 1/8 headroom); raise --memory-budget, or extract with a smaller --shard-mb")
    blocks, first, size = [], 0, 0
    for j, nbytes in enumerate(slices):
        if j > first and size + nbytes + reserve > usable:
            blocks.append(_block(shards, bounds, offsets, first, j))
            first, size = j, 0
        size += nbytes
    if len(shards):
        blocks.append(_block(shards, bounds, offsets, first, len(shards)))
    return blocks


def _block(shards, bounds, offsets, first: int, end: int) -> Block:
    u0, u1 = int(bounds[first]), int(bounds[end])
    return Block(tuple(int(k) for k in shards[first:end]), u0, u1, int(offsets[u0]), int(offsets[u1]))


class StreamedLayer:
    """A layer (or several states, as LayerData) whose frames stay on disk: the metadata of
    LayerData (ids, labels, speakers, groups, offsets, layer; classes(), n_frames, width...),
    `moments` and `statistics` computed in one pass over the blocks, and training and evaluation
    batches read one block at a time (`batches`). read(block) -> (f1 - f0, width) frames.
    peak_bytes: the most frame bytes held at once (a block), for tests and logs."""

    def __init__(self, meta: dict, offsets: np.ndarray, layer: Selection, dim: int, dtype,
                 blocks: list[Block], read: Callable[[Block], np.ndarray], batch_size: int, reserve_batch: int):
        self.ids, self.labels = meta["ids"], meta["labels"]
        self.speakers, self.groups = meta["speakers"], meta["groups"]
        # a regression's numeric targets (LayerData's), small: held in memory
        self.target_names, self.target_values = meta.get("target_names", ()), meta.get("target_values")
        self.offsets, self.layer, self.dim, self.dtype = offsets, layer, dim, np.dtype(dtype)
        self.blocks, self._read = blocks, read
        self.batch_size, self.reserve_batch = batch_size, reserve_batch
        self.peak_bytes = 0
        self._statistics = None
        # Rows as stored (pooled by stored_pool), and as read: each window pooled to frame_pool.
        self.stored_pool = self.frame_pool = int(meta.get("frame_pool", 1))
        self.encoder_frames = meta.get("encoder_frames")

    def pooled(self, frame_pool: int, what: str = "this layer") -> "StreamedLayer":
        """This layer read with each frame the mean of `frame_pool` encoder frames (a multiple of
        the stored rows'; each window pooled as it is read). A copy; self when unchanged."""
        read_factor(self.stored_pool, frame_pool, what)
        if frame_pool == self.frame_pool:
            return self
        other = copy.copy(self)
        other.frame_pool, other._statistics = int(frame_pool), None
        return other

    # the metadata side of LayerData
    def __len__(self) -> int:
        return len(self.ids)

    layers = LayerData.layers
    n_states = LayerData.n_states
    n_frames = LayerData.n_frames
    classes = LayerData.classes

    @property
    def width(self) -> int:
        return self.n_states * self.dim

    def describe(self) -> dict:
        """What decides a streamed run's batch order, for its config.json: the blocks' shards."""
        return {"streamed_blocks": [list(b.shards) for b in self.blocks]}

    def window(self, block: Block) -> LayerData:
        """The utterances of `block` as a LayerData (indices local: global index - block.u0),
        valid until the next window is read: its frames are the one block buffer (the budget
        holds one block), so the batch sources read blocks strictly one after another."""
        frames = self._read(block)
        assert frames.shape == (block.f1 - block.f0, self.width), f"read {frames.shape} for {block}"
        self.peak_bytes = max(self.peak_bytes, frames.nbytes)
        u = slice(block.u0, block.u1)
        stored = LayerData(frames, self.offsets[block.u0 : block.u1 + 1] - self.offsets[block.u0], self.ids[u],
                           self.labels[u], self.speakers[u], self.groups[u], self.layer, self.target_names,
                           None if self.target_values is None else self.target_values[u], self.stored_pool,
                           None if self.stored_pool == 1 else np.asarray(self.encoder_frames)[u])
        return stored.pooled(self.frame_pool)

    def _in_block(self, index, block: Block) -> np.ndarray:
        """The utterances of `index` stored in `block`, in the order of `index`."""
        index = np.asarray(index)
        return index[(index >= block.u0) & (index < block.u1)]

    def moments(self, index) -> tuple[np.ndarray, np.ndarray]:
        """LayerData.moments in one pass over the blocks; equal to it bit for bit when `index` is
        sorted (folds' splits are), since the frames are then added in the same order."""
        sums = FrameSums(self.width)
        for block in self.blocks:
            mine = self._in_block(index, block)
            if len(mine):
                sums.add(self.window(block), mine - block.u0)
        return sums.moments()

    @property
    def statistics(self) -> np.ndarray:
        """LayerData.statistics, (n, 2 * width) float64, in one pass over the blocks (once)."""
        if self._statistics is None:
            out = np.empty((len(self), 2 * self.width))
            for block in self.blocks:
                self.window(block).fill_statistics(out[block.u0 : block.u1])
            self._statistics = out
        return self._statistics

    def batches(self, y, index, batch_size: int, device, rng: np.random.Generator | None = None,
                transform=None) -> BlockBatches:
        """The batch source of utterances `index` (batches.batch_source): with rng, training
        batches drawn within each block (module docstring); without, evaluation batches sorted
        by length within each block, of at most the training batch size planned for (64 rows of
        the longest utterance, batches.EVAL_BATCH_SIZE, would set the smallest budget)."""
        if rng is None:
            batch_size = min(batch_size, self.batch_size)
        if batch_size > self.batch_size:
            raise MemoryBudgetError(f"training batches of {batch_size} on a layer opened for batches of "
                                    f"{self.batch_size}: open it with the larger batch size")
        plan = []
        for block in self.blocks:
            mine = self._in_block(index, block)
            if len(mine):
                order = batch_order(self, mine, batch_size, rng)
                plan.append((block, [order[i : i + batch_size] for i in range(0, len(order), batch_size)]))
        return BlockBatches(self, y, plan, device, transform)


class BlockBatches:
    """Padded batches read block by block: iterated in plan order (evaluation), or in an
    epoch's order (`epoch`: blocks, then each block's batches, shuffled). Each batch is x
    (B, T, width) float32 (standardised by `transform`), mask (B, T) bool, y (B,) int64 or
    None, as batches.HeldBatches gives; order: the utterance of each row, in plan order."""

    def __init__(self, data: StreamedLayer, y, plan: list[tuple[Block, list[np.ndarray]]], device, transform):
        self.data, self.y, self.plan, self.device, self.transform = data, y, plan, device, transform
        self.order = np.concatenate([rows for _, batches in plan for rows in batches]) if plan else np.array([], int)

    def __len__(self) -> int:
        return sum(len(batches) for _, batches in self.plan)

    def __iter__(self):
        for block, batches in self.plan:
            yield from self._read(block, batches, range(len(batches)))

    def epoch(self, rng: np.random.Generator):
        """One training epoch: the blocks in a random order, each block's batches in a random order."""
        for b in rng.permutation(len(self.plan)):
            block, batches = self.plan[b]
            yield from self._read(block, batches, rng.permutation(len(batches)))

    def _read(self, block: Block, batches: list[np.ndarray], which):
        window = self.data.window(block)
        for j in which:
            rows = batches[j]
            x, mask = window.batch(rows - block.u0, dtype=torch.float32, device=self.device)
            if self.transform is not None:
                with torch.no_grad():
                    x = self.transform(x)
            yield x, mask, None if self.y is None else torch.from_numpy(self.y[rows]).to(self.device)


# Share of the budget left for what is not frames: the head's activations and optimizer state,
# Python objects, the allocator's slack (about 2 MB of 20 when measured, tests/test_streaming.py).
HEADROOM = 1 / 8
MMAP_THRESHOLD = 128 * 2**10  # bytes: glibc's initial threshold, kept fixed while streaming


def _return_freed_memory() -> None:
    """Have glibc give every allocation over MMAP_THRESHOLD back to the system when it is freed.

    Why: glibc raises its mmap threshold to the size of the largest block freed so far (up to
    32 MiB), after which batches are carved from the heap, and freed batches of varying sizes
    stay there as holes. Training a 60 MB layer in a 20 MB budget (tests/test_streaming.py),
    that kept 19 MB more resident than a fixed threshold did; the cost is a few page faults
    per batch. Process-wide, so set only once a layer is streamed; a no-op where the C library
    is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; setting it turns the dynamic threshold off
    except (OSError, AttributeError):
        pass


# --- opening a layer --------------------------------------------------------------------------


def open_layer(cache, layer: Selection, budget: int | None, batch_size: int, workers: int = 1,
               held: int = 1, frame_pool: int | None = None) -> LayerData | StreamedLayer | StatsLayer:
    """Layer `layer` of `cache`: read whole (Cache.read_layer) when `held` copies of it plus
    `workers` folds' padded batches fit `budget` bytes (default: default_budget()), else a
    StreamedLayer with `budget / workers` for each worker (a sweep's pool). batch_size: the
    largest training batch planned for (evaluation batches are planned for too). frame_pool:
    encoder frames per frame read (default: as stored; pooling.py). A statistics cache's layer
    (a StatsLayer, a few numbers per utterance) is always read whole."""
    budget = default_budget() if budget is None else budget
    states = states_of(layer)
    cache.require(states)
    cache.check()
    if cache.settings.store == "stats":
        # Held whole, plus the linear probe's standardised copy of its training rows (per worker),
        # in float64; past the budget the statistics stay in the shards and the probe streams them.
        values = sum(cache.sidecar(k)["utterances"] for k in cache.complete_shards()) * 2 * len(states) * cache.dim * 8
        lazy = (held + workers) * values > budget
        data = cache.read_layer(layer, frame_pool=frame_pool, lazy=lazy)
        data.memory_budget = budget // workers
        if lazy:
            log.info("layer %s: statistics of %s over the %s budget: read from the shards as the probe needs them",
                     label(layer), format_size(values), format_size(budget))
        return data
    factor = read_factor(cache.settings.frame_pool, frame_pool or cache.settings.frame_pool, f"the cache {cache.root}")
    # pooled rows: about 1/factor of the stored ones (plus at most one partial row per utterance)
    frames = sum(cache.sidecar(k)["frames"] for k in cache.complete_shards()) // factor
    width, itemsize = len(states) * cache.dim, np.dtype(cache.settings.dtype).itemsize
    whole = in_memory_bytes(frames, width, itemsize)
    need = held * frames * width * itemsize + workers * (whole - frames * width * itemsize)
    if need <= budget:
        return cache.read_layer(layer, frame_pool=frame_pool)
    data = open_streamed(cache, layer, budget // workers, batch_size).pooled(frame_pool or cache.settings.frame_pool)
    log.info("layer %s: %s, about %s to train in memory, over the %s budget: streamed from the shards in %d "
             "blocks of at most %s", label(layer), format_size(frames * width * itemsize), format_size(need),
             format_size(budget), len(data.blocks), format_size(budget // workers))
    return data


def open_streamed(cache, layer: Selection, budget: int, batch_size: int) -> StreamedLayer:
    """Layer `layer` of `cache` as a StreamedLayer whose blocks fit `budget` bytes with padded
    batches of batch_size utterances (training and evaluation)."""
    states = states_of(layer)
    cache.require(states)
    cache.check()
    meta = cache.read_meta()
    meta["target_names"], meta["target_values"] = cache.targets_of(meta["ids"])
    meta["frame_pool"] = cache.settings.frame_pool
    offsets = np.concatenate([[0], np.cumsum(meta["n_frames"], dtype=np.int64)]).astype(np.int64)
    dtype, width = np.dtype(cache.settings.dtype), len(states) * cache.dim
    reserve = batch_bytes(batch_size, int(meta["n_frames"].max(initial=0)), width, dtype.itemsize)
    blocks = plan_blocks(meta["shard"], offsets, width, dtype.itemsize, budget, reserve,
                         f"layer {label(layer)} of {cache.root}")

    _return_freed_memory()
    # One buffer for every block, allocated once and reused.
    buffer = np.empty((max((b.f1 - b.f0 for b in blocks), default=0), width), dtype=dtype)

    def read(block: Block) -> np.ndarray:
        frames = buffer[: block.f1 - block.f0]
        cache.read_slices(list(block.shards), states, frames)
        return frames

    data = StreamedLayer(meta, offsets, selection(states), cache.dim, dtype, blocks, read, batch_size, reserve)
    data.opened_as = (str(cache.root), selection(states), budget, batch_size)  # how a worker opens it again
    return data


def from_memory(data: LayerData, shard_of: np.ndarray, budget: int, batch_size: int) -> StreamedLayer:
    """A layer already in memory, trained as if streamed: the same blocks and batch order as
    open_streamed gives for the cache it was read from (shard_of: Cache.read_meta()["shard"]),
    each block a view of data.frames. For tests: equal results prove that streaming changes
    nothing but the order."""
    reserve = batch_bytes(batch_size, int(data.n_frames.max(initial=0)), data.width, data.frames.itemsize)
    blocks = plan_blocks(shard_of, data.offsets, data.width, data.frames.itemsize, budget, reserve)
    meta = {"ids": data.ids, "labels": data.labels, "speakers": data.speakers, "groups": data.groups,
            "target_names": data.target_names, "target_values": data.target_values}
    return StreamedLayer(meta, data.offsets, data.layer, data.dim, data.frames.dtype, blocks,
                         lambda block: data.frames[block.f0 : block.f1], batch_size, reserve)

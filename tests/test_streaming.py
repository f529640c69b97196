"""Layers larger than memory (streaming.py): sizes, budgets, and streamed training equal to
in-memory training in the same order, within a bounded memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_cache import synthetic_cache

from ser_cache.features import LayerData
from ser_cache.folds import make_folds
from ser_cache.streaming import (
    HEADROOM,
    MemoryBudgetError,
    StreamedLayer,
    from_memory,
    in_memory_bytes,
    open_layer,
    open_streamed,
    parse_size,
)
from ser_cache.config import TrainConfig
from ser_cache.training import run_folds

SMALL = {"epochs": 3, "d_model": 16, "n_heads": 2, "head_dim": 4, "device": "cpu", "compute_dtype": "float32"}


@pytest.mark.parametrize("text, size", [("2G", 2 * 2**30), ("500M", 500 * 2**20), ("1.5G", 3 * 2**29),
                                        ("64MiB", 64 * 2**20), ("20mb", 20 * 2**20), ("1048576", 2**20)])
def test_sizes_are_read_in_powers_of_1024(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2 gigs", "-1G", "0", "", "G", "1.5.2M"])
def test_bad_sizes_are_refused_with_the_format(text):
    with pytest.raises(MemoryBudgetError, match="not a size: give a number of bytes with an optional K, M, G or T"):
        parse_size(text)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A cache of 12 shards of 16 utterances, 6 speakers with both labels and a target, two states."""
    return synthetic_cache(tmp_path_factory.mktemp("stream") / "c", n_utts=192, per_shard=16, dim=16,
                           states=(0, 1), frames=(10, 40), n_speakers=6, targets=True)


def budget_for(cache, shards_per_block: int, layer=1) -> int:
    """A budget whose blocks hold `shards_per_block` shards of `cache`, from the minimum the
    error names."""
    with pytest.raises(MemoryBudgetError, match="needs at least") as e:
        open_streamed(cache, layer, 1, TrainConfig().batch_size)
    minimum = parse_size(str(e.value).split("needs at least ")[1].split(" ")[0])
    width = len(np.atleast_1d(layer)) * cache.dim
    slice_bytes = max(cache.sidecar(k)["frames"] for k in range(len(cache.plan))) * width * 2
    return minimum + int((shards_per_block - 1) * slice_bytes / (1 - HEADROOM))


def test_a_budget_below_one_shard_and_one_batch_names_the_minimum(small):
    with pytest.raises(MemoryBudgetError, match=r"--memory-budget 1000 is too small to stream layer 1 of .*: it "
                                                r"needs at least [\d.]+K \(the largest shard's slice, [\d.]+K, and "
                                                r"padded batches, [\d.]+K, plus 1/8 headroom\); raise "
                                                r"--memory-budget, or extract with a smaller --shard-mb"):
        open_streamed(small, 1, 1000, 16)
    minimum = budget_for(small, 1)
    assert len(open_streamed(small, 1, minimum, 16).blocks) == len(small.plan)  # the minimum is enough


def test_blocks_are_whole_consecutive_shards_within_the_budget(small):
    budget = budget_for(small, 3)
    data = open_streamed(small, 1, budget, 16)
    assert [b.shards for b in data.blocks] == [tuple(range(k, k + 3)) for k in range(0, 12, 3)]
    assert data.blocks[0].u0 == 0 and data.blocks[-1].u1 == len(data)
    assert all(a.u1 == b.u0 and a.f1 == b.f0 for a, b in zip(data.blocks, data.blocks[1:]))
    whole = small.read_layer(1)
    for block in data.blocks:
        np.testing.assert_array_equal(data.window(block).frames, whole.frames[block.f0 : block.f1])
    assert data.peak_bytes + data.reserve_batch <= budget


def test_open_layer_reads_whole_layers_that_fit_and_streams_the_others(small):
    whole = small.read_layer(1)
    fits = in_memory_bytes(len(whole.frames), whole.width, 2)
    assert isinstance(open_layer(small, 1, fits, 16), LayerData)
    assert isinstance(open_layer(small, 1, fits - 1, 16), StreamedLayer)  # a byte less: streamed
    with pytest.raises(Exception, match=r"layer 5 is not in this cache; it holds layers \[0, 1\]"):
        open_layer(small, 5, 100, 16)


def test_streamed_statistics_equal_the_in_memory_ones(small):
    whole, data = small.read_layer((0, 1)), open_streamed(small, (0, 1), budget_for(small, 4, (0, 1)), 16)
    assert len(data.blocks) == 3
    index = np.arange(0, len(whole), 3)
    for a, b in zip(data.moments(index), whole.moments(index)):
        np.testing.assert_array_equal(a, b)  # same frames added in the same order: bit for bit
    np.testing.assert_array_equal(data.statistics, whole.statistics)


@pytest.mark.parametrize("head, task", [("mean", "classification"), ("linear", "classification"),
                                        ("mean", "regression")])
def test_streamed_training_equals_in_memory_training_in_the_same_order(small, head, task):
    budget = budget_for(small, 5)  # blocks of 5, 5 and 2 shards: uneven on purpose
    streamed = open_streamed(small, 1, budget, 16)
    assert len(streamed.blocks) == 3
    whole = small.read_layer(1)
    in_memory = from_memory(whole, small.read_meta()["shard"], budget, 16)
    folds = make_folds(whole.ids, whole.labels, whole.speakers, whole.groups, protocol="kfold", n_folds=2,
                       corpus="csv", seed=0)
    config = TrainConfig(**{**SMALL, "epochs": 2}, time_mask=0.2, task=task)  # time masking: torch's RNG too
    a, b = run_folds(streamed, folds, head, config), run_folds(in_memory, folds, head, config)
    for fa, fb in zip(a.folds, b.folds):
        np.testing.assert_array_equal(fa.probs, fb.probs)
        assert fa.selected == fb.selected and fa.history == fb.history and fa.test_ids == fb.test_ids
    assert a.metrics == b.metrics
    assert streamed.peak_bytes + streamed.reserve_batch <= budget


def test_streamed_order_reads_each_block_once_per_epoch(small):
    data = open_streamed(small, 1, budget_for(small, 4), 16)
    reads = []
    real = data._read
    data._read = lambda block: reads.append(block.shards) or real(block)
    index = np.arange(len(data))
    source = data.batches(data.classes()[1], index, 16, "cpu", np.random.default_rng(0))
    rows = np.concatenate([x[2].numpy() * 0 + 1 for x in source.epoch(np.random.default_rng(1))])
    assert len(rows) == len(index)  # every utterance once
    assert sorted(reads) == [b.shards for b in data.blocks]  # every block read once
    assert sorted(source.order.tolist()) == index.tolist()
    assert all(len(set(small.read_meta()["shard"][rows] // 4)) == 1 for _, batches in source.plan for rows in batches)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from ser_cache.config import TrainConfig
    from ser_cache.fitting import fit_head
    from ser_cache.batches import predict_proba
    from ser_cache.cache import open_cache
    from ser_cache.features import LayerData
    from ser_cache.streaming import from_memory, open_layer
    import numpy as np, torch

    def status(key):  # kB
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")))

    cache, budget = open_cache(sys.argv[1]), int(sys.argv[2])
    config = TrainConfig(epochs=2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")
    data = open_layer(cache, 1, budget, config.batch_size)
    labels, y = data.classes()
    n = len(data)
    train, select, test = np.arange(0, n, 3), np.arange(1, n, 3), np.arange(2, n, 3)
    # What torch and scikit-learn set up on first use (kernels, thread pools, allocator) is
    # not the data's: warm up with the same fit on a tiny layer in memory, then start the
    # peak afresh (writing 5 to clear_refs resets VmHWM; where refused, the peak so far
    # counts too, and the measure can only grow).
    rng = np.random.default_rng(0)
    offsets = np.arange(0, 33 * 50, 50)
    tiny = LayerData(rng.standard_normal((offsets[-1], data.dim)).astype(np.float16), offsets,
                     np.array([str(i) for i in range(32)]), np.array(["a", "b"] * 16), np.array(["s"] * 32),
                     np.array([""] * 32), 1)
    # ... in memory, and streamed (the code of blocks and windows is paged in too: counted in
    # RSS, it is not the data's; a fresh virtualenv's files map in larger pieces)
    for warm in (tiny, from_memory(tiny, np.repeat(np.arange(4), 8), budget, config.batch_size)):
        fit = fit_head("mean", warm, np.arange(32) % 2, np.arange(16), np.arange(16, 32), config, 2, 0,
                       torch.device("cpu"))
        predict_proba(fit.model, warm, np.arange(32), torch.device("cpu"))
    del fit, tiny, warm
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    before, files_before = status("VmRSS"), status("RssFile")
    fit = fit_head("mean", data, y, train, select, config, 2, 0, torch.device("cpu"))
    probs = predict_proba(fit.model, data, test, torch.device("cpu"))
    # Pages of library files mapped meanwhile are code, not data, and are counted in RSS by
    # how the page cache holds those files (up to 3 MB more in a freshly installed virtualenv).
    code = max(0, status("RssFile") - files_before)
    print(json.dumps({"streamed": type(data).__name__ == "StreamedLayer", "code": code * 1024,
                      "growth": (status("VmHWM") - before - code) * 1024,
                      "finite": bool(np.isfinite(probs).all()), "epochs": len(fit.history)}))
""")


def test_training_a_layer_several_times_the_budget_stays_under_it(tmp_path):
    """A 60 MB layer, a 20 MB budget: streamed, and the process's peak resident memory grows by
    less than the budget while it trains and tests (in a fresh process: RSS, which sees numpy
    and torch, unlike tracemalloc)."""
    budget = 20 * 2**20
    cache = synthetic_cache(tmp_path / "big", n_utts=6000, per_shard=250, dim=64, states=(1,), frames=(40, 130),
                            n_speakers=8)
    layer_bytes = sum(cache.sidecar(k)["frames"] for k in range(len(cache.plan))) * 64 * 2
    assert layer_bytes >= 3 * budget
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(cache.root), str(budget)], capture_output=True,
                         text=True, cwd=root, env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["streamed"] and result["finite"] and result["epochs"] == 2
    assert 0 < result["growth"] < budget, (result, layer_bytes)


def test_the_commands_take_a_budget_and_refuse_bad_ones(small, tmp_path):
    from click.testing import CliRunner

    from ser_cache.cli import main

    def train(budget, *more):
        return CliRunner().invoke(main, ["train", str(small.root), "--layer", "1", "--head", "linear", "--folds", "2",
                                         "--out", str(tmp_path / budget), "--memory-budget", budget, *more])

    bad = train("2gigs")
    assert bad.exit_code == 1 and bad.output.strip() == (
        "Error: --memory-budget '2gigs' is not a size: give a number of bytes with an optional K, M, G or T suffix "
        "(powers of 1024), e.g. 500M, 2G or 1.5G")
    small_budget = train("100K")
    assert small_budget.exit_code == 1 and "too small to stream layer 1" in small_budget.output
    assert "needs at least" in small_budget.output
    sweep = CliRunner().invoke(main, ["sweep", str(small.root), "--out", str(tmp_path / "sweep"), "--layers", "1",
                                      "--heads", "linear", "--memory-budget", "-3M"])
    assert sweep.exit_code == 1 and "Error: --memory-budget '-3M' is not a size" in sweep.output


def test_a_streamed_run_records_its_blocks_and_a_sweep_streams_in_its_workers(small, tmp_path, monkeypatch):
    import ser_cache.streaming as S
    from ser_cache.sweeping import SweepSpec, run_sweep
    from ser_cache.training import train_from_cache

    budget = budget_for(small, 6)
    monkeypatch.setattr(S, "in_memory_bytes", lambda *a: budget * 100)  # this small layer would fit: say it does not
    train_from_cache(small.root, 1, "linear", tmp_path / "run", TrainConfig(**SMALL), n_folds=2, memory_budget=budget)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["cache"]
    assert stored["streamed_blocks"] == [list(range(6)), list(range(6, 12))]
    spec = SweepSpec(caches=[small.root], layers="1", heads=["linear"], train=TrainConfig(**SMALL), protocol="kfold",
                     n_folds=2)
    # Two workers, each opening the shards itself with half the budget: blocks of 6 shards again.
    outcome = run_sweep(spec, tmp_path / "sweep", jobs=2, device="cpu", progress=False, write_report=False,
                        memory_budget=2 * budget)
    assert outcome.folds_run == 2 and not outcome.failures

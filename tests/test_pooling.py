"""Time pooling and statistics caches: pooling is a plain average, every way of getting pooled
frames or statistics gives the same numbers, the probe trains alike from a statistics cache,
exports predict what their fold heads predict, and every wrong K or head is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ser_cache import pooling
from ser_cache.audio import load_utterance
from ser_cache.cache import CacheError, open_cache
from ser_cache.cli import main
from ser_cache.derive import derive
from ser_cache.encoder import load_encoder
from ser_cache.errors import OptionError
from ser_cache.extract import ExtractOptions, extract
from ser_cache.folds import make_folds
from ser_cache.heads import load_head
from ser_cache.exporting import export_run
from ser_cache.predict import load_predictor
from ser_cache.config import ConfigError, TrainConfig
from ser_cache.training import run_folds, train_from_cache

from conftest import write_corpus

SMALL = dict(epochs=2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")


def plain_pool(frames: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """The reference: numpy's mean of every group of k frames of each utterance, in float64,
    rounded to the frames' dtype."""
    rows = []
    for i in range(len(offsets) - 1):
        u = frames[offsets[i] : offsets[i + 1]]
        rows += [u[j : j + k].astype(np.float64).mean(axis=0) for j in range(0, len(u), k)]
    return np.array(rows, dtype=frames.dtype).reshape(-1, frames.shape[1])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_pooling_is_numpys_mean_of_each_group_partial_groups_included(dtype, k, monkeypatch):
    monkeypatch.setattr(pooling, "BLOCK_VALUES", 10)  # many blocks, so block edges are crossed
    rng = np.random.default_rng(k)
    lengths = np.array([5, 1, 8, 3, 9, 13, 4])  # none a multiple of 8: last groups are partial
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    frames = rng.standard_normal((offsets[-1], 3)).astype(dtype)
    pooled, new_offsets = pooling.pool_rows(frames, offsets, k)
    np.testing.assert_array_equal(pooled, plain_pool(frames, offsets, k))
    np.testing.assert_array_equal(np.diff(new_offsets), -(-lengths // k))


def test_pooling_pooled_rows_weighs_them_by_their_encoder_frames():
    rng = np.random.default_rng(0)
    lengths = np.array([5, 1, 8, 3, 9, 14])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    frames = rng.standard_normal((offsets[-1], 4))
    by2, offsets2 = pooling.pool_rows(frames, offsets, 2)
    weights = pooling.row_weights(np.diff(offsets2), lengths, 2)
    by8_from_2, _ = pooling.pool_rows(by2, offsets2, 4, weights)
    np.testing.assert_allclose(by8_from_2, pooling.pool_rows(frames, offsets, 8)[0], rtol=0, atol=1e-14)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_checkpoint):
    """One corpus extracted as frames, pooled by 4 and as statistics, and derived both ways."""
    root = tmp_path_factory.mktemp("pooling")
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=4, seconds=(0.3, 0.9))
    enc = load_encoder(str(tiny_checkpoint))
    out = {}
    for name, opts in {"frames": {}, "pool4": {"frame_pool": 4}, "stats": {"store": "stats"},
                       "stats2": {"store": "stats", "frame_pool": 2}}.items():
        out[name] = root / f"cache-{name}"
        extract(records, out[name], "csv", enc, ExtractOptions(progress=False, shard_bytes=30_000, **opts))
    derive(out["frames"], root / "derived-pool4", frame_pool=4, progress=False)
    derive(out["frames"], root / "derived-stats", stats=True, progress=False)
    derive(out["pool4"], root / "derived-pool8", frame_pool=8, progress=False)
    out.update({name: root / name for name in ("derived-pool4", "derived-stats", "derived-pool8")})
    return out, records


def test_extracted_derived_and_read_time_pooling_give_the_same_frames(caches):
    paths, _ = caches
    frames = open_cache(paths["frames"])
    for state in frames.layers:
        at_read = frames.read_layer(state, frame_pool=4)
        for name in ("pool4", "derived-pool4"):
            cached = open_cache(paths[name]).read_layer(state)
            assert cached.frame_pool == at_read.frame_pool == 4
            np.testing.assert_array_equal(cached.frames, at_read.frames)
            np.testing.assert_array_equal(cached.offsets, at_read.offsets)
            np.testing.assert_array_equal(cached.encoder_counts, frames.read_layer(state).n_frames)
    assert open_cache(paths["pool4"]).summary()["bytes"] < open_cache(paths["frames"]).summary()["bytes"]
    # pooled again from a pooled cache: rows weighted by the encoder frames they stand for
    by8 = open_cache(paths["derived-pool8"]).read_layer(1)
    np.testing.assert_allclose(by8.frames.astype(float), frames.read_layer(1, frame_pool=8).frames.astype(float),
                               atol=2e-3)  # float16 rows pooled twice: one more rounding
    assert open_cache(paths["derived-pool8"]).provenance["derived_from"]["path"] == str(paths["pool4"].resolve())


def test_a_statistics_cache_holds_the_layer_statistics_in_float32(caches):
    paths, _ = caches
    frames = open_cache(paths["frames"])
    for selection in (1, (0, 2)):
        expected = frames.read_layer(selection).statistics.astype(np.float32)
        for name in ("stats", "derived-stats"):
            stats = open_cache(paths[name]).read_layer(selection)
            np.testing.assert_array_equal(stats.statistics.astype(np.float32), expected)  # bit for bit
    pooled = open_cache(paths["stats2"]).read_layer(1).statistics.astype(np.float32)
    np.testing.assert_array_equal(pooled, frames.read_layer(1, frame_pool=2).statistics.astype(np.float32))
    assert open_cache(paths["stats"]).verify() == {}


def test_the_probe_trains_alike_from_frames_and_from_statistics(caches):
    paths, _ = caches
    frames, stats = open_cache(paths["frames"]).read_layer((1, 2)), open_cache(paths["stats"]).read_layer((1, 2))
    folds = make_folds(frames.ids, frames.labels, frames.speakers, frames.groups, protocol="kfold", n_folds=3, seed=0)
    config = TrainConfig(**SMALL)
    a, b = run_folds(frames, folds, "linear", config), run_folds(stats, folds, "linear", config)
    for fa, fb in zip(a.folds, b.folds):
        assert fa.selected["C"] == fb.selected["C"]
        np.testing.assert_allclose(fa.probs, fb.probs, atol=1e-6)


def test_the_stats_head_without_attention_trains_from_a_statistics_cache_as_from_frames(caches):
    paths, _ = caches
    frames, stats = open_cache(paths["frames"]).read_layer((1, 2)), open_cache(paths["stats"]).read_layer((1, 2))
    folds = make_folds(frames.ids, frames.labels, frames.speakers, frames.groups, protocol="kfold", n_folds=3, seed=0)
    config = TrainConfig(**{**SMALL, "n_heads": 0, "epochs": 4})
    a, b = run_folds(frames, folds, "stats", config), run_folds(stats, folds, "stats", config)
    for fa, fb in zip(a.folds, b.folds):
        assert fa.selected == fb.selected
        np.testing.assert_array_equal(fa.probs, fb.probs)  # the same float32 statistics: the same numbers
    # what it learned from statistics is what it computes from frames (predict on new audio)
    head = a.models[0]
    rows = np.arange(6)
    x, mask = frames.batch(rows)
    with torch.no_grad():
        from_frames = head(x, mask).softmax(-1).numpy()
        from_statistics = head.from_statistics(torch.from_numpy(frames.statistics[rows])).softmax(-1).numpy()
    np.testing.assert_allclose(from_frames, from_statistics, atol=1e-5)


def test_exports_of_pooled_and_statistics_runs_predict_what_their_fold_heads_predict(caches, tiny_checkpoint,
                                                                                     tmp_path):
    paths, records = caches
    by_id = {r.id: r for r in records}
    frames = open_cache(paths["frames"])
    for cache, head, pool in (("frames", "mean", 2), ("stats", "linear", None), ("stats", "stats", None)):
        run = tmp_path / f"run-{cache}-{head}"
        train_from_cache(paths[cache], 1, head, run, TrainConfig(**{**SMALL, "n_heads": 0}, frame_pool=pool or 0),
                         protocol="kfold", n_folds=3)
        export_run(run, tmp_path / f"{cache}-{head}.pt", fold=0)
        predictor = load_predictor(tmp_path / f"{cache}-{head}.pt", str(tiny_checkpoint))
        assert predictor.exported.frame_pool == (pool or 1)
        data = frames.read_layer(1, frame_pool=pool)
        rows = [0, 5, 9]
        states = [predictor.states(load_utterance(by_id[data.ids[i]].path)[0])[0] for i in rows]
        fold_head, _ = load_head(run / "fold_0.pt")
        x, mask = data.batch(rows)
        with torch.no_grad():
            expected = fold_head(x, mask).softmax(-1).numpy()
        np.testing.assert_allclose(predictor.head_probs(states), expected, atol=1e-6)


def test_a_sweep_chooses_frame_pool_on_validation_and_records_it(caches, tmp_path, one_thread_per_job):
    from ser_cache.results import SweepFolder
    from ser_cache.sweeping import SweepSpec, parse_grid, run_sweep

    paths, _ = caches
    spec = SweepSpec(caches=[paths["frames"]], layers="1", heads=["linear", "mean"],
                     grid=parse_grid(["frame_pool=1,2"]), train=TrainConfig(**SMALL), n_folds=3)
    run_sweep(spec, tmp_path / "sweep", jobs=1, progress=False, write_report=False)
    cells = SweepFolder(tmp_path / "sweep").cells()
    assert len(cells) == 6
    for cell in cells:
        assert [t["values"]["frame_pool"] for t in cell.grid] == [1, 2]
        assert cell.frame_pool == cell.values["frame_pool"]
    stats = SweepSpec(caches=[paths["stats"]], layers="0,1", heads=["linear"], train=TrainConfig(**SMALL), n_folds=3)
    run_sweep(stats, tmp_path / "stats-sweep", jobs=2, progress=False, write_report=False)  # shared statistics
    assert len(SweepFolder(tmp_path / "stats-sweep").cells()) == 6


def test_every_wrong_frame_pool_and_head_is_refused_with_the_fix(caches, tmp_path):
    paths, records = caches
    for k in (0, -1, 2.5, True):
        with pytest.raises(OptionError, match="whole number of frames >= 1"):
            pooling.check_frame_pool(k)
    pooled = open_cache(paths["pool4"])
    with pytest.raises(OptionError, match=r"finer frames than the cache .* holds \(frames pooled by 4\).*multiple of 4"):
        pooled.read_layer(1, frame_pool=2)
    with pytest.raises(OptionError, match="not a multiple of .*give a multiple of 4"):
        pooled.read_layer(1, frame_pool=6)
    with pytest.raises(ConfigError, match="the qkv head reads frames.*--head linear or --head stats --attn-heads 0"):
        train_from_cache(paths["stats"], 1, "qkv", None, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
    with pytest.raises(ConfigError, match="the stats head with --attn-heads 2 reads frames"):
        train_from_cache(paths["stats"], 1, "stats", None, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
    with pytest.raises(ConfigError, match="--time-mask drops frames.*--time-mask 0"):
        train_from_cache(paths["frames"], 1, "stats", None, TrainConfig(**{**SMALL, "n_heads": 0, "time_mask": 0.1}),
                         protocol="kfold", n_folds=3)
    with pytest.raises(OptionError, match="holds statistics over frames pooled by 1.*derive"):
        open_cache(paths["stats"]).read_layer(1, frame_pool=2)
    with pytest.raises(ConfigError, match="frame_pool must be >= 1"):
        TrainConfig(frame_pool=-1)
    with pytest.raises(OptionError, match="nothing to derive"):
        derive(paths["pool4"], tmp_path / "same", frame_pool=4)
    with pytest.raises(OptionError, match="statistics cache, which holds no frames"):
        derive(paths["stats"], tmp_path / "again", frame_pool=2)
    # a resume with another K is another cache: refused, naming the setting
    with pytest.raises(CacheError, match="frame_pool: cache has 4, asked for 2"):
        extract(records, paths["pool4"], "csv", load_encoder(str(pooled.provenance["model_path"])),
                ExtractOptions(progress=False, shard_bytes=30_000, frame_pool=2))
    result = CliRunner().invoke(main, ["sweep", str(paths["stats"]), "--out", str(tmp_path / "s"), "--heads", "mean"])
    assert result.exit_code != 0 and "the mean head reads frames" in result.output
    result = CliRunner().invoke(main, ["sweep", str(paths["stats"]), "--out", str(tmp_path / "s"), "--heads", "stats",
                                       "--grid", "heads=0,4"])  # one grid setting needs frames
    assert result.exit_code != 0 and "the stats head with --attn-heads 4 reads frames" in result.output


def test_inspect_and_dry_run_say_what_a_cache_stores(caches, tiny_checkpoint, tmp_path):
    paths, records = caches
    shown = CliRunner().invoke(main, ["inspect", str(paths["stats2"])], catch_exceptions=False).output
    assert "statistics (mean, std per utterance, float32) of frames pooled by 2 (40 ms)" in shown
    from pathlib import Path

    corpus = Path(records[0].path).parent / "utterances.csv"
    corpus.write_text("path,label,speaker\n" + "".join(f"{Path(r.path).name},{r.label},{r.speaker}\n" for r in records))
    out = tmp_path / "dry"
    result = CliRunner().invoke(main, ["extract", str(corpus), "--corpus", "csv", "--model", str(tiny_checkpoint),
                                       "--out", str(out), "--store", "stats", "--dry-run"], catch_exceptions=False)
    assert "cache size: about" in result.output and "statistics" in result.output
    assert not out.exists()


def test_a_probe_too_large_for_memory_streams_to_the_in_memory_result(caches):
    """Statistics read from the shards as needed (StatisticsRows) are fitted by bigprobe.py: the
    same C chosen and the same probabilities as scikit-learn on the statistics in memory, to the
    tolerance both stop at (scikit-learn's default tol 1e-4 on the gradient: here 7.5e-4 apart at
    most; at tight tolerances tests/test_bigprobe.py finds them within 1e-6)."""
    paths, _ = caches
    cache = open_cache(paths["stats"])
    whole, lazy = cache.read_layer((0, 1, 2)), cache.read_layer((0, 1, 2), lazy=True)
    lazy.memory_budget = 2**20
    assert not isinstance(lazy.statistics, np.ndarray)
    folds = make_folds(whole.ids, whole.labels, whole.speakers, whole.groups, protocol="kfold", n_folds=3, seed=0)
    config = TrainConfig(**SMALL, linear_c=(0.1, 1.0))
    a, b = run_folds(whole, folds, "linear", config), run_folds(lazy, folds, "linear", config)
    for fa, fb in zip(a.folds, b.folds):
        assert {h["solver"] for h in fa.history} == {"scikit-learn lbfgs"}
        assert {h["solver"] for h in fb.history} == {"streamed lbfgs (bigprobe)"}
        assert fa.selected["C"] == fb.selected["C"]
        np.testing.assert_allclose(fa.probs, fb.probs, atol=2e-3)


def test_a_cross_corpus_test_cache_is_read_as_the_training_frames_are(caches):
    """A probe trained on statistics over frames pooled by 2 scores a frames test cache by the
    statistics of its frames pooled by 2 too (the same numbers as scoring the stats2 cache)."""
    paths, _ = caches
    config = TrainConfig(**SMALL)
    on_frames = train_from_cache(paths["stats2"], 1, "linear", None, config, protocol="kfold", n_folds=3,
                                 test_cache=paths["frames"])
    on_stats = train_from_cache(paths["stats2"], 1, "linear", None, config, protocol="kfold", n_folds=3,
                                test_cache=paths["stats2"])
    assert (on_frames.cross_corpus.test_corpus["ua"]["folds"]
            == pytest.approx(on_stats.cross_corpus.test_corpus["ua"]["folds"]))


def test_a_streamed_layer_pools_each_block_as_the_whole_layer_is_pooled(caches):
    from ser_cache.streaming import open_streamed

    paths, _ = caches
    cache = open_cache(paths["frames"])
    whole = cache.read_layer(1, frame_pool=2)
    streamed = open_streamed(cache, 1, 130_000, 4).pooled(2)  # as open_layer pools a layer over the budget
    assert len(streamed.blocks) > 1 and streamed.frame_pool == 2
    np.testing.assert_array_equal(streamed.statistics, whole.statistics)
    index = np.arange(len(whole))
    for got, want in zip(streamed.moments(index), whole.moments(index)):
        np.testing.assert_array_equal(got, want)
    # re-pooled from the rows it streams (stored every 20 ms), not from its pooled windows
    np.testing.assert_array_equal(streamed.pooled(3).statistics, cache.read_layer(1, frame_pool=3).statistics)

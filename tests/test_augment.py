"""Augmented views (augment.py): each view is a record of the cache tied to its source and
planned in its source's shard; resume, verify and inspect cover views; a resume with other
views is refused; folds, validation and test never hold a view, and training adds the views of
its own utterances only with views "on"."""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from ser_cache import augment
from ser_cache.audio import load_utterance
from ser_cache.cache import CacheError, open_cache
from ser_cache.cli import main
from ser_cache.config import ConfigError, TrainConfig
from ser_cache.encoder import load_encoder
from ser_cache.errors import OptionError
from ser_cache.extract import ExtractOptions, extract
from ser_cache.folds import ViewRows, make_folds
from ser_cache.records import load_records
from ser_cache.results import SweepFolder
from ser_cache.sweeping import SweepSpec, run_sweep
from ser_cache.training import fold_split, train_from_cache

from conftest import tone, write_corpus

VIEWS = ["speed0.9", "speed1.1", "noise20"]
LINEAR = dict(device="cpu", compute_dtype="float32", linear_c=(0.1, 1.0))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --- the transforms ---------------------------------------------------------------------------


def test_augment_specs_are_named_in_one_order_and_bad_ones_refused():
    assert augment.parse_augment(["noise=20,10", "speed=1.1,0.9", "speed=0.9"]) == [
        "speed0.9", "speed1.1", "noise10", "noise20"]
    assert augment.parse_augment([]) == []
    for bad, words in (("speed=1", "not 1"), ("speed=3", "from 0.5 to 2"), ("pitch=2", "TRANSFORM=V"),
                       ("speed=fast", "numbers"), ("noise=", "TRANSFORM=V"), ("noise=nan", "finite")):
        with pytest.raises(OptionError, match=words):
            augment.parse_augment([bad])
    assert augment.parse_view("speed0.9") == augment.View("speed", 0.9)
    assert augment.parse_view("noise-5") == augment.View("noise", -5.0)


@pytest.mark.parametrize("factor", [0.9, 1.1, 0.8, 1.25, 1.05])
@pytest.mark.parametrize("n", [333, 4801, 12345, 16000])
def test_a_speed_view_has_ceil_n_over_factor_samples(n, factor):
    audio = tone(n / 16000)[:, 0]
    assert len(audio) == n
    assert len(augment.speed(audio, factor)) == math.ceil(n / factor)


def test_a_speed_view_moves_the_pitch_by_the_factor():
    audio = tone(1.0, freq=200.0)[:, 0]
    faster = augment.speed(audio, 1.25)
    peak = lambda x: np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * 16000 / len(x)  # noqa: E731
    assert peak(audio) == pytest.approx(200, abs=2)
    assert peak(faster) == pytest.approx(250, abs=3)


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_a_noise_view_has_the_asked_snr_and_the_same_noise_every_time(snr):
    audio = tone(2.0)[:, 0]
    view = augment.apply_view(audio, f"noise{snr:g}", seed=0, source_id="a")
    noise = view.astype(np.float64) - audio
    measured = 10 * np.log10(np.mean(audio.astype(np.float64) ** 2) / np.mean(noise**2))
    assert measured == pytest.approx(snr, abs=0.2)
    np.testing.assert_array_equal(view, augment.apply_view(audio, f"noise{snr:g}", seed=0, source_id="a"))
    assert not np.array_equal(view, augment.apply_view(audio, f"noise{snr:g}", seed=0, source_id="b"))
    assert not np.array_equal(view, augment.apply_view(audio, f"noise{snr:g}", seed=1, source_id="a"))


def test_a_view_is_applied_to_the_16k_audio_before_it_is_split_into_windows(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(0.7, rate=22050), 22050)  # resampled to 16 kHz first, then sped up
    (plain,), _ = load_utterance(str(path))
    records = augment.with_views(write_corpus(tmp_path / "c", n_speakers=1, per_speaker=1), ["speed1.1"])
    view = records[1]
    (fast,), _ = load_utterance(str(path), transform=augment.view_transform(view, 0))
    assert len(fast) == math.ceil(len(plain) / 1.1)
    assert view.id == f"{records[0].id}~speed1.1" and view.source == records[0].id
    assert view.duration == pytest.approx(records[0].duration / 1.1)


# --- a cache with views -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("augment")
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=4, seconds=(0.3, 0.8))
    enc = load_encoder(str(tiny_checkpoint))
    opts = ExtractOptions(progress=False, shard_bytes=20_000, mode="short", augment=VIEWS, augment_seed=3)
    extract(records, root / "views", "csv", enc, opts)
    extract(records, root / "plain", "csv", enc, ExtractOptions(progress=False, shard_bytes=20_000, mode="short"))
    return root, records, enc, opts


def test_views_are_records_tied_to_their_source_in_its_shard(corpus):
    root, records, _, _ = corpus
    cache = open_cache(root / "views")
    stored = load_records(root / "views" / "records.jsonl")
    assert len(stored) == 4 * len(records)
    by_id = {r.id: r for r in stored}
    shard_of = {u: k for k, ids in enumerate(cache.plan) for u in ids}
    for r in records:
        for name in VIEWS:
            v = by_id[f"{r.id}~{name}"]
            assert (v.source, v.view, v.label, v.speaker, v.group, v.path) == (r.id, name, r.label, r.speaker,
                                                                                r.group, r.path)
            assert shard_of[v.id] == shard_of[r.id]
    assert cache.view_sources() == {f"{r.id}~{n}": r.id for r in records for n in VIEWS}
    meta = cache.read_meta()
    assert sorted(meta["ids"].tolist()) == sorted(by_id)
    assert cache.settings.augment == VIEWS and cache.settings.augment_seed == 3
    assert len(cache.plan) > 1  # several shards, so "the same shard" means something


def test_inspect_counts_the_views_and_the_classes_of_the_corpus(corpus):
    root, records, _, _ = corpus
    info = json.loads(cli("inspect", root / "views", "--json").output)
    assert info["views"] == {name: len(records) for name in VIEWS}
    assert sum(info["class_counts"].values()) == len(records)
    assert info["utterances"] == info["records"] == 4 * len(records)
    text = cli("inspect", root / "views").output
    assert f"of them {3 * len(records)} augmented views (seed 3): speed0.9 {len(records)}" in text


def test_a_cache_without_views_is_described_as_before(corpus):
    root, _, _, _ = corpus
    cache = open_cache(root / "plain")
    settings = json.loads((root / "plain" / "cache.json").read_text())["settings"]
    assert "augment" not in settings and "augment_seed" not in settings
    assert "augment" not in cache.fingerprint and cache.view_sources() == {}
    assert "views" not in cache.summary()
    assert "source" not in (root / "plain" / "records.jsonl").read_text()


def test_a_view_cache_verifies_and_resumes_with_the_same_noise(corpus, tmp_path):
    root, records, enc, opts = corpus
    copy = tmp_path / "views"
    shutil.copytree(root / "views", copy)
    assert open_cache(copy).verify() == {}
    again = extract(records, copy, "csv", enc, opts)
    assert again.shards_written == 0 and again.shards_done_before == len(open_cache(copy).plan)
    before = open_cache(copy).read_layer(1)
    k = next(k for k, ids in enumerate(open_cache(copy).plan) if any("~noise20" in u for u in ids))
    (copy / "shards" / f"shard-{k:05d}.h5").unlink()
    assert k in open_cache(copy).verify()
    resumed = extract(records, copy, "csv", enc, opts)
    assert resumed.shards_written == 1
    assert open_cache(copy).verify() == {}
    after = open_cache(copy).read_layer(1)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.frames, after.frames)  # the noise drawn again is the same


def test_a_resume_with_other_views_is_refused_naming_them(corpus, tmp_path):
    root, records, enc, opts = corpus
    copy = tmp_path / "views"
    shutil.copytree(root / "views", copy)
    for augment_, seed in ((["speed0.9"], 3), ([], 0), (VIEWS, 4)):
        other = ExtractOptions(progress=False, shard_bytes=20_000, mode="short", augment=augment_, augment_seed=seed)
        with pytest.raises(CacheError, match="augment"):
            extract(records, copy, "csv", enc, other)
    with pytest.raises(CacheError, match=r"augment: cache has \[\], asked for \['speed0.9'"):
        extract(records, root / "plain", "csv", enc,
                ExtractOptions(progress=False, shard_bytes=20_000, mode="short", augment=["speed0.9"]))


# --- folds and training -----------------------------------------------------------------------


def test_folds_validation_and_test_hold_no_view_and_never_split_one_from_its_source(corpus):
    root, _, _, _ = corpus
    cache = open_cache(root / "views")
    meta = cache.read_meta()
    sources = cache.view_sources()
    rows = ViewRows.of(meta["ids"], sources)
    o = rows.originals
    folds = make_folds(meta["ids"][o], meta["labels"][o], meta["speakers"][o], meta["groups"][o], n_folds=3)
    assert not set(folds.ids) & set(sources)
    source_row = {u: i for i, u in enumerate(meta["ids"].tolist())}
    for views in ("off", "on"):
        for k in range(folds.n_folds):
            train, val, test = fold_split(folds, k, TrainConfig(views=views), rows)
            ids = meta["ids"]
            assert not set(ids[val]) & set(sources) and not set(ids[test]) & set(sources)
            trained_views = set(ids[train]) & set(sources)
            assert bool(trained_views) == (views == "on")
            for v in trained_views:  # a view trains only where its source trains
                assert source_row[sources[v]] in set(train)
            if views == "on":  # and every view of a training utterance does
                expected = {u for u, s in sources.items() if source_row[s] in set(train)}
                assert trained_views == expected
            assert not set(train) & set(val) and not set(train) & set(test)


def test_training_with_views_on_uses_them_and_off_ignores_them_over_the_same_folds(corpus):
    root, records, _, _ = corpus
    results = {views: train_from_cache(root / "views", 1, "linear", None, TrainConfig(views=views, **LINEAR),
                                       n_folds=3) for views in ("off", "on")}
    plain = train_from_cache(root / "plain", 1, "linear", None, TrainConfig(**LINEAR), n_folds=3)
    for off, on, ref in zip(results["off"].folds, results["on"].folds, plain.folds):
        assert off.n_train == on.n_train == ref.n_train and off.n_val == on.n_val == ref.n_val
        assert off.n_train_views == 0 and on.n_train_views == len(VIEWS) * on.n_train
        assert off.test_ids == on.test_ids == ref.test_ids
        assert not any("~" in u for u in on.test_ids)
        # views off: the run of the same cache without views (up to the short mode's batch
        # padding: a shard's batches hold views too)
        np.testing.assert_allclose(off.probs, ref.probs, atol=1e-4)
    assert "augmented views per fold" in results["on"].table()
    assert "augmented views" not in results["off"].table()


def test_a_torch_head_trains_on_views_and_a_run_folder_counts_originals(corpus, tmp_path):
    root, records, _, _ = corpus
    config = TrainConfig(views="on", epochs=1, d_model=8, n_heads=2, device="cpu", compute_dtype="float32",
                         refit=True)
    result = train_from_cache(root / "views", 1, "mean", tmp_path / "run", config, n_folds=3)
    assert all(f.n_train_views == len(VIEWS) * f.n_train for f in result.folds)
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["n_utterances"] == len(records) and sum(run["class_counts"].values()) == len(records)
    assert run["config"]["views"] == "on"
    # refit: the training utterances, the validation ones and all their views
    assert all(f.refit["n_train"] == 4 * (f.n_train + f.n_val) for f in result.folds)
    details = json.loads((tmp_path / "run" / "metrics.json").read_text())["fold_details"]
    assert [d["n_train_views"] for d in details] == [f.n_train_views for f in result.folds]


def test_views_on_without_views_in_the_cache_is_refused(corpus):
    root, _, _, _ = corpus
    with pytest.raises(ConfigError, match="no augmented views.*--augment"):
        train_from_cache(root / "plain", 1, "linear", None, TrainConfig(views="on", **LINEAR), n_folds=3)
    with pytest.raises(ConfigError, match="views must be one of"):
        TrainConfig(views="yes")


def test_a_sweep_chooses_views_on_validation_and_never_tests_one(corpus, tmp_path):
    root, records, _, _ = corpus
    spec = SweepSpec(caches=[root / "views"], layers="1", heads=["linear"], grid={"views": ["off", "on"]},
                     train=TrainConfig(linear_c=(0.1, 1.0)), n_folds=3)
    run_sweep(spec, tmp_path / "sweep", jobs=1, device="cpu", progress=False, write_report=False)
    cells = SweepFolder(tmp_path / "sweep").cells()
    assert len(cells) == 3
    for c in cells:
        assert [t["values"] for t in c.grid] == [{"views": "off"}, {"views": "on"}]
        assert c.n_train_views == (len(VIEWS) * c.n_train if c.values["views"] == "on" else 0)
        assert c.n_train + c.n_val + c.n_test == len(records)
    folds = list((tmp_path / "sweep" / "folds").rglob("*.csv"))
    assert folds and all("~" not in f.read_text() for f in folds)


def test_the_command_line_extracts_views_and_trains_with_them(corpus, tmp_path):
    root, records, _, _ = corpus
    manifest = tmp_path / "corpus.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "speaker"])
        w.writerows((r.path, r.label, r.speaker) for r in records)
    args = ["extract", manifest, "--corpus", "csv", "--audio-root", root / "corpus", "--model", corpus[2].path,
            "--out", tmp_path / "cache",
            "--device", "cpu", "--mode", "short", "--limit", "12", "--augment", "speed=1.1", "--augment", "noise=10"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "augmented views: speed1.1, noise10 of every utterance (24 views)" in result.output
    assert "0 written now" in cli(*args).output  # resumed: nothing left to do
    refused = CliRunner().invoke(main, [str(a) for a in args[:-2]])
    assert refused.exit_code == 1 and "augment: cache has ['speed1.1', 'noise10'], asked for ['speed1.1']" in refused.output
    assert "all" in cli("verify", tmp_path / "cache").output
    trained = cli("train", tmp_path / "cache", "--layer", "1", "--head", "linear", "--out", tmp_path / "run",
                  "--views", "on", "--folds", "3", "--device", "cpu", "--linear-c", "0.1,1")
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["views"] == "on"


def test_a_statistics_cache_derived_from_a_view_cache_keeps_its_views(corpus, tmp_path):
    from ser_cache.derive import derive

    root, records, _, _ = corpus
    derived, _ = derive(root / "views", tmp_path / "stats", stats=True, progress=False)
    assert derived.view_sources() == open_cache(root / "views").view_sources()
    assert derived.settings.augment == VIEWS and derived.verify() == {}
    result = train_from_cache(tmp_path / "stats", 1, "linear", None, TrainConfig(views="on", **LINEAR), n_folds=3)
    assert all(f.n_train_views == len(VIEWS) * f.n_train for f in result.folds)


def test_the_python_make_folds_folds_the_originals_of_a_view_cache(corpus):
    import ser_cache

    root, records, _, _ = corpus
    cache = open_cache(root / "views")
    data = cache.read_layer(1)
    folds = ser_cache.make_folds(data, n_folds=3, views=cache.view_sources())
    assert sorted(folds.ids.tolist()) == sorted(r.id for r in records)  # no view among them
    plain = open_cache(root / "plain").read_layer(1)
    reference = ser_cache.make_folds(plain, n_folds=3)
    assert folds.aligned_to(reference.ids).test_fold.tolist() == reference.test_fold.tolist()

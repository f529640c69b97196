"""Cross-corpus runs: which caches may meet, label maps that drop and count, test corpus metrics that
follow the labels (and fail when they are permuted), resume, and the command line."""
import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_checkpoint, write_corpus
from test_training import layer_data

from ser_cache.crosscorpus import CrossCorpus, CrossCorpusError, CrossResult, map_classes, read_cross_result
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.features import LayerData
from ser_cache.folds import kfold_folds
from ser_cache.config import ConfigError, TrainConfig
from ser_cache.results import RunFolder
from ser_cache.training import run_folds, train_from_cache

SMALL = dict(epochs=5, lr=1e-2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")
A_CLASSES = ("angry", "happy", "sad", "calm")  # calm: not in ravdess-emodb6
B_CLASSES = ("angry", "happy", "sad", "bored")  # bored: not in ravdess-emodb6


# Tiny heads train fastest, and reproducibly, on one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def caches(tiny_checkpoint, tmp_path_factory):
    """Tiny caches: corpus A, corpus B with the same encoder settings, and B made differently
    (another checkpoint, another mode, fewer layers)."""
    root = tmp_path_factory.mktemp("cross")
    a = write_corpus(root / "corpus-a", n_speakers=4, per_speaker=4, labels=A_CLASSES, seed=0)
    b = write_corpus(root / "corpus-b", n_speakers=3, per_speaker=4, labels=B_CLASSES, seed=1)
    enc = load_encoder(str(tiny_checkpoint))
    other = load_encoder(str(make_checkpoint(root / "other.pt", seed=1)))
    made = {}
    for name, records, encoder, options in (
            ("a", a, enc, {}), ("b", b, enc, {}), ("b-other-model", b, other, {}),
            ("b-trim", b, enc, {"mode": "trim"}), ("b-layers-01", b, enc, {"layers": [0, 1]})):
        made[name] = root / name
        extract(records, made[name], "csv", encoder, ExtractOptions(**{"mode": "short", **options}, progress=False))
    return made


def relabelled(data: LayerData, table: dict) -> LayerData:
    return LayerData(data.frames, data.offsets, data.ids, np.array([table[c] for c in data.labels]),
                     data.speakers, data.groups, data.layer)


def cross_run(source, test_corpus, head="mean", out_dir=None, **kw):
    folds = kfold_folds(source.ids, source.labels, source.speakers, 3, seed=0)
    cross = CrossCorpus(label_map=None, test_corpus=test_corpus, test_cache={"path": "synthetic", "records_hash": "x"})
    return run_folds(source, folds, head, TrainConfig(**SMALL), out_dir, cross_corpus=cross, **kw)


# --- which caches may meet ---------------------------------------------------------------------


@pytest.mark.parametrize("other, named", [
    ("b-other-model", r"model_sha256: training cache has '[0-9a-f]+', test cache has '[0-9a-f]+'"),
    ("b-trim", r"mode: training cache has 'short', test cache has 'trim'"),
    ("b-layers-01", r"layers \[2\]: not in the test cache, which holds layers \[0, 1\]"),
])
def test_caches_of_other_encoder_settings_are_refused_naming_the_difference(caches, other, named):
    with pytest.raises(CrossCorpusError, match=named):
        train_from_cache(caches["a"], 2, "linear", None, TrainConfig(**SMALL), n_folds=2,
                         test_cache=caches[other], label_map="ravdess-emodb6")
    # the layer both hold is fine for the cache that only lacks layer 2
    if other == "b-layers-01":
        train_from_cache(caches["a"], 1, "linear", None, TrainConfig(**SMALL), n_folds=2,
                         test_cache=caches[other], label_map="ravdess-emodb6")


def test_other_classes_are_refused_naming_them_and_the_fix(caches):
    with pytest.raises(CrossCorpusError, match=r"only in the training cache \['calm'\], only in the test "
                                               r"cache \['bored'\]; pass --label-map NAME .*ravdess-emodb6"):
        train_from_cache(caches["a"], 1, "linear", None, TrainConfig(**SMALL), n_folds=2, test_cache=caches["b"])
    with pytest.raises(CrossCorpusError, match="unknown label map 'no-such-map'"):
        train_from_cache(caches["a"], 1, "linear", None, TrainConfig(**SMALL), n_folds=2, label_map="no-such-map")


# --- label maps --------------------------------------------------------------------------------


def test_a_label_map_renames_keeps_and_counts_what_it_drops():
    data = relabelled(layer_data(n_classes=4), {"c0": "angry", "c1": "calm", "c2": "sad", "c3": "bored"})
    mapped, dropped = map_classes(data, "ravdess-emodb6", "here")
    assert dropped == {"bored": 18, "calm": 18} and len(mapped) == len(data) - 36
    assert sorted(set(mapped.labels)) == ["angry", "sad"]
    keep = np.isin(data.labels, ["angry", "sad"])
    assert (mapped.ids == data.ids[keep]).all()
    assert all((mapped.utterance(j) == data.utterance(i)).all() for j, i in enumerate(np.flatnonzero(keep)))
    # a map that renames: arousal
    mapped, dropped = map_classes(data, "ravdess-arousal", "here")
    assert dropped == {"bored": 18} and sorted(set(mapped.labels)) == ["high", "low"]
    assert map_classes(data, None, "here") == (data, {}) and map_classes(data, "none", "here")[1] == {}
    with pytest.raises(CrossCorpusError, match="keeps none of the 72 utterances of here"):
        map_classes(relabelled(data, {c: "bored" for c in set(data.labels)}), "ravdess-emodb6", "here")


def test_a_cross_corpus_run_drops_unmapped_classes_of_both_caches_and_records_the_counts(caches, tmp_path):
    out = tmp_path / "run"
    result = train_from_cache(caches["a"], 1, "linear", out, TrainConfig(**SMALL), n_folds=2,
                              test_cache=caches["b"], label_map="ravdess-emodb6")
    a_labels = [json.loads(line)["label"] for line in (caches["a"] / "records.jsonl").read_text().splitlines()]
    b_labels = [json.loads(line)["label"] for line in (caches["b"] / "records.jsonl").read_text().splitlines()]
    expected = {"train": {"calm": a_labels.count("calm")}, "test": {"bored": b_labels.count("bored")}}
    assert min(expected["train"]["calm"], expected["test"]["bored"]) > 0
    config = json.loads((out / "config.json").read_text())
    saved = json.loads((out / "cross_corpus.json").read_text())
    assert config["cross_corpus"]["dropped"] == saved["dropped"] == expected
    assert config["cross_corpus"]["test_cache"]["path"] == str(caches["b"].resolve())
    assert result.labels == saved["labels"] == ["angry", "happy", "sad"]
    assert sum(config["class_counts"].values()) == len(a_labels) - expected["train"]["calm"]
    n = saved["n_test_corpus"]
    assert n == len(b_labels) - expected["test"]["bored"] == sum(saved["test_corpus_class_counts"].values())
    rows = list(csv.DictReader((out / "predictions_test_corpus.csv").open()))
    assert len(rows) == 2 * n and {r["label"] for r in rows} == {"angry", "happy", "sad"}
    counts = np.array(saved["test_corpus"]["confusion"]["counts"])
    assert counts.sum() == 2 * n  # summed over the 2 fold heads
    assert not any("target" in key for key in saved)  # "target" names regression targets only
    assert "dropped by the label map from the test cache: bored" in result.cross_corpus.table()


def test_a_label_map_alone_trains_on_a_class_subset_of_one_cache(caches, tmp_path):
    result = train_from_cache(caches["a"], 1, "linear", tmp_path / "run", TrainConfig(**SMALL), n_folds=2,
                              label_map="ravdess-emodb6")
    assert result.labels == ["angry", "happy", "sad"] and result.cross_corpus is None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cross_corpus"]["dropped"]["train"]["calm"] > 0 and config["cross_corpus"]["test_cache"] is None
    assert not (tmp_path / "run" / "cross_corpus.json").exists()
    # exported on all speakers of the same classes
    from ser_cache.exporting import export_run

    saved = export_run(tmp_path / "run", tmp_path / "model.pt")
    assert saved["labels"] == ["angry", "happy", "sad"]
    assert saved["provenance"]["class_counts"] == config["class_counts"]


# --- the test corpus metrics mean something ----------------------------------------------------


@pytest.mark.parametrize("head", ["mean", "linear"])
def test_heads_score_well_on_a_corpus_of_the_same_kind_and_badly_when_its_labels_are_permuted(head):
    source = layer_data(seed=0)
    test_corpus = layer_data(n_speakers=4, seed=1, prefix="t")
    same = cross_run(source, test_corpus, head).cross_corpus
    permuted = cross_run(source, relabelled(test_corpus, {"c0": "c1", "c1": "c2", "c2": "c0"}), head).cross_corpus
    assert same.in_corpus["ua"]["mean"] > 0.8 and same.test_corpus["ua"]["mean"] > 0.8
    assert permuted.test_corpus["ua"]["mean"] < 1 / 3  # chance is 1/3: a permutation without fixed points
    assert permuted.in_corpus == same.in_corpus  # the training corpus did not change
    assert len(same.test_corpus["ua"]["folds"]) == 3


def test_a_resumed_cross_corpus_run_gives_identical_results_and_refuses_another_test_cache(tmp_path):
    source, test_corpus = layer_data(seed=0), layer_data(n_speakers=4, seed=1, prefix="t")
    out = tmp_path / "run"
    first = cross_run(source, test_corpus, out_dir=out)
    saved = {name: (out / name).read_bytes() for name in ("cross_corpus.json", "predictions_test_corpus.csv")}
    # killed after fold 1 was saved, before fold 2 and the cross-corpus files
    for name in ("metrics.json", "cross_corpus.json", "predictions_test_corpus.csv", "fold_2.json", "fold_2.pt"):
        (out / name).unlink()
    again = cross_run(source, test_corpus, out_dir=out)
    assert {name: (out / name).read_bytes() for name in saved} == saved
    assert again.cross_corpus.test_corpus == first.cross_corpus.test_corpus
    assert read_cross_result(RunFolder(out)) == CrossResult.from_dict(first.cross_corpus.to_dict())
    (out / "metrics.json").unlink()
    other = layer_data(n_speakers=4, seed=2, prefix="t")
    cross = CrossCorpus(label_map=None, test_corpus=other, test_cache={"path": "synthetic", "records_hash": "y"})
    with pytest.raises(ConfigError, match=r"cross_corpus.test_cache.records_hash: run has 'x', asked for 'y'"):
        run_folds(source, kfold_folds(source.ids, source.labels, source.speakers, 3, seed=0), "mean",
                  TrainConfig(**SMALL), out, cross_corpus=cross)


# --- the command line --------------------------------------------------------------------------


def test_cli_cross_corpus_run_and_its_one_line_errors(caches, tmp_path):
    from ser_cache.cli import main

    def train(*args):
        return CliRunner().invoke(main, ["train", str(caches["a"]), "--layer", "1", "--head", "mean", "--folds", "2",
                                         "--epochs", "2", "--device", "cpu", *map(str, args)])

    out = tmp_path / "run"
    r = train("--out", out, "--test-cache", caches["b"], "--label-map", "ravdess-emodb6")
    assert r.exit_code == 0, r.output
    assert "in-corpus (test folds)" in r.output and "test corpus" in r.output and "difference" in r.output
    assert "test corpus confusion" in r.output and "dropped by the label map from the training cache: calm" in r.output
    assert all((out / name).is_file() for name in ("cross_corpus.json", "predictions_test_corpus.csv", "metrics.json"))
    for args, message in (
            (("--test-cache", caches["b-trim"], "--label-map", "ravdess-emodb6"),
             "mode: training cache has 'short', test cache has 'trim'"),
            (("--test-cache", caches["b"]), "pass --label-map NAME"),
            (("--label-map", "nope"), "unknown label map 'nope'")):
        r = train("--out", tmp_path / "bad", *args)
        assert r.exit_code == 1 and message in r.output, r.output
        error = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and message in error[0]


# --- sweeps ------------------------------------------------------------------------------------


def test_a_cross_corpus_sweep_records_test_corpus_metrics_equal_to_the_train_run_on_the_same_folds(caches, tmp_path):
    from ser_cache.report import write_report
    from ser_cache.results import SweepError, SweepFolder
    from ser_cache.sweeping import SweepSpec, run_sweep

    spec = SweepSpec(caches=[caches["a"]], layers="1,2", heads=["linear", "mean"], train=TrainConfig(**SMALL),
                     n_folds=2, test_cache=caches["b"], label_map="ravdess-emodb6")
    out = tmp_path / "sweep"
    run_sweep(spec, out, jobs=1, progress=False, write_report=False)
    cells = SweepFolder(out).cells()
    assert len(cells) == 2 * 2 * 2 and {c.test_corpus["n"] for c in cells} == {9}  # B: 12 utterances, 3 bored
    assert all(c.labels == ["angry", "happy", "sad"] and c.n_train + c.n_val + c.n_test == 12 for c in cells)
    run = train_from_cache(caches["a"], 2, "linear", None, TrainConfig(**SMALL), n_folds=2,
                           test_cache=caches["b"], label_map="ravdess-emodb6")
    swept = sorted((c.fold, c.test_corpus["ua"], c.ua) for c in cells if c.layer == 2 and c.head == "linear")
    trained = [(k, ua, r.metrics["ua"]) for k, (ua, r) in
               enumerate(zip(run.cross_corpus.test_corpus["ua"]["folds"], run.folds))]
    np.testing.assert_allclose(swept, trained)
    # worker processes get the test cache's layer through shared memory: the same records
    run_sweep(replace(spec, heads=["linear"]), tmp_path / "pool", jobs=2, progress=False, write_report=False)
    pooled = {(c.layer, c.fold): c.test_corpus for c in SweepFolder(tmp_path / "pool").cells()}
    assert pooled == {(c.layer, c.fold): c.test_corpus for c in cells if c.head == "linear"}
    paths = write_report([out], out)
    assert {"test_corpus_ua", "n_test_corpus"} <= set(paths["results"].read_text().splitlines()[0].split(","))
    summary = paths["summary"].read_text()
    assert "Cross-corpus: UA % in-corpus (test folds) → on all 9 utterances" in summary
    assert "label map ravdess-emodb6" in summary
    with pytest.raises(SweepError, match=r"cross_corpus.test_cache.records_hash: sweep has"):
        run_sweep(replace(spec, test_cache=caches["a"]), out, jobs=1, progress=False)
    with pytest.raises(CrossCorpusError, match="mode: training cache has 'short', test cache has 'trim'"):
        run_sweep(replace(spec, test_cache=caches["b-trim"]), tmp_path / "other", jobs=1,
                  progress=False)


def test_a_sweep_with_a_label_map_alone_makes_its_folds_on_the_kept_classes(caches, tmp_path):
    from ser_cache.results import SweepFolder
    from ser_cache.sweeping import SweepSpec, run_sweep

    spec = SweepSpec(caches=[caches["a"]], layers="1", heads=["linear"], train=TrainConfig(**SMALL), n_folds=2,
                     label_map="ravdess-emodb6")
    run_sweep(spec, tmp_path / "sweep", jobs=1, progress=False, write_report=False)
    cells = SweepFolder(tmp_path / "sweep").cells()
    assert len(cells) == 2 and all(not c.test_corpus and c.labels == ["angry", "happy", "sad"] for c in cells)
    assert sum(c.n_test for c in cells) == 12  # 16 utterances, 4 calm dropped
    assert SweepFolder(tmp_path / "sweep").read_config()["cross_corpus"] == {"label_map": "ravdess-emodb6",
                                                                          "test_cache": None}


def test_one_fold_file_serves_a_cache_with_and_without_a_label_map(caches, tmp_path):
    """The fold file lists every utterance of the cache; those the map drops are passed over."""
    import csv

    from ser_cache.cache import open_cache
    from ser_cache.folds import make_folds
    from ser_cache.results import SweepFolder
    from ser_cache.sweeping import SweepSpec, run_sweep

    meta = open_cache(caches["a"]).read_meta()
    folds = make_folds(meta["ids"], meta["labels"], meta["speakers"], n_folds=2, seed=0)
    path = tmp_path / "folds.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("id", "fold"), *zip(folds.ids, folds.test_fold.tolist())])
    assert "calm" in set(meta["labels"].tolist())  # the file lists utterances the map drops
    mapped = train_from_cache(caches["a"], 1, "linear", None, TrainConfig(**SMALL), fold_file=path,
                              label_map="ravdess-emodb6")
    assert sum(len(r.test_ids) for r in mapped.folds) == 12
    assert all(str(u) in set(folds.ids.tolist()) for r in mapped.folds for u in r.test_ids)
    spec = SweepSpec(caches=[caches["a"]], layers="1", heads=["linear"], train=TrainConfig(**SMALL),
                     fold_file=path, label_map="ravdess-emodb6")
    run_sweep(spec, tmp_path / "sweep", jobs=1, progress=False, write_report=False)
    assert sum(c.n_test for c in SweepFolder(tmp_path / "sweep").cells()) == 12

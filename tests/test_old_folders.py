"""Run and sweep folders written by an earlier version (tests/data/old_folders, see its README)
still read: report writes the same tables, compare pairs the same folds, train and sweep resume.
Names those versions wrote for the cross-corpus test corpus ("target") are read as "test_corpus"."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ser_cache.compare import compare
from ser_cache.config import TrainConfig
from ser_cache.crosscorpus import CrossCorpus, read_cross_result
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.folds import kfold_folds
from ser_cache.report import RESULTS_FILE, SUMMARY_FILE, write_report
from ser_cache.results import RunFolder, SweepFolder
from ser_cache.sweeping import SweepSpec, plan_sweep, run_sweep
from ser_cache.training import run_folds

from conftest import write_corpus
from test_tasks import target_data
from test_training import layer_data

OLD = Path(__file__).parent / "data" / "old_folders"


def synthetic_test_corpus() -> CrossCorpus:
    """The test corpus the old run-cross folder was scored on (README)."""
    return CrossCorpus(label_map=None, test_corpus=layer_data(n_speakers=2, per_speaker=3, seed=1, prefix="t"),
                       test_cache={"path": "synthetic", "records_hash": "x"})


RUNS = {  # the settings each old run folder was made with (README): head, data, folds, config, test corpus
    "run": ("mean", lambda: layer_data(n_speakers=6, per_speaker=4), 3,
            TrainConfig(epochs=2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32"), None),
    "run-regression": ("linear", lambda: target_data(n_speakers=4, per_speaker=6), 2,
                       TrainConfig(epochs=2, device="cpu", compute_dtype="float32", linear_c=(1.0,),
                                   task="regression", targets=("arousal", "valence")), None),
    "run-cross": ("linear", lambda: layer_data(n_speakers=4, per_speaker=6), 2,
                  TrainConfig(epochs=2, device="cpu", compute_dtype="float32", linear_c=(1.0,)), synthetic_test_corpus),
}
# What earlier versions called the cross-corpus test corpus "target" in: cross_corpus.json's keys,
# the run's predictions file, a cross-corpus sweep's results.csv columns.
OLD_CROSS_CORPUS_KEYS = {"n_target": "n_test_corpus", "target_class_counts": "test_corpus_class_counts",
                         "target": "test_corpus", "target_minus_in_corpus": "test_corpus_minus_in_corpus"}
OLD_PREDICTIONS, PREDICTIONS = "predictions_target.csv", "predictions_test_corpus.csv"
OLD_COLUMNS = {"target_ua": "test_corpus_ua", "target_wa": "test_corpus_wa", "target_macro_f1": "test_corpus_macro_f1",
               "n_target": "n_test_corpus"}
SWEEP_TRAIN = TrainConfig(epochs=2, n_heads=2, head_dim=2, linear_c=(1.0,), compute_dtype="float32")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def old(tmp_path) -> Path:
    """A writable copy of the old folders."""
    shutil.copytree(OLD, tmp_path / "old")
    return tmp_path / "old"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def with_todays_columns(text: str) -> str:
    """results.csv text of an earlier version with its header's OLD_COLUMNS named as today."""
    header, newline, rows = text.partition("\n")
    return ",".join(OLD_COLUMNS.get(c, c) for c in header.split(",")) + newline + rows


@pytest.mark.parametrize("name", ["sweep", "sweep-cross", "sweep-regression"])
def test_an_old_sweep_is_reported_as_that_version_reported_it(old, tmp_path, name):
    """The same bytes, but for the test corpus's columns of results.csv, which are named
    test_corpus_* (every value and every other name the same)."""
    write_report([old / name], tmp_path / "report")
    for file in (RESULTS_FILE, SUMMARY_FILE):
        now, then = ((folder / file).read_text(encoding="utf-8") for folder in (tmp_path / "report", OLD / name))
        assert now == (with_todays_columns(then) if file == RESULTS_FILE else then)
    header = (tmp_path / "report" / RESULTS_FILE).read_text(encoding="utf-8").partition("\n")[0].split(",")
    assert ("test_corpus_ua" in header) == (name == "sweep-cross") and not any("target" in c for c in header)


def test_old_cells_read_into_todays_record(old):
    cross = SweepFolder(old / "sweep-cross").cells()
    stored = json.loads((OLD / "sweep-cross" / "cells" / "a" / "layer_01" / "linear-seed0-fold0.json").read_text())
    (cell,) = [c for c in cross if c.fold == 0]
    assert cell.test_corpus == stored["target"] and cell.test_corpus["n"] == 9
    assert cell.metrics["ua"] == cell.ua == stored["ua"] and cell.metrics["confusion"] == stored["confusion"]
    assert cell.selected["ua"] == stored["val_ua"] and cell.n_test == stored["n_test"]
    regression = SweepFolder(old / "sweep-regression").cells()
    assert all(c.task == "regression" and c.ua is None and set(c.metrics) == {"ccc", "targets"} for c in regression)
    assert all("val_ccc" in trial for c in regression for trial in c.grid)


def test_old_results_pair_as_they_did(old):
    sweep = old / "sweep"
    for run in RUNS:  # compare reads only the fold records; the repository keeps no heads (*.pt)
        for k in range(RUNS[run][2]):
            (old / run / f"fold_{k}.pt").touch()
    rows = compare([f"{sweep}:1:linear", f"{sweep}:1:mean", f"{sweep}:1+2:mean"])
    rows += compare([str(old / "run-regression"), str(old / "run-regression")], metric="ccc")
    rows += compare([str(old / "run"), str(old / "run")])
    expected = json.loads((OLD / "compare.json").read_text())
    assert len(expected) == len(rows) - 1
    for row, was in zip(rows, expected):
        assert row["unpaired"] == was["unpaired"] == []
        numbers = [k for k in was if k not in ("base", "other", "metric", "unpaired")]
        assert [row[k] for k in numbers] == pytest.approx([was[k] for k in numbers])
    assert rows[-1]["n"] == 3 and rows[-1]["diff_mean"] == 0
    # the cross-corpus run (written later than compare.json): paired on its 2 folds, their UA as recorded
    (row,) = compare([str(old / "run-cross"), str(old / "run-cross")])
    was = [json.loads((OLD / "run-cross" / f"fold_{k}.json").read_text())["metrics"]["ua"] for k in range(2)]
    assert row["n"] == 2 and row["diff_mean"] == 0 and row["base_mean"] == pytest.approx(np.mean(was))


def test_an_old_cross_corpus_run_reads_under_todays_names(old):
    """cross_corpus.json's "target" keys read as test_corpus ones, every value as written; the
    table printed from it is the one that version printed, in today's words."""
    folder = RunFolder(old / "run-cross")
    stored = json.loads((OLD / "run-cross" / "cross_corpus.json").read_text())
    result = read_cross_result(folder)
    assert result.to_dict() == {OLD_CROSS_CORPUS_KEYS.get(k, k): v for k, v in stored.items()}
    assert result.test_corpus == stored["target"] and result.n_test_corpus == stored["n_target"] == 6
    printed = (OLD / "run-cross-table.txt").read_text(encoding="utf-8").rstrip("\n")
    assert result.table() == printed.replace("target corpus", "  test corpus").replace(
        "target confusion", "test corpus confusion")
    assert folder.test_corpus_predictions_path() == folder.root / OLD_PREDICTIONS
    assert folder.read_config().cross_corpus["test_cache"]["records_hash"] == "x"


@pytest.mark.parametrize("name", list(RUNS))
def test_an_old_unfinished_run_resumes_from_its_fold_records(old, tmp_path, name):
    """The old run less its last fold and its results: the re-run keeps the old fold records,
    trains the last fold, and ends with the old run's metrics and predictions."""
    head, make, n_folds, config, test_corpus = RUNS[name]
    cross = test_corpus or (lambda: None)
    data = make()
    folds = kfold_folds(data.ids, data.labels, data.speakers, n_folds, seed=0)
    fresh = run_folds(data, folds, head, config, tmp_path / "fresh", cross_corpus=cross())
    for k, record in enumerate(fresh.folds):  # today's code computes what the old one did
        was = json.loads((OLD / name / f"fold_{k}.json").read_text())
        assert record.selected == pytest.approx(was["selected"])
        np.testing.assert_allclose(record.probs, was["probs"], atol=1e-5)
    run, last = old / name, n_folds - 1
    for k in range(last):  # the heads of the finished folds (not kept in the repository: *.pt)
        shutil.copy(tmp_path / "fresh" / f"fold_{k}.pt", run / f"fold_{k}.pt")
    for file in ("metrics.json", "predictions.csv", f"fold_{last}.json", "cross_corpus.json", OLD_PREDICTIONS):
        (run / file).unlink(missing_ok=True)
    resumed = run_folds(data, folds, head, config, run, cross_corpus=cross())
    for k in range(last):  # kept as the old version saved them, timings included
        was = json.loads((OLD / name / f"fold_{k}.json").read_text())
        assert resumed.folds[k].train_seconds == was["train_seconds"]
        assert RunFolder(run).read_fold(k).n_test == len(was["test_ids"])
    score = "ccc" if config.task == "regression" else "ua"
    was = json.loads((OLD / name / "metrics.json").read_text())
    np.testing.assert_allclose(resumed.metrics[score]["folds"], was[score]["folds"], atol=1e-6)
    assert_same_rows(read_csv(run / "predictions.csv"), read_csv(OLD / name / "predictions.csv"))
    if test_corpus is not None:
        assert_same_test_corpus_files(run, OLD / name)


def assert_same_rows(now: list[dict], then: list[dict]) -> None:
    """Predictions of the same utterances: the same words, and numbers within 1e-5."""
    assert [r.keys() for r in now] == [r.keys() for r in then]
    for a, b in zip(now, then):
        numbers = [k for k in a if k.startswith(("prob_", "pred_", "true_"))]
        assert {k: a[k] for k in a if k not in numbers} == {k: b[k] for k in b if k not in numbers}
        np.testing.assert_allclose([float(a[k]) for k in numbers], [float(b[k]) for k in numbers], atol=1e-5)


def assert_same_test_corpus_files(run: Path, was: Path) -> None:
    """A resumed cross-corpus run's files under today's names hold what the old run's held."""
    assert not (run / OLD_PREDICTIONS).exists() and RunFolder(run).test_corpus_predictions_path() == run / PREDICTIONS
    assert_same_rows(read_csv(run / PREDICTIONS), read_csv(was / OLD_PREDICTIONS))
    then = json.loads((was / "cross_corpus.json").read_text())
    assert_close(json.loads((run / "cross_corpus.json").read_text()),
                 {OLD_CROSS_CORPUS_KEYS.get(k, k): v for k, v in then.items()})


def assert_close(a, b, where: str = "") -> None:
    """Two JSON values of the same keys, lengths and words, their numbers within 1e-6."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for k in b:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


def test_an_old_cross_corpus_run_killed_before_its_metrics_resumes_under_todays_names(old, tmp_path):
    """An old run killed after its cross-corpus files, before metrics.json: the re-run keeps
    every fold, writes those files again under today's names, and removes predictions_target.csv."""
    head, make, n_folds, config, test_corpus = RUNS["run-cross"]
    data = make()
    folds = kfold_folds(data.ids, data.labels, data.speakers, n_folds, seed=0)
    run_folds(data, folds, head, config, tmp_path / "fresh", cross_corpus=test_corpus())
    run = old / "run-cross"
    for k in range(n_folds):
        shutil.copy(tmp_path / "fresh" / f"fold_{k}.pt", run / f"fold_{k}.pt")
    (run / "metrics.json").unlink()
    resumed = run_folds(data, folds, head, config, run, cross_corpus=test_corpus())
    for k in range(n_folds):  # no fold trained again
        was = json.loads((OLD / "run-cross" / f"fold_{k}.json").read_text())
        assert resumed.folds[k].train_seconds == was["train_seconds"]
    assert_same_test_corpus_files(run, OLD / "run-cross")


def test_an_old_cross_corpus_run_overwritten_by_a_plain_run_keeps_none_of_its_cross_corpus_files(old):
    head, make, n_folds, config, _ = RUNS["run-cross"]
    data = make()
    folds = kfold_folds(data.ids, data.labels, data.speakers, n_folds, seed=0)
    run_folds(data, folds, head, config, old / "run-cross", overwrite=True)
    assert RunFolder(old / "run-cross").finished
    assert not any((old / "run-cross" / name).exists() for name in ("cross_corpus.json", OLD_PREDICTIONS, PREDICTIONS))


def test_an_old_sweep_resumes_and_is_reported_with_todays_cells(old, tmp_path, tiny_checkpoint):
    """The old sweep less one cell fold: a re-run on the same cache runs that one only, and
    the report joins old and new cells."""
    records = write_corpus(tmp_path / "corpus", n_speakers=4, per_speaker=3)
    extract(records, tmp_path / "tiny", "csv", load_encoder(str(tiny_checkpoint)),
            ExtractOptions(mode="trim", progress=False))
    spec = SweepSpec(caches=[tmp_path / "tiny"], layers="1,1+2", heads=["linear", "mean"], train=SWEEP_TRAIN,
                     n_folds=2, grid={"lr": [1e-3, 3e-3]})
    sweep = old / "sweep"
    # The cache is built again here: its identity replaces the one the old sweep recorded.
    stored = json.loads((sweep / SweepFolder.CONFIG).read_text())
    stored["config"]["caches"] = plan_sweep(spec).config["caches"]
    (sweep / SweepFolder.CONFIG).write_text(json.dumps(stored))
    missing = sweep / SweepFolder.CELLS / "tiny" / "layer_01" / "mean-seed0-fold1.json"
    missing.unlink()
    outcome = run_sweep(spec, sweep, jobs=1, device="cpu", progress=False)
    assert outcome.folds_run == 1 and outcome.state.complete and not outcome.failures
    assert len(SweepFolder(sweep).cells()) == 8
    rows, then = read_csv(sweep / RESULTS_FILE), read_csv(OLD / "sweep" / RESULTS_FILE)
    key = lambda r: (r["layer"], r["head"], r["seed"], r["fold"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in then]
    rerun = ("1", "mean", "0", "1")
    assert [r for r in rows if key(r) != rerun] == [r for r in then if key(r) != rerun]

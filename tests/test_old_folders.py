"""Run and sweep folders written by an earlier version (tests/data/old_folders, see its README)
still read: report writes the same tables, compare pairs the same folds, train and sweep resume."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ser_cache.compare import compare
from ser_cache.config import TrainConfig
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
RUNS = {  # the settings each old run folder was made with (README)
    "run": ("mean", lambda: layer_data(n_speakers=6, per_speaker=4), 3,
            TrainConfig(epochs=2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")),
    "run-regression": ("linear", lambda: target_data(n_speakers=4, per_speaker=6), 2,
                       TrainConfig(epochs=2, device="cpu", compute_dtype="float32", linear_c=(1.0,),
                                   task="regression", targets=("arousal", "valence"))),
}
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


@pytest.mark.parametrize("name", ["sweep", "sweep-cross", "sweep-regression"])
def test_an_old_sweep_is_reported_as_that_version_reported_it(old, tmp_path, name):
    write_report([old / name], tmp_path / "report")
    for file in (RESULTS_FILE, SUMMARY_FILE):
        now, then = (folder / file for folder in (tmp_path / "report", OLD / name))
        assert now.read_text(encoding="utf-8") == then.read_text(encoding="utf-8")


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


@pytest.mark.parametrize("name", list(RUNS))
def test_an_old_unfinished_run_resumes_from_its_fold_records(old, tmp_path, name):
    """The old run less its last fold and its results: the re-run keeps the old fold records,
    trains the last fold, and ends with the old run's metrics and predictions."""
    head, make, n_folds, config = RUNS[name]
    data = make()
    folds = kfold_folds(data.ids, data.labels, data.speakers, n_folds, seed=0)
    fresh = run_folds(data, folds, head, config, tmp_path / "fresh")
    for k, record in enumerate(fresh.folds):  # today's code computes what the old one did
        was = json.loads((OLD / name / f"fold_{k}.json").read_text())
        assert record.selected == pytest.approx(was["selected"])
        np.testing.assert_allclose(record.probs, was["probs"], atol=1e-5)
    run, last = old / name, n_folds - 1
    for k in range(last):  # the heads of the finished folds (not kept in the repository: *.pt)
        shutil.copy(tmp_path / "fresh" / f"fold_{k}.pt", run / f"fold_{k}.pt")
    for file in ("metrics.json", "predictions.csv", f"fold_{last}.json"):
        (run / file).unlink()
    resumed = run_folds(data, folds, head, config, run)
    for k in range(last):  # kept as the old version saved them, timings included
        was = json.loads((OLD / name / f"fold_{k}.json").read_text())
        assert resumed.folds[k].train_seconds == was["train_seconds"]
        assert RunFolder(run).read_fold(k).n_test == len(was["test_ids"])
    score = "ccc" if config.task == "regression" else "ua"
    was = json.loads((OLD / name / "metrics.json").read_text())
    np.testing.assert_allclose(resumed.metrics[score]["folds"], was[score]["folds"], atol=1e-6)
    now, then = read_csv(run / "predictions.csv"), read_csv(OLD / name / "predictions.csv")
    assert [r["id"] for r in now] == [r["id"] for r in then]
    for a, b in zip(now, then):
        numbers = [k for k in a if k.startswith(("prob_", "pred_", "true_"))]
        np.testing.assert_allclose([float(a[k]) for k in numbers], [float(b[k]) for k in numbers], atol=1e-5)


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

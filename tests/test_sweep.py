"""Sweeps: same folds for every cell, grid chosen on validation, resume, refusal, reports."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ser_cache import sweeping as S
from ser_cache.cli import main
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.report import CONFUSION_PLOT, LAYER_PLOT, RESULTS_FILE, SUMMARY_FILE, WEIGHTS_PLOT, load_sweep
from ser_cache.results import SweepFolder
from ser_cache.sweeping import CellFold, SweepError, SweepSpec, head_settings, parse_grid, run_sweep
from ser_cache.config import TrainConfig
from ser_cache.fitting import Fit

from conftest import write_corpus

HEADS = ["linear", "mean", "qkv"]
N_FOLDS = 3
TRAIN = TrainConfig(epochs=2, n_heads=2, head_dim=2, linear_c=(1.0,), compute_dtype="float32")


pytestmark = pytest.mark.usefixtures("one_thread_per_job")  # conftest


@pytest.fixture(scope="module")
def caches(tiny_checkpoint, tmp_path_factory):
    """Two tiny caches of one corpus (6 speakers x 4 utterances, 3 classes): trim and short."""
    root = tmp_path_factory.mktemp("sweep-caches")
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=4)
    enc = load_encoder(str(tiny_checkpoint))
    out = {}
    for mode in ("trim", "short"):
        extract(records, root / f"tiny-{mode}", "csv", enc, ExtractOptions(mode=mode, progress=False))
        out[mode] = root / f"tiny-{mode}"
    return out


def spec_for(cache, **kw) -> SweepSpec:
    return SweepSpec(caches=[cache], **{"heads": HEADS, "train": TRAIN, "n_folds": N_FOLDS, **kw})


def cells_on_disk(folder: Path) -> list[Path]:
    return sorted((folder / SweepFolder.CELLS).glob("*/*/*.json"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full(caches, tmp_path_factory):
    """One uninterrupted sweep (2 seeds), run in this process."""
    out = tmp_path_factory.mktemp("sweeps") / "full"
    outcome = run_sweep(spec_for(caches["trim"], seeds=[0, 1]), out, jobs=1, progress=False)
    return out, outcome


def test_sweep_writes_one_row_per_cell_and_fold_over_the_same_folds(full):
    out, outcome = full
    n_layers = 3  # tiny Whisper: 2 blocks -> states 0, 1, 2
    total = n_layers * len(HEADS) * 2 * N_FOLDS
    assert outcome.folds_total == outcome.folds_run == total and not outcome.failures
    rows = read_csv(out / RESULTS_FILE)
    assert len(rows) == total
    assert list(rows[0])[:12] == ["cache", "model", "mode", "layer", "head", "setting", "seed", "fold",
                                  "ua", "wa", "macro_f1", "seconds"]
    assert {r["mode"] for r in rows} == {"trim"} and {r["cache"] for r in rows} == {"tiny-trim"}
    # one fold file per cache and seed, and every cell of a seed tested the same utterances
    assert sorted(p.name for p in (out / SweepFolder.FOLDS).glob("*.csv")) == ["tiny-trim-seed0.csv", "tiny-trim-seed1.csv"]
    for seed in (0, 1):
        n_test: dict[tuple, list] = {}
        for r in rows:
            if r["seed"] == str(seed):
                n_test.setdefault((r["layer"], r["head"]), []).append(r["n_test"])
        assert len({tuple(v) for v in n_test.values()}) == 1, n_test
    for r in rows:
        assert 0 <= float(r["ua"]) <= 1 and 0 <= float(r["val_ua"]) <= 1
    assert (out / LAYER_PLOT).stat().st_size > 10_000 and (out / CONFUSION_PLOT).stat().st_size > 10_000
    summary = (out / SUMMARY_FILE).read_text(encoding="utf-8")
    assert "| layer | linear | mean | qkv |" in summary and summary.count("★") >= 2
    timing = json.loads((out / SweepFolder.TIMING).read_text())["runs"]
    assert len(timing) == 1 and timing[0]["layers_read"] == n_layers  # each layer read once
    assert timing[0]["train_seconds"] > 0 and timing[0]["read_seconds"] > 0


def test_interrupted_sweep_resumes_without_duplicates_and_same_results(caches, full, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real, calls = S.run_cell_fold, []

    def crash_after_five(*args, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the sixth cell fold
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(S, "run_cell_fold", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec_for(caches["trim"], seeds=[0, 1]), out, jobs=1, progress=False)
    assert len(cells_on_disk(out)) == 5
    monkeypatch.setattr(S, "run_cell_fold", real)

    outcome = run_sweep(spec_for(caches["trim"], seeds=[0, 1]), out, jobs=1, progress=False)
    assert outcome.folds_done_before == 5 and outcome.folds_run == outcome.folds_total - 5
    again = run_sweep(spec_for(caches["trim"], seeds=[0, 1]), out, jobs=1, progress=False)
    assert again.folds_run == 0  # nothing left: nothing re-run
    rows, reference = read_csv(out / RESULTS_FILE), read_csv(full[0] / RESULTS_FILE)
    key = lambda r: (r["layer"], r["head"], r["seed"], r["fold"])  # noqa: E731
    assert len({key(r) for r in rows}) == len(rows) == len(reference)
    assert [(key(r), r["ua"], r["setting"]) for r in rows] == [(key(r), r["ua"], r["setting"]) for r in reference]
    assert len(json.loads((out / SweepFolder.TIMING).read_text())["runs"]) == 2  # the no-op adds none


def test_a_changed_config_into_the_same_sweep_is_refused(caches, full):
    out = full[0]
    with pytest.raises(SweepError, match=r"train\.epochs: sweep has 2, asked for 3"):
        run_sweep(spec_for(caches["trim"], seeds=[0, 1], train=replace(TRAIN, epochs=3)), out, jobs=1, progress=False)
    with pytest.raises(SweepError, match=r"heads: sweep has"):
        run_sweep(spec_for(caches["trim"], seeds=[0, 1], heads=["mean"]), out, jobs=1, progress=False)
    with pytest.raises(SweepError, match=r"caches"):
        run_sweep(spec_for(caches["short"], seeds=[0, 1]), out, jobs=1, progress=False)
    result = CliRunner().invoke(main, ["sweep", str(caches["trim"]), "--out", str(out), "--epochs", "3",
                                       "--heads", ",".join(HEADS), "--seeds", "0,1", "--folds", "3"])
    assert result.exit_code != 0 and "epochs: sweep has 2, asked for 3" in result.output


def test_report_rebuilds_the_same_summary(full, tmp_path):
    copy = tmp_path / full[0].name  # the same folder name: the summary's title is the sweep's name
    shutil.copytree(full[0], copy)
    original = (copy / SUMMARY_FILE).read_text(encoding="utf-8")
    original_csv = (copy / RESULTS_FILE).read_text(encoding="utf-8")
    for name in (SUMMARY_FILE, RESULTS_FILE, LAYER_PLOT, CONFUSION_PLOT):
        (copy / name).unlink()
    result = CliRunner().invoke(main, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / SUMMARY_FILE).read_text(encoding="utf-8") == original
    assert (copy / RESULTS_FILE).read_text(encoding="utf-8") == original_csv
    assert (copy / LAYER_PLOT).exists() and (copy / CONFUSION_PLOT).exists()


def test_report_puts_two_sweeps_side_by_side(caches, full, tmp_path):
    short = tmp_path / "short"
    run_sweep(spec_for(caches["short"], heads=["mean"], layers="1-2"), short, jobs=1, progress=False)
    joint = tmp_path / "joint"
    result = CliRunner().invoke(main, ["report", str(full[0]), str(short), "--out", str(joint)])
    assert result.exit_code == 0, result.output
    summary = (joint / SUMMARY_FILE).read_text(encoding="utf-8")
    assert "## full: tiny-trim (" in summary and "## short: tiny-short (" in summary
    rows = read_csv(joint / RESULTS_FILE)
    assert {r["sweep"] for r in rows} == {"full", "short"}
    assert {r["layer"] for r in rows if r["sweep"] == "short"} == {"1", "2"}
    assert len(load_sweep(short).records) == 2 * N_FOLDS
    assert (joint / LAYER_PLOT).stat().st_size > 10_000
    result = CliRunner().invoke(main, ["report", str(full[0]), str(short)])
    assert result.exit_code != 0 and "--out" in result.output


def test_grid_setting_is_chosen_on_validation_never_on_test(caches, tmp_path, monkeypatch):
    """Validation favours n_heads=2, test data would favour n_heads=4: every fold must pick 2,
    train without seeing its test set, and test only the chosen head, once."""
    tested = []

    class Marker:
        def __init__(self, n_heads):
            self.n_heads = n_heads

        def layer_weights(self):  # a head's interface: single-layer heads weigh no states
            return None

    def fake_fit(head, data, y, train, select, config, n_classes, seed, device, fixed=None):
        assert not set(train) & set(select), "validation utterances reached training"
        test = set(range(len(data))) - set(train) - set(select)
        assert test, "the test fold reached training or validation"
        val_ua = {2: 0.9, 4: 0.4}[config.n_heads]
        return Fit(Marker(config.n_heads), {}, {"epoch": 0, "ua": val_ua}, [], 0.01)

    def fake_test(model, data, test, device, dropout=False):
        tested.append(model.n_heads)
        # perfect predictions for n_heads=4, always wrong for n_heads=2
        _, y = data.classes()
        n_classes = int(y.max()) + 1
        pred = y[test] if model.n_heads == 4 else (y[test] + 1) % n_classes
        return np.eye(n_classes)[pred]

    import ser_cache.ensembles as E
    import ser_cache.training as T

    monkeypatch.setattr(E, "fit_head", fake_fit)  # what the fold runner's fit_selected calls
    monkeypatch.setattr(T, "predict_proba", fake_test)  # the fold runner's test
    spec = spec_for(caches["trim"], heads=["qkv"], layers="2", grid=parse_grid(["heads=2,4"]))
    run_sweep(spec, tmp_path / "grid", jobs=1, progress=False)
    records = load_sweep(tmp_path / "grid").records
    assert len(records) == N_FOLDS and tested == [2] * N_FOLDS
    for r in records:
        assert r.setting == "n_heads=2" and r.values == {"n_heads": 2}
        assert r.selected["ua"] == 0.9 and r.ua == 0.0
        assert [(g["setting"], g["val_ua"]) for g in r.grid] == [("n_heads=2", 0.9), ("n_heads=4", 0.4)]
    assert "n_heads=2" in (tmp_path / "grid" / SUMMARY_FILE).read_text()


def test_grid_keys_apply_only_to_the_heads_they_change():
    grid = parse_grid(["heads=4,8 head_dim=4,16", "lr=1e-3,3e-4 class_weights=true,false"])
    assert grid == {"n_heads": [4, 8], "head_dim": [4, 16], "lr": [1e-3, 3e-4], "class_weights": [True, False]}
    base = TrainConfig()
    assert len(head_settings("qkv", grid, base)) == 16
    assert head_settings("mean", grid, base) == [{"lr": 1e-3, "class_weights": True}, {"lr": 1e-3, "class_weights": False},
                                                 {"lr": 3e-4, "class_weights": True}, {"lr": 3e-4, "class_weights": False}]
    assert head_settings("linear", grid, base) == [{"class_weights": True}, {"class_weights": False}]
    assert head_settings("linear", parse_grid(["heads=4,8"]), base) == [{}]
    for bad, message in (("heads=4,x", "must be int"), ("colour=1", "unknown"), ("heads", "key=v1"),
                         ("heads=4,4", "repeats")):
        with pytest.raises(SweepError, match=message):
            parse_grid([bad])


def test_a_grid_without_attention_heads_is_for_the_stats_head():
    grid = parse_grid(["heads=0,4"])
    assert head_settings("stats", grid, TrainConfig()) == [{"n_heads": 0}, {"n_heads": 4}]
    assert head_settings("linear", grid, TrainConfig()) == [{}]
    with pytest.raises(S.OptionError, match="attn_heads=0 .* is for --head stats only"):
        head_settings("qkv", grid, TrainConfig())
    # One value is a fixed setting, not the default: it applies wherever it changes something.
    assert head_settings("stats", parse_grid(["heads=0"]), TrainConfig()) == [{"n_heads": 0}]
    assert head_settings("qkv", parse_grid(["heads=12"]), TrainConfig(n_heads=12)) == [{}]


def test_worker_processes_share_one_read_of_each_layer(caches, full, tmp_path):
    out = tmp_path / "pool"
    shm_before = set(Path("/dev/shm").glob("psm_*"))
    outcome = run_sweep(spec_for(caches["trim"], heads=["linear", "mean"], layers="1-2"), out, jobs=2, progress=False)
    assert outcome.folds_run == 2 * 2 * N_FOLDS and not outcome.failures
    assert outcome.timing.layers_read == 2 and outcome.timing.jobs == 2
    records = load_sweep(out).records
    assert {r.threads for r in records} == {1}
    # the linear head is deterministic, so it matches the in-process sweep exactly
    reference = {(r.layer, r.fold): r.ua for r in load_sweep(full[0]).records if r.head == "linear" and r.seed == 0}
    assert all(r.ua == reference[r.layer, r.fold] for r in records if r.head == "linear")
    assert set(Path("/dev/shm").glob("psm_*")) <= shm_before  # every shared layer was freed


def test_cli_names_the_fix_for_a_stray_grid_key(caches, tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(caches["trim"]), "--out", str(tmp_path / "x"),
                                       "--grid", "heads=4,8", "head_dim=4,16"])
    assert result.exit_code != 0 and "give each one its own --grid" in result.output


def test_cell_fold_paths_are_unique_per_cell_and_fold(tmp_path):
    cell_folds = {CellFold("c", layer, head, seed, fold)
                  for layer in (0, 1) for head in HEADS for seed in (0, 1) for fold in range(3)}
    assert len({t.path(tmp_path) for t in cell_folds}) == len(cell_folds)


def test_an_interrupt_stops_the_workers_at_once_and_the_rerun_finishes(caches, tmp_path, monkeypatch):
    """Ctrl-C while workers train layer 1 (simulated when layer 2 is read): workers are stopped,
    shared memory freed; a re-run does exactly the tasks that are missing."""
    from ser_cache.cache import Cache

    out, real_read, reads = tmp_path / "interrupted", Cache.read_layer, []

    def read_then_interrupt(self, state, dtype=None, frame_pool=None):
        reads.append(state)
        if len(reads) == 2:
            raise KeyboardInterrupt
        return real_read(self, state, dtype, frame_pool)

    shm_before = set(Path("/dev/shm").glob("psm_*"))
    spec = spec_for(caches["trim"], heads=["mean"], layers="1-2")
    monkeypatch.setattr(Cache, "read_layer", read_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, jobs=2, progress=False)
    monkeypatch.setattr(Cache, "read_layer", real_read)
    assert set(Path("/dev/shm").glob("psm_*")) <= shm_before
    done_before = len(cells_on_disk(out))
    assert done_before < 2 * N_FOLDS
    outcome = run_sweep(spec, out, jobs=1, progress=False)
    assert outcome.folds_done_before == done_before and outcome.folds_run == 2 * N_FOLDS - done_before
    assert len(load_sweep(out).records) == 2 * N_FOLDS


def test_multi_layer_cells_share_the_table_with_single_layer_cells(caches, full, tmp_path):
    out = tmp_path / "multi"
    spec = spec_for(caches["trim"], heads=["linear", "mean"], layers="1,2,1+2")
    outcome = run_sweep(spec, out, jobs=1, progress=False)
    assert outcome.folds_total == outcome.folds_run == 3 * 2 * N_FOLDS and not outcome.failures
    assert json.loads((out / SweepFolder.CONFIG).read_text())["config"]["layers"] == {"tiny-trim": [1, 2, [1, 2]]}
    assert outcome.timing.layers_read == 3  # each cell's states read once, the multi-layer cell in one array
    rows = read_csv(out / RESULTS_FILE)
    assert [r["layer"] for r in rows if r["head"] == "mean" and r["fold"] == "0"] == ["1", "2", "1+2"]
    for r in rows:
        weights = [float(w) for w in r["layer_weights"].split()]
        assert (len(weights) == 2) == (r["layer"] == "1+2" and r["head"] == "mean")
        assert not weights or sum(weights) == pytest.approx(1, abs=1e-3)
    # the single-layer cells are those of a sweep without the multi-layer cell
    reference = {(r.layer, r.fold): r.ua for r in load_sweep(full[0]).records if r.head == "linear" and r.seed == 0}
    records = load_sweep(out).records
    assert all(r.ua == reference[r.layer, r.fold] for r in records if r.head == "linear" and r.layer != [1, 2])
    assert (out / "cells" / "tiny-trim" / "layers_01+02" / "mean-seed0-fold0.json").is_file()
    summary = (out / SUMMARY_FILE).read_text(encoding="utf-8")
    assert "| 1+2 | " in summary and "- 1+2, mean: state 1 0." in summary
    assert (out / WEIGHTS_PLOT).stat().st_size > 10_000 and (out / LAYER_PLOT).stat().st_size > 10_000
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0 and str(out / WEIGHTS_PLOT) in result.output
    assert not (full[0] / WEIGHTS_PLOT).exists()  # single-layer sweeps: no weights to draw


def test_a_bad_layers_spec_names_the_fix(caches, tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(caches["trim"]), "--out", str(tmp_path / "x"),
                                       "--layers", "all,[1-2"])
    assert result.exit_code != 0 and "close the bracket, e.g. [2-5]" in result.output
    result = CliRunner().invoke(main, ["sweep", str(caches["trim"]), "--out", str(tmp_path / "x"),
                                       "--layers", "1+5"])
    assert result.exit_code != 0 and "layers [5] are not in the cache" in result.output


def test_refit_retrains_the_chosen_setting_on_training_and_validation(caches, tmp_path):
    spec = spec_for(caches["trim"], heads=["mean", "linear"], layers="2", train=replace(TRAIN, refit=True),
                    grid=parse_grid(["lr=1e-3,3e-3"]))
    run_sweep(spec, tmp_path / "refit", jobs=1, progress=False)
    records = load_sweep(tmp_path / "refit").records
    assert len(records) == 2 * N_FOLDS
    for r in records:
        assert r.tested == "refit" and r.refit["n_train"] == r.n_train + r.n_val
        assert r.selected["ua"] == max(g["val_ua"] for g in r.grid)  # chosen before the refit, on validation
    assert "refit" in (tmp_path / "refit" / SUMMARY_FILE).read_text()


def test_time_masking_is_a_grid_key_for_the_heads_trained_by_epochs():
    grid = parse_grid(["time_mask=0,0.2"])
    assert grid == {"time_mask": [0.0, 0.2]}
    assert head_settings("mean", grid, TrainConfig()) == [{"time_mask": 0.0}, {"time_mask": 0.2}]
    assert head_settings("linear", grid, TrainConfig()) == [{}]  # no frames to mask: statistics
    from ser_cache.config import ConfigError

    with pytest.raises(ConfigError, match="time_mask must be in"):
        head_settings("mean", parse_grid(["time_mask=0,1.5"]), TrainConfig())


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_workers_do_not_outlive_a_killed_sweep(caches, tmp_path, how):
    """A sweep killed outright (SIGKILL) or by a scheduler's SIGTERM leaves no worker training on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ser_cache.cli", "sweep", str(caches["trim"]), "--out", str(out), "--heads", "qkv",
           "--epochs", "50", "--folds", str(N_FOLDS), "--jobs", "2", "--compute-dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers, deadline = set(), time.time() + 60
    while time.time() < deadline and len(workers) < 2:  # the two training workers (and a resource tracker)
        workers = {c for c in _children(parent.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()
                   and "tracker_fd" in Path(f"/proc/{c}/cmdline").read_text()}
        time.sleep(0.2)
    assert len(workers) >= 2, "the sweep started no workers"
    time.sleep(1.0)  # the workers are training
    parent.send_signal(getattr(signal, how))
    output, _ = parent.communicate(timeout=60)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), f"workers outlived the sweep: {workers}"
    if how == "SIGTERM":
        assert parent.returncode == 1 and "interrupted; every finished fold is saved" in output


def test_a_sweep_from_before_a_setting_existed_resumes_only_as_it_was_made(caches, full, tmp_path):
    """Settings added later (patience, arithmetic, ...) count as the value that reproduces an
    older sweep (patience 0, float32), not as today's default."""
    old = tmp_path / "old"
    shutil.copytree(full[0], old)
    stored = json.loads((old / SweepFolder.CONFIG).read_text())
    for key in ("patience", "compute_dtype", "refit", "ensemble", "time_mask", "task", "targets", "loss"):
        stored["config"]["train"].pop(key)
    (old / SweepFolder.CONFIG).write_text(json.dumps(stored))
    for cell in cells_on_disk(old):  # cells written before tasks: classification (test_old_folders.py: more)
        record = json.loads(cell.read_text())
        record.pop("task")
        cell.write_text(json.dumps(record))
    spec = spec_for(caches["trim"], seeds=[0, 1])  # today's default patience
    with pytest.raises(SweepError, match=r"train\.patience: sweep has 0, asked for 10"):
        run_sweep(spec, old, jobs=1, progress=False)
    again = run_sweep(replace(spec, train=replace(TRAIN, patience=0)), old, jobs=1, progress=False)
    assert again.folds_run == 0 and again.folds_done_before == again.folds_total
    assert all(r.task == "classification" for r in load_sweep(old).records)  # cells from before tasks

    def table(path):
        return (path / SUMMARY_FILE).read_text().split("UA % by layer")[1].split("## Time")[0]

    assert table(old) == table(full[0])  # the same cells, reported as classification


def test_a_diverged_fold_is_named_and_fails_the_sweep(caches, tmp_path, monkeypatch):
    import ser_cache.sweeping as sweeping
    from ser_cache.fitting import NonFiniteLossError

    real = sweeping.run_cell_fold

    def diverge_on_fold_1(data, job, test_corpus=None):
        if job.cell_fold.fold == 1:
            raise NonFiniteLossError("the loss became nan at epoch 0")
        return real(data, job, test_corpus)

    monkeypatch.setattr(sweeping, "run_cell_fold", diverge_on_fold_1)
    result = CliRunner().invoke(main, ["sweep", str(caches["trim"]), "--out", str(tmp_path / "x"), "--layers", "1",
                                       "--heads", "linear", "--folds", "3", "--jobs", "1"])
    assert result.exit_code != 0
    assert f"FAILED {caches['trim'].name} layer 1 linear seed 0 fold 1: the loss became nan at epoch 0" in result.output
    assert "1 folds failed (listed above)" in result.output

"""Continuous targets (tasks.Regression): the loss is 1 - CCC, heads learn a target from the
layer that carries it and predict on the targets' own scale, and the CLI trains, exports and
predicts them. Synthetic data only; the numbers in asserts are margins around what a correct
implementation reaches, measured in development and named where they come from."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ser_cache.cli import main
from ser_cache.features import LayerData
from ser_cache.folds import kfold_folds
from ser_cache.heads import HEADS, Ensemble
from ser_cache.metrics import regression_scores
from ser_cache.results import RunFolder
from ser_cache.tasks import Regression, TaskError, ccc_loss, make_task
from ser_cache.config import TrainConfig
from ser_cache.fitting import fit_head
from ser_cache.training import run_folds

SMALL = dict(epochs=3, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")
REGRESS = dict(task="regression", targets=("arousal", "valence"))


# Tiny heads train fastest, and reproducibly, on one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numpy_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's CCC written out from numpy's population statistics (the reference)."""
    cov = np.cov(x, y, bias=True)[0, 1]
    return 2 * cov / (np.var(x) + np.var(y) + (np.mean(x) - np.mean(y)) ** 2)


def test_the_ccc_loss_is_one_minus_the_reference_ccc_mean_over_targets():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 2))
    pred = truth + rng.normal(scale=0.7, size=(50, 2))
    pred[:, 1] = 0.4 * pred[:, 1] + 1.5  # a scale and a shift: CCC drops where r would not
    reference = [numpy_ccc(truth[:, t], pred[:, t]) for t in range(2)]
    loss = ccc_loss(torch.from_numpy(pred), torch.from_numpy(truth)).item()
    assert loss == pytest.approx(1 - np.mean(reference), abs=1e-9)
    task = Regression(["arousal", "valence"])
    assert task.score(truth, pred) == pytest.approx(np.mean(reference), abs=1e-12)
    shifted = regression_scores(truth[:, 0], truth[:, 0] + 1.0)
    scaled = regression_scores(truth[:, 0], 2 * truth[:, 0])
    assert shifted["pearson"] == pytest.approx(1) and shifted["ccc"] == pytest.approx(numpy_ccc(truth[:, 0], truth[:, 0] + 1))
    assert scaled["pearson"] == pytest.approx(1) and scaled["ccc"] == pytest.approx(numpy_ccc(truth[:, 0], 2 * truth[:, 0]))
    assert shifted["ccc"] < 0.9 and scaled["ccc"] < 0.9
    assert ccc_loss(torch.from_numpy(truth), torch.from_numpy(truth)).item() == pytest.approx(0, abs=1e-12)


def target_data(n_speakers=6, per_speaker=20, dim=4, frames=(15, 30), seed=0) -> LayerData:
    """Two states per row, (3, 7): state 3 carries arousal (in its dimension 0) and valence
    (dimension 1) as a shift of every frame by the standardised value; state 7 is noise.
    Targets on their own scales: arousal about 4 +- 1.5, valence about -2 +- 0.5."""
    rng = np.random.default_rng(seed)
    n = n_speakers * per_speaker
    lengths = rng.integers(*frames, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = rng.normal(size=(lengths.sum(), 2 * dim)).astype(np.float32)
    z = rng.normal(size=(n, 2))
    for i in range(n):
        x[offsets[i] : offsets[i + 1], :2] += z[i]
    values = np.stack([4 + 1.5 * z[:, 0], -2 + 0.5 * z[:, 1]], axis=1)
    return LayerData(x, offsets, np.array([f"u{i:03d}" for i in range(n)]), np.array([f"c{i % 2}" for i in range(n)]),
                     np.array([f"s{i // per_speaker}" for i in range(n)]), np.array([""] * n), layer=(3, 7),
                     target_names=("arousal", "valence"), target_values=values)


def one_state(data: LayerData, j: int) -> LayerData:
    frames = np.ascontiguousarray(data.frames[:, j * data.dim : (j + 1) * data.dim])
    return LayerData(frames, data.offsets, data.ids, data.labels, data.speakers, data.groups, data.layers[j],
                     data.target_names, data.target_values)


@pytest.fixture(scope="module")
def data():
    return target_data()


@pytest.fixture(scope="module")
def folds(data):
    return kfold_folds(data.ids, data.labels, data.speakers, 3, seed=0)


@pytest.fixture(scope="module")
def layer_runs(data, folds):
    config = TrainConfig(**{**SMALL, "epochs": 10}, lr=5e-3, linear_c=(0.1, 1.0), **REGRESS)
    inputs = {"state 3": one_state(data, 0), "state 7": one_state(data, 1), "both": data}
    return {(name, head): run_folds(d, folds, head, config) for name, d in inputs.items() for head in ("mean", "linear")}


@pytest.mark.parametrize("head", ["mean", "linear"])
def test_a_regression_head_learns_the_target_of_the_layer_that_carries_it(layer_runs, head):
    ccc = {name: {t: layer_runs[name, head].metrics["targets"][t]["ccc"]["mean"] for t in ("arousal", "valence")}
           for name in ("state 3", "state 7", "both")}
    # In development (data seeds 0-2): state 3 and both states 0.89-0.98, the noise state
    # -0.09-0.10.
    for t in ("arousal", "valence"):
        assert ccc["state 3"][t] >= 0.8 and ccc["both"][t] >= 0.8, ccc
        assert abs(ccc["state 7"][t]) <= 0.25, ccc
    r = layer_runs["state 3", head]
    assert set(r.folds[0].selected) == {"epoch" if head == "mean" else "C", "ccc"}  # chosen on validation CCC
    for f in r.folds:  # predictions on the targets' own scale, not standardised
        preds, truth = f.probs, np.asarray(f.true_values)
        assert preds.shape == truth.shape == (len(f.test_ids), 2)
        assert abs(preds[:, 0].mean() - 4) < 0.8 and abs(preds[:, 1].mean() + 2) < 0.3
        assert f.metrics["targets"]["arousal"]["mae"] < 1.0


def test_the_noise_layer_gets_the_lower_weight_in_a_multi_layer_regression(layer_runs):
    weights = np.array([f.layer_weights for f in layer_runs["both", "mean"].folds])
    assert (weights[:, 0] > weights[:, 1]).all(), weights


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_regresses_and_an_ensemble_averages_values(data, folds, head):
    d = one_state(data, 0)
    r = run_folds(d, folds, head, TrainConfig(**SMALL, linear_c=(1.0,), ensemble=2, **REGRESS))
    f = r.folds[0]
    assert np.isfinite(f.probs).all() and f.probs.shape == (len(f.test_ids), 2)
    model = r.models[0]
    assert isinstance(model, Ensemble) and model.regression
    x, mask = d.batch(folds.split(0)[2])
    with torch.no_grad():
        members = [m(x, mask).double().numpy() for m in model.members]
    np.testing.assert_allclose(f.probs, np.mean(members, axis=0), rtol=1e-5, atol=1e-5)
    assert "CCC arousal" in r.table() and "Pearson r" in r.table()


def test_mse_loss_is_an_option(data, folds):
    d = one_state(data, 0)
    train, val, _ = folds.split(0)
    task, y = make_task(d, TrainConfig(**REGRESS, loss="mse"))
    fit = fit_head("mean", d, y, train, val, TrainConfig(**{**SMALL, "epochs": 6}, lr=5e-3, **REGRESS, loss="mse"),
                   task, 0, torch.device("cpu"))
    assert fit.selected["ccc"] > 0.6 and all("select_ccc" in h for h in fit.history)


def test_task_errors_name_the_fix(data):
    with pytest.raises(TaskError, match=r"target 'dominance' not found; this cache's targets = \['arousal', 'valence'\]"):
        make_task(data, TrainConfig(task="regression", targets=("dominance",)))
    plain = LayerData(data.frames, data.offsets, data.ids, data.labels, data.speakers, data.groups, data.layer)
    with pytest.raises(TaskError, match="carry no numeric targets"):
        make_task(plain, TrainConfig(task="regression"))
    holes = data.target_values.copy()
    holes[[3, 5], 1] = np.nan
    holed = LayerData(data.frames, data.offsets, data.ids, data.labels, data.speakers, data.groups, data.layer,
                      data.target_names, holes)
    with pytest.raises(TaskError, match=r"2 of 120 utterances lack a value of \['valence'\]"):
        make_task(holed, TrainConfig(task="regression"))
    task, y = make_task(data, TrainConfig(task="regression"))  # no targets named: every one
    assert task.targets == ["arousal", "valence"] and y.shape == (120, 2)


# --- the command line, on a csv corpus with targets --------------------------------------------


@pytest.fixture(scope="module")
def csv_cache(tmp_path_factory, tiny_checkpoint):
    """A csv corpus (path,label,speaker,arousal,valence) extracted by `ser-cache extract`."""
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("regression-cli")
    records = write_corpus(root / "corpus", n_speakers=4, per_speaker=4)
    rng = np.random.default_rng(0)
    with open(root / "corpus" / "utterances.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "speaker", "arousal", "valence"])
        for r in records:
            w.writerow([r.path, r.label, r.speaker, f"{rng.uniform(1, 7):.2f}", f"{rng.uniform(1, 7):.2f}"])
    r = CliRunner().invoke(main, ["extract", str(root / "corpus" / "utterances.csv"), "--corpus", "csv", "--model",
                                  str(tiny_checkpoint), "--out", str(root / "cache"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root, records


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("head", ["linear", "qkv"])
def test_cli_trains_exports_and_predicts_targets(csv_cache, tiny_checkpoint, tmp_path, head):
    root, records = csv_cache
    out = tmp_path / "run"
    r = invoke("train", root / "cache", "--layer", "1-2", "--head", head, "--out", out, "--folds", 2, "--epochs", 2,
               "--device", "cpu", "--targets", "arousal,valence")
    assert r.exit_code == 0, r.output
    assert "CCC arousal" in r.output and "valence   CCC" in r.output and "mean CCC" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["task"] == "regression" and config["config"]["targets"] == ["arousal", "valence"]
    assert config["labels"] == ["arousal", "valence"] and config["head_kwargs"]["regression"] is True
    with open(out / RunFolder.PREDICTIONS) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and {"true_arousal", "pred_arousal", "true_valence", "pred_valence"} <= set(rows[0])
    truth = {rec.id: dict(rec.targets) for rec in _cache_records(root)}
    assert all(float(row["true_arousal"]) == pytest.approx(truth[row["id"]]["arousal"]) for row in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["targets"]) == {"arousal", "valence"} and "ccc" in metrics

    r = invoke("export", out, "--out", tmp_path / "model.pt")
    assert r.exit_code == 0, r.output
    assert "targets: arousal, valence" in r.output
    r = invoke("predict", tmp_path / "model.pt", records[0].path, records[1].path, "--model", tiny_checkpoint, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    values = [f["values"] for f in result]
    assert all(set(v) == {"arousal", "valence"} and "probabilities" not in f for v, f in zip(values, result))
    assert all(0 < v["arousal"] < 8 for v in values)  # the targets' scale (1-7), not standardised
    table = invoke("predict", tmp_path / "model.pt", records[0].path, "--model", tiny_checkpoint)
    assert table.exit_code == 0 and "arousal" in table.stdout and "emotion" not in table.stdout


def _cache_records(root):
    from ser_cache.cache import open_cache

    return open_cache(root / "cache").records()


def test_cli_regression_errors(csv_cache, tmp_path):
    root, _ = csv_cache
    base = ["train", root / "cache", "--layer", 1, "--head", "mean", "--folds", 2, "--epochs", 1, "--device", "cpu"]
    r = invoke(*base, "--out", tmp_path / "a", "--targets", "arousal,dominance")
    assert r.exit_code == 1 and "target 'dominance' not found; this cache's targets = ['arousal', 'valence']" in r.output
    r = invoke(*base, "--out", tmp_path / "b", "--targets", "arousal", "--task", "classification")
    assert r.exit_code == 2 and "--task regression" in r.output
    r = invoke(*base, "--out", tmp_path / "c", "--task", "regression")  # every target of the cache
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["config"]["targets"] == ["arousal", "valence"]


def test_a_cache_without_targets_is_refused_for_regression(tmp_path, tiny_checkpoint):
    from conftest import write_corpus

    from ser_cache.encoder import load_encoder
    from ser_cache.extract import ExtractOptions, extract

    records = write_corpus(tmp_path / "corpus", n_speakers=4, per_speaker=2)
    extract(records, tmp_path / "cache", "csv", load_encoder(str(tiny_checkpoint)), ExtractOptions(progress=False))
    r = invoke("train", tmp_path / "cache", "--layer", 1, "--head", "mean", "--out", tmp_path / "run", "--folds", 2,
               "--task", "regression")
    assert r.exit_code == 1 and "carry no numeric targets" in r.output


# --- runs made before tasks ----------------------------------------------------------------------


def test_a_run_folder_without_task_settings_resumes_and_exports_as_classification(csv_cache, tmp_path):
    """config.json written by earlier versions has no task, targets or loss: it is a
    classification run, resumed as one and exported as one."""
    from ser_cache.exporting import export_run
    from ser_cache.predict import load_exported
    from ser_cache.training import train_from_cache

    root, _ = csv_cache
    out = tmp_path / "run"
    first = train_from_cache(root / "cache", 1, "mean", out, TrainConfig(**SMALL), protocol="kfold", n_folds=2)
    path = out / "config.json"
    config = json.loads(path.read_text())
    for key in ("task", "targets", "loss"):
        del config["config"][key]
    path.write_text(json.dumps(config))
    (out / "metrics.json").unlink()
    (out / "fold_1.json").unlink()
    again = train_from_cache(root / "cache", 1, "mean", out, TrainConfig(**SMALL), protocol="kfold", n_folds=2)
    assert again.metrics["ua"] == first.metrics["ua"]  # resumed: fold 0 kept, fold 1 the same again
    export_run(out, tmp_path / "m.pt")
    exported = load_exported(tmp_path / "m.pt")
    assert exported.task == "classification" and exported.labels == first.labels


# --- sweeps over targets ---------------------------------------------------------------------------


def test_a_regression_sweep_draws_one_ccc_curve_per_target(csv_cache, tmp_path):
    from ser_cache.report import CCC_PLOT, CONFUSION_PLOT, RESULTS_FILE, SUMMARY_FILE
    from ser_cache.results import SweepFolder

    root, _ = csv_cache
    out = tmp_path / "sweep"
    r = invoke("sweep", root / "cache", "--out", out, "--task", "regression", "--targets", "arousal,valence",
               "--heads", "linear,mean", "--layers", "all,1+2", "--epochs", 2, "--folds", 2, "--jobs", 2,
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (out / CCC_PLOT).is_file() and not (out / CONFUSION_PLOT).exists()
    with open(out / RESULTS_FILE) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 * 2  # (states 0, 1, 2 and 1+2) x heads x folds
    assert {"ccc", "val_ccc", "ccc_arousal", "pearson_valence", "mae_valence"} <= set(rows[0])
    for row in rows:  # the mean CCC is the mean of the targets'
        assert float(row["ccc"]) == pytest.approx((float(row["ccc_arousal"]) + float(row["ccc_valence"])) / 2, abs=1e-5)
    summary = (out / SUMMARY_FILE).read_text()
    assert "CCC of arousal by layer" in summary and "CCC of valence by layer" in summary
    assert summary.count("†") >= 3 and "Best on validation †" in summary  # chosen on validation CCC
    cells = SweepFolder(out).cells()
    assert all(c.task == "regression" and c.labels == ["arousal", "valence"] and c.ua is None for c in cells)
    assert all("val_ccc" in trial for c in cells for trial in c.grid)
    stored = json.loads((out / SweepFolder.CONFIG).read_text())["config"]["train"]
    assert stored["task"] == "regression" and stored["targets"] == ["arousal", "valence"]
    r = invoke("compare", f"{out}:0:linear", f"{out}:1+2:mean", "--metric", "ccc_arousal")  # cells pair by CCC
    assert r.exit_code == 0 and "ccc_arousal as CCC" in r.output, r.output
    r = invoke("sweep", root / "cache", "--out", tmp_path / "other", "--targets", "dominance", "--heads", "mean",
               "--folds", 2)
    assert r.exit_code == 1 and "target 'dominance' not found" in r.output


def test_settings_that_mean_nothing_for_regression_are_refused():
    from ser_cache.config import ConfigError

    with pytest.raises(ConfigError, match="drop class_weights"):
        TrainConfig(task="regression", class_weights=True)
    with pytest.raises(ConfigError, match="add --task regression"):
        TrainConfig(targets=("arousal",))
    with pytest.raises(ConfigError, match="loss must be one of"):
        TrainConfig(task="regression", loss="huber")


def test_compare_pairs_regression_results_by_ccc(data, folds, tmp_path):
    """Runs of two layers on the same folds pair by mean CCC or one target's; UA is refused by name."""
    from ser_cache.compare import CompareError, compare, table

    config = TrainConfig(**SMALL, linear_c=(1.0,), **REGRESS)
    run_folds(one_state(data, 0), folds, "linear", config, tmp_path / "signal")
    run_folds(one_state(data, 1), folds, "linear", config, tmp_path / "noise")
    row, = compare([str(tmp_path / "noise"), str(tmp_path / "signal")], "ccc_valence")
    assert row["better"] == 3 and row["diff_mean"] > 0.5  # the layer that carries the target, fold by fold
    assert "ccc_valence as CCC" in table([row])
    assert compare([str(tmp_path / "noise"), str(tmp_path / "signal")], "ccc")[0]["better"] == 3
    with pytest.raises(CompareError, match="it has ccc, ccc_arousal, ccc_valence"):
        compare([str(tmp_path / "noise"), str(tmp_path / "signal")], "ua")

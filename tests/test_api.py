"""The Python interface: its names stay, each call gives what its command gives, nothing is
written without an output, and a wrong setting is refused by name."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ser_cache
from ser_cache.cli import main
from ser_cache.errors import OptionError
from ser_cache.extract import ExtractOptions, extract
from ser_cache.encoder import load_encoder

from conftest import write_corpus

API = ["open_cache", "train", "sweep", "make_folds", "export", "load_predictor", "TrainConfig", "__version__"]
SMALL = dict(epochs=2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("api")
    records = write_corpus(root / "corpus", n_speakers=6, per_speaker=3, seconds=(0.3, 0.8))
    extract(records, root / "cache", "csv", load_encoder(str(tiny_checkpoint)), ExtractOptions(progress=False))
    return root / "cache", records


def test_no_module_of_the_package_hides_a_name_of_the_interface():
    # importing ser_cache.X sets the attribute X of the package: a module named like a
    # function of the interface would replace it once imported
    modules = {p.stem for p in Path(ser_cache.__file__).parent.glob("*.py")}
    assert modules.isdisjoint(API), sorted(modules & set(API))


def test_the_interface_keeps_its_names_and_keyword_only_options():
    assert ser_cache.__all__ == API
    for name in API[:-2]:
        assert callable(getattr(ser_cache, name)), name
    for name in ("train", "sweep", "make_folds", "export", "load_predictor"):
        params = list(inspect.signature(getattr(ser_cache, name)).parameters.values())
        assert [p.kind for p in params[1:]] and all(
            p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:]), f"{name}: options are keyword-only"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ser_cache.nothing  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = "import sys, ser_cache; assert 'torch' not in sys.modules; ser_cache.open_cache; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_train_gives_what_the_command_gives_and_writes_nothing_without_out(cache, tmp_path, monkeypatch):
    path, _ = cache
    monkeypatch.chdir(tmp_path)
    settings = {k: v for k, v in SMALL.items() if k != "d_model"}  # the command has no --d-model
    result = ser_cache.train(path, layer=2, head="mean", n_folds=3, **settings)
    assert list(tmp_path.iterdir()) == []
    run = tmp_path / "run"
    args = ["train", str(path), "--layer", "2", "--head", "mean", "--folds", "3", "--epochs", "2",
            "--heads", "2", "--head-dim", "4", "--device", "cpu", "--compute-dtype", "float32", "--out", str(run)]
    done = CliRunner().invoke(main, args, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    written = json.loads((run / "metrics.json").read_text())
    assert result.metrics["ua"]["folds"] == pytest.approx(written["ua"]["folds"])
    assert len(result.models) == 3


def test_folds_sweep_export_and_predict(cache, tmp_path, tiny_checkpoint, one_thread_per_job):
    path, records = cache
    data = ser_cache.open_cache(path).read_layer(1)
    folds = ser_cache.make_folds(data, n_folds=3)
    train, val, test = folds.split(0)
    assert set(data.speakers[test]).isdisjoint(data.speakers[np.concatenate([train, val])])
    outcome = ser_cache.sweep(path, out=tmp_path / "sweep", layers="1", heads=["linear"], n_folds=3, jobs=1,
                              report=False, **SMALL)
    assert outcome.folds_total == 3 and not outcome.failures
    ser_cache.train(path, layer=1, head="linear", n_folds=3, out=tmp_path / "run", **SMALL)
    ser_cache.export(tmp_path / "run", out=tmp_path / "model.pt", fold=0)
    predictor = ser_cache.load_predictor(tmp_path / "model.pt", model=str(tiny_checkpoint))
    prediction = predictor.predict_file(records[0].path)
    assert prediction.error == "" and prediction.probs.sum() == pytest.approx(1.0)
    assert sorted(predictor.labels) == sorted(set(data.labels))


def test_a_setting_it_does_not_have_is_refused_with_the_list(cache):
    path, _ = cache
    with pytest.raises(OptionError, match="unknown setting.s. epoch: the settings are TrainConfig's fields, .*epochs"):
        ser_cache.train(path, layer=1, head="mean", epoch=3)
